"""The service: hosts several adapters of one base model, each a `Route` (`NAME@ALIAS` followed,
`NAME==VERSION` pinned). For every move of a followed alias it loads the new version beside the
current ones, runs the canary, switches that route's new requests to it and lets the old version
finish its requests (then unloads it).

A version that fails to load or fails its canary is unloaded, never served, and reported in
`/v1/adapter` (`last_swap_error`), the logs and the `loraflow_serve_swaps{result=...}` metric; the
route's current version keeps serving. A rollback is just the alias moving back.

A request's `model` picks the route: `NAME@ALIAS`, `NAME==VERSION` (a version some route serves
now), or `NAME` (the first route of that name, in the order given). Generation is the
scheduler's (serving.scheduler): requests of every route are batched together.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from loraflow.errors import ConfigError, LoraflowError, ModelError, StorageError
from loraflow.log import get_logger
from loraflow.registry.layout import parse_ref
from loraflow.registry.manifest import now_iso
from loraflow.serving.canary import DEFAULT_TOLERANCE, read_documents, run_canary
from loraflow.serving.metrics import Metrics
from loraflow.serving.model import Loaded, ModelHolder, NotReady, same_base
from loraflow.serving.scheduler import Sampling, Scheduler, Sequence

log = get_logger("serving")


class SwapRefused(LoraflowError):
    """A new version was not switched to (load failure or failed canary)."""


class BadRequest(LoraflowError):
    """The request is well-formed JSON but cannot be served as asked (too long for the model...)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param if param is not None else (message.split(":", 1)[0] if ":" in message else None)


class ModelNotFound(LoraflowError):
    """The request's `model` names nothing this server serves."""


@dataclass
class ServeOptions:
    interval: float = 10.0  # seconds between alias polls
    canary_docs: str | None = None
    canary_tolerance: float = DEFAULT_TOLERANCE
    max_tokens_limit: int = 512
    dest: str | None = None  # adapter cache root (default LORAFLOW_HOME/adapters)
    max_batch: int = 16  # sequences generated together; 1 = one at a time
    max_loaded: int = 8  # adapter versions kept loaded (LRU beyond; pinned ones always stay)

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ConfigError(f"--poll-interval {self.interval}: must be positive")
        if self.canary_tolerance < 0:
            raise ConfigError(f"--canary-tolerance {self.canary_tolerance}: must be >= 0")
        if self.max_tokens_limit < 1:
            raise ConfigError(f"--max-tokens-limit {self.max_tokens_limit}: must be >= 1")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch {self.max_batch}: must be >= 1")
        if self.max_loaded < 1:
            raise ConfigError(f"--max-loaded {self.max_loaded}: must be >= 1")


