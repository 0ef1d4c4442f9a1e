"""One base model with the adapter versions loaded on it (PEFT multi-adapter), and the rules that
make a swap safe.

Every use of the model (a generation, a canary, loading or unloading an adapter) holds the model
lock. PEFT's active adapter is a property of the whole model, so two generations with different
adapters cannot overlap; on a CPU, where one generation already uses every core, serialising them
costs nothing. Requests take the lock in arrival order (FIFO); swap work (load, canary, unload)
goes before every waiting request, so a move is served after at most the generation running now
plus the canary, not after the whole queue.

A request picks its version when its generation starts, under the lock: every generation that
starts after a switch uses the new version, and the old version is unloaded (under the lock, so
after the generation using it has finished) right after the switch.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraflow.errors import LoraflowError, ModelError
from loraflow.log import get_logger
from loraflow.registry.manifest import now_iso

log = get_logger("serving")


class ModelLock:
    """A lock whose waiters are served in arrival order, except `urgent` ones, which go first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._urgent = 0
        self._tickets = itertools.count()
        self._next = 0
        self.waiting = 0  # threads queued for the lock now

    @contextmanager
    def hold(self, *, urgent: bool = False) -> Iterator[None]:
        with self._cond:
            self.waiting += 1
            if urgent:
                self._urgent += 1
                while self._held:
                    self._cond.wait()
                self._urgent -= 1
            else:
                ticket = next(self._tickets)
                while self._held or self._urgent or ticket != self._next:
                    self._cond.wait()
                self._next += 1
            self.waiting -= 1
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()


class NotReady(LoraflowError):
    """No version is loaded yet."""


@dataclass
class Loaded:
    slot: str  # PEFT adapter name (versions contain '.', which module names cannot)
    version: str
    manifest: dict = field(repr=False)
    path: Path
    loaded_at: str = field(default_factory=now_iso)
    unloaded: bool = False


def base_tokenizer(manifest: dict, settings):
    """The tokenizer of the manifest's base model, from the same source `load_adapter` uses (hub
    id, local directory, or the `s3://` mirror in this host's cache)."""
    from transformers import AutoTokenizer

    from loraflow.adapters import modeling_settings
    from loraflow.modeling import resolve_model_source
    from loraflow.registry.manifest import base_identity

    base = base_identity(manifest)
    if not base.get("id"):
        raise ModelError(f"manifest of version {manifest.get('version')}: names no base model")
    source = resolve_model_source(modeling_settings(base["id"], base.get("revision")), settings.storage)
    kwargs = {} if Path(source).is_dir() or not base.get("revision") else {"revision": base["revision"]}
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of base model {base['id']}: {exc}") from None


def same_base(a: dict, b: dict) -> bool:
    from loraflow.registry.manifest import base_identity

    x, y = base_identity(a), base_identity(b)
    return (x.get("id"), x.get("revision"), x.get("weights") or None) == \
        (y.get("id"), y.get("revision"), y.get("weights") or None)


class ModelHolder:
    def __init__(self) -> None:
        self.model = None
        self.tokenizer = None
        self.lock = ModelLock()
        self._books = threading.Lock()  # active / loaded
        self.active: Loaded | None = None
        self.loaded: dict[str, Loaded] = {}
        self._slots = itertools.count(1)

    # --- loading -------------------------------------------------------------------------------
    def load_first(self, ref: str, path: Path, manifest: dict, *, settings, dest=None) -> Loaded:
        """Load the base model the manifest names (verified by `load_adapter`) with this version."""
        import torch

        import loraflow

        device = "cuda" if torch.cuda.is_available() else "cpu"
        # fp32 on a CPU: without native half-precision maths bf16/fp16 run ~50x slower there.
        dtype = "auto" if device == "cuda" else torch.float32
        model = loraflow.load_adapter(ref, settings=settings, dest=dest, dtype=dtype)
        model.to(device).eval()
        tokenizer = base_tokenizer(manifest, settings)
        entry = Loaded("default", manifest["version"], manifest, Path(path))
        with self.lock.hold(urgent=True):
            self.model, self.tokenizer = model, tokenizer
        with self._books:
            self.loaded[entry.slot] = entry
        return entry

    def add(self, path: Path, manifest: dict) -> Loaded:
        """Load another version of the same base beside the ones loaded (gets no traffic yet)."""
        entry = Loaded(f"v{next(self._slots)}", manifest["version"], manifest, Path(path))
        with self.lock.hold(urgent=True):
            try:
                self.model.load_adapter(str(path), adapter_name=entry.slot)
            except Exception:
                # A half-injected adapter (e.g. a weights file that does not match its config)
                # must not stay in the model the current version is serving from.
                if entry.slot in getattr(self.model, "peft_config", {}):
                    self.model.delete_adapter(entry.slot)
                raise
            self.model.eval()
        with self._books:
            self.loaded[entry.slot] = entry
        return entry

    # --- using ---------------------------------------------------------------------------------
    def _call(self, entry: Loaded, fn: Callable[[Any], Any]) -> Any:
        import torch

        if self.model.active_adapter != entry.slot:
            self.model.set_adapter(entry.slot)
        with torch.inference_mode():
            return fn(self.model)

    def run(self, entry: Loaded, fn: Callable[[Any], Any]) -> Any:
        """Swap work: `fn(model)` with `entry`'s adapter active, ahead of waiting requests."""
        with self.lock.hold(urgent=True):
            if entry.unloaded:
                raise ModelError(f"version {entry.version} was unloaded")
            return self._call(entry, fn)

    def serve(self, fn: Callable[[Any], Any]) -> tuple[Loaded, Any]:
        """A request: waits its turn, then runs `fn(model)` on the version active at that moment."""
        if self.active is None:
            raise NotReady("no adapter version loaded yet")
        with self.lock.hold():
            with self._books:
                entry = self.active
            if entry is None or self.model is None:
                raise NotReady("no adapter version loaded yet")
            return entry, self._call(entry, fn)

    def switch(self, entry: Loaded) -> Loaded | None:
        """Send every generation that starts from now on to `entry`; unload the previous version
        (after the generation running now, if it uses it). Returns the previous version."""
        with self._books:
            old, self.active = self.active, entry
        if old is not None and old is not entry:
            self._unload(old)
        return old

    def discard(self, entry: Loaded) -> None:
        """Unload a version that never got traffic (its canary failed)."""
        if self.active is None:
            # The first version failed: drop the whole model so the next one starts clean
            # (PEFT cannot hold a model with its only adapter deleted).
            with self.lock.hold(urgent=True):
                self.model = self.tokenizer = None
            with self._books:
                self.loaded.clear()
            entry.unloaded = True
            return
        if entry is not self.active:
            self._unload(entry)

    def _unload(self, entry: Loaded) -> None:
        with self.lock.hold(urgent=True):
            if entry.unloaded:
                return
            active = self.active
            if active is not None and self.model.active_adapter == entry.slot and active.slot != entry.slot:
                self.model.set_adapter(active.slot)  # PEFT cannot delete the active adapter
            self.model.delete_adapter(entry.slot)
            entry.unloaded = True
        with self._books:
            self.loaded.pop(entry.slot, None)
        log.info("unloaded version %s", entry.version)

    def loaded_versions(self) -> list[str]:
        with self._books:
            return [e.version for e in self.loaded.values()]
