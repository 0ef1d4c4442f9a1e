"""A stop request ends an in-process run within seconds, says where it stopped, and leaves no
process behind: real `loraflow run --local` processes (their own ephemeral Prefect API, the local
object store), real signals sent to the terminal's process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from fixtures_prefect import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_request_ends_a_local_run_within_seconds_and_leaves_no_process(
        signum, tiny_model_dir, imdb_data_dir, tmp_path):
    import psutil

    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"source": str(imdb_data_dir), "max_length": 64, "max_eval_samples": 8},
        "lora": {"r": 4, "target_modules": ["c_attn", "c_proj"]},
        "training": {"max_steps": 2000, "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 4,
                     "gradient_accumulation_steps": 1, "warmup_steps": 0},
        "registry": {"adapter_name": "stopped"}, "storage": {"endpoint_url": "local"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "LORAFLOW_", "AWS_"))}
    env.update(LORAFLOW_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", PYTHONUNBUFFERED="1")
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        # A session of its own: its process group is the one a terminal's Ctrl-C would reach.
        proc = subprocess.Popen([sys.executable, "-m", "loraflow.cli", "run", "--local", "--config", str(config)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "step 3/2000" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 2  # the ephemeral Prefect API and the local store's rclone, at least
        sent = time.monotonic()
        os.killpg(proc.pid, signum)
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log_path.read_text()
    last = out.strip().splitlines()[-1]
    assert code == 130, out[-3000:]
    assert last.startswith(f"error: loraflow run stopped by {signum.name} during training, after step "), last
    assert "Finished in state Crashed" in out  # the run's end reached its API before it went
    assert took < 30, f"{took:.1f} s to stop"
    time.sleep(2)  # the reaper
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline()[:4] for p in alive]
    checkpoints = list((tmp_path / "home" / "s3").rglob("checkpoint-*")) + \
        list((tmp_path / "home" / "runs").rglob("checkpoint-*"))
    assert checkpoints  # what was saved before the stop is kept


def test_what_fails_after_a_stop_request_is_the_stop():
    """The local store dies with the terminal's Ctrl-C: a storage failure after the request ends the
    run as stopped (exit 130, the stage named), is not retried, and a later run starts unstopped."""
    import tempfile
    from pathlib import Path
    from types import SimpleNamespace

    from loraflow import stopping
    from loraflow.errors import StorageError
    from loraflow.storage.store import Store

    sys.path.insert(0, str(ROOT))
    from tasks._retry import retry_transient

    store = Store.__new__(Store)
    with pytest.raises(stopping.RunStopped, match="loraflow run stopped by SIGTERM during training, step 3; ") as stop:
        with stopping.stop_on_signals("loraflow run"):
            stopping.at("training, step 3")
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except KeyboardInterrupt:
                pass  # swallowed on the way, as a thread pool's wait may
            assert stopping.requested() == "SIGTERM"
            assert not retry_transient(None, None, SimpleNamespace(data=StorageError("upload: unreachable")))
            with pytest.raises(KeyboardInterrupt), store.errors("upload checkpoint-6/README.md"):
                raise StorageError("upload checkpoint-6/README.md: cannot reach the storage endpoint")
            raise StorageError("list s3://loraflow/checkpoints/: cannot reach the storage endpoint")
    assert stop.value.exit_code == 130
    with stopping.stop_on_signals("loraflow run"):
        assert stopping.requested() == ""
        assert retry_transient(None, None, SimpleNamespace(data=StorageError("upload: unreachable")))
        with pytest.raises(StorageError), store.errors("x"):
            raise OSError(28, "No space left on device", str(Path(tempfile.gettempdir()) / "x"))
