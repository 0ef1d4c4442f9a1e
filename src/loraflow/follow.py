"""Follow an alias: when `NAME@ALIAS` moves, pull and verify the new version, then hand it over.

    follower = loraflow.follow("smollm2-imdb@champion", on_change=swap, interval=10)
    ...
    follower.stop()

Polling is one HEAD of the alias object per interval (its ETag changes whenever the alias is
rewritten); the alias is read only when the ETag changed, and nothing is ever listed. A move is
pulled through `loraflow.registry.pull_adapter`, which verifies every sha256 and places the
version atomically, so the callback only ever sees a complete, verified directory.

Failures never drop the version being served: a storage outage or a corrupt version is logged
once (and once more when it clears), retried with exponential backoff, and the last delivered
version stays current. If the alias moves again while a pull is in flight, the stale version is
not delivered; the follower goes straight on to the newer one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

from loraflow.errors import ConfigError, LoraflowError, StorageError
from loraflow.log import get_logger

log = get_logger("follow")

OnChange = Callable[[Path, dict], None]


class Follower:
    """Watches one alias in a daemon thread. `current` is the version last delivered to
    `on_change`; `last_error` the latest failure (None once polling works again)."""

    def __init__(self, ref: str, on_change: OnChange, *, settings=None, interval: float = 10.0,
                 max_backoff: float = 60.0, dest=None) -> None:
        from loraflow.registry.catalog import open_registry
        from loraflow.registry.layout import parse_ref

        name, alias, version = parse_ref(ref)
        if alias is None:
            raise ConfigError(f"{ref!r}: follow an alias (NAME@ALIAS); a pinned version never moves")
        if interval <= 0:
            raise ConfigError(f"interval={interval!r}: must be positive")
        if settings is None:
            from loraflow.settings import load_settings

            settings = load_settings()
        self.name, self.alias = name, alias
        self.on_change = on_change
        self.settings = settings
        self.interval = float(interval)
        self.max_backoff = max(float(max_backoff), self.interval)
        self.dest = dest
        self.store, self.layout = open_registry(settings, name)
        self.key = self.layout.alias_key(alias)
        self.current: str | None = None
        self.last_error: str | None = None
        self.polls = 0
        self._etag: str | None = None
        self._target: str | None = None  # what the alias pointed at when it had ETag `_etag`
        self._failed: set[str] = set()  # versions whose callback raised: not retried until the alias moves
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.alias}"

    # --- one poll ------------------------------------------------------------------------------
    def alias_target(self) -> str | None:
        """The version the alias points at, or None when it does not exist. Costs one HEAD when
        the alias is unchanged since the last read."""
        from loraflow.registry.alias_object import read_alias

        head = self.store.head(self.key)
        if head is None:
            self._etag = self._target = None
            return None
        if head.get("ETag") and head["ETag"] == self._etag:
            return self._target
        got = read_alias(self.store, self.layout, self.alias)
        if got is None:
            return None
        doc, etag = got
        # A rewritten alias is a new decision: a version the consumer refused before gets another try.
        self._failed.clear()
        self._etag, self._target = etag, doc["version"]
        return self._target

    def pull(self, version: str) -> Path:
        from loraflow.registry.pull import pull_adapter

        return pull_adapter(f"{self.name}=={version}", settings=self.settings, dest=self.dest)

    def check(self) -> str | None:
        """Poll once; deliver a move. Returns the current version. Raises on storage errors."""
        self.polls += 1
        target = self.alias_target()
        while target is not None and target != self.current and target not in self._failed:
            path = self.pull(target)
            # The alias may have moved while we pulled: deliver only what it points at now.
            now = self.alias_target()
            if now != target:
                log.info("%s moved to %s while %s was being pulled; skipping %s", self.ref, now, target, target)
                target = now
                continue
            manifest = json.loads((path / "manifest.json").read_text())
            try:
                self.on_change(path, manifest)
            except StorageError:
                raise  # the consumer could not reach the store either: an outage, retried with backoff
            except Exception as exc:  # noqa: BLE001 - a consumer's failure must not stop the follower
                self._failed.add(target)
                log.error("%s: the consumer refused %s: %s", self.ref, target, exc)
                break
            self.current = target
        if target is None and self.current is None:
            log.debug("%s does not exist yet", self.ref)
        return self.current

    def _recovered(self) -> None:
        if self.last_error is not None:
            log.info("%s: storage reachable again; following %s", self.ref, self.current)
        self.last_error = None

    # --- the thread ----------------------------------------------------------------------------
    def run(self) -> None:
        delay = self.interval
        while not self._stop.is_set():
            try:
                self.check()
            except LoraflowError as exc:
                message = str(exc)
                if self.last_error is None:
                    log.warning("%s: %s; keeping %s, retrying with backoff", self.ref, message,
                                self.current or "nothing")
                self.last_error = message
                delay = min(delay * 2, self.max_backoff)
            except Exception as exc:  # noqa: BLE001 - the thread must survive anything one poll does
                message = f"{type(exc).__name__}: {exc}"
                if self.last_error is None:
                    log.exception("%s: unexpected error; keeping %s, retrying with backoff", self.ref,
                                  self.current or "nothing")
                self.last_error = message
                delay = min(delay * 2, self.max_backoff)
            else:
                self._recovered()
                delay = self.interval
            self._stop.wait(delay)

    def start(self) -> Follower:
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name=f"follow-{self.ref}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Follower:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def follow(ref: str, on_change: OnChange, *, settings=None, interval: float = 10.0,
           max_backoff: float = 60.0, dest=None, start: bool = True) -> Follower:
    """Watch `NAME@ALIAS` every `interval` seconds and call `on_change(verified_dir, manifest)`
    for the version it points at now and after every move. Returns the running `Follower`
    (`start=False`: not started; call `.start()` or `.check()` yourself)."""
    follower = Follower(ref, on_change, settings=settings, interval=interval, max_backoff=max_backoff, dest=dest)
    return follower.start() if start else follower
