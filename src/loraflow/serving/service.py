"""The service: follows `NAME@ALIAS` and, for every move, loads the new version beside the current
one, runs the canary, switches new requests to it and lets the old one finish its requests.

A version that fails to load or fails its canary is unloaded, never served, and reported in
`/v1/adapter` (`last_swap_error`), the logs and the `loraflow_serve_swaps{result=...}` metric; the
current version keeps serving. A rollback is just the alias moving back.
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
from loraflow.serving.model import Loaded, ModelHolder, same_base

log = get_logger("serving")


class SwapRefused(LoraflowError):
    """A new version was not switched to (load failure or failed canary)."""


class BadRequest(LoraflowError):
    """The request is well-formed JSON but cannot be served as asked (too long for the model...)."""


@dataclass
class ServeOptions:
    interval: float = 10.0  # seconds between alias polls
    canary_docs: str | None = None
    canary_tolerance: float = DEFAULT_TOLERANCE
    max_tokens_limit: int = 512
    dest: str | None = None  # adapter cache root (default LORAFLOW_HOME/adapters)

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ConfigError(f"--poll-interval {self.interval}: must be positive")
        if self.canary_tolerance < 0:
            raise ConfigError(f"--canary-tolerance {self.canary_tolerance}: must be >= 0")
        if self.max_tokens_limit < 1:
            raise ConfigError(f"--max-tokens-limit {self.max_tokens_limit}: must be >= 1")


class Service:
    def __init__(self, ref: str, settings, options: ServeOptions | None = None) -> None:
        from loraflow.follow import Follower

        name, alias, _ = parse_ref(ref)
        if "@" not in ref:
            raise ConfigError(f"{ref!r}: serve an alias, NAME@ALIAS (the service follows it)")
        self.name, self.alias = name, alias
        self.settings = settings
        self.options = options or ServeOptions()
        self.documents = read_documents(self.options.canary_docs)
        self.holder = ModelHolder()
        self.metrics = Metrics()
        self.metrics.queue.set_function(lambda: self.holder.lock.waiting)
        self.follower = Follower(f"{name}@{alias}", self.on_change, settings=settings,
                                 interval=self.options.interval, dest=self.options.dest)
        self.swaps = 0
        self.last_swap: dict | None = None
        self.last_swap_error: dict | None = None
        self.last_canary: dict | None = None
        self._swap_lock = threading.Lock()

    # --- following -----------------------------------------------------------------------------
    def start(self) -> Service:
        self.follower.start()
        return self

    def stop(self) -> None:
        self.follower.stop()

    def on_change(self, path: Path, manifest: dict) -> None:
        """The follower's callback: raises SwapRefused so the follower keeps the current version."""
        version = manifest["version"]
        with self._swap_lock:
            started = time.monotonic()
            active = self.holder.active
            try:
                if active is None:
                    entry = self.holder.load_first(f"{self.name}=={version}", path, manifest,
                                                   settings=self.settings, dest=self.options.dest)
                else:
                    if not same_base(active.manifest, manifest):
                        raise ModelError(f"version {version} was trained on another base model than "
                                         f"{active.version}; restart the service to change base models")
                    entry = self.holder.add(path, manifest)
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
                canary = run_canary(self.holder, entry, self.documents, self.options.canary_tolerance)
            except Exception as exc:  # noqa: BLE001 - same: report, keep serving
                self.holder.discard(entry)
                self._refuse(version, "canary_failed", f"canary crashed: {type(exc).__name__}: {exc}")
            self.last_canary = canary.to_dict()
            if not canary.ok:
                self.holder.discard(entry)
                self._refuse(version, "canary_failed", f"canary failed: {canary.reason}")

            old = self.holder.switch(entry)
            self.swaps += 1 if old is not None else 0
            self.metrics.swaps.labels(result="ok").inc()
            self.metrics.serving(self.name, self.alias, version)
            self.last_swap = {"from": old.version if old else None, "to": version, "at": now_iso(),
                              "seconds": round(time.monotonic() - started, 3)}
            self.last_swap_error = None
            log.info("serving %s==%s (%s; canary ppl %.4g, %.2fs)", self.name, version,
                     f"was {old.version}" if old else "first version", canary.ppl or float("nan"),
                     time.monotonic() - started)

    def _refuse(self, version: str, result: str, message: str) -> None:
        self.metrics.swaps.labels(result=result).inc()
        self.last_swap_error = {"version": version, "result": result, "error": message, "at": now_iso()}
        current = self.holder.active.version if self.holder.active else "nothing"
        log.error("not serving %s==%s: %s; still serving %s", self.name, version, message, current)
        raise SwapRefused(message)

    # --- answering -----------------------------------------------------------------------------
    def complete_all(self, prompts: list[str], *, max_tokens: int, temperature: float, top_p: float,
                     stop: list[str], seed: int | None = None) -> dict:
        """One OpenAI completion answer for a batch of prompts: choice i answers prompt i (as
        OpenAI numbers them with n=1), usage is summed."""
        answers = [self.complete(p, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                                 seed=seed) for p in prompts]
        first = answers[0]
        if len(answers) == 1:
            return first
        choices = [{**a["choices"][0], "index": i} for i, a in enumerate(answers)]
        usage = {k: sum(a["usage"][k] for a in answers) for k in first["usage"]}
        return {**first, "model": answers[-1]["model"], "choices": choices, "usage": usage}

    def complete(self, prompt: str, *, max_tokens: int, temperature: float, top_p: float,
                 stop: list[str], seed: int | None = None) -> dict:
        import torch

        holder = self.holder
        if max_tokens > self.options.max_tokens_limit:
            raise BadRequest(f"max_tokens: {max_tokens} exceeds this server's limit of "
                             f"{self.options.max_tokens_limit}")

        # Tokenizing happens under the model lock too: a fast tokenizer shared by threads can
        # fail with "Already borrowed" when two calls reconfigure it at once.
        def generate(model):
            tok = holder.tokenizer
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            if ids.shape[1] == 0:
                raise BadRequest("prompt: encodes to no tokens")
            context = _context_length(model)
            if context and ids.shape[1] + max_tokens > context:
                raise BadRequest(f"prompt ({ids.shape[1]} tokens) + max_tokens ({max_tokens}) exceeds the "
                                 f"model's context of {context} tokens")
            ids = ids.to(model.device)
            eos = tok.eos_token_id
            kwargs = {"max_new_tokens": max_tokens,
                      "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else eos}
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
                if seed is not None:
                    torch.manual_seed(seed)  # under the model lock: no other generation draws meanwhile
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if stop:
                kwargs.update(stop_strings=stop, tokenizer=tok)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            new = out[0, ids.shape[1]:]
            return int(ids.shape[1]), int(new.numel()), tok.decode(new, skip_special_tokens=True)

        entry, (prompt_tokens, completion_tokens, text) = holder.serve(generate)
        finish = "length" if completion_tokens >= max_tokens else "stop"
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        self.metrics.tokens.inc(completion_tokens)
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": f"{self.name}=={entry.version}",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    # --- describing ----------------------------------------------------------------------------
    def describe(self) -> dict:
        from loraflow.registry.manifest import base_identity

        active: Loaded | None = self.holder.active
        base = base_identity(active.manifest) if active else {}
        return {
            "name": self.name, "alias": self.alias,
            "version": active.version if active else None,
            "model": f"{self.name}=={active.version}" if active else None,
            "loaded_at": active.loaded_at if active else None,
            "base_model": {"id": base.get("id"), "revision": base.get("revision")} if active else None,
            "metrics": (active.manifest.get("metrics") or {}) if active else None,
            "loaded_versions": self.holder.loaded_versions(),
            "swaps": self.swaps,
            "last_swap": self.last_swap,
            "last_swap_error": self.last_swap_error,
            "last_canary": self.last_canary,
            "storage_error": self.follower.last_error,
            "poll_interval_s": self.options.interval,
        }


def _context_length(model) -> int | None:
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
