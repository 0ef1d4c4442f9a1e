"""Dropout on the CPU at the cost of one pass over memory, not of a serial random-number draw.

Why this exists: ATen's CPU dropout draws its mask with `bernoulli_`, which on a processor that is
not Intel's (no MKL VSL path) costs one mt19937 draw and a float conversion per element, serially:
~5 ns per element on the 2-core EPYC here, 21.6% of a bf16 training step of DialoGPT-small/512
(73 masks per row: GPT-2's attention, residual and embedding dropout at 0.1, LoRA's at 0.05), and
each step around it (mask, cast, scale, multiply) is one more pass over memory. Here each mask is a
pure function of a seed and the element's index (loraflow.cpu_kernels: SplitMix64 over a counter),
computed inside the pass that applies it, forward and again backward: nothing is drawn serially or
stored. The seed is one draw from torch's default generator per mask: `set_seed` and the Trainer's
checkpointed RNG state reproduce every mask. An element is kept when its 32-bit draw is below
(1 - p) * 2^32 rounded, and survivors are scaled by the inverse of that exact probability, in fp32
and rounded once to the activations' dtype.

Attention dropout is the larger half (12 x 512 x 512 per layer and row) and happens inside
`scaled_dot_product_attention`, which on a CPU with dropout > 0 also leaves its fused kernel for
the math one (scores upcast to fp32, fp32 matrix products). `attention` below is registered with
transformers as its own implementation: without dropout (evaluation, generation, Llama-style
models) it is transformers' SDPA, unchanged; with dropout it computes the same attention with
bf16 products under autocast and one fused pass for bias, softmax (fp32 inside) and mask, block of
queries by block of queries over only the keys the block's mask lets it see (a packed row's causal,
per-document mask leaves much of the [s, s] square out: nothing is computed or stored there; each
element's mask depends on its place in the whole square, so the blocks drop what one pass would).

CUDA keeps torch's dropout (Philox, fused in the kernels): this is for the CPU only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraflow import cpu_kernels
from loraflow.modeling import CPU_DROPOUT_ATTENTION as ATTENTION
from loraflow.modeling import training_attention

_LEVELS = 1 << 32
# Queries per block of the attention: fewer keys per block (a causal row's square is cut closer)
# against more, smaller matrix products; 128 measured best at 512 tokens (bench/train_step_ab.py).
QUERY_BLOCK = 128


def keep_level(p: float) -> tuple[int, float]:
    """(kept, scale): an element survives when its 32-bit draw is below `kept` = (1 - p) * 2^32
    rounded, and survivors are scaled by 2^32 / kept, the inverse of that exact keep probability."""
    kept = round((1.0 - p) * _LEVELS)
    return kept, (_LEVELS / kept if kept > 0 else 0.0)


def _seed() -> int:
    """One 64-bit draw from torch's default generator: set_seed and checkpointed RNG state
    reproduce every mask drawn from it."""
    return int(torch.empty((), dtype=torch.int64).random_(-(1 << 63), None))  # as int64: the kernels take it so


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, seed: int | None = None) -> tuple[torch.Tensor, float]:
    """A bool mask keeping each element with probability 1 - p (to 2^-32), and the survivors' scale:
    the mask `cpu_dropout` applies to a tensor of this shape with this seed."""
    kept, scale = keep_level(p)
    return _mask(shape, _seed() if seed is None else seed, kept), scale


def _mask(shape, seed: int, kept: int) -> torch.Tensor:
    """The kernels' mask of a tensor of this shape, element by element in memory order."""
    return cpu_kernels.keep(seed, torch.arange(math.prod(shape)), kept).view(shape)


class _Dropout(torch.autograd.Function):
    """x * mask * scale where the mask is recomputed from its seed in the backward, never stored."""

    @staticmethod
    def forward(ctx, x, seed, kept, scale):
        ctx.mask = (seed, kept, scale)
        return _apply(x.contiguous(), seed, kept, scale)

    @staticmethod
    def backward(ctx, grad):
        return _apply(grad.contiguous(), *ctx.mask), None, None, None


def _apply(x: torch.Tensor, seed: int, kept: int, scale: float) -> torch.Tensor:
    fused = cpu_kernels.kernels() if x.dtype in (torch.float32, torch.bfloat16) else None
    if fused is not None:
        return fused.dropout(x, seed, kept, scale)
    return _apply_reference(x, seed, kept, scale)


def _apply_reference(x: torch.Tensor, seed: int, kept: int, scale: float) -> torch.Tensor:
    """What the kernel computes, in torch operations: the product in fp32, rounded once to x's dtype."""
    mask = _mask(x.shape, seed, kept)
    return (x.float() * (mask.float() * torch.tensor(scale, dtype=torch.float32))).to(x.dtype)


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of `x` (a CPU tensor): masks from loraflow.cpu_kernels' stream."""
    if p <= 0.0:
        return x
    kept, scale = keep_level(p)
    if kept <= 0:
        return x * 0.0
    return _Dropout.apply(x, _seed(), kept, scale)


