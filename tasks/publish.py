"""Publish the adapter as a new immutable version in the registry (object storage)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.settings import Settings
from tasks._retry import IO_BACKOFF, IO_RETRIES, retry_transient


@task(name="publish", retries=IO_RETRIES, retry_delay_seconds=IO_BACKOFF, retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def publish_task(settings: Settings, adapter_dir: str, extra: dict[str, Any]) -> dict[str, Any]:
    from loraflow.registry import publish_adapter

    published = publish_adapter(settings, Path(adapter_dir), extra=extra)
    return {"name": published.name, "version": published.version, "uri": published.uri}
