"""Alias history: an append-only record of every alias move, next to the alias.

    <prefix>/adapters/<name>/aliases/<alias>.json                       where it points now
    <prefix>/adapters/<name>/aliases/<alias>.history/<seq>-<ns>.json     one object per move

Append-only on S3 means one new object per event, never a rewritten log: two writers cannot
lose each other's lines, and no reader sees a half-rewritten file. The key starts with the move's
sequence number (the alias object's `seq`, incremented by each compare-and-swap), so keys sort
in move order without trusting anyone's clock; the wall-clock suffix keeps keys unique.

The event is written right after the alias moved (aliases.compare_and_swap). Should the writer die
in between, the alias object itself still says who moved it, when and why, and `read_history`
puts that move at the head of the list.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from loraflow.registry.alias_object import read_alias
from loraflow.registry.layout import Layout, check_name
from loraflow.storage.store import Store


def history_prefix(layout: Layout, alias: str) -> str:
    return f"{layout.aliases_prefix}{check_name(alias, 'alias')}.history/"


def default_actor() -> str:
    """Who moves an alias when the caller does not say: the Prefect flow run when there is one,
    else the local user (`user@host`)."""
    from loraflow.events import current_flow_run_id

    run_id = current_flow_run_id()
    if run_id:
        return f"flow-run:{run_id}"
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = os.environ.get("USER") or "unknown"
    return f"{user}@{socket.gethostname()}"


def append_event(store: Store, layout: Layout, alias: str, event: dict[str, Any]) -> str:
    key = f"{history_prefix(layout, alias)}{int(event['seq']):012d}-{time.time_ns():020d}.json"
    store.put_json(key, event)
    return key


def move_event(layout: Layout, alias: str, doc: dict[str, Any]) -> dict[str, Any]:
    """The history record of the move that produced alias object `doc`."""
    return {"name": layout.name, "alias": alias, "seq": doc.get("seq", 0), "from": doc.get("previous"),
            "to": doc["version"], "at": doc.get("updated_at"), "actor": doc.get("actor"),
            "reason": doc.get("reason", "")}


def _checked(layout: Layout, alias: str, key: str, event: Any) -> dict[str, Any]:
    """A history record must describe a move of the alias it was read under, with the sequence
    number its key starts with: a record copied from elsewhere would rewrite what happened."""
    from loraflow.errors import IntegrityError
    from loraflow.registry.layout import VERSION_RE

    where = layout.uri(key)
    if not isinstance(event, dict):
        raise IntegrityError(f"{where}: not an alias history record")
    seq = key.rsplit("/", 1)[-1].split("-", 1)[0]
    expected = {"name": layout.name, "alias": alias, "seq": int(seq) if seq.isdigit() else None}
    for field, value in expected.items():
        if event.get(field) != value:
            raise IntegrityError(f"{where}: history record says {field} {event.get(field)!r}, but it was read "
                                 f"as {field} {value!r}; refusing it")
    for field in ("to", "from"):
        if not (event.get(field) is None and field == "from") and not (
                isinstance(event.get(field), str) and VERSION_RE.fullmatch(event[field])):
            raise IntegrityError(f"{where}: history record has a bad {field!r} version {event.get(field)!r}")
    return event


def read_history(store: Store, layout: Layout, alias: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The alias's moves, newest first (at most `limit`)."""
    prefix = history_prefix(layout, alias)
    keys = sorted((obj["Key"] for obj in store.list(prefix)), reverse=True)
    if limit is not None:
        keys = keys[:limit]
    with ThreadPoolExecutor(max_workers=8) as pool:
        events = [_checked(layout, alias, key, got[0]) for key, got in zip(keys, pool.map(store.get_json, keys))
                  if got is not None]
    got = read_alias(store, layout, alias)
    if got is not None and got[0].get("seq", 0) > (events[0]["seq"] if events else 0):
        # The newest move's writer died before recording it; the alias object remembers it.
        events.insert(0, {**move_event(layout, alias, got[0]), "recovered_from_alias": True})
    return events[:limit] if limit is not None else events
