"""Batching prepared rows for a causal LM without an attention mask.

Rows are right-padded to the longest row of the batch. Padding gets its own run of position ids
(0, 1, ..., k), so it is one more "document" and no real token attends to it. Passing
`position_ids` and no `attention_mask` makes transformers (masking_utils.find_packed_sequence_indices,
transformers >= 4.56) build a block-diagonal causal mask from the position-id restarts.

Caveat, verified on transformers 5.24: packed-sequence detection only happens when no KV cache is
built, i.e. the model must run with `use_cache=False` (Trainer sets `model.config.use_cache =
args.use_cache`, False by default; a hand-written loop or evaluation must pass `use_cache=False`).
With the cache on, documents in one row silently attend to each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

IGNORE_INDEX = -100

# What a forward pass over collated batches must add so the block mask is built (see above).
FORWARD_KWARGS: dict[str, Any] = {"use_cache": False}


@dataclass
class PackedCollator:
    """`flatten=True` is for FlashAttention-2's varlen kernel: the rows are concatenated into one
    row of shape [1, total tokens] with no padding at all, plus the document boundaries
    (`cu_seq_lens_q/k`, int32, and `max_length_q/k`, Python ints) computed here on the host, so the
    kernel needs no device-side search for position-id restarts (a host sync in every layer)
    and transformers' FlashAttention path does not silently fall back to plain causal attention
    across documents, which it does for position ids of a batch wider than one row."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    flatten: bool = False

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        if not rows:
            raise ValueError("PackedCollator got an empty batch")
        if self.flatten:
            return self._flattened(rows)
        longest = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        batch = len(rows)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        # Padding counts 0..k: its own block, so the mask keeps it away from real tokens.
        position_ids = torch.arange(longest, dtype=torch.long).repeat(batch, 1)
        for i, row in enumerate(rows):
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            n = ids.numel()
            pos = torch.as_tensor(row["position_ids"], dtype=torch.long) if "position_ids" in row \
                else torch.arange(n, dtype=torch.long)
            input_ids[i, :n] = ids
            position_ids[i, :n] = pos
            position_ids[i, n:] = torch.arange(longest - n, dtype=torch.long)
            row_labels = ids.clone()
            # A document's first token is never a target: in a packed row it would be "predicted"
            # from the previous document (the model shifts labels by one). With this, a packed
            # row's loss is exactly the sum of its documents' losses run alone. EOS stays a target.
            row_labels[pos == 0] = IGNORE_INDEX
            labels[i, :n] = row_labels
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}

    def _flattened(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        ids = torch.cat([torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows])
        pos = torch.cat([torch.as_tensor(r["position_ids"], dtype=torch.long) if "position_ids" in r
                         else torch.arange(len(r["input_ids"]), dtype=torch.long) for r in rows])
        labels = ids.clone()
        labels[pos == 0] = IGNORE_INDEX  # as above; also keeps a row's first token off the previous row
        starts = torch.nonzero(pos == 0).flatten()
        bounds = torch.cat([starts, torch.tensor([ids.numel()])])
        cu_seq_lens = bounds.to(torch.int32)
        max_length = int((bounds[1:] - bounds[:-1]).max())
        return {"input_ids": ids[None], "position_ids": pos[None], "labels": labels[None],
                "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
                "max_length_q": max_length, "max_length_k": max_length}
