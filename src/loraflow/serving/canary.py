"""What a new version must pass before it gets traffic: finite logits, a fixed prompt generates,
and its perplexity on a few held-back documents is not worse than the figure its manifest
recorded at evaluation (`metrics.adapter_ppl`) by more than a tolerance.

The canary runs in one hold of the model lock, ahead of waiting requests (see serving.model): a
request queued during a swap waits for it once (a short generation and a few forward passes).

The built-in documents are short movie-review sentences (the seed's domain). Pass the held-back
part of your own eval set (`--canary-docs FILE`) for a tighter check; the recorded figure was
measured on the eval set, so the tolerance also absorbs the difference between the two texts.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loraflow.errors import ConfigError

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
               max_tokens_per_doc: int = 256) -> CanaryResult:
    import torch

    started = time.monotonic()
    recorded = (entry.manifest.get("metrics") or {}).get("adapter_ppl")
    recorded = float(recorded) if isinstance(recorded, (int, float)) and math.isfinite(recorded) else None
    limit = recorded * (1 + tolerance) if recorded is not None else None
    tok = holder.tokenizer

    def result(ok: bool, reason: str | None, ppl=None, sample=None) -> CanaryResult:
        return CanaryResult(entry.version, ok, reason, ppl, recorded, limit, sample,
                            round(time.monotonic() - started, 3))

    # The tokenizer is used only under the model lock (see serving.service).
    def encode(model, text: str):
        return tok(text, return_tensors="pt")["input_ids"][:, :max_tokens_per_doc].to(model.device)

    def finite_logits(model) -> bool:
        return bool(torch.isfinite(model(input_ids=encode(model, PROMPT)).logits).all())

    def generate(model):
        prompt = encode(model, PROMPT)
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GENERATE_TOKENS,
                             do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        new = out[0, prompt.shape[1]:]
        return int(new.numel()), tok.decode(new, skip_special_tokens=True)

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
