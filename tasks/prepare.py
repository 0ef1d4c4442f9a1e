"""Set up the run's recipe on the worker that trains: the base model's files (an s3:// mirror synced
once), its config and tokenizer, and the prepared dataset (read, hashed and tokenised once, or
loaded from the cache by its fingerprint). The recipe is handed to the training and scoring tasks
in this process; nothing is loaded twice."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.recipe import Recipe
from loraflow.settings import Settings


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_task(settings: Settings) -> Recipe:
    from prefect import get_run_logger

    recipe = Recipe(settings)
    data = recipe.prepared
    get_run_logger().info("dataset %s: %s", data.fingerprint, "cache hit" if data.from_cache else "prepared")
    return recipe
