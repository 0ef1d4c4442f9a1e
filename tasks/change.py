"""The cheap change check (loraflow.changes): listings, file stats, a hub revision and the training
settings against what the champion's manifest recorded. Runs on the CPU pool before any GPU is asked for."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.settings import Settings


@task(name="change-check", task_run_name="change-check-{settings.registry.adapter_name}", cache_policy=NO_CACHE)
def change_check_task(settings: Settings) -> dict[str, Any]:
    from loraflow.changes import check_since_champion

    return check_since_champion(settings).to_dict()
