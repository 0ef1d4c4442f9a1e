"""Publish the adapter as a new immutable version in the registry (object storage)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.settings import Settings
from tasks._retry import IO_BACKOFF, IO_RETRIES, retry_transient


def publishable_copy(adapter_dir: Path, dest: Path) -> list[str]:
    """Copy the files the registry accepts into `dest`; return the names left out. The training
    output also holds e.g. its settings snapshot (loraflow.yaml), which the manifest already
    records (`settings`), so leaving it out loses nothing."""
    from loraflow.errors import ConfigError
    from loraflow.registry.layout import check_file_name

    skipped = []
    for path in sorted(Path(adapter_dir).iterdir()):
        if not path.is_file():
            continue
        try:
            check_file_name(path.name)
        except ConfigError:
            skipped.append(path.name)
            continue
        shutil.copy2(path, dest / path.name)
    return skipped


@task(name="publish", retries=IO_RETRIES, retry_delay_seconds=IO_BACKOFF, retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def publish_task(settings: Settings, adapter_dir: str, extra: dict[str, Any]) -> dict[str, Any]:
    from loraflow.log import get_logger
    from loraflow.registry import publish_adapter

    with tempfile.TemporaryDirectory(prefix="loraflow-stage-") as scratch:
        skipped = publishable_copy(Path(adapter_dir), Path(scratch))
        if skipped:
            get_logger("flows").info("not uploaded with the version (recorded in the manifest instead): %s",
                                     ", ".join(skipped))
        published = publish_adapter(settings, Path(scratch), extra=extra)
    return {"name": published.name, "version": published.version, "uri": published.uri}
