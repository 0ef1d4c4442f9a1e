"""One base model with the adapter versions loaded on it (PEFT multi-adapter), and the rules that
make a swap and an eviction safe.

Every use of the model (a generation step, a canary, loading or unloading an adapter) holds the
model lock. The generation loop (serving.scheduler) takes it once per step, for every request of
its batch at once, each row naming its adapter (`adapter_names`), so nothing depends on PEFT's
active adapter. Swap work (load, canary, unload) is `urgent`: it goes before the next step, so a
move is served after at most one step plus the canary, not after the queue.

A request holds its version from the moment it is accepted (`acquire`) until its sequence
finishes (`release`). A version that stops taking new requests (its alias moved on) is `retire`d:
unloaded once its last request has finished. At most `max_loaded` versions stay loaded: when one
more must be loaded, the least recently used version that is not pinned and has no request in
flight is evicted (its verified files stay in the local cache; a later request loads it again).
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraflow.errors import LoraflowError, ModelError
from loraflow.log import get_logger
from loraflow.registry.manifest import now_iso

log = get_logger("serving")

MANIFEST = "manifest.json"


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


@dataclass(eq=False)
class Loaded:
    slot: str  # PEFT adapter name (versions contain '.', which module names cannot)
    version: str
    manifest: dict = field(repr=False)
    path: Path
    sha256: str = ""  # of the version's manifest.json, which lists every file's sha256
    pinned: bool = False  # never evicted
    loaded_at: str = field(default_factory=now_iso)
    unloaded: bool = False  # gone for good (retired or discarded)
    evicted: bool = False  # out of memory for now; loaded again on demand
    retired: bool = False  # takes no new requests; unloaded when the last one finishes
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.manifest.get("name", "")

    @property
    def model_id(self) -> str:
        return f"{self.name}=={self.version}"


def manifest_sha256(path: Path) -> str:
    """The identity a response names: sha256 of the version's manifest (as `loraflow export` records)."""
    try:
        return hashlib.sha256((Path(path) / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return ""


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
    def __init__(self, max_loaded: int = 8) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded={max_loaded}: must be >= 1")
        self.model = None
        self.tokenizer = None
        self.base_manifest: dict | None = None  # the manifest whose base model is loaded
        self.eos_ids: set[int] = set()
        self.max_loaded = max_loaded
        self.lock = ModelLock()
        self._books = threading.RLock()  # entries and their counts
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer shared by threads can fail "Already borrowed"
        self.entries: list[Loaded] = []  # every version known here that is not unloaded for good
        self._slots = itertools.count(1)
        self.loads = 0
        self.evictions = 0

    # --- loading -------------------------------------------------------------------------------
    def load_first(self, ref: str, path: Path, manifest: dict, *, settings, dest=None, pinned: bool = False) -> Loaded:
        """Load the base model the manifest names (verified by `load_adapter`) with this version."""
        import torch

        import loraflow

        from loraflow.modeling import resolve_precision

        device = "cuda" if torch.cuda.is_available() else "cpu"
        # A CPU: the precision training resolves to on this machine (bf16 base where the processor
        # multiplies bf16 natively, else fp32: emulated bf16 runs ~60x slower); the adapters stay fp32
        # and generation computes under autocast (scheduler.forward).
        dtype = "auto" if device == "cuda" else resolve_precision(settings.training, settings.model,
                                                                   device=device).torch_dtype
        model = loraflow.load_adapter(ref, settings=settings, dest=dest, dtype=dtype)
        model.to(device).eval()
        tokenizer = base_tokenizer(manifest, settings)
        entry = Loaded("default", manifest["version"], manifest, Path(path), manifest_sha256(path), pinned)
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos |= set(configured) if isinstance(configured, list) else ({configured} if configured is not None else set())
        with self.lock.hold(urgent=True):
            self.model, self.tokenizer, self.base_manifest, self.eos_ids = model, tokenizer, manifest, eos
        with self._books:
            self.entries.append(entry)
            self.loads += 1
        return entry

    def add(self, path: Path, manifest: dict, *, pinned: bool = False) -> Loaded:
        """Load another version of the same base beside the ones loaded (gets no traffic yet)."""
        entry = Loaded(f"v{next(self._slots)}", manifest["version"], manifest, Path(path), manifest_sha256(path),
                       pinned)
        with self.lock.hold(urgent=True):
            self._inject(entry)
        with self._books:
            self.entries.append(entry)
        self._make_room(keep=entry)
        return entry

    def _inject(self, entry: Loaded) -> None:
        """Load `entry`'s weights into the model (the caller holds the model lock)."""
        try:
            self.model.load_adapter(str(entry.path), adapter_name=entry.slot)
        except Exception:
            # A half-injected adapter (e.g. a weights file that does not match its config)
            # must not stay in the model the current versions are serving from.
            if entry.slot in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter(entry.slot)
            raise
        self.model.eval()
        entry.evicted = False
        self.loads += 1

    # --- requests ------------------------------------------------------------------------------
    def acquire(self, entry: Loaded) -> Loaded:
        """A request takes `entry`: it stays loaded until `release`; loaded again if evicted."""
        with self._books:
            if entry.unloaded:
                raise NotReady(f"version {entry.version} was unloaded")
            entry.in_flight += 1
            entry.last_used = time.monotonic()
            reload = entry.evicted
        if reload:
            try:
                with self.lock.hold(urgent=True):
                    if entry.evicted:
                        self._inject(entry)
                        log.info("loaded %s again (evicted earlier)", entry.model_id)
            except Exception:
                self.release(entry)
                raise
            self._make_room(keep=entry)
        return entry

    def release(self, entry: Loaded) -> None:
        with self._books:
            entry.in_flight -= 1
            entry.last_used = time.monotonic()
            done = entry.retired and entry.in_flight <= 0
        if done:
            self._unload(entry)

    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    # --- swap work -----------------------------------------------------------------------------
    def run(self, entry: Loaded, fn: Callable[[Any], Any]) -> Any:
        """Swap work: `fn(model)` with `entry`'s adapter active, ahead of waiting requests."""
        import torch

        from loraflow.modeling import autocast, precision_of

        with self.lock.hold(urgent=True):
            if entry.unloaded or entry.evicted:
                raise ModelError(f"version {entry.version} is not loaded")
            if self.model.active_adapter != entry.slot:
                self.model.set_adapter(entry.slot)
            with torch.inference_mode(), autocast(precision_of(self.model)):
                return fn(self.model)

    def retire(self, entry: Loaded) -> None:
        """`entry` takes no new requests (its alias moved on): unload it once the last one finishes."""
        with self._books:
            entry.retired = True
            done = entry.in_flight <= 0
        if done:
            self._unload(entry)

    def discard(self, entry: Loaded) -> None:
        """Unload a version that never got traffic (its canary failed)."""
        self._unload(entry)

    def _make_room(self, keep: Loaded) -> None:
        while True:
            with self._books:
                loaded = [e for e in self.entries if not e.evicted]
                if len(loaded) <= self.max_loaded:
                    return
                victims = sorted((e for e in loaded if e is not keep and not e.pinned and e.in_flight <= 0
                                  and not e.retired), key=lambda e: e.last_used)
                if not victims:
                    log.warning("%d adapter versions loaded, above the bound of %d: every other one is pinned "
                                "or in use", len(loaded), self.max_loaded)
                    return
                victim = victims[0]
            with self.lock.hold(urgent=True):
                with self._books:
                    if victim.evicted or victim.in_flight > 0 or victim.unloaded:
                        continue
                    self._delete(victim)
                    victim.evicted = True
                    self.evictions += 1
            log.info("evicted %s (least recently used; %d loaded at most)", victim.model_id, self.max_loaded)

    def _delete(self, entry: Loaded) -> None:
        """Delete `entry`'s weights from the model (the caller holds the model lock)."""
        others = [s for s in self.model.peft_config if s != entry.slot]
        if self.model.active_adapter == entry.slot and others:
            self.model.set_adapter(others[0])  # PEFT cannot delete the active adapter
        self.model.delete_adapter(entry.slot)

    def _unload(self, entry: Loaded) -> None:
        with self._books:
            if entry.unloaded:
                return
            entry.unloaded = True
            if entry in self.entries:
                self.entries.remove(entry)
            resident = not entry.evicted
            others = [e for e in self.entries if not e.evicted]
            spare = sorted((e for e in self.entries if e.evicted), key=lambda e: e.last_used)
        if resident:
            with self.lock.hold(urgent=True):
                if not others and spare:
                    self._inject(spare[-1])  # PEFT keeps at least one adapter: bring one back first
                    others = [spare[-1]]
                if others:
                    self._delete(entry)
                else:
                    # The last version went: drop the whole model, the next one starts clean
                    # (PEFT cannot hold a model with its only adapter deleted).
                    self.model = self.tokenizer = self.base_manifest = None
        log.info("unloaded version %s", entry.version)

    def loaded_versions(self) -> list[str]:
        with self._books:
            return [e.version for e in self.entries if not e.evicted]
