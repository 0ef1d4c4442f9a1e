"""Dropout on the CPU at the cost of its multiply, not of its random numbers.

Why this exists: ATen's CPU dropout draws its mask with `bernoulli_`, which on a processor that is
not Intel's (no MKL VSL path) costs one mt19937 draw and a float conversion per element, serially:
~5 ns per element on the 2-core EPYC here, 21.6% of a bf16 training step of DialoGPT-small/512
(73 masks per row: GPT-2's attention, residual and embedding dropout at 0.1, LoRA's at 0.05). Here
one 64-bit word makes four masks: its four 16-bit words, each compared with a threshold. The words
come from numpy's PCG64 (2.1 ns a word here; torch's int64 `random_` takes two mt19937 draws, 5.8
ns), seeded per mask by one draw from torch's default generator: `set_seed` and the Trainer's
checkpointed RNG state reproduce every mask. The keep probability is 1 - p rounded to a multiple of
2^-16 (p = 0.1 drops 6,554/65,536 = 0.100006) and the survivors are scaled by the inverse of that
probability, held in the activations' dtype as torch's dropout holds its 1/(1-p) (bf16: 1.109375
for 1/0.9); the attention below applies it to its output in fp32 arithmetic instead.

Attention dropout is the larger half (12 x 512 x 512 per layer and row) and happens inside
`scaled_dot_product_attention`, which on a CPU with dropout > 0 also leaves its fused kernel for
the math one (scores upcast to fp32, fp32 matrix products). `attention` below is registered with
transformers as its own implementation: without dropout (evaluation, generation, Llama-style
models) it is transformers' SDPA, unchanged; with dropout it computes the same attention with
bf16 products under autocast, a softmax accumulated in fp32 and the mask above, block of queries
by block of queries over only the keys the block's mask lets it see (a packed row's causal,
per-document mask leaves most of the [s, s] square out: nothing is computed, drawn or stored there).

CUDA keeps torch's dropout (Philox, fused in the kernels): this is for the CPU only.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from loraflow.modeling import CPU_DROPOUT_ATTENTION as ATTENTION
from loraflow.modeling import training_attention

_LEVELS = 1 << 16
# Queries per block of the attention: fewer keys per block (a causal row's square is cut closer)
# against more, smaller matrix products; 128 measured best at 512 tokens (bench/train_step_ab.py).
QUERY_BLOCK = 128


def _words(n: int) -> torch.Tensor:
    """n uniform 64-bit words from a PCG64 stream seeded by one draw of torch's default generator."""
    seed = int(torch.empty((), dtype=torch.int64).random_(-(1 << 63), None)) & ((1 << 64) - 1)
    return torch.from_numpy(np.random.PCG64(seed).random_raw(n).view(np.int64))


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> tuple[torch.Tensor, float]:
    """A bool mask keeping each element with probability ~1 - p, and the scale that keeps the mean."""
    kept = round((1.0 - p) * _LEVELS)
    n = 1
    for d in shape:
        n *= d
    if kept <= 0:
        return torch.zeros(shape, dtype=torch.bool), 0.0
    words = _words((n + 3) // 4)
    draws = words.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    return draws >= (_LEVELS // 2 - kept), _LEVELS / kept


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of `x` (a CPU tensor) with the mask from `keep_mask`."""
    if p <= 0.0:
        return x
    mask, scale = keep_mask(x.shape, p)
    # The mask in x's dtype, scaled once: a bool operand would be converted inside every multiply
    # (forward and backward); measured 6.4 -> 4.8 ms for [512, 3072] bf16, forward + backward.
    return x * mask.to(x.dtype).mul_(scale)


class CpuDropout(nn.Dropout):
    """nn.Dropout whose training-mode masks come from `keep_mask` when the input is on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        return cpu_dropout(x, self.p)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
              **kwargs):
    """transformers' SDPA attention, except on the CPU with dropout (see the module's docstring)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if dropout == 0.0 or query.device.type != "cpu" or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # The scale goes on the queries and the dropout's 1/(1-p) on the output: [.., s, head_dim]
    # tensors instead of two more passes over the [.., s, s] scores, forward and backward.
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    query = query * scaling
    q_len, k_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    blocks, bias = _blocks_and_bias(attention_mask, causal and q_len > 1, q_len, k_len, query.dtype)
    outs, keep_scale = [], 1.0
    for q0, q1, k0, k1, masked in blocks:
        scores = torch.matmul(query[:, :, q0:q1], key[:, :, k0:k1].transpose(-1, -2))
        if masked:
            # An additive bias, added in place: masked_fill would copy the scores and its backward
            # the gradient; an addition passes the gradient through.
            scores = scores.add_(bias[..., q0:q1, k0:k1])
        # Softmax in the scores' dtype: torch's CPU kernel accumulates bf16 in fp32 and rounds once,
        # so the probabilities equal an fp32 softmax cast to bf16 without the two [.., s, s] casts
        # (and their two in the backward) that softmax(dtype=float32).to(bf16) costs.
        probs = torch.softmax(scores, dim=-1)
        mask, keep_scale = keep_mask(probs.shape, dropout)
        outs.append(torch.matmul(torch.where(mask, probs, 0), value[:, :, k0:k1]))
    out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)) * keep_scale
    return out.transpose(1, 2).contiguous(), None


# The last mask's blocks and bias: transformers builds one mask per forward and hands the same
# tensor to every layer (and to a checkpointed layer's recompute); without a mask (causal rows),
# the same shape gives the same blocks.
_last: tuple = (None, 0, None, None)


def _blocks_and_bias(mask: torch.Tensor | None, causal: bool, q_len: int, k_len: int, dtype: torch.dtype):
    """[(q0, q1, k0, k1, masked)]: blocks of QUERY_BLOCK queries, each with the key range its
    queries may attend (over every row and head of the batch) and whether any score inside is
    masked; and the mask as an additive bias. Outside a block's range every score is masked, so
    leaving it out changes nothing; a block with a query that may attend nothing keeps all keys, as
    SDPA's math kernel does with it. No mask and not causal: one block, all keys, no bias."""
    global _last
    key = mask if mask is not None else (causal, q_len, k_len)
    last = _last  # one read: another thread may replace it
    if (last[0] is key or (mask is None and last[0] == key)) and last[1] == QUERY_BLOCK and last[3].dtype == dtype:
        return last[2], last[3]
    if mask is None and not causal:
        return [(0, q_len, 0, k_len, False)], None
    if mask is None:
        # What SDPA's is_causal means: query i sees keys up to i (aligned to the end of the keys).
        mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    if mask.dtype != torch.bool:
        bias, allowed = mask.to(dtype), mask > torch.finfo(mask.dtype).min
    else:
        bias = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
        allowed = mask
    allowed = allowed.expand(*allowed.shape[:-2], q_len, k_len).reshape(-1, q_len, k_len)
    seen = allowed.any(dim=0)  # by any row (and head) of the batch
    everywhere = allowed.all(dim=0)  # by every one
    blocks = []
    for q0 in range(0, q_len, QUERY_BLOCK):
        q1 = min(q0 + QUERY_BLOCK, q_len)
        keys = seen[q0:q1].any(dim=0).nonzero()
        k0, k1 = (0, k_len) if keys.numel() == 0 or not bool(seen[q0:q1].any(dim=1).all()) \
            else (int(keys[0]), int(keys[-1]) + 1)
        blocks.append((q0, q1, k0, k1, not bool(everywhere[q0:q1, k0:k1].all())))
    _last = (key, QUERY_BLOCK, blocks, bias)
    return blocks, bias


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)  # the same boolean masks as sdpa


def use_cpu_dropout(model) -> str | None:
    """Switch a model about to train on the CPU to these masks: its nn.Dropout modules (the base's
    and PEFT's LoRA dropout) and, where the base attends through SDPA, its attention. Returns the
    one line to log, or None where there is no dropout to change."""
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Dropout and module.p > 0:
            # Changing the class in place keeps every reference to the module (PEFT's ModuleDicts,
            # GPT-2's attributes) and its state (p, training); nothing is saved for a dropout.
            module.__class__ = CpuDropout
            swapped += 1
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    attention_dropout = attention_dropout_p(config)
    current = getattr(config, "_attn_implementation", None)
    switched = training_attention(current, "cpu", attention_dropout, cpu_dropout=True) != current
    if switched:
        register_attention()
        base.set_attn_implementation(ATTENTION)
    if not swapped and not switched:
        return None
    return (f"dropout on cpu: masks from 64-bit draws, 4 per draw (torch's CPU bernoulli draws one per element): "
            f"{swapped} dropout module(s)" + (f", attention dropout {attention_dropout:g} outside SDPA's math kernel"
                                              if switched else ""))


def attention_dropout_p(config) -> float:
    for name in ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0
