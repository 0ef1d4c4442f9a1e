"""Dropout on the CPU at the cost of its multiply, not of its random numbers.

Why this exists: ATen's CPU dropout draws its mask with `bernoulli_`, which on a processor that is
not Intel's (no MKL VSL path) costs one mt19937 draw and a float conversion per element, serially:
~5 ns per element on the 2-core EPYC here, 21.6% of a bf16 training step of DialoGPT-small/512
(73 masks per row: GPT-2's attention, residual and embedding dropout at 0.1, LoRA's at 0.05). Here
one 64-bit draw from the same generator makes four masks: its four 16-bit words, each compared with
a threshold. The keep probability is 1 - p rounded to a multiple of 2^-16 (p = 0.1 drops
6,554/65,536 = 0.100006) and the survivors are scaled by the inverse of that probability, held in
the activations' dtype as torch's dropout holds its 1/(1-p) (bf16: 1.109375 for 1/0.9); the
attention below applies it to its output in fp32 arithmetic instead. The draws come from torch's
default generator: `set_seed` and the Trainer's checkpointed RNG state reproduce them.

Attention dropout is the larger half (12 x 512 x 512 per layer and row) and happens inside
`scaled_dot_product_attention`, which on a CPU with dropout > 0 also leaves its fused kernel for
the math one (scores upcast to fp32, fp32 matrix products). `attention` below is registered with
transformers as its own implementation: without dropout (evaluation, generation, Llama-style
models) it is transformers' SDPA, unchanged; with dropout it computes the same attention with
bf16 products under autocast, a softmax accumulated in fp32 and the mask above.

CUDA keeps torch's dropout (Philox, fused in the kernels): this is for the CPU only.
"""

from __future__ import annotations

import torch
from torch import nn

from loraflow.modeling import CPU_DROPOUT_ATTENTION as ATTENTION
from loraflow.modeling import training_attention

_LEVELS = 1 << 16


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> tuple[torch.Tensor, float]:
    """A bool mask keeping each element with probability ~1 - p, and the scale that keeps the mean."""
    kept = round((1.0 - p) * _LEVELS)
    n = 1
    for d in shape:
        n *= d
    if kept <= 0:
        return torch.zeros(shape, dtype=torch.bool), 0.0
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)  # all 64 bits
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
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))
    q_len, k_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and q_len > 1:
        # What SDPA's is_causal means: query i sees keys up to i (aligned to the end of the keys).
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            # An additive [s, s] bias, added in place: masked_fill would copy the scores and its
            # backward the gradient; an addition passes the gradient through.
            attention_mask = torch.zeros(attention_mask.shape, dtype=scores.dtype).masked_fill_(
                ~attention_mask, torch.finfo(scores.dtype).min)
        scores = scores.add_(attention_mask)
    # Softmax in the scores' dtype: torch's CPU kernel accumulates bf16 in fp32 and rounds once, so
    # the probabilities equal an fp32 softmax cast to bf16 without the two [.., s, s] casts (and
    # their two in the backward) that softmax(dtype=float32).to(bf16) costs.
    probs = torch.softmax(scores, dim=-1)
    mask, keep_scale = keep_mask(probs.shape, dropout)
    out = torch.matmul(torch.where(mask, probs, 0), value) * keep_scale
    return out.transpose(1, 2).contiguous(), None


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
