"""What downstream services call: `pull_adapter` fetches a version into a local cache keyed by
version, verified file by file against its manifest. Loading it onto a model is loraflow.adapters'
job: the registry moves files and never imports a model library.

The cache is `LORAFLOW_HOME/adapters/<name>/<version>/` (or `<dest>/<name>/<version>/`). A version
directory only ever appears there by the storage layer's atomic rename of a fully verified
temporary directory. Each use re-hashes its files against its manifest (transfer.verified_copy:
0.85 s for a 670 MB adapter), and the manifest must name this adapter and version; a copy that
fails either is pulled again. A cached version costs no download (an alias costs one GET).
"""

from __future__ import annotations

import os
from pathlib import Path

from loraflow.errors import StorageError
from loraflow.log import get_logger
from loraflow.registry.aliases import current_version
from loraflow.registry.catalog import complete_versions, fetch_manifest, open_registry
from loraflow.registry.layout import check_version, parse_ref
from loraflow.storage.transfer import download_dir, verified_copy

log = get_logger("registry")


def cache_root(dest: str | os.PathLike | None = None) -> Path:
    if dest is not None:
        from loraflow.paths import ensure_dir

        return ensure_dir(dest, "--dest")
    from loraflow.paths import cache_dir

    return cache_dir("adapters")


def _cached(directory: Path, name: str, version: str) -> bool:
    manifest = verified_copy(directory)
    return manifest is not None and manifest.get("name") == name and manifest.get("version") == version


def pull_adapter(ref: str, *, settings=None, dest: str | os.PathLike | None = None) -> Path:
    """`NAME` (= `NAME@latest`), `NAME@ALIAS` or `NAME==VERSION` -> the local directory holding
    the verified adapter (PEFT layout plus README.md, metrics.json, manifest.json)."""
    name, alias, version = parse_ref(ref)
    root = cache_root(dest) / name
    if version and _cached(root / version, name, version):
        return root / version  # pinned, cached and its content verified again: no network at all
    if settings is None:
        from loraflow.settings import load_settings

        settings = load_settings()
    store, layout = open_registry(settings, name)
    if alias:
        version = current_version(store, layout, alias)
        if version is None:
            store.check_bucket()
            known = complete_versions(store, layout)
            if not known:
                raise StorageError(f"no adapter named {name!r} in {layout.uri()}")
            raise StorageError(f"adapter {name!r} has no alias {alias!r}; pull {name}=={known[-1]} "
                               "or move the alias with `loraflow promote`")
    final = root / check_version(version)  # an alias object is data from the store: never a path
    if _cached(final, name, version):
        log.debug("%s %s already cached at %s", name, version, final)
        return final
    if final.exists():
        log.warning("%s: changed since it was verified; pulling %s==%s again", final, name, version)

    manifest = fetch_manifest(store, layout, version)
    root.mkdir(parents=True, exist_ok=True)
    download_dir(store, layout.version_prefix(version), final, "adapter", manifest=manifest)
    log.info("pulled %s %s into %s", name, version, final)
    return final