def read_refs_file(path: str | Path) -> list[str]:
    """One ref per line; blank lines and `#` comments skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"--adapters-file {path}: {exc.strerror or exc}") from None
    refs = [line.split("#", 1)[0].strip() for line in lines]
    refs = [r for r in refs if r]
    if not refs:
        raise ConfigError(f"--adapters-file {path}: lists no adapter (one NAME@ALIAS or NAME==VERSION a line)")
    return refs


class Route:
    """One served ref and the version its requests go to."""

    def __init__(self, service: Service, ref: str) -> None:
        name, alias, version = parse_ref(ref)
        if "@" not in ref and "==" not in ref:
            raise ConfigError(f"{ref!r}: serve an alias, NAME@ALIAS (followed), or a pinned NAME==VERSION")
        self.service, self.name, self.alias, self.pinned_version = service, name, alias, version
        self.ref = f"{name}@{alias}" if alias else f"{name}=={version}"
        self.current: Loaded | None = None
        self.swaps = 0
        self.last_swap: dict | None = None
        self.last_swap_error: dict | None = None
        self.last_canary: dict | None = None
        self.follower = None
        self._pin_thread: threading.Thread | None = None
        self._stop = threading.Event()
        if alias:
            from loraflow.follow import Follower

            self.follower = Follower(self.ref, self.on_change, settings=service.settings,
                                     interval=service.options.interval, dest=service.options.dest)

    @property
    def label(self) -> str:
        return self.alias if self.alias else "pinned"

    def start(self) -> None:
        if self.follower is not None:
            self.follower.start()
        else:
            self._pin_thread = threading.Thread(target=self._load_pinned, name=f"loraflow-pin-{self.name}",
                                                daemon=True)
            self._pin_thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.follower is not None:
            self.follower.stop()

    @property
    def storage_error(self) -> str | None:
        if self.follower is not None:
            return self.follower.last_error
        error = self.last_swap_error or {}
        return error.get("error") if error.get("result") == "storage" else None

    def _load_pinned(self) -> None:
        import json

        from loraflow.registry import pull_adapter

        delay = self.service.options.interval
        while not self._stop.is_set():
            try:
                path = pull_adapter(self.ref, settings=self.service.settings, dest=self.service.options.dest)
                self.on_change(path, json.loads((path / "manifest.json").read_text()))
                return
            except StorageError as exc:  # an outage: try again, with backoff
                self.last_swap_error = {"version": self.pinned_version, "result": "storage", "error": str(exc),
                                        "at": now_iso()}
                log.warning("cannot load %s yet: %s; retrying in %gs", self.ref, exc, delay)
            except SwapRefused:
                return
            except LoraflowError as exc:
                self.last_swap_error = {"version": self.pinned_version, "result": "load_failed", "error": str(exc),
                                        "at": now_iso()}
                log.error("not serving %s: %s", self.ref, exc)
                return
            self._stop.wait(delay)
            delay = min(delay * 2, 60.0)

    def on_change(self, path: Path, manifest: dict) -> None:
        """The follower's callback: raises SwapRefused so the follower keeps the current version."""
        service, holder = self.service, self.service.holder
        version = manifest["version"]
        pinned = self.follower is None
        with service.swap_lock:
            started = time.monotonic()
            try:
                if holder.model is None:
                    entry = holder.load_first(f"{self.name}=={version}", path, manifest, settings=service.settings,
                                              dest=service.options.dest, pinned=pinned)
                else:
                    if not same_base(holder.base_manifest, manifest):
                        raise ModelError(f"version {version} was trained on another base model than the one this "
                                         f"service hosts ({_base_name(holder.base_manifest)}); serve it from "
                                         "another process")
                    entry = holder.add(path, manifest, pinned=pinned)
            except StorageError as exc:
                # An outage, not a verdict on the version: the follower retries it with backoff.
                self.last_swap_error = {"version": version, "result": "load_failed", "error": str(exc),
                                        "at": now_iso()}
                raise
            except LoraflowError as exc:
                self._refuse(version, "load_failed", str(exc))
            except Exception as exc:  # noqa: BLE001 - a broken adapter file must not stop the service
                self._refuse(version, "load_failed", f"{type(exc).__name__}: {exc}")

            try:
                canary = run_canary(holder, entry, service.documents, service.options.canary_tolerance)
            except Exception as exc:  # noqa: BLE001 - same: report, keep serving
                holder.discard(entry)
                self._refuse(version, "canary_failed", f"canary crashed: {type(exc).__name__}: {exc}")
            self.last_canary = canary.to_dict()
            if not canary.ok:
                holder.discard(entry)
                self._refuse(version, "canary_failed", f"canary failed: {canary.reason}")

            old, self.current = self.current, entry
            if old is not None and old is not entry:
                holder.retire(old)
            self.swaps += 1 if old is not None else 0
            service.metrics.swaps.labels(result="ok").inc()
            service.metrics.serving(self.name, self.label, version)
            self.last_swap = {"from": old.version if old else None, "to": version, "at": now_iso(),
                              "seconds": round(time.monotonic() - started, 3)}
            self.last_swap_error = None
            log.info("serving %s==%s for %s (%s; canary ppl %.4g, %.2fs)", self.name, version, self.ref,
                     f"was {old.version}" if old else "first version", canary.ppl or float("nan"),
                     time.monotonic() - started)

    def _refuse(self, version: str, result: str, message: str) -> None:
        self.service.metrics.swaps.labels(result=result).inc()
        self.last_swap_error = {"version": version, "result": result, "error": message, "at": now_iso()}
        current = self.current.version if self.current else "nothing"
        log.error("not serving %s==%s: %s; still serving %s", self.name, version, message, current)
        raise SwapRefused(message)

    def describe(self) -> dict:
        from loraflow.registry.manifest import base_identity

        active = self.current
        base = base_identity(active.manifest) if active else {}
        return {
            "name": self.name, "alias": self.alias, "ref": self.ref, "pinned": self.follower is None,
            "version": active.version if active else None,
            "model": active.model_id if active else None,
            "sha256": active.sha256 if active else None,
            "loaded_at": active.loaded_at if active else None,
            "base_model": {"id": base.get("id"), "revision": base.get("revision")} if active else None,
            "metrics": (active.manifest.get("metrics") or {}) if active else None,
            "swaps": self.swaps,
            "last_swap": self.last_swap,
            "last_swap_error": self.last_swap_error,
            "last_canary": self.last_canary,
            "storage_error": self.storage_error,
        }


