"""One base model with the adapter versions loaded on it (PEFT multi-adapter), and the bookkeeping
that makes a swap safe: which version new requests go to, how many requests each version still
has in flight, and unloading a retired version only when its last request has finished.

Every use of the model (a generation, a canary step, loading or unloading an adapter) holds
`ModelHolder.lock`. PEFT's active adapter is a property of the whole model, so two generations
with different adapters cannot overlap; on a CPU, where one generation already uses every core,
serialising them costs nothing. Bookkeeping has its own small lock, so picking a version for a
request never waits for a generation.
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


class NotReady(LoraflowError):
    """No version is loaded yet."""


@dataclass
class Loaded:
    slot: str  # PEFT adapter name (versions contain '.', which module names cannot)
    version: str
    manifest: dict = field(repr=False)
    path: Path
    loaded_at: str = field(default_factory=now_iso)
    inflight: int = 0
    retired: bool = False
    unloaded: bool = False


def base_tokenizer(manifest: dict, settings):
    """The tokenizer of the manifest's base model, from the same source `load_adapter` uses (hub
    id, local directory, or the `s3://` mirror in this host's cache)."""
    from transformers import AutoTokenizer

    from loraflow.modeling import resolve_model_source
    from loraflow.registry.pull import base_identity, modeling_settings

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
    from loraflow.registry.pull import base_identity

    x, y = base_identity(a), base_identity(b)
    return (x.get("id"), x.get("revision"), x.get("weights") or None) == \
        (y.get("id"), y.get("revision"), y.get("weights") or None)


class ModelHolder:
    def __init__(self) -> None:
        self.model = None
        self.tokenizer = None
        self.lock = threading.Lock()  # the model itself
        self._books = threading.Lock()  # active / loaded / in-flight counts
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
        with self.lock:
            self.model, self.tokenizer = model, tokenizer
        with self._books:
            self.loaded[entry.slot] = entry
        return entry

    def add(self, path: Path, manifest: dict) -> Loaded:
        """Load another version of the same base beside the ones loaded (gets no traffic yet)."""
        entry = Loaded(f"v{next(self._slots)}", manifest["version"], manifest, Path(path))
        with self.lock:
            self.model.load_adapter(str(path), adapter_name=entry.slot)
            self.model.eval()
        with self._books:
            self.loaded[entry.slot] = entry
        return entry

    # --- traffic -------------------------------------------------------------------------------
    @contextmanager
    def use(self) -> Iterator[Loaded]:
        """The version this request goes to, counted as in flight until the block ends."""
        with self._books:
            entry = self.active
            if entry is None:
                raise NotReady("no adapter version loaded yet")
            entry.inflight += 1
        try:
            yield entry
        finally:
            with self._books:
                entry.inflight -= 1
                drop = entry.retired and entry.inflight == 0 and not entry.unloaded
            if drop:
                self._unload(entry)

    def run(self, entry: Loaded, fn: Callable[[Any], Any]) -> Any:
        """`fn(model)` with `entry`'s adapter active, under the model lock, without gradients."""
        import torch

        with self.lock:
            if entry.unloaded:
                raise ModelError(f"version {entry.version} was unloaded")
            if self.model.active_adapter != entry.slot:
                self.model.set_adapter(entry.slot)
            with torch.inference_mode():
                return fn(self.model)

    def switch(self, entry: Loaded) -> Loaded | None:
        """Send new requests to `entry`; the previous version is unloaded once idle. Returns it."""
        with self._books:
            old, self.active = self.active, entry
            drop = False
            if old is not None and old is not entry:
                old.retired = True
                drop = old.inflight == 0 and not old.unloaded
        if drop:
            self._unload(old)
        return old

    def discard(self, entry: Loaded) -> None:
        """Unload a version that never got traffic (its canary failed)."""
        with self._books:
            entry.retired = True
            drop = entry is not self.active and entry.inflight == 0 and not entry.unloaded
        if drop:
            self._unload(entry)

    def _unload(self, entry: Loaded) -> None:
        with self.lock:
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
