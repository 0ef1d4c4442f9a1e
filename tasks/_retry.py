"""When a whole task may run again: only training, whose next attempt resumes from its newest
checkpoint in object storage. Storage requests are retried by botocore alone
(loraflow.storage.client); a wrong setting, missing data or a diverged run is never retried,
because a retry would fail the same way."""

from __future__ import annotations

from typing import Any

from loraflow.errors import ConfigError, DataError, IntegrityError, ModelError, TrainingError
from loraflow.registry.aliases import AliasConflictError

# Deterministic failures: retrying repeats them. (A moved alias is a lost race, not an outage.)
PERMANENT = (ConfigError, DataError, ModelError, TrainingError, IntegrityError, AliasConflictError, ValueError,
             TypeError, KeyError, MemoryError)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    from loraflow import stopping

    if stopping.requested():  # this process is being stopped: what failed, failed because of it
        return False
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    return not isinstance(exc, PERMANENT)