def _base_name(manifest: dict | None) -> str:
    from loraflow.registry.manifest import base_identity

    return str(base_identity(manifest or {}).get("id"))


class Service:
    def __init__(self, refs: str | list[str], settings, options: ServeOptions | None = None) -> None:
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ConfigError("serve: name at least one adapter (NAME@ALIAS or NAME==VERSION)")
        self.settings = settings
        self.options = options or ServeOptions()
        self.documents = read_documents(self.options.canary_docs)
        self.holder = ModelHolder(max_loaded=self.options.max_loaded)
        self.scheduler = Scheduler(self.holder, max_batch=self.options.max_batch)
        self.metrics = Metrics()
        self.metrics.queue.set_function(lambda: self.scheduler.depth)
        self.metrics.batch.set_function(lambda: self.scheduler.running)
        self.swap_lock = threading.RLock()  # one load/canary at a time, whichever route moved
        self.routes: list[Route] = []
        for ref in refs:
            route = Route(self, ref)
            if any(r.ref == route.ref for r in self.routes):
                raise ConfigError(f"{ref!r}: listed twice")
            self.routes.append(route)

    # Compatibility with one-route callers (the first route).
    @property
    def name(self) -> str:
        return self.routes[0].name

    @property
    def alias(self) -> str | None:
        return self.routes[0].alias

    # --- lifecycle -----------------------------------------------------------------------------
    def check_bases(self) -> None:
        """Refuse, before loading anything, refs whose versions were trained on different base
        models (one process loads one base). Skipped when the store cannot be read now: each
        load checks again."""
        from loraflow.registry.catalog import get_alias, read_manifest
        from loraflow.registry.manifest import base_identity

        seen: list[tuple[str, dict]] = []
        for route in self.routes:
            try:
                version = route.pinned_version or get_alias(self.settings, route.name, route.alias)
                if version is None:
                    continue
                manifest = read_manifest(self.settings, route.name, version)
            except StorageError as exc:
                log.warning("cannot compare the base models of the adapters now (%s); each load checks", exc)
                return
            for ref, other in seen:
                if not same_base(other, manifest):
                    raise ConfigError(f"{route.ref} is on base model {base_identity(manifest).get('id')}, {ref} on "
                                      f"{base_identity(other).get('id')}: one process serves one base model")
            seen.append((route.ref, manifest))

    def start(self) -> Service:
        self.scheduler.start()
        for route in self.routes:
            route.start()
        return self

    def stop(self) -> None:
        for route in self.routes:
            route.stop()
        self.scheduler.stop()

    # --- choosing ------------------------------------------------------------------------------
    def route_for(self, model: str | None) -> Route:
        if not model:
            if len(self.routes) == 1:
                return self.routes[0]
            raise BadRequest(f"model: required, this server serves {len(self.routes)} adapters "
                             f"({', '.join(r.ref for r in self.routes)})", "model")
        if "==" in model:
            name, _, version = model.partition("==")
            for route in self.routes:
                if route.name == name and route.current is not None and route.current.version == version:
                    return route
        elif "@" in model:
            for route in self.routes:
                if route.ref == model:
                    return route
        else:
            for route in self.routes:
                if route.name == model:
                    return route
        raise ModelNotFound(f"model {model!r} is not served here; GET /v1/models lists "
                            f"{', '.join(r.ref for r in self.routes)} and the versions they serve")

    def acquire(self, model: str | None) -> Loaded:
        """The version a request goes to, held until its sequences finish (`holder.release`)."""
        route = self.route_for(model)
        for _ in range(3):
            entry = route.current
            if entry is None:
                raise NotReady(f"no version of {route.ref} loaded yet")
            try:
                return self.holder.acquire(entry)
            except NotReady:
                continue  # switched and unloaded meanwhile: the route's new version
        raise NotReady(f"{route.ref}: version changing, try again")

    # --- answering -----------------------------------------------------------------------------
    def start_generation(self, model: str | None, prompts: list[str], *, max_tokens: int, temperature: float,
                         top_p: float, stop: list[str], seed: int | None = None) -> tuple[Loaded, list[Sequence]]:
        """Submit one sequence per prompt (they are batched with everything else running)."""
        if max_tokens > self.options.max_tokens_limit:
            raise BadRequest(f"max_tokens: {max_tokens} exceeds this server's limit of "
                             f"{self.options.max_tokens_limit}")
        entry = self.acquire(model)
        holder = self.holder
        try:
            encoded = [holder.encode(p) for p in prompts]
            context = _context_length(holder.model)
            for ids in encoded:
                if not ids:
                    raise BadRequest("prompt: encodes to no tokens")
                if context and len(ids) + max_tokens > context:
                    raise BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                     f"model's context of {context} tokens")
        except BaseException:
            holder.release(entry)
            raise
        for _ in encoded[1:]:
            holder.acquire(entry)  # one hold per sequence; each sequence releases its own
        sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        sequences = [self.scheduler.submit(Sequence(entry, ids, sampling, holder.decode)) for ids in encoded]
        return entry, sequences

    def chat_prompt(self, model: str | None, messages: list[dict]) -> str:
        holder = self.holder
        self.route_for(model)  # 404 before 400: an unknown model is the first thing wrong
        if holder.tokenizer is None:
            raise NotReady("no adapter version loaded yet")
        if not getattr(holder.tokenizer, "chat_template", None):
            raise BadRequest(f"messages: the base model ({_base_name(holder.base_manifest)}) has no chat template; "
                             "use /v1/completions with a plain prompt", "messages")
        try:
            return holder.chat_prompt(messages)
        except Exception as exc:  # noqa: BLE001 - the template's own complaint (a jinja error) is the message
            raise BadRequest(f"messages: the chat template cannot render them: {exc}", "messages") from None

    def complete_all(self, prompts: list[str], *, model: str | None = None, max_tokens: int, temperature: float,
                     top_p: float, stop: list[str], seed: int | None = None, chat: bool = False) -> tuple[Loaded, dict]:
        """One OpenAI answer for a batch of prompts: choice i answers prompt i, usage is summed."""
        entry, sequences = self.start_generation(model, prompts, max_tokens=max_tokens, temperature=temperature,
                                                 top_p=top_p, stop=stop, seed=seed)
        texts = [seq.result() for seq in sequences]
        tokens = sum(seq.completion_tokens for seq in sequences)
        self.metrics.tokens.inc(tokens)
        choices = []
        for i, (seq, text) in enumerate(zip(sequences, texts)):
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": seq.finish_reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": seq.finish_reason})
        prompt_tokens = sum(len(seq.prompt_ids) for seq in sequences)
        return entry, {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": entry.model_id, "system_fingerprint": identity(entry),
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                      "total_tokens": prompt_tokens + tokens},
        }

    # --- describing ----------------------------------------------------------------------------
    def models(self) -> list[dict]:
        """What /v1/models lists: each route's current version, with its identity and base."""
        from loraflow.registry.manifest import base_identity

        data = []
        for route in self.routes:
            entry = route.current
            if entry is None:
                continue
            base = base_identity(entry.manifest)
            created = entry.manifest.get("created_at")
            data.append({"id": entry.model_id, "object": "model", "owned_by": "loraflow",
                         "created": _epoch(created), "root": base.get("id"), "parent": base.get("id"),
                         "alias": route.ref if route.alias else None, "ref": route.ref,
                         "version": entry.version, "sha256": entry.sha256,
                         "base_model": {"id": base.get("id"), "revision": base.get("revision")}})
        return data

    def describe(self) -> dict:
        first = self.routes[0].describe()
        return {
            **first,
            "loaded_versions": self.holder.loaded_versions(),
            "poll_interval_s": self.options.interval,
            "adapters": [r.describe() for r in self.routes],
            "scheduler": {"max_batch": self.options.max_batch, "running": self.scheduler.running,
                          "waiting": self.scheduler.depth, "steps": self.scheduler.steps,
                          "peak_batch": self.scheduler.peak_batch},
            "max_loaded": self.options.max_loaded, "loads": self.holder.loads, "evictions": self.holder.evictions,
        }

    @property
    def ready(self) -> bool:
        return any(r.current is not None for r in self.routes)


def identity(entry: Loaded) -> str:
    """What a response says it was generated by, beyond `model`: the version manifest's sha256."""
    return f"sha256:{entry.sha256}"


def _epoch(iso: str | None) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def _context_length(model) -> int | None:
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
