"""Perplexity of the base model and of base + adapter on the eval split, plus a few greedy
generations for the model card.

Both numbers come from one loaded `PeftModel` (the base is the same model under
`disable_adapter()`), the same prepared rows and the same collator as training, so they differ
only by the adapter. Perplexity is token-weighted: exp(sum of token losses / number of target
tokens) over the whole split, not a mean of per-batch perplexities.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.errors import ModelError
from loraflow.log import get_logger

if TYPE_CHECKING:
    from loraflow.data import PreparedDataset
    from loraflow.settings import Settings

log = get_logger("eval")

# Fixed prompts so generations are comparable between runs and adapter versions.
EVAL_PROMPTS = (
    "This movie was",
    "I watched this film last night and",
    "The acting in this",
)
MAX_NEW_TOKENS = 40


@dataclass
class EvalResult:
    base_ppl: float
    adapter_ppl: float
    base_eval_loss: float
    eval_loss: float
    eval_tokens: int
    eval_documents: int
    eval_fingerprint: str
    generations: list[dict[str, str]] = field(default_factory=list)
    eval_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ppl(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def token_loss(model, dataset, collator, *, batch_size: int, device: str) -> tuple[float, int]:
    """(mean loss per target token, number of target tokens). Targets are the collator's labels
    after the causal shift; forward runs with `use_cache=False`, which is what lets transformers
    build the per-document block mask from position_ids (see loraflow.data.collator)."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            labels = batch["labels"][:, 1:].to(device)
            logits = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                           use_cache=False).logits[:, :-1]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels != -100).sum())
    if count == 0:
        raise ModelError("the eval split has no target tokens")
    return total / count, count


def generate_samples(model, tokenizer, prompts=EVAL_PROMPTS, *, device: str, seed: int,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    import torch
    from transformers import set_seed

    from loraflow.modeling import pad_token_id

    texts = []
    for prompt in prompts:
        set_seed(seed)  # greedy needs no randomness, but dropout-free eval + fixed seed keeps it exact
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=pad_token_id(tokenizer))
        texts.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


def _count_documents(prepared: PreparedDataset) -> int:
    docs = (prepared.stats.get("eval") or {}).get("documents")
    if isinstance(docs, int):
        return docs
    # Fall back to counting document starts (a long document cut into chunks counts per chunk).
    return sum(sum(1 for p in row if p == 0) for row in prepared.eval["position_ids"])


def evaluate_adapter(settings: Settings, adapter_dir: str | Path, *, prepared: PreparedDataset | None = None,
                     tokenizer=None) -> EvalResult:
    """Base vs base + adapter on the eval split. Writes nothing: the numbers go into a release
    directory through loraflow.release, never back into the adapter directory it read (which may
    be a verified cache entry)."""
    from peft import PeftModel

    from loraflow import modeling
    from loraflow.data import PackedCollator, prepare_dataset

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter_dir}: not an adapter directory (no adapter_config.json)")
    t0 = time.perf_counter()
    tokenizer = tokenizer or modeling.load_tokenizer(settings)
    if prepared is None:
        prepared = prepare_dataset(settings, tokenizer, model_max_positions=modeling.model_max_positions(settings))
    if len(prepared.eval) == 0:
        raise ModelError(f"data.source={settings.data.source!r}: the eval split is empty")

    precision = modeling.resolve_precision(settings.training, settings.model)
    device = precision.device
    base = modeling.load_base_model(settings, precision)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{adapter_dir}: cannot load the adapter onto {settings.model.name_or_path!r}: {exc}") from None
    model.to(device)
    collator = PackedCollator(modeling.pad_token_id(tokenizer))
    batch_size = settings.training.per_device_train_batch_size

    adapter_loss, tokens = token_loss(model, prepared.eval, collator, batch_size=batch_size, device=device)
    with model.disable_adapter():
        base_loss, _ = token_loss(model, prepared.eval, collator, batch_size=batch_size, device=device)
        base_texts = generate_samples(model, tokenizer, device=device, seed=settings.training.seed)
    texts = generate_samples(model, tokenizer, device=device, seed=settings.training.seed)

    result = EvalResult(
        base_ppl=_ppl(base_loss), adapter_ppl=_ppl(adapter_loss), base_eval_loss=base_loss,
        eval_loss=adapter_loss, eval_tokens=tokens, eval_documents=_count_documents(prepared),
        eval_fingerprint=prepared.fingerprint,
        generations=[{"prompt": p, "text": t, "base_text": b} for p, t, b in zip(EVAL_PROMPTS, texts, base_texts)],
        eval_time_s=round(time.perf_counter() - t0, 3),
    )
    log.info("eval: base ppl %.3f -> adapter ppl %.3f over %d tokens (%d documents)",
             result.base_ppl, result.adapter_ppl, tokens, result.eval_documents)
    return result


def format_results_table(metrics: dict[str, Any]) -> str:
    """The small table the notebook printed at the end, from a metrics.json-shaped dict."""
    rows = [
        ("base perplexity", metrics.get("base_ppl")),
        ("adapter perplexity", metrics.get("adapter_ppl")),
        ("base eval loss", metrics.get("base_eval_loss")),
        ("adapter eval loss", metrics.get("eval_loss")),
        ("eval tokens", metrics.get("eval_tokens")),
        ("train tokens", metrics.get("train_tokens")),
        ("train steps", metrics.get("global_step")),
        ("train time (s)", metrics.get("train_time_s")),
        ("train tokens/s", metrics.get("tokens_per_s")),
    ]
    rows = [(k, v) for k, v in rows if v is not None]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 1e6 else f"{v:.3e}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    width = max(len(k) for k, _ in rows) if rows else 10
    vwidth = max((len(fmt(v)) for _, v in rows), default=5)
    line = f"+-{'-' * width}-+-{'-' * vwidth}-+"
    out = [line, f"| {'metric'.ljust(width)} | {'value'.rjust(vwidth)} |", line]
    out += [f"| {k.ljust(width)} | {fmt(v).rjust(vwidth)} |" for k, v in rows]
    out.append(line)
    return "\n".join(out)
