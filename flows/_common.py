"""What both flows share: the seed defaults shown in the UI form, the library's `loraflow` log lines
in Prefect's UI, and watching a deployment run whose worker may die. What a run follows is its
spec (loraflow.run_spec)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from loraflow.settings import Settings


def seed_settings() -> Settings:
    """The seed recipe's defaults, the flow parameter's default: the Prefect UI renders them in the
    run form. A plain `Settings` reads no environment, so nothing machine-local (an endpoint, a
    bucket) is baked into a deployment's parameter schema."""
    return Settings()


def run_logger() -> Any:
    """Prefect's run logger for the code running now. In a flow body this is get_run_logger(), except
    for a flow called inside a task (a fleet's branch runs `retrain` so): Prefect 3.9's
    get_run_logger then returns the enclosing task run's logger, and the subflow's lines would land
    in its parent's logs. get_run_context() tells the two apart (PrefectHQ/prefect#19450)."""
    from prefect import get_run_logger
    from prefect.context import FlowRunContext, TaskRunContext, get_run_context
    from prefect.logging.loggers import flow_run_logger

    context = get_run_context()
    if isinstance(context, FlowRunContext) and TaskRunContext.get() is not None and context.flow_run is not None:
        return flow_run_logger(flow_run=context.flow_run, flow=context.flow)
    return get_run_logger()


def current_run_key() -> str:
    """The flow run id (stable across retries of the run), or a fresh id outside Prefect."""
    from prefect.runtime import flow_run

    return str(flow_run.id or uuid.uuid4())


def _last_heartbeat(client: Any, flow_run_id: Any) -> datetime | None:
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    page = client.read_events(filter=EventFilter(event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                                                 resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"])),
                              limit=50)
    return max((e.occurred for e in page.events), default=None)


def submit_and_watch(deployment: str, parameters: dict[str, Any], heartbeat_timeout_s: float,
                     poll_s: float = 5) -> tuple[Any, Any, bool]:
    """Start a run of `deployment` (a subflow of the current run) and wait for its final state.

    Returns (flow run, final state, lost): lost means its worker went away, i.e. Prefect marked it
    Crashed, or it stayed Running longer than `heartbeat_timeout_s` past its last heartbeat (or its
    start), in which case it is marked Crashed here so nothing waits on it any more."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Crashed

    child = run_deployment(deployment, parameters=parameters, timeout=0)
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(child.id)
            state = run.state
            if state is not None and state.is_final():
                return run, state, state.is_crashed()
            if state is not None and state.is_running():
                seen = [t for t in (_last_heartbeat(client, run.id), run.start_time, state.timestamp) if t]
                silent = (datetime.now(timezone.utc) - max(seen)).total_seconds()
                if silent > heartbeat_timeout_s:
                    crashed = Crashed(message=f"no heartbeat for {silent:.0f} s (limit {heartbeat_timeout_s} s): "
                                              "its worker is gone")
                    client.set_flow_run_state(run.id, crashed, force=True)
                    return run, crashed, True
            time.sleep(poll_s)


@contextlib.contextmanager
def library_logs_in_prefect() -> Iterator[None]:
    """While a flow runs, send the `loraflow` logger's lines to the Prefect API (the run's logs in
    the UI), as PREFECT_LOGGING_EXTRA_LOGGERS=loraflow does when it is set before Prefect is
    imported (`prefect.extra` holds Prefect's API handler). Detached afterwards: outside a flow
    run the API handler has nowhere to send lines and warns on every one.

    Also the run's scope for lines said once (loraflow.log.log_once: the precision warning, the
    prepared-data cache hit) and no tqdm bars when the worker's stderr is not a terminal."""
    from loraflow.log import one_run, quiet_progress_bars

    quiet_progress_bars()
    extra = logging.getLogger("prefect.extra")
    lib = logging.getLogger("loraflow")
    added = [h for h in extra.handlers if h not in lib.handlers]
    saved = (lib.propagate, lib.level)
    for handler in added:
        lib.addHandler(handler)
    if any(getattr(h, "_loraflow", False) for h in lib.handlers):
        # The CLI prints these lines itself; Prefect's root console handler would print them twice.
        lib.propagate = False
    if lib.level == logging.NOTSET or lib.level > logging.INFO:
        lib.setLevel(logging.INFO)
    try:
        with one_run():
            yield
    finally:
        for handler in added:
            lib.removeHandler(handler)
        lib.propagate, lib.level = saved


os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "loraflow")
# The library also logs outside flow runs (a pull, a publish); those lines have no run to go to.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
