"""The `train-adapter` flow: training alone, so it can be deployed on its own work pool (`gpu`).

`retrain` calls it in-process by default, or through `run_deployment` when
`settings.prefect.train_deployment` names its deployment. Checkpoints go to object storage under the
run key, so when a worker dies the next attempt (a Prefect retry, or a new run with the same key)
resumes from the last checkpoint instead of step 0."""

from __future__ import annotations

from typing import Any

from loraflow.flows._common import (
    current_run_key,
    library_logs_in_prefect,
    seed_settings,
    with_worker_environment,
)
from prefect import flow

from loraflow.settings import Settings
from loraflow.tasks.train import train_task


@flow(name="train-adapter")
def train_adapter_flow(settings: Settings = seed_settings(), run_key: str | None = None) -> dict[str, Any]:
    """Train a LoRA adapter and stage it in object storage under `checkpoints/<run_key>/final/`.

    `run_key` names the run's checkpoint folder; reuse it to resume a crashed run."""
    with library_logs_in_prefect():
        settings = with_worker_environment(settings)
        return train_task(settings, run_key or current_run_key())