class CpuDropout(nn.Dropout):
    """nn.Dropout whose training-mode masks come from loraflow.cpu_kernels when the input is on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        return cpu_dropout(x, self.p)


class _Attention(torch.autograd.Function):
    """softmax(scaling * q k^T + bias) with dropout, times v, block of queries by block (`_blocks`).
    One function for the whole layer: its backward writes each block's gradients into the
    full-size ones, where autograd would give every slice of q, k and v a zero-filled full-size
    gradient to add up, and a cat to undo."""

    @staticmethod
    def forward(ctx, query, key, value, blocks, seed, kept, keep_scale, scaling):
        # Row-major [batch x heads, tokens, head_dim] operands once per layer (q, k, v arrive as
        # strided views of the fused QKV projection): each block's operand is then a sub-matrix
        # that bmm reads in place, plain or transposed, instead of one more copy per block. The
        # queries' scale is applied in the pass that lays them out.
        b, h, q_len, d = query.shape
        k_len, dv = key.shape[2], value.shape[-1]
        q = query.new_empty(b * h, q_len, d)
        torch.mul(query, scaling, out=q.view(b, h, q_len, d))
        k_t = key.transpose(-1, -2).contiguous().view(b * h, d, k_len)
        v = value.contiguous().view(b * h, k_len, dv)
        # The output in the [batch, tokens, heads, head_dim] layout the heads are merged from: each
        # block's product lands there with the dropout's 1/(1-p) in one strided pass.
        out = query.new_empty(b, q_len, h, dv)
        saved = []
        for q0, q1, k0, k1, bias in blocks:
            scores = torch.bmm(q[:, q0:q1], k_t[:, :, k0:k1]).view(b, h, q1 - q0, k1 - k0)
            probs, dropped = _softmax_dropout(scores, bias, seed, kept, (q0, k0, q_len, k_len))
            dropped = dropped.view(b * h, q1 - q0, k1 - k0)
            block = torch.bmm(dropped, v[:, k0:k1]).view(b, h, q1 - q0, dv)
            torch.mul(block, keep_scale, out=out[:, q0:q1].transpose(1, 2))
            saved += [probs, dropped]
        ctx.save_for_backward(q, k_t, v, *saved)
        ctx.blocks, ctx.mask, ctx.shape = [blk[:4] for blk in blocks], (seed, kept, keep_scale), (b, h, scaling)
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        q, k_t, v, *saved = ctx.saved_tensors
        seed, kept, keep_scale = ctx.mask
        b, h, scaling = ctx.shape
        q_len, d, k_len, dv = q.shape[1], q.shape[2], k_t.shape[2], v.shape[2]
        g_all = q.new_empty(b * h, q_len, dv)
        torch.mul(grad, keep_scale, out=g_all.view(b, h, q_len, dv))
        v_t = v.transpose(1, 2).contiguous()
        grad_q = q.new_empty(b, q_len, h, d)  # the layout of the fused QKV projection's gradient
        grad_k_t, grad_v = torch.zeros_like(k_t), torch.zeros_like(v)
        for i, (q0, q1, k0, k1) in enumerate(ctx.blocks):
            probs, dropped = saved[2 * i], saved[2 * i + 1]
            g = g_all[:, q0:q1]
            grad_v[:, k0:k1] += torch.bmm(dropped.transpose(1, 2), g)
            g_dropped = torch.bmm(g, v_t[:, :, k0:k1]).view(probs.shape)
            g_scores = _softmax_dropout_grad(g_dropped, probs, seed, kept, (q0, k0, q_len, k_len))
            g_scores = g_scores.view(b * h, q1 - q0, k1 - k0)
            block = torch.bmm(g_scores, k_t[:, :, k0:k1].transpose(1, 2)).view(b, h, q1 - q0, d)
            torch.mul(block, scaling, out=grad_q[:, q0:q1].transpose(1, 2))
            grad_k_t[:, :, k0:k1] += torch.bmm(q[:, q0:q1].transpose(1, 2), g_scores)
        return (grad_q.transpose(1, 2), grad_k_t.view(b, h, -1, k_len).transpose(-1, -2),
                grad_v.view(b, h, k_len, -1), None, None, None, None, None)


def _softmax_dropout(scores, bias, seed: int, kept: int, place):
    """(softmax(scores + bias), its dropped copy): the fused kernel, or the same in torch operations."""
    fused = cpu_kernels.kernels() if scores.dtype in (torch.float32, torch.bfloat16) else None
    if fused is not None:
        return fused.softmax_dropout_forward(scores.contiguous(), bias, seed, kept, *place)
    if bias is not None:
        scores = scores + bias.unsqueeze(1)
    probs = torch.softmax(scores, dim=-1)
    return probs, torch.where(_block_mask(probs.shape, seed, kept, place), probs, 0)


def _softmax_dropout_grad(grad, probs, seed: int, kept: int, place):
    fused = cpu_kernels.kernels() if probs.dtype in (torch.float32, torch.bfloat16) else None
    if fused is not None:
        return fused.softmax_dropout_backward(grad.contiguous(), probs, seed, kept, *place)
    g = torch.where(_block_mask(probs.shape, seed, kept, place), grad, 0).float()
    p = probs.float()
    return (p * (g - (g * p).sum(dim=-1, keepdim=True))).to(probs.dtype)


def _block_mask(shape, seed: int, kept: int, place) -> torch.Tensor:
    """The kernels' mask of a [B, H, q, k] block at (q_off, k_off) of a [q_total, k_total] square."""
    q_off, k_off, q_total, k_total = place
    b, h, q, k = shape
    index = ((torch.arange(b * h).view(-1, 1, 1) * q_total + q_off + torch.arange(q).view(1, -1, 1)) * k_total
             + k_off + torch.arange(k).view(1, 1, -1))
    return cpu_kernels.keep(seed, index, kept).view(shape)


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
    q_len, k_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    blocks = _blocks(attention_mask, causal and q_len > 1, q_len, k_len, query.dtype)
    kept, keep_scale = keep_level(dropout)
    # One seed for the layer: each element's mask is a function of its place in the [q, k] square.
    out = _Attention.apply(query, key, value, blocks, _seed(), kept, keep_scale, scaling)
    return out.transpose(1, 2).contiguous(), None


