"""Publish the adapter as a new immutable version in the registry (object storage)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.settings import Settings


# No task retries: botocore already retries every request (loraflow.storage.client), and a
# repeated publish would only leave a second, manifest-less version behind for gc.
@task(name="publish", cache_policy=NO_CACHE)
def publish_task(settings: Settings, adapter_dir: str, train: dict[str, Any], evaluation: dict[str, Any],
                 extra: dict[str, Any]) -> dict[str, Any]:
    """Write the version's directory once from the step results (loraflow.release) and publish it."""
    from loraflow.registry import publish_adapter

    published = publish_adapter(settings, Path(adapter_dir), train=train, evaluation=evaluation, extra=extra)
    return {"name": published.name, "version": published.version, "uri": published.uri}
