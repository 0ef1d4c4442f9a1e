"""Reading the registry and moving aliases by hand: what `loraflow versions` and
`loraflow promote` call, by settings rather than by store."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from loraflow.errors import StorageError
from loraflow.registry.aliases import ANY, current_version, list_aliases, move_alias
from loraflow.registry.layout import MANIFEST, Layout, check_name, check_version
from loraflow.registry.manifest import validate_manifest
from loraflow.storage.store import Store


def open_registry(settings, name: str) -> tuple[Store, Layout]:
    return Store(settings.storage), Layout.for_name(settings.storage, name)


def fetch_manifest(store: Store, layout: Layout, version: str) -> dict:
    key = layout.manifest_key(check_version(version))
    got = store.get_json(key)
    if got is None:
        raise StorageError(f"version {version} of adapter {layout.name!r} does not exist "
                           f"(no manifest at {layout.uri(key)})")
    return validate_manifest(got[0], layout.uri(key))


def read_manifest(settings, name: str, version: str) -> dict:
    store, layout = open_registry(settings, name)
    return fetch_manifest(store, layout, version)


def get_alias(settings, name: str, alias: str) -> str | None:
    store, layout = open_registry(settings, name)
    return current_version(store, layout, check_name(alias, "alias"))


def set_alias(settings, name: str, alias: str, version: str, *, expected_version=ANY) -> None:
    """Point `alias` at `version` (which must exist). With `expected_version` (a version, or None
    for "the alias must not exist yet") this is a compare-and-swap: AliasConflictError when the
    alias points elsewhere."""
    store, layout = open_registry(settings, name)
    move_alias(store, layout, alias, check_version(version), expected_version=expected_version)


def complete_versions(store: Store, layout: Layout) -> list[str]:
    """Versions that have a manifest (the others do not exist for readers), oldest first."""
    versions = set()
    for obj in store.list(layout.versions_prefix):
        rel = obj["Key"][len(layout.versions_prefix):]
        version, _, file_name = rel.partition("/")
        if file_name == MANIFEST:
            versions.add(version)
    return sorted(versions)


def list_versions(settings, name: str) -> list[dict]:
    """One dict per complete version, oldest first: version, created_at, metrics, aliases,
    base_model, size (bytes), dataset fingerprint."""
    store, layout = open_registry(settings, name)
    store.check_bucket()
    versions = complete_versions(store, layout)
    aliases = list_aliases(store, layout)
    with ThreadPoolExecutor(max_workers=8) as pool:
        manifests = list(pool.map(lambda v: fetch_manifest(store, layout, v), versions))
    out = []
    for version, manifest in zip(versions, manifests):
        out.append({
            "version": version,
            "created_at": manifest.get("created_at"),
            "aliases": sorted(a for a, v in aliases.items() if v == version),
            "metrics": manifest.get("metrics") or {},
            "base_model": (manifest.get("base_model") or {}).get("name_or_path"),
            "dataset_fingerprint": (manifest.get("dataset") or {}).get("fingerprint"),
            "size": sum(f["size"] for f in manifest["files"]),
            "flow_run_id": manifest.get("flow_run_id"),
        })
    return out
