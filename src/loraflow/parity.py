"""Parity: a model that claims to be "base + this adapter" (the service's multi-adapter model, a
merged export) generates, greedily, the same tokens as plain PEFT on the same files
(`PeftModel.from_pretrained(base, adapter_dir)`, freshly loaded, sharing no module with the model
under test), on fixed prompts, token for token.

Greedy tokens, not a logit tolerance, are the verdict: they are what a client sees, and they are
exact where a tolerance would have to be chosen per model size. The largest logit difference on
the reference's own sequences is recorded beside them, so a drift that has not yet flipped a
token is visible too. One mismatch is reported as one line naming the prompt and the first
differing generated token.

Used by the service's canary (loraflow.serving.canary) and by `loraflow export --merged`
(loraflow.export): one check, one verdict format.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraflow.errors import ModelError
from loraflow.evaluation import EVAL_PROMPTS

# The first three of the demo's fixed prompts (the evaluation's), 8 tokens each: the serving side
# runs inside the model lock, where every token delays waiting requests (SmolLM2-135M on 2 shared
# cores: ~9.5 s for all six prompts, bench/parity_cost.py).
PROMPTS: tuple[str, ...] = EVAL_PROMPTS[:3]
NEW_TOKENS = 8
REFERENCE = "PeftModel.from_pretrained(base, adapter_dir)"

# A side's greedy continuation of one prompt (token ids in, generated ids out).
Generate = Callable[[list[int]], list[int]]


class ParityError(ModelError):
    """A model's greedy continuations differ from plain PEFT's on the same weights."""


@dataclass
class Observation:
    """What one model did on the fixed prompts: its greedy continuations and, on the sequences
    it was forced through, its logits (kept for the reference only)."""

    prompt_ids: list[list[int]]
    generated: list[list[int]]
    logits: list[Any] = field(default_factory=list, repr=False)  # torch tensors, one per prompt
    max_abs_logit_diff: float | None = None  # against the reference, when forced through its sequences
    seconds: float = 0.0

    def sequences(self) -> list[list[int]]:
        return [p + g for p, g in zip(self.prompt_ids, self.generated)]


@dataclass
class ParityResult:
    ok: bool
    reason: str | None  # one line when not ok
    prompts: int
    new_tokens: int
    tokens_compared: int
    max_abs_logit_diff: float | None
    mismatch: dict | None  # prompt, position, expected / got (ids and text)
    reference: str = REFERENCE
    seconds: float = 0.0  # both sides' generations and forward passes, loading excluded

    def to_dict(self) -> dict:
        return asdict(self)


def encode(encode_one: Callable[[str], list[int]], prompts: Sequence[str] = PROMPTS) -> list[list[int]]:
    """The prompts' token ids, through the caller's own encoding (the service's, under its lock)."""
    ids = [[int(t) for t in encode_one(p)] for p in prompts]
    empty = [p for p, i in zip(prompts, ids) if not i]
    if empty:
        raise ModelError(f"parity prompt {empty[0]!r}: encodes to no tokens")
    return ids


def end_ids(model, tokenizer) -> set[int]:
    """The ids that end a generation: the tokenizer's EOS and the model's generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else ({configured} if configured is not None else set())
    return {int(i) for i in ids}


def greedy(model, pad_token_id: int, ends: set[int], new_tokens: int = NEW_TOKENS) -> Generate:
    """A plain `generate` call, greedy, one unpadded prompt at a time. The continuation is cut
    before its first end id: both sides then say "ended here" the same way, whether their
    generation loop keeps the end token (transformers) or not (the service's)."""
    import torch

    from loraflow.modeling import autocast, precision_of

    def run(prompt_ids: list[int]) -> list[int]:
        ids = torch.tensor([prompt_ids], device=model.device)
        # The precision the model is held in, as the service computes (scheduler.forward).
        with torch.inference_mode(), autocast(precision_of(model)):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=pad_token_id, eos_token_id=sorted(ends) or None)
        return until_end([int(t) for t in out[0, len(prompt_ids):]], ends)

    return run


def until_end(tokens: list[int], ends: set[int]) -> list[int]:
    return next((tokens[:k] for k, t in enumerate(tokens) if t in ends), tokens)


def observe(model, prompt_ids: list[list[int]], generate: Generate, *,
            reference: Observation | None = None) -> Observation:
    """Generate on every prompt with `generate`, then run `model` forward over the reference's
    sequences (its own, for the reference itself) to compare logits position by position."""
    import torch

    started = time.monotonic()
    generated = [list(generate(list(p))) for p in prompt_ids]
    obs = Observation([list(p) for p in prompt_ids], generated)
    forced = reference.sequences() if reference is not None else obs.sequences()
    worst = 0.0
    from loraflow.modeling import autocast, precision_of

    with torch.inference_mode(), autocast(precision_of(model)):
        for i, seq in enumerate(forced):
            ids = torch.tensor([seq], device=model.device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().cpu()
            if reference is None:
                obs.logits.append(logits)
            else:
                diff = (logits - reference.logits[i]).abs().max().item()
                worst = max(worst, diff if diff == diff else float("inf"))  # NaN counts as infinitely far
    if reference is not None:
        obs.max_abs_logit_diff = worst
    obs.seconds = time.monotonic() - started
    return obs


def compare(reference: Observation, candidate: Observation, tokenizer, *, subject: str,
            prompts: Sequence[str] = PROMPTS, new_tokens: int = NEW_TOKENS) -> ParityResult:
    """Token-for-token verdict; `subject` names the model under test in the one-line reason
    (e.g. "the serving path", "the merged model")."""
    compared = 0
    mismatch = None
    for prompt, want, got in zip(prompts, reference.generated, candidate.generated):
        position = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), None)
        if position is None and len(want) != len(got):
            position = min(len(want), len(got))  # one side stopped (EOS) where the other went on
        compared += len(want) if position is None else position
        if position is not None:
            mismatch = {"prompt": prompt, "position": position,
                        "expected": _token(want, position, tokenizer), "got": _token(got, position, tokenizer)}
            break
    reason = None
    if mismatch is not None:
        exp, got = mismatch["expected"], mismatch["got"]
        drift = candidate.max_abs_logit_diff
        reason = (f"parity: {subject} differs from plain PEFT on prompt {mismatch['prompt']!r} at generated "
                  f"token {mismatch['position']}: {got['text']!r} (id {got['id']}) instead of "
                  f"{exp['text']!r} (id {exp['id']})"
                  + (f"; max logit difference {drift:.3g}" if drift is not None else ""))
    return ParityResult(mismatch is None, reason, len(reference.generated), new_tokens, compared,
                        candidate.max_abs_logit_diff, mismatch,
                        seconds=round(reference.seconds + candidate.seconds, 3))


def _token(ids: list[int], position: int, tokenizer) -> dict:
    if position >= len(ids):
        return {"id": None, "text": "<end>"}
    return {"id": ids[position], "text": tokenizer.decode([ids[position]])}


def reference_model(base_source: str | Path, adapter_dir: str | Path, *, dtype=None, device=None):
    """Plain PEFT, fresh: the base read again from its files, the adapter from its directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraflow.modeling import peft_quietly

    kwargs = {"dtype": dtype} if dtype is not None else {}
    base = AutoModelForCausalLM.from_pretrained(str(base_source), use_safetensors=True, **kwargs)
    if device is not None:
        base.to(device)
    with peft_quietly():
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()
