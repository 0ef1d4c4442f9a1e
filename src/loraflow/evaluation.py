"""Perplexity of the base model and of base + adapter on the eval split, per-document losses for
the promotion gate, generation health on fixed prompts, and an optional forgetting check.

Both numbers come from one loaded `PeftModel` (the base is the same model under
`disable_adapter()`), the same prepared rows and the same collator as training, so they differ
only by the adapter. Perplexity is token-weighted: exp(sum of token losses / number of target
tokens) over the whole split, not a mean of per-batch perplexities.

Per-document losses are the unit of the gate's paired bootstrap (loraflow.promotion): one entry
per document of the eval split (a document longer than `data.max_length` counts once per chunk,
since packing separates its chunks), in the order of the prepared rows, which is the same for
every model evaluated on the same eval fingerprint.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
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
    "My favourite scene is",
    "I would not recommend",
    "The plot",
)
MAX_NEW_TOKENS = 64  # eval.max_new_tokens' default
# Seconds between evaluation progress lines.
PROGRESS_EVERY_S = 15.0


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
    # Per eval document (see the module docstring): mean loss per target token, and target tokens.
    document_losses: list[float] = field(default_factory=list)
    base_document_losses: list[float] = field(default_factory=list)
    document_tokens: list[int] = field(default_factory=list)
    # {"adapter": {...}, "base": {...}, "prompts": n, "max_new_tokens": m}; see generation_health.
    generation_health: dict[str, Any] = field(default_factory=dict)
    # Forgetting check (eval.general_source); None when it is off.
    general_source: str | None = None
    general_base_ppl: float | None = None
    general_adapter_ppl: float | None = None
    general_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ppl(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def document_losses(model, dataset, collator, *, batch_size: int, device: str) -> tuple[list[float], list[int]]:
    """(summed loss, number of target tokens) per document of `dataset`, in row order. A document
    is a run of positions starting at 0 (PackedCollator); padding and one-token chunks have no
    targets and are left out. Forward runs with `use_cache=False`, which is what lets transformers
    build the per-document block mask from position_ids (see loraflow.data.collator)."""
    return _document_losses(model, dataset, collator, batch_size=batch_size, device=device)


def _document_starts(rows) -> int:
    """Documents (chunks) in packed rows: positions that restart at 0."""
    return sum(1 for row in rows["position_ids"] for p in row if p == 0)


class _Progress:
    """Progress lines while evaluation runs (about a minute idle, many on a busy CPU): pieces scored
    of all the passes (adapter, base, forgetting check), elapsed, and an ETA from the rates so far.
    The first batch gets a line (the user sees it move and a first ETA), then one every
    `PROGRESS_EVERY_S`. Generation sets are timed too; until the first one ends their cost is
    unknown and the ETA says so."""

    def __init__(self, total: int, unit: str, generation_sets: int) -> None:
        self.total, self.done, self.unit = total, 0, unit
        self.sets_left, self.sets_s, self.sets_done = generation_sets, 0.0, 0
        self.t0 = self.last = time.perf_counter()
        self.scoring_s = 0.0
        self.lines = 0

    def _eta(self) -> str:
        eta = self.scoring_s / max(1, self.done) * (self.total - self.done)
        if self.sets_left and not self.sets_done:
            return f"eta {eta:.0f} s plus {self.sets_left} generation set{'s' if self.sets_left > 1 else ''}"
        return f"eta {eta + self.sets_left * self.sets_s / max(1, self.sets_done):.0f} s"

    def scored(self, what: str, pieces: int, seconds: float) -> None:
        self.done += pieces
        self.scoring_s += seconds
        now = time.perf_counter()
        if self.lines and now - self.last < PROGRESS_EVERY_S and self.done < self.total:
            return
        self.last, self.lines = now, self.lines + 1
        log.info("eval: %d/%d %s scored (%s), %.0f s elapsed, %s", self.done, self.total, self.unit, what,
                 now - self.t0, self._eta())

    @contextlib.contextmanager
    def generating(self, what: str, prompts: int, budget: int) -> Iterator[None]:
        log.info("eval: %d greedy generations (up to %d new tokens each) with %s", prompts, budget, what)
        t0 = time.perf_counter()
        yield
        self.sets_done, self.sets_left = self.sets_done + 1, self.sets_left - 1
        self.sets_s += time.perf_counter() - t0


def _document_losses(model, dataset, collator, *, batch_size: int, device: str,
                     progress: tuple[_Progress, str] | None = None) -> tuple[list[float], list[int]]:
    import torch
    import torch.nn.functional as F

    from loraflow.modeling import autocast, precision_of

    sums: list[float] = []
    counts: list[int] = []
    model.eval()
    # The precision the base is held in (bf16 on a CPU with native bf16, see modeling.resolve_precision),
    # as in training: the adapters stay fp32 and meet it under autocast; the loss is taken in fp32.
    with torch.inference_mode(), autocast(precision_of(model)):
        for start in range(0, len(dataset), batch_size):
            t0 = time.perf_counter()
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collator(rows)
            labels = batch["labels"][:, 1:].to(device)
            logits = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                           use_cache=False).logits[:, :-1]
            losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     ignore_index=-100, reduction="none").reshape(labels.shape).cpu()
            targets = (labels != -100).cpu()
            # Document j of a row covers the positions from its start (position id 0) to the next
            # start; its targets sit one to the left after the shift.
            doc_ids = (batch["position_ids"] == 0).cumsum(dim=1)[:, 1:]
            for i, row in enumerate(rows):
                n_docs = int(doc_ids[i, :len(row["input_ids"]) - 1].max()) if len(row["input_ids"]) > 1 else 0
                for doc in range(1, n_docs + 1):
                    mask = (doc_ids[i] == doc) & targets[i]
                    n = int(mask.sum())
                    if n:
                        sums.append(float(losses[i][mask].sum()))
                        counts.append(n)
            if progress is not None:
                reporter, what = progress
                reporter.scored(what, sum(1 for row in rows for p in row["position_ids"] if p == 0),
                               time.perf_counter() - t0)
    if not counts:
        raise ModelError("the eval split has no target tokens")
    return sums, counts


def token_loss(model, dataset, collator, *, batch_size: int, device: str) -> tuple[float, int]:
    """(mean loss per target token, number of target tokens). Targets are the collator's labels
    after the causal shift."""
    sums, counts = document_losses(model, dataset, collator, batch_size=batch_size, device=device)
    return sum(sums) / sum(counts), sum(counts)


def generate_samples(model, tokenizer, prompts=EVAL_PROMPTS, *, device: str, seed: int,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict[str, Any]]:
    """Greedy continuations: {"text", "ids" (generated token ids), "ended" (stopped on EOS)}."""
    import torch
    from transformers import set_seed

    from loraflow.modeling import autocast, pad_token_id, precision_of

    out_rows = []
    precision = precision_of(model)
    for prompt in prompts:
        set_seed(seed)  # greedy needs no randomness, but dropout-free eval + fixed seed keeps it exact
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.inference_mode(), autocast(precision):
            # EOS as training appended it to every document: stopping on it is what health measures.
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=pad_token_id(tokenizer), eos_token_id=tokenizer.eos_token_id)
        ids = [int(t) for t in out[0, enc["input_ids"].shape[1]:]]
        ended = bool(ids) and ids[-1] == tokenizer.eos_token_id
        out_rows.append({"text": tokenizer.decode(ids, skip_special_tokens=True), "ids": ids, "ended": ended})
    return out_rows


def generation_health(samples: list[dict[str, Any]], n: int = 4) -> dict[str, float]:
    """How generations behave, not what they say: `eos_rate`, the share that ended with EOS within
    the budget (a model that never learned to stop rambles to the limit); `distinct_2`, unique
    bigrams / bigrams per generation, averaged; `repeated_4gram_rate`, the share of 4-grams that
    repeat an earlier 4-gram of the same generation (degenerate loops push it towards 1)."""
    distinct, repeats, grams = [], 0, 0
    for sample in samples:
        ids = sample["ids"][:-1] if sample["ended"] else sample["ids"]
        bigrams = list(zip(ids, ids[1:]))
        if bigrams:
            distinct.append(len(set(bigrams)) / len(bigrams))
        seen = set()
        for gram in zip(*(ids[k:] for k in range(n))):
            grams += 1
            repeats += gram in seen
            seen.add(gram)
    return {
        "eos_rate": round(sum(s["ended"] for s in samples) / max(1, len(samples)), 4),
        "distinct_2": round(sum(distinct) / len(distinct), 4) if distinct else 0.0,
        "repeated_4gram_rate": round(repeats / grams, 4) if grams else 0.0,
    }


def general_rows(settings: Settings, tokenizer):
    """The forgetting check's documents: every document of `eval.general_source` (all its splits;
    nothing of it is trained on), a seeded sample of `eval.max_general_samples`, tokenised and
    packed like the training data. None when the check is off."""
    import datasets

    from loraflow.data.packing import layout_rows, tokenize_documents
    from loraflow.data.sources import load_records

    source = settings.eval.general_source
    if not source:
        return None
    data = settings.data.model_copy(update={"source": source, "text_column": settings.eval.general_text_column,
                                            "max_eval_samples": None, "max_train_samples": None,
                                            "config_name": None, "revision": None, "eval_size": 0.5})
    records = load_records(data, settings.storage, seed=settings.training.seed)
    texts = datasets.concatenate_datasets([records["train"], records["eval"]])
    limit = settings.eval.max_general_samples
    if limit is not None and len(texts) > limit:
        texts = texts.shuffle(seed=settings.training.seed).select(range(limit))
    docs = tokenize_documents(texts, tokenizer)
    if len(docs) == 0:
        raise ModelError(f"eval.general_source={source!r}: no documents to evaluate")
    return layout_rows(docs, data.max_length, True)


def _count_documents(prepared: PreparedDataset) -> int:
    docs = (prepared.stats.get("eval") or {}).get("documents")
    if isinstance(docs, int):
        return docs
    # Fall back to counting document starts (a long document cut into chunks counts per chunk).
    return sum(sum(1 for p in row if p == 0) for row in prepared.eval["position_ids"])


def evaluate_adapter(settings: Settings, adapter_dir: str | Path, *, prepared: PreparedDataset | None = None,
                     tokenizer=None, with_base: bool = True) -> EvalResult:
    """Base vs base + adapter on the eval split, set up from scratch (`loraflow evaluate`, tests).
    A run scores on its recipe's loaded base instead (loraflow.recipe.Recipe.score). Writes
    nothing: the numbers go into a release directory through loraflow.release, never back into the
    adapter directory it read (which may be a verified cache entry)."""
    from loraflow.recipe import Recipe

    return Recipe(settings, prepared=prepared, tokenizer=tokenizer).score(adapter_dir, with_base=with_base)[0]


def score_adapters(settings: Settings, model, names: dict[str, str], *, prepared: PreparedDataset, tokenizer,
                   device: str, with_base: bool = True) -> dict[str, EvalResult]:
    """Each adapter of `model` (a PeftModel; `names`: role -> adapter name) and, once, the base
    model under `disable_adapter()`, on the same prepared rows and collator as training, so the
    numbers differ only by the adapter. {adapter name: EvalResult}; the base numbers go into each.
    `with_base=False` leaves the base out (its fields are then NaN / empty)."""
    from loraflow import modeling
    from loraflow.data import PackedCollator

    from loraflow.stopping import at

    at("evaluation")
    t0 = time.perf_counter()
    if len(prepared.eval) == 0:
        raise ModelError(f"data.source={settings.data.source!r}: the eval split is empty")
    general = general_rows(settings, tokenizer)
    collator = PackedCollator(modeling.pad_token_id(tokenizer))
    batch_size = settings.training.per_device_train_batch_size
    budget = settings.eval.max_new_tokens

    # Progress counts what is scored: document chunks of up to data.max_length tokens (one per
    # document unless documents are longer).
    passes = len(names) + (1 if with_base else 0)
    documents, chunks = _count_documents(prepared), _document_starts(prepared.eval)
    general_chunks = _document_starts(general) if general is not None else 0
    unit = "documents" if chunks == documents and general is None else "chunks"
    progress = _Progress(passes * (chunks + general_chunks), unit, passes)
    scored = " and ".join([*names, *(["the base model"] if with_base else [])])
    log.info("eval: scoring %d documents%s with %s, then %d greedy generations with each%s", documents,
             f" ({chunks} chunks of up to {settings.data.max_length} tokens)" if chunks != documents else "",
             scored, len(EVAL_PROMPTS),
             f"; forgetting check on {general_chunks} chunks of {settings.eval.general_source}" if general is not None
             else "")

    def score(rows, what: str) -> tuple[list[float], list[int]]:
        return _document_losses(model, rows, collator, batch_size=batch_size, device=device, progress=(progress, what))

    def generate(what: str) -> list[dict[str, Any]]:
        with progress.generating(what, len(EVAL_PROMPTS), budget):
            return generate_samples(model, tokenizer, device=device, seed=settings.training.seed,
                                    max_new_tokens=budget)

    base_sums, base_samples, general_base, counts = [], [], None, None
    if with_base:
        with model.disable_adapter():
            base_sums, counts = score(prepared.eval, "base model")
            base_samples = generate("the base model")
            general_base = score(general, "base model, general text") if general is not None else None

    results: dict[str, EvalResult] = {}
    for role, name in names.items():
        t_adapter = time.perf_counter()
        model.set_adapter(name)
        adapter_sums, counts = score(prepared.eval, role)
        samples = generate(f"the {role}")
        general_adapter = score(general, f"{role}, general text") if general is not None else None
        result = _result(settings, prepared, adapter_sums, counts, samples, base_sums, base_samples, budget,
                         general_adapter, general_base)
        result.eval_time_s = round(time.perf_counter() - t_adapter, 3)
        results[name] = result
    first = results[next(iter(names.values()))]
    first.eval_time_s = round(time.perf_counter() - t0, 3)  # the whole scoring, as a run's eval time
    # The same token count as the prepare line, with the predicted share explained: a document's
    # first token has nothing before it to predict it from.
    all_tokens = (prepared.stats.get("eval") or {}).get("tokens")
    for role, name in names.items():
        result = results[name]
        log.info("eval (%s): base ppl %.2f -> adapter ppl %.2f on %d documents / %s tokens (%s of them predicted); "
                 "generations ending with EOS %.0f%%, distinct-2 %.2f", role, result.base_ppl, result.adapter_ppl,
                 result.eval_documents, f"{all_tokens:,}" if isinstance(all_tokens, int) else "?",
                 f"{result.eval_tokens:,}", 100 * result.generation_health["adapter"]["eos_rate"],
                 result.generation_health["adapter"]["distinct_2"])
        if result.general_adapter_ppl is not None:
            general_base_ppl = f"{result.general_base_ppl:.2f}" if result.general_base_ppl is not None else "-"
            log.info("forgetting check (%s) on %s: base ppl %s -> adapter ppl %.2f over %s predicted tokens", role,
                     result.general_source, general_base_ppl, result.general_adapter_ppl,
                     f"{result.general_tokens:,}")
    log.info("eval: done in %.1f s", time.perf_counter() - t0)
    return results


def _result(settings: Settings, prepared: PreparedDataset, adapter_sums: list[float], counts: list[int],
            samples: list[dict[str, Any]], base_sums: list[float], base_samples: list[dict[str, Any]], budget: int,
            general_adapter, general_base) -> EvalResult:
    with_base = bool(base_sums)
    tokens = sum(counts)
    adapter_loss = sum(adapter_sums) / tokens
    base_loss = sum(base_sums) / tokens if with_base else math.nan
    health = {"adapter": generation_health(samples), "prompts": len(EVAL_PROMPTS), "max_new_tokens": budget}
    if with_base:
        health["base"] = generation_health(base_samples)
    result = EvalResult(
        base_ppl=_ppl(base_loss), adapter_ppl=_ppl(adapter_loss), base_eval_loss=base_loss,
        eval_loss=adapter_loss, eval_tokens=tokens, eval_documents=_count_documents(prepared),
        eval_fingerprint=prepared.fingerprint,
        generations=[{"prompt": p, "text": a["text"], **({"base_text": b["text"]} if with_base else {})}
                     for p, a, b in zip(EVAL_PROMPTS, samples, base_samples or samples)],
        document_losses=[x / n for x, n in zip(adapter_sums, counts)],
        base_document_losses=[x / n for x, n in zip(base_sums, counts)],
        document_tokens=counts,
        generation_health=health,
    )
    if general_adapter is not None:
        general_tokens = sum(general_adapter[1])
        result.general_source = settings.eval.general_source
        result.general_tokens = general_tokens
        result.general_adapter_ppl = _ppl(sum(general_adapter[0]) / general_tokens)
        if general_base is not None:
            result.general_base_ppl = _ppl(sum(general_base[0]) / general_tokens)
    return result


def format_results_table(metrics: dict[str, Any]) -> str:
    """The small table the notebook printed at the end, from a metrics.json-shaped dict."""
    # (label, value, decimals for a float): rounded for people; metrics.json keeps full precision.
    rows = [
        ("base perplexity", metrics.get("base_ppl"), 3),
        ("adapter perplexity", metrics.get("adapter_ppl"), 3),
        ("base eval loss", metrics.get("base_eval_loss"), 3),
        ("adapter eval loss", metrics.get("eval_loss"), 3),
        ("eval tokens (predicted)", metrics.get("eval_tokens"), 0),
        ("general-text base perplexity", metrics.get("general_base_ppl"), 3),
        ("general-text adapter perplexity", metrics.get("general_adapter_ppl"), 3),
        ("train tokens", metrics.get("train_tokens"), 0),
        ("train steps", metrics.get("global_step"), 0),
        ("train time (s)", metrics.get("train_time_s"), 1),
        ("train tokens/s", metrics.get("tokens_per_s"), 0),
    ]
    rows = [(k, v, d) for k, v, d in rows if v is not None]

    def fmt(v: Any, decimals: int) -> str:
        if isinstance(v, float):
            return f"{v:,.{decimals}f}" if abs(v) < 1e6 else f"{v:.3e}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    width = max(len(k) for k, _, _ in rows) if rows else 10
    vwidth = max((len(fmt(v, d)) for _, v, d in rows), default=5)
    line = f"+-{'-' * width}-+-{'-' * vwidth}-+"
    out = [line, f"| {'metric'.ljust(width)} | {'value'.rjust(vwidth)} |", line]
    out += [f"| {k.ljust(width)} | {fmt(v, d).rjust(vwidth)} |" for k, v, d in rows]
    out.append(line)
    return "\n".join(out)
