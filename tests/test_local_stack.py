"""`make up` / `make down` with real processes: deployments/up.sh on free ports with its own
LORAFLOW_HOME and run dir (rclone S3, Prefect server, two workers, the deployments, the demo
assets), then deployments/down.sh.

Nothing runs that nobody started (the schedules are applied paused, so the scheduler makes no
run at all), up.sh ends with the deployments and a command that works as printed, the env file is
owner-only and names this LORAFLOW_HOME, and down.sh stops everything (`make serve`'s service too)
with exit 0 and leaves no process and no listening port. The demo training itself (tens of minutes
on 2 cores) is not run here: tests/test_deployments.py runs retrains on real workers, and the
closing note of the change that added this test reports a full `make up` -> demo run -> `make down`
by hand."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_assets import make_offline_home

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
QUIET_S = 30  # how long the stack is watched for a run nobody started


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _family(pid: int) -> set[int]:
    import psutil

    try:
        proc = psutil.Process(pid)
        return {pid, *(c.pid for c in proc.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def _listening(ports: set[int]) -> list:
    import psutil

    return [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.laddr.port in ports]


@pytest.fixture
def stack_env(tmp_path, asset_wheels):
    """A fresh shell's environment: no LORAFLOW_*, AWS_* or PREFECT_* of the test session."""
    home = make_offline_home(tmp_path / "home", asset_wheels)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAFLOW_", "AWS_", "PREFECT_"))}
    env.update({"LORAFLOW_HOME": str(home), "LORAFLOW_RUN_DIR": str(tmp_path / "run"), "VENV": str(VENV),
                "PREFECT_PORT": str(_free_port()), "S3_PORT": str(_free_port()), "PIP_NO_INDEX": "1"})
    return env


