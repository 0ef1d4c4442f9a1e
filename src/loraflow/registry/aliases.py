"""Aliases (`latest`, `champion`, ...): small JSON objects naming one version, moved by
compare-and-swap so that two publishers never lose an update or leave an alias pointing at a
version that does not exist. Every move is recorded (registry.history): the alias object carries a
move counter `seq`, who moved it and why, and one history object per move is appended next to it.

Two mechanisms, chosen per bucket at run time by `cas_mode` (a probe, cached per process):

* **conditional** - S3 conditional writes: `PutObject` with `If-None-Match: *` to create an alias
  and `If-Match: <etag>` to replace the one that was read; a 412/409 means someone else moved it,
  so read again and retry. AWS S3, MinIO, Cloudflare R2 and recent Ceph RGW honour these headers.

* **lock** - for servers that accept the headers but ignore them. `rclone serve s3` 1.75.2 is one:
  a PutObject with `If-None-Match: *` on an existing key, or `If-Match` with a wrong ETag, is
  answered 200 and overwrites. There a writer takes a lock before read-check-write:
  it writes a *claim* object under `locks/<alias>/` whose key starts with the wall-clock time in
  nanoseconds (unique keys, so claims never overwrite each other), waits `SETTLE_S`, lists the
  claims and holds the lock when its own is the oldest live one; otherwise it deletes its claim and
  tries again after a random backoff. A claim whose PUT took longer than `WRITE_BOUND_S` is
  withdrawn, so any claim older than yours has landed before you list (LIST is strongly consistent
  on AWS S3, MinIO, Ceph and a local directory); hence two writers cannot both see themselves
  first, provided publishers' clocks agree within `SETTLE_S - WRITE_BOUND_S`. Claims older than
  `LEASE_S` belong to crashed writers and are ignored (and removed); a holder that has used up
  its lease gives up before writing. The alias is verified by reading it back.
"""

from __future__ import annotations

import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone

from loraflow.errors import ConfigError, StorageError
from loraflow.log import get_logger
from loraflow.registry.alias_object import read_alias
from loraflow.registry.history import append_event, default_actor, move_event
from loraflow.registry.layout import NAME_RE, Layout, check_name, check_version
from loraflow.registry.manifest import now_iso
from loraflow.storage.store import Store, error_code

log = get_logger("registry")


class ANYType:
    def __repr__(self) -> str:
        return "ANY"


ANY = ANYType()  # expected_version=ANY: move the alias whatever it points at now


class AliasConflictError(StorageError):
    """The alias no longer points where the caller expected (someone else moved it)."""


# Lock timing (seconds). Overridable through the environment for slow links or known clock skew.
WRITE_BOUND_S = float(os.environ.get("LORAFLOW_REGISTRY_LOCK_WRITE_BOUND_S", "0.5"))
SETTLE_S = float(os.environ.get("LORAFLOW_REGISTRY_LOCK_SETTLE_S", "0.75"))
LEASE_S = float(os.environ.get("LORAFLOW_REGISTRY_LOCK_LEASE_S", "30"))
ACQUIRE_TIMEOUT_S = float(os.environ.get("LORAFLOW_REGISTRY_LOCK_TIMEOUT_S", "60"))
CAS_RETRIES = 20

_cas_modes: dict[tuple[str | None, str], str] = {}


def cas_mode(store: Store) -> str:
    """'conditional' when the server refuses conditional PUTs that should fail, else 'lock'.
    `LORAFLOW_REGISTRY_CAS=conditional|lock` skips the probe."""
    forced = os.environ.get("LORAFLOW_REGISTRY_CAS", "auto")
    if forced in ("conditional", "lock"):
        return forced
    if forced != "auto":
        raise ConfigError(f"LORAFLOW_REGISTRY_CAS={forced!r}: expected auto, conditional or lock")
    key = (store.storage.endpoint_url, store.bucket)
    if key not in _cas_modes:
        _cas_modes[key] = _probe(store)
        log.debug("conditional writes on %s/%s: %s", key[0] or "aws", key[1], _cas_modes[key])
    return _cas_modes[key]


