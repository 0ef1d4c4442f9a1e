"""The `train-adapter` flow: training alone, so it can be deployed on its own work pool (`gpu`).

`retrain` calls it in-process by default, or through `run_deployment` when
`settings.prefect.train_deployment` names its deployment. Checkpoints go to object storage under the
run key, so when a worker dies the next attempt (a Prefect retry, or a new run with the same key)
resumes from the last checkpoint instead of step 0."""

from __future__ import annotations

import sys
from pathlib import Path

# A worker loads this file as a script (cwd = the repo root via the deployment's pull step); the
# path line also makes `tasks`/`flows` importable when loaded from anywhere else.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from typing import Any  # noqa: E402

from flows._common import (  # noqa: E402
    current_run_key,
    library_logs_in_prefect,
    seed_settings,
    with_worker_environment,
)
from prefect import flow  # noqa: E402

from loraflow.settings import Settings  # noqa: E402
from tasks.train import train_task  # noqa: E402


@flow(name="train-adapter")
def train_adapter_flow(settings: Settings = seed_settings(), run_key: str | None = None) -> dict[str, Any]:
    """Train a LoRA adapter and stage it in object storage under `checkpoints/<run_key>/final/`.

    `run_key` names the run's checkpoint folder; reuse it to resume a crashed run."""
    with library_logs_in_prefect():
        settings = with_worker_environment(settings)
        return train_task(settings, run_key or current_run_key())
