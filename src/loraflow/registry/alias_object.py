"""Reading an alias object (`<prefix>/adapters/<name>/aliases/<alias>.json`): the one thing both
registry.aliases (which moves it) and registry.history (which recovers an unrecorded move from it)
need, kept here so that neither imports the other's module."""

from __future__ import annotations

from loraflow.errors import IntegrityError, StorageError
from loraflow.registry.layout import Layout, check_version
from loraflow.storage.store import Store


def read_alias(store: Store, layout: Layout, alias: str) -> tuple[dict, str] | None:
    """The alias object and its ETag, or None when the alias does not exist."""
    got = store.get_json(layout.alias_key(alias))
    if got is None:
        return None
    doc, etag = got
    where = layout.uri(layout.alias_key(alias))
    if not isinstance(doc, dict) or not isinstance(doc.get("version"), str):
        raise StorageError(f"{where}: not an alias object")
    # What the object says about itself must be where it was read from: an alias object copied
    # from another adapter or alias would otherwise move this one silently.
    for field, expected in (("name", layout.name), ("alias", alias)):
        if field in doc and doc[field] != expected:
            raise IntegrityError(f"{where}: alias object says {field} {doc[field]!r}, but it was read as "
                                 f"{field} {expected!r}; refusing it")
    if "seq" in doc and (type(doc["seq"]) is not int or doc["seq"] < 0):
        raise IntegrityError(f"{where}: alias object has a bad seq {doc['seq']!r}")
    check_version(doc["version"])  # data from the store, about to become a key and a local path
    return doc, etag
