"""What both flows share: the seed defaults shown in the UI form, resolving storage connection
details on the worker, and making the library's `loraflow` log lines appear in Prefect's UI."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any

from pydantic import SecretStr

from loraflow.settings import Settings, StorageSettings

# Where the object store is and who we are to it belong to the machine that runs the flow (its
# environment: AWS_* or LORAFLOW_STORAGE__*), not to flow parameters: parameters are stored in the
# Prefect database in clear and secrets come back from it masked as '**********'.
CONNECTION_FIELDS = ("endpoint_url", "region", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")
MASK = "**********"


def seed_settings() -> Settings:
    """The seed recipe's defaults, untouched by this process's environment: the flow parameter's
    default, so the Prefect UI renders them in the run form and no secret is baked into a
    deployment's parameter schema."""
    return Settings.model_construct(storage=StorageSettings.model_construct())


def _unset(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, SecretStr) and value.get_secret_value() in ("", MASK)


def with_worker_environment(settings: Settings) -> Settings:
    """`settings` with every unset (or masked) storage connection field taken from this process's
    environment, re-validated. Values a caller set explicitly (in-process runs) are kept."""
    env = Settings()  # env-resolved: LORAFLOW_* and the standard AWS_* variables
    updates = {f: getattr(env.storage, f) for f in CONNECTION_FIELDS if _unset(getattr(settings.storage, f))}
    storage = settings.storage.model_copy(update=updates)
    if settings.prefect.train_deployment is None and env.prefect.train_deployment is not None:
        # A worker may route training to the GPU pool for every run it executes.
        settings = settings.model_copy(update={"prefect": env.prefect})
    return Settings.model_validate({**settings.model_dump(exclude={"storage"}), "storage": storage.model_dump()})


def parameters_for_deployment(settings: Settings) -> dict[str, Any]:
    """JSON parameters for `run_deployment`: no credentials travel; the target worker uses its own."""
    data = settings.model_dump(mode="json")
    for field in CONNECTION_FIELDS[2:]:
        data["storage"][field] = None
    return data


def current_run_key() -> str:
    """The flow run id (stable across retries of the run), or a fresh id outside Prefect."""
    from prefect.runtime import flow_run

    return str(flow_run.id or uuid.uuid4())


@contextlib.contextmanager
def library_logs_in_prefect() -> Iterator[None]:
    """While a flow runs, send the `loraflow` logger's lines to the Prefect API (the run's logs in
    the UI), as PREFECT_LOGGING_EXTRA_LOGGERS=loraflow does when it is set before Prefect is
    imported (`prefect.extra` holds Prefect's API handler). Detached afterwards: outside a flow
    run the API handler has nowhere to send lines and warns on every one."""
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
        yield
    finally:
        for handler in added:
            lib.removeHandler(handler)
        lib.propagate, lib.level = saved


os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "loraflow")
# The library also logs outside flow runs (a pull, a publish); those lines have no run to go to.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
