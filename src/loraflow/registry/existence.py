"""Whether an adapter exists: a registry command on one that does not is an error, not an empty
result. Its own module because both the catalog and the alias writer ask, and the catalog imports
the alias writer."""

from __future__ import annotations

from loraflow.errors import StorageError
from loraflow.registry.layout import Layout
from loraflow.storage.store import Store


def adapter_exists(store: Store, layout: Layout) -> bool:
    """Anything at all under the adapter's prefix (versions, aliases, leftovers)."""
    with store.errors(f"list {layout.uri()}"):
        resp = store.client.list_objects_v2(Bucket=store.bucket, Prefix=layout.root, MaxKeys=1)
    return bool(resp.get("KeyCount") or resp.get("Contents"))


def require_adapter(store: Store, layout: Layout) -> None:
    """A registry command on an adapter that does not exist is an error (a typo is not an empty
    result): one line naming where it looked and, when there are some, the adapters that exist."""
    if adapter_exists(store, layout):
        return
    store.check_bucket()
    top = layout.root[: -len(f"{layout.name}/")]
    with store.errors(f"list s3://{store.bucket}/{top}"):
        resp = store.client.list_objects_v2(Bucket=store.bucket, Prefix=top, Delimiter="/", MaxKeys=50)
    names = sorted(p["Prefix"][len(top):].rstrip("/") for p in resp.get("CommonPrefixes", []))
    names = [n for n in names if not n.startswith(".")]
    known = f" (adapters there: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''})" if names else ""
    raise StorageError(f"no adapter named {layout.name!r} in s3://{store.bucket}/{top}{known}")
