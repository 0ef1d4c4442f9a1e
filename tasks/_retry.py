"""When an I/O task may retry: transient failures (network, storage, timeouts) yes; a wrong
setting, missing data or a diverged run no, because a retry would fail the same way."""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

from loraflow.errors import ConfigError, DataError, IntegrityError, ModelError, TrainingError
from loraflow.registry.aliases import AliasConflictError

# Deterministic failures: retrying repeats them. (A moved alias is a lost race, not an outage.)
PERMANENT = (ConfigError, DataError, ModelError, TrainingError, IntegrityError, AliasConflictError, ValueError,
             TypeError, KeyError, MemoryError)

IO_RETRIES = 3
IO_BACKOFF = exponential_backoff(backoff_factor=2)  # 2 s, 4 s, 8 s


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    return not isinstance(exc, PERMANENT)
