"""Reading an alias object (`<prefix>/adapters/<name>/aliases/<alias>.json`): the one thing both
registry.aliases (which moves it) and registry.history (which recovers an unrecorded move from it)
need, kept here so that neither imports the other's module."""

from __future__ import annotations

from loraflow.errors import StorageError
from loraflow.registry.layout import Layout
from loraflow.storage.store import Store


def read_alias(store: Store, layout: Layout, alias: str) -> tuple[dict, str] | None:
    """The alias object and its ETag, or None when the alias does not exist."""
    got = store.get_json(layout.alias_key(alias))
    if got is None:
        return None
    doc, etag = got
    if not isinstance(doc, dict) or not isinstance(doc.get("version"), str):
        raise StorageError(f"{layout.uri(layout.alias_key(alias))}: not an alias object")
    return doc, etag
