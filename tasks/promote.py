"""The gate's I/O: read the current champion (and its recorded perplexity), fetch it when it must be
re-measured on the current eval set, and move the `champion` alias with compare-and-swap so two
runs finishing together cannot both think they won."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.settings import Settings


def recorded_metrics(manifest: dict[str, Any]) -> tuple[str | None, float | None]:
    """(eval fingerprint, adapter perplexity) recorded when the version was published."""
    for source in (manifest, manifest.get("extra") or {}):
        metrics = source.get("metrics") or {}
        fingerprint = source.get("eval_fingerprint") or metrics.get("eval_fingerprint")
        ppl = metrics.get("adapter_ppl", source.get("adapter_ppl"))
        if fingerprint is not None or ppl is not None:
            return fingerprint, (float(ppl) if ppl is not None else None)
    return None, None


@task(name="read-champion", cache_policy=NO_CACHE)
def read_champion_task(settings: Settings, eval_fingerprint: str) -> dict[str, Any]:
    """{"version": str|None, "ppl": float|None (None: must be re-measured), "recorded_on": fingerprint}."""
    from loraflow.registry import get_alias, read_manifest

    name, alias = settings.registry.adapter_name, settings.registry.promote_alias
    version = get_alias(settings, name, alias)
    if version is None:
        return {"version": None, "ppl": None, "recorded_on": None}
    fingerprint, ppl = recorded_metrics(read_manifest(settings, name, version))
    same_eval_set = fingerprint is not None and fingerprint == eval_fingerprint
    return {"version": version, "ppl": ppl if same_eval_set else None, "recorded_on": fingerprint}


@task(name="pull-champion", cache_policy=NO_CACHE)
def pull_version_task(settings: Settings, version: str) -> str:
    from loraflow.registry import pull_adapter

    return str(pull_adapter(f"{settings.registry.adapter_name}=={version}", settings=settings))


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(settings: Settings, version: str, expected_version: str | None) -> str:
    """Point the promote alias at `version`, only if it still points at `expected_version`."""
    from loraflow.registry import set_alias

    set_alias(settings, settings.registry.adapter_name, settings.registry.promote_alias, version,
              expected_version=expected_version)
    return version
