"""Score the candidate, the base model and the current champion on the same eval documents, on the
recipe's loaded base (one PeftModel holding both adapters; the base under disable_adapter)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from loraflow.errors import LoraflowError
from loraflow.recipe import Recipe, finite_or_raise


@task(name="evaluate", cache_policy=NO_CACHE)
def score_task(recipe: Recipe, adapter_dir: str, champion_dir: str | None = None) -> dict[str, Any]:
    """{"evaluation": the candidate's EvalResult dict, "champion": the champion's (None without one,
    or when it could not be scored: the gate then treats the run as the first)."""
    champion = None
    try:
        evaluation, champion = recipe.score(adapter_dir, champion=champion_dir)
    except LoraflowError as exc:
        if champion_dir is None:
            raise
        get_run_logger().warning("could not score the champion (%s): %s; scoring the candidate alone", champion_dir, exc)
        evaluation, _ = recipe.score(adapter_dir)
    return {"evaluation": finite_or_raise(evaluation.to_dict(), adapter_dir),
            "champion": champion.to_dict() if champion is not None else None}