def _run(cmd, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_up_runs_nothing_by_itself_prints_what_to_do_and_down_leaves_nothing(stack_env, tmp_path):
    run_dir = Path(stack_env["LORAFLOW_RUN_DIR"])
    ports = {int(stack_env["PREFECT_PORT"]), int(stack_env["S3_PORT"])}
    started = time.monotonic()
    up = _run(["deployments/up.sh"], stack_env)
    pids = {}
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        up_s = time.monotonic() - started
        out = up.stdout
        print(f"up.sh took {up_s:.0f} s\n{out}")

        # It ends with the UI, the four deployments, the command that starts a run, and how to stop.
        assert f"up: Prefect UI  http://127.0.0.1:{stack_env['PREFECT_PORT']}" in out
        lines = {name: next(line for line in out.splitlines() if line.strip().startswith(name + " "))
                 for name in ("retrain/retrain-demo", "retrain/retrain-imdb", "retrain/retrain-on-new-data",
                              "train-adapter/train-adapter")}
        assert "PAUSED" in lines["retrain/retrain-imdb"] and "PAUSED" in lines["retrain/retrain-on-new-data"]
        assert "ACTIVE" not in out and "runs when you start it" in lines["retrain/retrain-demo"]
        env_file = run_dir / "env"
        command = f"source {env_file} && loraflow run --deployment retrain/retrain-demo"
        assert out.rstrip().splitlines()[-2].strip() == command
        assert out.rstrip().splitlines()[-1] == f"up: stop it all with: LORAFLOW_RUN_DIR={run_dir} make -C {ROOT} down"

        # The demo assets were built here (GGUF conversion included): a log file gets no progress bars.
        assert "\r" not in (run_dir / "demo-assets.log").read_text()

        # The env file: owner-only, this store's home, and it works in a fresh shell.
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        text = env_file.read_text()
        assert f"export LORAFLOW_HOME={stack_env['LORAFLOW_HOME']}\n" in text and "AWS_SECRET_ACCESS_KEY=" in text
        fresh = {k: v for k, v in stack_env.items() if not k.startswith(("LORAFLOW_", "PREFECT_"))}
        shown = _run(["bash", "-c", f"source {env_file} && command -v loraflow && prefect deployment ls"], fresh,
                     timeout=180)
        assert shown.returncode == 0, shown.stderr[-2000:]
        assert shown.stdout.splitlines()[0] == str(VENV / "bin" / "loraflow")
        assert "retrain-demo" in shown.stdout and "train-adapter" in shown.stdout

        for name in ("s3", "prefect-server", "worker-cpu", "worker-gpu"):
            pids[name] = int((run_dir / f"{name}.pid").read_text())
        # Nothing runs that nobody started: with active schedules the scheduler would have made
        # runs (Scheduled, then started by the workers) within seconds of the deploy.
        lister = tmp_path / "list_runs.py"
        lister.write_text(_LIST_RUNS)
        deadline = time.monotonic() + QUIET_S
        while True:
            runs = _run(["bash", "-c", f"source {env_file} && python {lister}"], fresh, timeout=120)
            assert runs.returncode == 0, runs.stderr[-2000:]
            assert json.loads(runs.stdout.splitlines()[-1]) == [], runs.stdout
            if time.monotonic() > deadline:
                break
            time.sleep(5)

        # A printed schedule command works as printed (and the schedule is paused again after).
        resume = next(line.strip() for line in out.splitlines() if "schedule resume retrain/retrain-imdb" in line)
        switched = _run(["bash", "-c", f"source {env_file} && {resume} && "
                                       f"{resume.replace(' resume ', ' pause ')}"], fresh, timeout=180)
        assert switched.returncode == 0, switched.stdout[-2000:] + switched.stderr[-2000:]

        # `make serve`'s service, as the Makefile records it (a stand-in: serving needs a champion).
        serve = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "loraflow", "serve"],
                                 start_new_session=True)
        (run_dir / "serve.pid").write_text(f"{serve.pid}\n")
        pids["serve"] = serve.pid
        family = set().union(*(_family(p) for p in pids.values()))
        assert _listening(ports), "the stack listens on its ports while it is up"
    finally:
        t0 = time.monotonic()
        down = _run(["deployments/down.sh"], stack_env, timeout=300)
        down_s = time.monotonic() - t0
    print(f"down.sh took {down_s:.1f} s\n{down.stdout}{down.stderr}")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "killed" not in down.stdout
    order = [re.search(r"down: (\S+) stopped", line).group(1) for line in down.stdout.splitlines()
             if re.search(r"down: (\S+) stopped", line)]
    assert order == ["serve", "worker-cpu", "worker-gpu", "prefect-server", "s3"], down.stdout
    serve.wait(10)
    import psutil

    assert not [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not _listening(ports)
    assert not list(run_dir.glob("*.pid"))

    # Nothing left to stop is not a failure either.
    again = _run(["deployments/down.sh"], stack_env, timeout=60)
    assert again.returncode == 0 and "nothing to stop" in again.stdout


# Every flow run on the server, as JSON: [] when nothing was ever scheduled or started.
_LIST_RUNS = """import asyncio, json
from prefect.client.orchestration import get_client


async def main():
    async with get_client() as client:
        return [(r.name, r.state.name) for r in await client.read_flow_runs()]

print(json.dumps(asyncio.run(main())))
"""


@pytest.mark.parametrize("stale", ["gone", "reused"])
def test_down_removes_a_stale_pid_file_without_signalling_anyone(tmp_path, stale):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if stale == "gone":
        proc = subprocess.Popen(["true"])
        proc.wait()
        pid = proc.pid
    else:  # the pid now belongs to some other program: not ours to stop
        other = subprocess.Popen(["sleep", "60"])
        pid = other.pid
    (run_dir / "worker-cpu.pid").write_text(f"{pid}\n")
    down = _run(["deployments/down.sh"], {**os.environ, "LORAFLOW_RUN_DIR": str(run_dir)}, timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "down: worker-cpu was not running" in down.stdout and not (run_dir / "worker-cpu.pid").exists()
    if stale == "reused":
        assert other.poll() is None
        other.send_signal(signal.SIGTERM)
        other.wait()
