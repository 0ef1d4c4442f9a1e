"""Tokenising documents and laying them out in rows of at most `max_length` tokens.

Every document gets EOS appended (GPT-2 has no pad token; a model that never sees EOS in its
loss never learns to stop). A document longer than `max_length` is cut into `max_length`
chunks; only the last chunk ends in EOS. Each row carries `position_ids` that restart at 0 at
every document/chunk start: transformers derives a block-diagonal causal mask from them when no
attention_mask is passed, so packed documents never attend to each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

# Documents packed together must come from one batch of `map`; a large batch packs tighter.
PACK_BATCH_DOCUMENTS = 100_000


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        from loraflow.errors import ConfigError

        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no eos_token; "
                          "documents need an end-of-sequence token")
    return int(eos)


def tokenize_documents(ds: datasets.Dataset, tokenizer: Any, *, text_column: str = "text") -> datasets.Dataset:
    """One row per document: `input_ids` = the tokenizer's encoding (with its own special tokens,
    e.g. a Llama BOS) followed by EOS."""
    eos = _eos_id(tokenizer)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        # verbose=False: documents longer than the model context are expected here; they are
        # split into max_length chunks afterwards, so the "sequence too long" warning is noise.
        ids = tokenizer(batch[text_column], add_special_tokens=True, verbose=False)["input_ids"]
        return {"input_ids": [row + [eos] if not row or row[-1] != eos else row for row in ids]}

    return ds.map(encode, batched=True, remove_columns=ds.column_names, keep_in_memory=True,
                  desc="tokenise")


def _positions_from_lengths(batch: dict[str, list]) -> dict[str, list]:
    return {"position_ids": [[p for n in lengths for p in range(n)] for lengths in batch["seq_lengths"]]}


def pack_documents(ds: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Best-fit-decreasing packing of whole chunks into rows of at most `max_length` tokens.

    TRL's `pack_dataset(strategy="bfd_split")` does exactly this (split overflow into chunks, then
    BFD with a segment tree) and is deterministic; we only turn its `seq_lengths` into position ids."""
    from trl.data_utils import pack_dataset

    packed = pack_dataset(ds.select_columns(["input_ids"]), max_length, strategy="bfd_split",
                          map_kwargs={"batch_size": PACK_BATCH_DOCUMENTS, "keep_in_memory": True})
    packed = packed.map(_positions_from_lengths, batched=True, keep_in_memory=True, desc="position ids")
    return packed.remove_columns(["seq_lengths"])


def chunk_documents(ds: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Packing off: one document (or one `max_length` chunk of a long one) per row, the seed's layout."""

    def split(batch: dict[str, list]) -> dict[str, list]:
        rows: list[list[int]] = []
        for ids in batch["input_ids"]:
            rows += [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
        return {"input_ids": rows, "position_ids": [list(range(len(r))) for r in rows]}

    return ds.map(split, batched=True, remove_columns=ds.column_names, keep_in_memory=True, desc="chunk")


def layout_rows(ds: datasets.Dataset, max_length: int, packing: bool) -> datasets.Dataset:
    import datasets as hf

    rows = pack_documents(ds, max_length) if packing else chunk_documents(ds, max_length)
    # int32 halves the cache on disk; the collator makes int64 tensors anyway.
    features = hf.Features({"input_ids": hf.List(hf.Value("int32")), "position_ids": hf.List(hf.Value("int32"))})
    return rows.cast(features, keep_in_memory=True)
