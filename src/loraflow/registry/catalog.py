"""Reading the registry and moving aliases by hand: what `loraflow versions`, `loraflow promote`,
`loraflow history` and `loraflow rollback` call, by settings rather than by store. Moves made here
emit Prefect events (loraflow.events) when a Prefect API is configured."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from typing import Any

from loraflow import events
from loraflow.errors import ConfigError, StorageError
from loraflow.registry.aliases import ANY, AliasConflictError, compare_and_swap, current_version, list_aliases, move_alias
from loraflow.registry.history import read_history
from loraflow.registry.layout import MANIFEST, VERSION_RE, Layout, check_name, check_version
from loraflow.registry.existence import require_adapter
from loraflow.registry.manifest import base_identity, validate_manifest
from loraflow.storage.store import Store


def open_registry(settings, name: str) -> tuple[Store, Layout]:
    return Store(settings.storage), Layout.for_name(settings.storage, name)


def require_alias(store: Store, layout: Layout, alias: str) -> None:
    """Raise unless the adapter exists and has `alias`, naming the aliases it has."""
    require_adapter(store, layout)
    aliases = sorted(list_aliases(store, layout))
    raise StorageError(f"adapter {layout.name!r} has no alias {alias!r}"
                       f" (its aliases: {', '.join(aliases) if aliases else 'none'})")


def fetch_manifest(store: Store, layout: Layout, version: str) -> dict:
    key = layout.manifest_key(check_version(version))
    got = store.get_json(key)
    if got is None:
        require_adapter(store, layout)
        raise StorageError(f"version {version} of adapter {layout.name!r} does not exist "
                           f"(no manifest at {layout.uri(key)})")
    return check_identity(validate_manifest(got[0], layout.uri(key)), layout, version, layout.uri(key))


def check_identity(manifest: dict, layout: Layout, version: str, where: str) -> dict:
    """A manifest says which adapter and version it describes; it must be the ones its key names,
    so a manifest copied under another version (or another adapter) is refused, not served as them."""
    from loraflow.errors import IntegrityError

    for field, expected in (("name", layout.name), ("version", version)):
        if manifest.get(field) != expected:
            raise IntegrityError(f"{where}: manifest says {field} {manifest.get(field)!r}, but it was read "
                                 f"from {field} {expected!r}; refusing it")
    return manifest


def read_manifest(settings, name: str, version: str) -> dict:
    store, layout = open_registry(settings, name)
    return fetch_manifest(store, layout, version)


def get_alias(settings, name: str, alias: str) -> str | None:
    # None for an adapter not published yet too: the flows ask this before the first publish.
    store, layout = open_registry(settings, name)
    return current_version(store, layout, check_name(alias, "alias"))


def set_alias(settings, name: str, alias: str, version: str, *, expected_version=ANY, actor: str | None = None,
              reason: str = "", payload: dict[str, Any] | None = None) -> None:
    """Point `alias` at `version` (which must exist). With `expected_version` (a version, or None
    for "the alias must not exist yet") this is a compare-and-swap: AliasConflictError when the
    alias points elsewhere. The move is recorded in the alias's history (`actor`, `reason`) and
    announced as `loraflow.adapter.promoted` (with `payload`, e.g. the gate's verdict)."""
    store, layout = open_registry(settings, name)
    before = current_version(store, layout, check_name(alias, "alias"))
    move_alias(store, layout, alias, check_version(version), expected_version=expected_version, actor=actor,
               reason=reason)
    _announce(store, layout, "promoted", version, alias, previous=before, reason=reason, **(payload or {}))


def _announce(store: Store, layout: Layout, event: str, version: str, alias: str | None, **payload: Any) -> None:
    if not events.api_configured():
        return  # skip the manifest read too
    metrics = fetch_manifest(store, layout, version).get("metrics") or {}
    events.emit(event, layout.name, version=version, alias=alias, metrics=metrics, **payload)


def alias_history(settings, name: str, alias: str, limit: int | None = None) -> list[dict]:
    """Every move of `alias`, newest first: seq, from, to, at, actor, reason."""
    store, layout = open_registry(settings, name)
    store.check_bucket()
    rows = read_history(store, layout, check_name(alias, "alias"), limit)
    if not rows:
        require_alias(store, layout, alias)  # an alias that exists has at least the move that made it
    return rows


def rollback_alias(settings, name: str, alias: str, *, to: str | None = None, actor: str | None = None,
                   reason: str | None = None) -> tuple[str, str]:
    """Move `alias` back to the version it pointed at before its current one (or to `to`), by
    compare-and-swap against the version it points at now. Returns (from, to)."""
    store, layout = open_registry(settings, name)
    check_name(alias, "alias")
    store.check_bucket()
    current = current_version(store, layout, alias)
    if current is None:
        require_alias(store, layout, alias)
    if to is None:
        previous = next((e.get("from") for e in read_history(store, layout, alias) if e.get("to") == current), None)
        if previous is None:
            raise ConfigError(f"alias {alias!r} of {name!r} has no previous version in its history; "
                              "name one with --to VERSION")
        to = previous
    to = check_version(to)
    if to == current:
        raise ConfigError(f"alias {alias!r} of {name!r} already points at {to}")
    reason = reason or f"rollback from {current}"

    def decide(now: str | None) -> str:
        if now != current:
            raise AliasConflictError(f"alias {alias!r} of {name!r} moved to {now or 'nothing'} while rolling back "
                                     f"from {current}; nothing changed")
        return to

    if not store.exists(layout.manifest_key(to)):
        require_adapter(store, layout)
        raise StorageError(f"version {to} of adapter {name!r} does not exist "
                           f"(no manifest under {layout.uri(layout.version_prefix(to))})")
    compare_and_swap(store, layout, alias, decide, actor=actor, reason=reason)
    _announce(store, layout, "rolled-back", to, alias, previous=current, reason=reason)
    return current, to


def complete_versions(store: Store, layout: Layout) -> list[str]:
    """Versions that have a manifest (the others do not exist for readers), oldest first."""
    versions = set()
    for obj in store.list(layout.versions_prefix):
        rel = obj["Key"][len(layout.versions_prefix):]
        version, _, file_name = rel.partition("/")
        if file_name == MANIFEST and VERSION_RE.fullmatch(version):
            versions.add(version)  # a key outside the version pattern was not written by publish
    return sorted(versions)


def list_versions(settings, name: str) -> list[dict]:
    """One dict per complete version, oldest first: version, created_at, metrics, aliases,
    base_model (the logical id: hub id or s3:// URI), base_model_revision, size (bytes), dataset
    fingerprint."""
    store, layout = open_registry(settings, name)
    store.check_bucket()
    versions = complete_versions(store, layout)
    aliases = list_aliases(store, layout)
    with ThreadPoolExecutor(max_workers=8) as pool:
        manifests = list(pool.map(lambda v: fetch_manifest(store, layout, v), versions))
    out = []
    for version, manifest in zip(versions, manifests):
        base = base_identity(manifest)
        out.append({
            "version": version,
            "created_at": manifest.get("created_at"),
            "aliases": sorted(a for a, v in aliases.items() if v == version),
            "metrics": manifest.get("metrics") or {},
            "base_model": base.get("id"),
            "base_model_revision": base.get("revision"),
            "dataset_fingerprint": (manifest.get("dataset") or {}).get("fingerprint"),
            "size": sum(f["size"] for f in manifest["files"]),
            "flow_run_id": manifest.get("flow_run_id"),
            "gate": manifest.get("gate"),
        })
    return out