# The last mask's blocks: transformers builds one mask per forward and hands the same tensor to
# every layer (and to a checkpointed layer's recompute); without a mask (causal rows), the same
# shape gives the same blocks.
_last: tuple = (None, 0, None, None)


def _blocks(mask: torch.Tensor | None, causal: bool, q_len: int, k_len: int, dtype: torch.dtype):
    """[(q0, q1, k0, k1, bias)]: blocks of QUERY_BLOCK queries, each with the key range its queries
    may attend (over every row of the batch) and, where a score inside is masked, the mask as an
    additive bias [1 or batch, q1 - q0, k1 - k0] (else None). Outside a block's range every score is
    masked, so leaving it out changes nothing; a block with a query that may attend nothing keeps
    all keys, as SDPA's math kernel does with it. No mask and not causal: one block, all keys."""
    global _last
    key = mask if mask is not None else (causal, q_len, k_len)
    last = _last  # one read: another thread may replace it
    if (last[0] is key or (mask is None and last[0] == key)) and last[1:3] == (QUERY_BLOCK, dtype):
        return last[3]
    if mask is None and not causal:
        return [(0, q_len, 0, k_len, None)]
    if mask is None:
        # What SDPA's is_causal means: query i sees keys up to i (aligned to the end of the keys).
        mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    mask = mask.expand(*([1] * (4 - mask.dim())), *mask.shape[-min(mask.dim(), 4):])
    if mask.shape[1] != 1:
        raise ValueError(f"loraflow's CPU attention takes one mask for all heads, got a mask of shape "
                         f"{tuple(mask.shape)}")
    mask = mask[:, 0].expand(mask.shape[0], q_len, k_len)
    if mask.dtype == torch.bool:
        allowed, bias = mask, torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
    else:
        allowed, bias = mask > torch.finfo(mask.dtype).min, mask.to(dtype)
    seen = allowed.any(dim=0)  # by any row of the batch
    everywhere = allowed.all(dim=0)  # by every one
    blocks = []
    for q0 in range(0, q_len, QUERY_BLOCK):
        q1 = min(q0 + QUERY_BLOCK, q_len)
        keys = seen[q0:q1].any(dim=0).nonzero()
        k0, k1 = (0, k_len) if keys.numel() == 0 or not bool(seen[q0:q1].any(dim=1).all()) \
            else (int(keys[0]), int(keys[-1]) + 1)
        masked = not bool(everywhere[q0:q1, k0:k1].all())
        blocks.append((q0, q1, k0, k1, bias[:, q0:q1, k0:k1].contiguous() if masked else None))
    _last = (key, QUERY_BLOCK, dtype, blocks)
    return blocks


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
        if getattr(module, "cast_input_dtype_enabled", False):
            # PEFT casts a LoRA layer's bf16 input to its fp32 weights' dtype, and autocast casts the
            # product's operand straight back: two copies of the input, forward and backward. The
            # dropout between them computes in fp32 and rounds once, as that round trip does, so
            # the LoRA products see the same numbers without the copies (without autocast the
            # input already has the weights' dtype and the cast did nothing).
            module.cast_input_dtype_enabled = False
    from loraflow.lora_branch import use_cpu_lora_branch

    branches = use_cpu_lora_branch(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    attention_dropout = attention_dropout_p(config)
    current = getattr(config, "_attn_implementation", None)
    switched = training_attention(current, "cpu", attention_dropout, cpu_dropout=True) != current
    if switched:
        register_attention()
        base.set_attn_implementation(ATTENTION)
    if not swapped and not switched and not branches:
        return None
    return (f"dropout on cpu: counter-based masks, recomputed in the backward (torch's CPU bernoulli draws one "
            f"mt19937 number per element): {swapped} dropout module(s)"
            + (f", attention dropout {attention_dropout:g} outside SDPA's math kernel" if switched else "")
            + (f", {branches} LoRA branch(es) as one node (loraflow.lora_branch)" if branches else "")
            + f"; {cpu_kernels.status()}")


def attention_dropout_p(config) -> float:
    for name in ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0
