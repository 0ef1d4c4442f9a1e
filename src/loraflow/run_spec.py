"""What a flow run follows: its spec, as given, plus the two things that belong to the machine.

A flow run's `settings` parameter is the run's spec (loraflow.settings). It was resolved once by
whoever started the run (the CLI, a deployment's parameters, the UI's form, an event trigger's
parameters); fields it leaves out are the documented defaults. The machine that executes the run
contributes only:
- credentials, through boto3's chain (environment, profile, instance or pod role), never settings;
- the storage location, and only when the spec leaves it unset (`storage.endpoint_url` is None):
  then endpoint, bucket, prefix, region and profile come from this machine's LORAFLOW_STORAGE__*
  together, never some fields from the spec and others from the machine.

A run executed by a worker (a deployment's flow run) never falls back to a machine-local store:
the adapter would be published onto a disk that goes away with the machine. With no location, or
`storage.endpoint_url: local`, it fails at its start in one line, before any GPU time is spent.
Interactive runs (`loraflow run --local`, the demo, a Python call) keep the local-store fallback.
Any other LORAFLOW_* variable on a worker is named in one warning line: it is not applied.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from loraflow.errors import ConfigError
from loraflow.log import get_logger

if TYPE_CHECKING:
    from loraflow.settings import Settings, StorageSettings

log = get_logger("run")

LOCATION_FIELDS = ("endpoint_url", "bucket", "prefix", "region", "profile")
# LORAFLOW_* variables that are not settings: where loraflow keeps its files on this machine.
MACHINE_VARIABLES = frozenset({"LORAFLOW_HOME", "LORAFLOW_CPU_BF16"})


def executed_by_worker() -> bool:
    """Whether the current flow run is a deployment's, i.e. a worker (not a person's shell) runs it."""
    try:
        from prefect.context import FlowRunContext
    except ImportError:  # pragma: no cover - flows always have Prefect
        return False
    context = FlowRunContext.get()
    return bool(context and context.flow_run and context.flow_run.deployment_id)


def _explicit_location(storage: StorageSettings) -> list[str]:
    """Location fields the spec set to something other than their default."""
    defaults = type(storage).model_fields
    return [f for f in LOCATION_FIELDS if f in storage.model_fields_set and f != "endpoint_url"
            and getattr(storage, f) != defaults[f].default]


def settings_variables() -> list[str]:
    """LORAFLOW_* variables of this process that name a settings section (LORAFLOW_TRAINING__MAX_STEPS,
    LORAFLOW_LORA='{...}')."""
    from loraflow.settings import Settings

    sections = {name.upper() for name in Settings.model_fields}
    found = []
    for name in os.environ:
        upper = name.upper()
        if not upper.startswith("LORAFLOW_") or upper in MACHINE_VARIABLES:
            continue
        if upper[len("LORAFLOW_"):].split("__", 1)[0] in sections:
            found.append(name)
    return sorted(found)


def resolve_location(storage: StorageSettings, *, on_worker: bool) -> tuple[StorageSettings, bool]:
    """(the run's storage location, whether it came from this machine's environment)."""
    from loraflow.settings import StorageFromEnvironment, StorageSettings

    if storage.endpoint_url is not None:
        if on_worker and storage.endpoint_url == "local":
            raise ConfigError("storage.endpoint_url=local: a flow run on a worker never publishes to a machine-local "
                              "store; give the run an S3 endpoint URL, or `aws` for AWS S3")
        return storage, False
    if not on_worker:
        return storage, False  # interactive: the local-store fallback (loraflow.storage.client)
    mixed = _explicit_location(storage)
    if mixed:
        raise ConfigError(
            f"storage.{mixed[0]} is set but storage.endpoint_url is not: a run's storage location is one unit "
            "(endpoint_url, bucket, prefix, region, profile); give them all in the run's settings, or none and "
            "let the worker's LORAFLOW_STORAGE__* name it")
    try:
        env = StorageFromEnvironment()
    except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError: one line naming the variable
        raise ConfigError(f"this worker's LORAFLOW_STORAGE__* variables are invalid: {str(exc).splitlines()[0]}") from None
    if env.endpoint_url in (None, "local"):
        raise ConfigError(
            "no storage location: the run's settings leave storage.endpoint_url unset and this worker sets no "
            "LORAFLOW_STORAGE__ENDPOINT_URL" + (" (it says `local`)" if env.endpoint_url == "local" else "")
            + "; a flow run on a worker never falls back to a machine-local store: set storage.endpoint_url "
            "(an S3 endpoint URL, or `aws` for AWS S3) in the deployment's parameters or the worker's environment")
    return StorageSettings.model_validate(env.model_dump()), True


def for_flow_run(settings: Settings, *, on_worker: bool | None = None) -> Settings:
    """The spec this flow run follows (see the module docstring). Raises ConfigError in one line
    when a worker's run has no storage location."""
    on_worker = executed_by_worker() if on_worker is None else on_worker
    storage, from_machine = resolve_location(settings.storage, on_worker=on_worker)
    if on_worker:
        ignored = [v for v in settings_variables() if not (from_machine and v.upper().startswith("LORAFLOW_STORAGE"))]
        if ignored:
            log.warning("ignoring %s on this worker: a flow run follows its settings parameter (unset fields are the "
                        "documented defaults), not the worker's environment", ", ".join(ignored))
        if from_machine:
            log.info("storage location from this worker's environment: %s, bucket %s%s", storage.endpoint_url,
                     storage.bucket, f", prefix {storage.prefix}" if storage.prefix else "")
    if storage is settings.storage:
        return settings
    return settings.model_copy(update={"storage": storage})
