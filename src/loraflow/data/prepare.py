"""`prepare_dataset`: records -> tokenised, packed rows, cached by a content fingerprint.

The fingerprint is a sha256 over the cleaned texts of both splits and every setting that changes
the rows (tokenizer vocabulary and rules, EOS id, max_length, packing, cleaning, column, splits,
sample limits, seed). It keys `LORAFLOW_HOME/prepared/<fingerprint>/`, so an unchanged re-run
loads the rows instead of preparing them, and a changed dataset can never hit a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.data.packing import layout_rows, tokenize_documents
from loraflow.data.sources import TEXT, load_records
from loraflow.errors import ConfigError
from loraflow.log import get_logger, log_once
from loraflow.paths import cache_dir

if TYPE_CHECKING:
    import datasets

    from loraflow.settings import DataSettings, Settings

log = get_logger("data")

# Bump when the row layout produced for the same inputs changes.
FORMAT_VERSION = "loraflow-prepared-v1"
STATS_FILE = "loraflow_stats.json"
# transformers' "no limit" sentinel for model_max_length is ~1e30; anything this large is not a context.
_NO_LIMIT = 10**8


@dataclass
class PreparedDataset:
    train: datasets.Dataset
    eval: datasets.Dataset
    fingerprint: str
    cache_dir: Path
    from_cache: bool
    stats: dict[str, Any] = field(default_factory=dict)


def hash_texts(ds: datasets.Dataset, column: str = TEXT) -> str:
    digest = hashlib.sha256()
    for batch in ds.iter(batch_size=10_000):
        for text in batch[column]:
            raw = text.encode("utf-8")
            digest.update(len(raw).to_bytes(8, "little"))  # length prefix: no ambiguity across records
            digest.update(raw)
    return digest.hexdigest()


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What decides how text becomes ids: the full serialized fast tokenizer (vocab, merges,
    normalizer, pre/post-processor) when there is one, else the vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "sha256": hashlib.sha256(blob.encode("utf-8")).hexdigest(),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
    }


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def compute_fingerprints(data: DataSettings, seed: int, tok_id: dict[str, Any], train_sha: str,
                         eval_sha: str) -> tuple[str, str]:
    """(fingerprint of the whole prepared dataset, fingerprint of the eval set alone).

    The eval fingerprint leaves out `packing` and everything about the train split: with
    per-document position ids the eval loss of a document does not depend on what shares its row,
    so two runs with these equal were scored on exactly the same tokens."""
    from loraflow.settings import result_role

    tokenisation = {"tokenizer": {k: v for k, v in tok_id.items() if k != "name_or_path"},
                    "max_length": data.max_length}
    # Every data setting that changes the rows (settings.result_role); where the data came from
    # (`source` role) is left out: the texts themselves are hashed.
    shaping = {name: getattr(data, name) for name, field in type(data).model_fields.items()
               if result_role(field) not in ("source", "inert") and name != "max_length"}
    settings = {"format": FORMAT_VERSION, **tokenisation, **shaping, "seed": seed}
    full = _sha({"settings": settings, "train": train_sha, "eval": eval_sha})
    eval_only = _sha({"format": FORMAT_VERSION, **tokenisation, "eval": eval_sha})
    return full[:32], eval_only[:32]


def model_context_length(config: Any) -> int | None:
    """The longest sequence a model's positions cover (GPT-2 `n_positions`, Llama
    `max_position_embeddings`), for `prepare_dataset(model_max_positions=...)`."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    text_config = getattr(config, "text_config", None)  # multimodal wrappers
    return model_context_length(text_config) if text_config is not None else None


def check_max_length(data: DataSettings, tokenizer: Any, model_max_positions: int | None) -> None:
    limits = []
    if model_max_positions:
        limits.append((int(model_max_positions), "the model's context (max position embeddings)"))
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < _NO_LIMIT:
        limits.append((tok_limit, f"tokenizer.model_max_length of {getattr(tokenizer, 'name_or_path', '?')}"))
    for limit, what in limits:
        if data.max_length > limit:
            raise ConfigError(f"data.max_length={data.max_length} is above {what} ({limit}); "
                              f"set data.max_length <= {limit}")


