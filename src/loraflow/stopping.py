"""A stop request (Ctrl-C, SIGTERM) ends an in-process run within seconds, at any stage, and says
where it stopped.

Two things stood in the way. Prefect's ephemeral API server is a child in the terminal's process
group, so Ctrl-C killed it together with the run; the run then spent minutes retrying to report
its crash to a server that was gone, and kept training meanwhile (measured: still running 60 s
after SIGINT). And SIGTERM's default action ends Python without unwinding, so nothing recorded the
run's end and the run's concurrency slot stayed held until its lease ran out.

So an in-process run gets an API server of its own in a session of its own (`prefect_api`: the
terminal's signals do not reach it; it dies with this process, PR_SET_PDEATHSIG, and is stopped at
exit), SIGTERM unwinds like Ctrl-C (`stop_on_signals`), and the stages say where they are (`at`),
so the one line at the end names the stage and step. Prefect marks the interrupted run Crashed,
the adapter's concurrency slot is released on the way out, and stored checkpoints stay, for
`loraflow train --resume` or a resubmission with the same run key.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

from loraflow.errors import LoraflowError

_stage = ""
STOP_GRACE_S = 1.5


class RunStopped(LoraflowError):
    exit_code = 130


def at(stage: str) -> None:
    """Record the stage a run is in (`training, step 12/400`) for the line said on a stop."""
    global _stage
    _stage = stage


def stage() -> str:
    return _stage


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Have the kernel send this process `sig` when the thread that started it dies, even by
    SIGKILL (PR_SET_PDEATHSIG): run in the child, as a preexec_fn or first thing in its main.
    `parent`: the pid that must still be the parent once the tie is made; if it is not, the parent
    died first, nothing would ever fire, and the child is sent `sig` at once."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
        if parent is not None and os.getppid() != parent:
            os.kill(os.getpid(), sig)


def _session_server_class():
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class SessionServer(SubprocessASGIServer):
        """Prefect's ephemeral API server (its command, health wait and stop), started in a session
        of its own so that Ctrl-C in the terminal reaches the run but not the API it reports to."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            import prefect

            server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
            return subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                 "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                 "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, **server_env,
                     **get_current_settings().to_environment_variables(exclude_unset=True)},
                start_new_session=True, preexec_fn=die_with_parent,
            )

        def stop(self) -> None:
            # uvicorn's graceful shutdown (Prefect's services, open keep-alive connections) takes
            # ~5 s; everything this process had to say was drained before (prefect_api), and SQLite
            # keeps its database consistent through a kill.
            if self.server_process is not None and self.server_process.poll() is None:
                self.server_process.terminate()
                try:
                    self.server_process.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    self.server_process.kill()
                    self.server_process.wait()
            super().stop()

    return SessionServer


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """The Prefect API for an in-process flow run: the configured one (PREFECT_API_URL), else an
    ephemeral server of this process's own (see the module docstring)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, \
        temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    server = _session_server_class()()
    server.start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield
            finally:
                _drain_prefect_services()
    finally:
        server.stop()


def _drain_prefect_services() -> None:
    """Send what Prefect's background services hold (log lines, events, slot leases) while the API
    is still there, as prefect_test_harness does: drained at exit instead, they would retry against
    a stopped server and hold the process."""
    from prefect.concurrency.services import ConcurrencySlotAcquisitionWithLeaseService
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker, ConcurrencySlotAcquisitionWithLeaseService):
        with contextlib.suppress(Exception):  # best effort: a service that never started has nothing to send
            service.drain_all(timeout=5)


_requested = ""


def requested() -> str:
    """The signal that asked this process to stop ("" while none has): what fails after it (the
    local object store, in the terminal's process group, dies with the same Ctrl-C) is the stop's
    consequence, not an outage to retry (loraflow.storage's errors say so)."""
    return _requested


@contextlib.contextmanager
def stop_on_signals(what: str, kept: str = "the run is marked Crashed, checkpoints it stored are kept") -> Iterator[None]:
    """SIGINT and SIGTERM unwind as Ctrl-C does; either ends in RunStopped naming the stage reached and `kept`."""
    def stop(signum, frame):
        global _requested
        _requested = signal.Signals(signum).name
        raise KeyboardInterrupt(_requested)

    global _requested
    _requested = ""
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    at("")
    try:
        yield
    except KeyboardInterrupt as exc:
        name = str(exc) or "SIGINT"
        where = f" during {_stage}" if _stage else ""
        raise RunStopped(f"{what} stopped by {name}{where}; {kept}") from None
    except Exception:
        if not _requested:
            raise
        # Whatever failed after the request failed because of it (see requested()).
        where = f" during {_stage}" if _stage else ""
        raise RunStopped(f"{what} stopped by {_requested}{where}; {kept}") from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
