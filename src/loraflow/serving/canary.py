"""What a new version must pass before it gets traffic: finite logits, a fixed prompt generates,
greedy continuations of the fixed prompts from the serving path equal plain PEFT's on the same
files (loraflow.parity), and its perplexity on a few held-back documents is not worse than the
figure its manifest recorded at evaluation (`metrics.adapter_ppl`) by more than a tolerance.

Parity is checked on the version as the serving path runs it: in the service's model, beside the
adapters loaded there, through the same greedy `generate` call a request makes. The reference is
built fresh from the files (the base model read again from the source the service loaded, the
adapter from its verified directory), outside the model lock, so requests keep being served while
it loads and generates; it is dropped right after.

The serving side runs in one hold of the model lock, ahead of waiting requests (see
serving.model): a request queued during a swap waits for it once (a few short generations and a
few forward passes).

The built-in documents are short movie-review sentences (the seed's domain). Pass the held-back
part of your own eval set (`--canary-docs FILE`) for a tighter check; the recorded figure was
measured on the eval set, so the tolerance also absorbs the difference between the two texts.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loraflow import parity as par
from loraflow.errors import ConfigError
from loraflow.serving.scheduler import serving_greedy

PROMPT = "The movie was"
GENERATE_TOKENS = 8
DEFAULT_TOLERANCE = 1.0  # perplexity may be up to (1 + tolerance) x the recorded figure
DEFAULT_DOCUMENTS = (
    "This movie was a pleasant surprise. The acting was good and the story kept me interested until the end.",
    "I did not like this film at all. The plot made no sense and the dialogue was painfully slow.",
    "A solid cast, a beautiful score and a script that trusts its audience. I would watch it again.",
    "The first half is funny, but the ending drags on and the characters never become more than clichés.",
)


@dataclass
class CanaryResult:
    version: str
    ok: bool
    reason: str | None
    ppl: float | None
    recorded_ppl: float | None
    limit_ppl: float | None
    sample: str | None
    seconds: float
    parity: dict | None = None  # loraflow.parity.ParityResult, as a dict

    def to_dict(self) -> dict:
        return asdict(self)


def read_documents(path: str | Path | None) -> list[str]:
    """One document per line (blank lines skipped), or a .jsonl file with a `text` field."""
    if path is None:
        return list(DEFAULT_DOCUMENTS)
    import json

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"--canary-docs {path}: {exc.strerror or exc}") from None
    docs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
                docs.append(str(record["text"]))
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"--canary-docs {path}: line {number} is not a JSON object with 'text'") from None
        else:
            docs.append(line)
    if not docs:
        raise ConfigError(f"--canary-docs {path}: no documents")
    return docs


def run_canary(holder, entry, documents: list[str], tolerance: float = DEFAULT_TOLERANCE,
               max_tokens_per_doc: int = 256, *, parity: bool = True) -> CanaryResult:
    import torch

    started = time.monotonic()
    recorded = (entry.manifest.get("metrics") or {}).get("adapter_ppl")
    recorded = float(recorded) if isinstance(recorded, (int, float)) and math.isfinite(recorded) else None
    limit = recorded * (1 + tolerance) if recorded is not None else None
    tok = holder.tokenizer

    checked: dict = {}

    def result(ok: bool, reason: str | None, ppl=None, sample=None) -> CanaryResult:
        return CanaryResult(entry.version, ok, reason, ppl, recorded, limit, sample,
                            round(time.monotonic() - started, 3), checked.get("parity"))

    reference = _reference(holder, entry) if parity else None
    reference_s = time.monotonic() - started  # loading and generating, outside the model lock

    # Through the holder: requests encode concurrently, and a shared fast tokenizer is not thread-safe.
    def encode(model, text: str):
        return torch.tensor([holder.encode(text)[:max_tokens_per_doc]], dtype=torch.long, device=model.device)

    def finite_logits(model) -> bool:
        return bool(torch.isfinite(model(input_ids=encode(model, PROMPT)).logits).all())

    def generate(model):
        prompt = encode(model, PROMPT)
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GENERATE_TOKENS,
                             do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        new = out[0, prompt.shape[1]:]
        return int(new.numel()), holder.decode(new.tolist())

    def doc_nll(model, doc: str) -> tuple[float, int]:
        ids = encode(model, doc)
        if ids.shape[1] < 2:
            return 0.0, 0
        return float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1), ids.shape[1] - 1

    def steps(model):
        # One hold of the model lock for the whole canary (it goes ahead of waiting requests): the
        # move is served sooner, and queued requests wait once, for about one short generation.
        if not finite_logits(model):
            return "non-finite logits on the canary prompt", None, 0.0, 0
        generated, sample = generate(model)
        if generated == 0:
            return f"generated nothing for the canary prompt {PROMPT!r}", sample, 0.0, 0
        if reference is not None:
            # The serving path itself: the generation loop's prefill and decode steps, with this
            # version named per row beside the other adapters, as a request runs.
            served = par.observe(model, reference.prompt_ids, serving_greedy(holder, entry, par.NEW_TOKENS),
                                 reference=reference)
            verdict = par.compare(reference, served, tok, subject=f"the serving path of version {entry.version}")
            checked["parity"] = {**verdict.to_dict(), "reference_seconds": round(reference_s, 3),
                                 "serving_seconds": round(served.seconds, 3)}
            if not verdict.ok:
                return verdict.reason, sample, 0.0, 0
        nll, count = 0.0, 0
        for doc in documents:
            doc_sum, doc_count = doc_nll(model, doc)
            nll += doc_sum
            count += doc_count
        return None, sample, nll, count

    failure, sample, nll, count = holder.run(entry, steps)
    if failure:
        return result(False, failure, sample=sample)
    if count == 0:
        return result(False, "the canary documents hold no tokens", sample=sample)
    mean = nll / count
    ppl = math.exp(mean) if math.isfinite(mean) and mean < 700 else math.inf
    if not math.isfinite(ppl):
        return result(False, "non-finite perplexity on the canary documents", sample=sample)
    if limit is not None and ppl > limit:
        return result(False, f"perplexity {ppl:.4g} on the canary documents exceeds {limit:.4g} "
                             f"(recorded {recorded:.4g} x (1 + {tolerance:g}))", ppl=ppl, sample=sample)
    return result(True, None, ppl=ppl, sample=sample)


def _reference(holder, entry) -> par.Observation:
    """Plain PEFT's greedy continuations of the fixed prompts, on a fresh copy of the version's
    base model and adapter files, computed outside the model lock."""
    import torch

    from loraflow.modeling import pad_token_id

    prompt_ids = par.encode(holder.encode)
    pad = pad_token_id(holder.tokenizer)
    base = holder.model.get_base_model()
    param = next(base.parameters())
    model = par.reference_model(base.name_or_path, entry.path, dtype=param.dtype, device=param.device)
    try:
        return par.observe(model, prompt_ids, par.greedy(model, pad, set(holder.eos_ids)))
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
