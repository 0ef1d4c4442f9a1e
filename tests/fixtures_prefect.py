"""A real Prefect server for the flow and deployment tests: `prefect server start` on a free loopback
port with its own PREFECT_HOME (SQLite), started once per session. In-process flows talk to it
through PREFECT_API_URL; subprocesses (prefect deploy, workers) get `prefect_server.env`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Must be in the environment before Prefect configures logging (at import).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "loraflow")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

ROOT = Path(__file__).resolve().parents[1]
PREFECT_BIN = str(Path(sys.executable).with_name("prefect"))
STARTUP_TIMEOUT_S = 180  # ~20 s on an idle 2-core machine; much more while other tests train


@dataclass
class PrefectServer:
    url: str
    api_url: str
    home: Path
    env: dict[str, str] = field(repr=False)
    proc: subprocess.Popen = field(repr=False)
    log_path: Path = field(repr=False)

    def cli(self, *args: str, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        return subprocess.run([PREFECT_BIN, *args], env=self.env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"{url}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_LOGGING_EXTRA_LOGGERS": "loraflow", "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
           "PYTHONPATH": str(ROOT)}
    log_path = home / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([PREFECT_BIN, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
            pytest.fail(f"prefect server did not start: {log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    server = PrefectServer(url, f"{url}/api", home, env, proc, log_path)
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server
    finally:
        try:  # ship the last run logs before the server goes
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def flow_home(tmp_path, monkeypatch) -> Path:
    """A fresh LORAFLOW_HOME for one flow test: its run folders (local checkpoints, staged
    adapters) start empty, like a new worker's disk."""
    home = tmp_path / "loraflow-home"
    monkeypatch.setenv("LORAFLOW_HOME", str(home))
    return home


def tiny_flow_settings(s3_server, bucket: str, model_dir: Path, data_dir: Path, *, name: str = "imdb-tiny",
                       **training):
    """Settings for a fast retrain: 2-layer GPT-2, 64-token rows, a few steps, checkpoints every 2."""
    from fixtures_s3 import s3_settings_for

    return s3_settings_for(
        s3_server, bucket,
        model={"name_or_path": str(model_dir)},
        data={"source": str(data_dir), "max_length": 64, "max_train_samples": 48, "max_eval_samples": 8},
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"]},
        training={"max_steps": 6, "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 4,
                  "gradient_accumulation_steps": 1, "warmup_steps": 0, "learning_rate": 3e-3,
                  "save_total_limit": None, **training},
        registry={"adapter_name": name},
    )


def wait_final_state(flow_run_id, timeout: float = 420):
    """The flow run once its state is final, or as it is after `timeout` seconds."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(flow_run_id)

    deadline = time.monotonic() + timeout
    while True:
        run = asyncio.run(read())
        if run.state.is_final() or time.monotonic() > deadline:
            return run
        time.sleep(1)