def _probe(store: Store) -> str:
    from botocore.exceptions import ClientError

    prefix = store.storage.prefix.strip("/")
    probe = f"{prefix + '/' if prefix else ''}adapters/.cas-probe/{secrets.token_hex(8)}.json"
    store.put_bytes(probe, b"{}")
    refused = 0
    try:
        for conditions in ({"IfNoneMatch": "*"}, {"IfMatch": '"' + "0" * 32 + '"'}):
            try:
                store.client.put_object(Bucket=store.bucket, Key=probe, Body=b"{}", **conditions)
            except ClientError as exc:
                if error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    refused += 1
                # NotImplemented / InvalidArgument / anything else: the header is not supported.
    finally:
        try:
            store.delete([probe])
        except StorageError:
            pass
    return "conditional" if refused == 2 else "lock"


def current_version(store: Store, layout: Layout, alias: str) -> str | None:
    got = read_alias(store, layout, alias)
    return got[0]["version"] if got else None


def list_aliases(store: Store, layout: Layout) -> dict[str, str]:
    out = {}
    for obj in store.list(layout.aliases_prefix):
        alias = obj["Key"][len(layout.aliases_prefix):]
        if alias.endswith(".json") and NAME_RE.fullmatch(alias[:-5]) and ".." not in alias:
            version = current_version(store, layout, alias[:-5])
            if version:
                out[alias[:-5]] = version
    return out


def _alias_doc(layout: Layout, alias: str, version: str, got: tuple[dict, str] | None, actor: str,
               reason: str) -> dict:
    previous = got[0] if got else {}
    return {"name": layout.name, "alias": alias, "version": version, "previous": previous.get("version"),
            "seq": int(previous.get("seq", 0)) + 1, "updated_at": now_iso(), "actor": actor, "reason": reason}


def compare_and_swap(store: Store, layout: Layout, alias: str, decide: Callable[[str | None], str | None], *,
                     actor: str | None = None, reason: str = "") -> str | None:
    """Move `alias` to `decide(current)`; `decide` returns None to leave it, or raises.
    Returns the version the alias points at afterwards. A move is recorded in the alias's
    history with `actor` (default: the flow run, else user@host) and `reason`."""
    check_name(alias, "alias")
    actor = actor or default_actor()
    if cas_mode(store) == "conditional":
        return _cas_conditional(store, layout, alias, decide, actor, reason)
    with AliasLock(store, layout, alias) as lock:
        got = read_alias(store, layout, alias)
        current = got[0]["version"] if got else None
        target = decide(current)
        if target is None or target == current:
            return current
        lock.check()
        doc = _alias_doc(layout, alias, target, got, actor, reason)
        store.put_json(layout.alias_key(alias), doc)
        if current_version(store, layout, alias) != target:
            raise StorageError(f"{layout.uri(layout.alias_key(alias))}: read-back after the update "
                               "shows another version; another writer bypassed the lock")
        _record(store, layout, alias, doc)
        return target


def _cas_conditional(store: Store, layout: Layout, alias: str, decide: Callable[[str | None], str | None],
                     actor: str, reason: str) -> str | None:
    from botocore.exceptions import ClientError

    key = layout.alias_key(alias)
    for attempt in range(CAS_RETRIES):
        got = read_alias(store, layout, alias)
        current, etag = (got[0]["version"], got[1]) if got else (None, None)
        target = decide(current)
        if target is None or target == current:
            return current
        conditions = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        doc = _alias_doc(layout, alias, target, got, actor, reason)
        try:
            store.client.put_object(Bucket=store.bucket, Key=key, ContentType="application/json",
                                    Body=_json(doc), **conditions)
            _record(store, layout, alias, doc)
            return target
        except ClientError as exc:
            if error_code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                with store.errors(f"write {layout.uri(key)}"):
                    raise
            time.sleep(random.uniform(0, 0.05 * (attempt + 1)))
    raise AliasConflictError(f"{layout.uri(key)}: still contended after {CAS_RETRIES} attempts")


