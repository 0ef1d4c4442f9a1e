"""Perplexity of the base model and of the adapter on the held-out set (and, for the gate, of the
current champion when its recorded numbers come from a different eval set)."""

from __future__ import annotations

import math
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.errors import TrainingError
from loraflow.settings import Settings


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(settings: Settings, adapter_dir: str) -> dict[str, Any]:
    from pathlib import Path

    from loraflow.evaluation import evaluate_adapter

    result = evaluate_adapter(settings, Path(adapter_dir)).to_dict()
    for key in ("base_ppl", "adapter_ppl"):
        value = result.get(key)
        if value is None or not math.isfinite(float(value)):
            # A broken evaluation must stop the flow before anything is published.
            raise TrainingError(f"evaluation of {adapter_dir} gave {key}={value}; nothing is published")
    return result