def _split_stats(docs: datasets.Dataset, rows: datasets.Dataset, max_length: int) -> dict[str, Any]:
    import numpy as np

    doc_lengths = np.fromiter((len(x) for x in docs["input_ids"]), dtype=np.int64, count=len(docs))
    row_lengths = np.fromiter((len(x) for x in rows["input_ids"]), dtype=np.int64, count=len(rows))
    chunks = int(np.ceil(doc_lengths / max_length).sum())
    tokens = int(doc_lengths.sum())
    return {
        "documents": len(docs), "chunks": chunks, "rows": len(rows), "tokens": tokens,
        # Tokens the loss is computed on: every token but each chunk's first (see PackedCollator).
        "target_tokens": tokens - chunks,
        "max_document_tokens": int(doc_lengths.max()) if len(doc_lengths) else 0,
        "mean_document_tokens": round(float(doc_lengths.mean()), 2) if len(doc_lengths) else 0.0,
        "fill": round(tokens / max(1, len(rows) * max_length), 4),
        "longest_row": int(row_lengths.max()) if len(row_lengths) else 0,
    }


def prepare_dataset(settings: Settings, tokenizer: Any, *, model_max_positions: int | None = None,
                    cache_root: Path | None = None) -> PreparedDataset:
    """Load, clean, split, tokenise and lay out `settings.data`, or load it from the cache.

    `model_max_positions`: the model's context (e.g. `config.n_positions`); `data.max_length`
    above it, or above the tokenizer's `model_max_length`, is a ConfigError."""
    import datasets

    data, seed = settings.data, settings.training.seed
    check_max_length(data, tokenizer, model_max_positions)
    t0 = time.perf_counter()
    from loraflow.loads import count

    count("dataset")  # read and hashed: once per run (loraflow.recipe)
    records = load_records(data, settings.storage, seed=seed)
    tok_id = tokenizer_identity(tokenizer)
    fingerprint, eval_fingerprint = compute_fingerprints(
        data, seed, tok_id, hash_texts(records["train"]), hash_texts(records["eval"]))
    root = cache_root or cache_dir("prepared")
    target = root / fingerprint

    if (target / STATS_FILE).is_file():
        loaded = datasets.load_from_disk(str(target))
        stats = json.loads((target / STATS_FILE).read_text())
        # The train, eval and gate tasks of one run each find it: say so once per run.
        log_once(log, logging.INFO, "prepared data from cache %s (fingerprint %s): %d train rows, %d eval rows",
                 target, fingerprint, len(loaded["train"]), len(loaded["eval"]))
        return PreparedDataset(loaded["train"], loaded["eval"], fingerprint, target, True, stats)

    splits, stats = {}, {
        "fingerprint": fingerprint, "eval_fingerprint": eval_fingerprint, "source": data.source,
        "tokenizer": tok_id["name_or_path"], "tokenizer_sha256": tok_id["sha256"],
        "eos_token_id": tok_id["eos_token_id"], "max_length": data.max_length, "packing": data.packing,
        "seed": seed,
    }
    for name in ("train", "eval"):
        docs = tokenize_documents(records[name], tokenizer)
        rows = layout_rows(docs, data.max_length, data.packing)
        stats[name] = _split_stats(docs, rows, data.max_length)
        splits[name] = rows
    stats["prepare_s"] = round(time.perf_counter() - t0, 3)

    # Write next to the final place, then rename: a crash or a concurrent run (one per DDP rank)
    # never leaves a half-written cache that later runs would trust.
    tmp = root / f".{fingerprint}.{uuid.uuid4().hex[:8]}.tmp"
    datasets.DatasetDict(splits).save_to_disk(str(tmp))
    (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2, sort_keys=True))
    try:
        tmp.rename(target)
    except OSError:  # someone else finished first: theirs is identical by construction
        shutil.rmtree(tmp, ignore_errors=True)
    loaded = datasets.load_from_disk(str(target))
    log.info("prepared data in %.1f s -> %s: train %d docs / %s tokens in %d rows (fill %.0f%%), "
             "eval %d docs / %s tokens", stats["prepare_s"], target, stats["train"]["documents"],
             f"{stats['train']['tokens']:,}", stats["train"]["rows"], 100 * stats["train"]["fill"],
             stats["eval"]["documents"], f"{stats['eval']['tokens']:,}")
    return PreparedDataset(loaded["train"], loaded["eval"], fingerprint, target, False, stats)
