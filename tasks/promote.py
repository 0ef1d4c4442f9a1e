"""The gate's I/O: find the current champion and fetch it (tasks/evaluate scores it on this run's
eval documents: the gate compares per document, so recorded numbers from another run cannot stand
in), and move the
`champion` alias with compare-and-swap so two runs finishing together cannot both think they won."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.settings import Settings


@task(name="read-champion", cache_policy=NO_CACHE)
def read_champion_task(settings: Settings) -> str | None:
    from loraflow.registry import get_alias

    return get_alias(settings, settings.registry.adapter_name, settings.registry.promote_alias)


@task(name="pull-champion", cache_policy=NO_CACHE)
def pull_version_task(settings: Settings, version: str) -> str:
    from loraflow.registry import pull_adapter

    return str(pull_adapter(f"{settings.registry.adapter_name}=={version}", settings=settings))


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(settings: Settings, version: str, expected_version: str | None, reason: str = "",
                 gate: dict[str, Any] | None = None) -> str:
    """Point the promote alias at `version`, only if it still points at `expected_version`. The
    move is recorded with this flow run as the actor and the gate's reason."""
    from loraflow.registry import set_alias

    set_alias(settings, settings.registry.adapter_name, settings.registry.promote_alias, version,
              expected_version=expected_version, reason=reason, payload={"gate": gate} if gate else None)
    return version