def _record(store: Store, layout: Layout, alias: str, doc: dict) -> None:
    try:
        append_event(store, layout, alias, move_event(layout, alias, doc))
    except StorageError as exc:
        # The alias has moved; failing now would report a move that happened as failed. The alias
        # object itself carries this move, and read_history recovers it from there.
        log.warning("alias %s of %s moved to %s, but its history record was not written: %s",
                    alias, layout.name, doc["version"], exc)


def _json(doc: dict) -> bytes:
    import json

    return json.dumps(doc, indent=2, sort_keys=True).encode()


class AliasLock:
    """The claim-based lock described in the module docstring (only for servers without
    conditional writes)."""

    def __init__(self, store: Store, layout: Layout, alias: str) -> None:
        self.store, self.layout, self.alias = store, layout, alias
        self.prefix = layout.lock_prefix(alias)
        self.key: str | None = None
        self.claimed_at = 0.0

    def __enter__(self) -> AliasLock:
        deadline = time.monotonic() + ACQUIRE_TIMEOUT_S
        attempt, holder = 0, None
        while True:
            attempt += 1
            start = time.time()
            key = f"{self.prefix}{time.time_ns():020d}-{secrets.token_hex(4)}.json"
            self.store.put_json(key, {"owner": f"{socket.gethostname()}:{os.getpid()}",
                                      "claimed_at": datetime.now(timezone.utc).isoformat()})
            if time.time() - start <= WRITE_BOUND_S:
                time.sleep(SETTLE_S)
                holder = self._oldest_live_claim()
                if holder == key:
                    self.key, self.claimed_at = key, start
                    return self
            self.store.delete([key])
            if time.monotonic() > deadline:
                raise StorageError(f"alias {self.alias!r} of {self.layout.name!r} is locked by another "
                                   f"writer ({holder}); claims expire after {LEASE_S:.0f}s")
            time.sleep(random.uniform(0.05, 0.2) * min(attempt, 10))

    def _oldest_live_claim(self) -> str | None:
        now_ns = time.time_ns()
        live, stale = [], []
        for obj in self.store.list(self.prefix):
            stamp = obj["Key"][len(self.prefix):].split("-", 1)[0]
            if not stamp.isdigit():
                continue
            (stale if now_ns - int(stamp) > LEASE_S * 1e9 else live).append(obj["Key"])
        if stale:
            log.warning("removing %d expired lock claim(s) on alias %s", len(stale), self.alias)
            self.store.delete(stale)
        return min(live) if live else None

    def check(self) -> None:
        if time.time() - self.claimed_at > LEASE_S - SETTLE_S:
            raise StorageError(f"lost the lock on alias {self.alias!r}: the lease ran out before the write")

    def __exit__(self, *exc) -> None:
        if self.key:
            self.store.delete([self.key])
            self.key = None


def _require_version(store: Store, layout: Layout, version: str) -> None:
    if not store.exists(layout.manifest_key(check_version(version))):
        from loraflow.registry.existence import require_adapter

        require_adapter(store, layout)
        raise StorageError(f"version {version} of adapter {layout.name!r} does not exist "
                           f"(no manifest under {layout.uri(layout.version_prefix(version))})")


def move_alias(store: Store, layout: Layout, alias: str, version: str, *, expected_version=ANY,
               actor: str | None = None, reason: str = "") -> str | None:
    _require_version(store, layout, version)

    def decide(current: str | None) -> str | None:
        if expected_version is not ANY and current != expected_version:
            raise AliasConflictError(f"alias {alias!r} of {layout.name!r} points at {current or 'nothing'}, "
                                     f"expected {expected_version or 'nothing'}")
        return version

    return compare_and_swap(store, layout, alias, decide, actor=actor, reason=reason)


def advance_alias(store: Store, layout: Layout, alias: str, version: str, *, actor: str | None = None,
                  reason: str = "published") -> str | None:
    """Move `alias` to `version` unless it already points at a newer one: concurrent publishers
    leave `latest` on the newest version, whatever order their updates arrive in."""
    _require_version(store, layout, version)
    return compare_and_swap(store, layout, alias,
                            lambda current: version if current is None or version > current else None,
                            actor=actor, reason=reason)
