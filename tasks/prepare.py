"""Fetch and tokenise the dataset. The library caches the prepared dataset on disk by the source's
fingerprint and the tokenisation settings, so a second run with the same data is a cache hit; the
task returns only that fingerprint, the cache path and counts."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.settings import Settings


@task(name="prepare-dataset", cache_policy=NO_CACHE)
def prepare_dataset_task(settings: Settings) -> dict[str, Any]:
    from loraflow.data import prepare_dataset
    from loraflow.modeling import load_tokenizer

    prepared = prepare_dataset(settings, load_tokenizer(settings))
    return {
        "fingerprint": prepared.fingerprint,
        "cache_dir": str(prepared.cache_dir),
        "from_cache": prepared.from_cache,
        "stats": prepared.stats,
    }
