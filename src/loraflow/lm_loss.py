"""The causal-LM loss without the logits tensor: output head and cross-entropy fused, chunk by chunk.

A causal LM's loss normally materialises logits for every position (GPT-2: 512 x 50,257 per row),
upcasts them to fp32, takes a log-softmax and, in backward, a gradient of the same size: a few
hundred MB per row streamed through memory several times, which on a CPU is memory-bound work
beside the matrix products. Here the head runs over `CHUNK` target positions at a time and each
chunk's gradient with respect to the hidden states is computed right away (softmax minus one-hot,
times the head's weight), so only [positions, hidden] tensors outlive a chunk. The matrix-product
FLOPs are the same as the unfused head's forward and input-gradient; nothing is recomputed.

Only positions with a target are computed (a packed row's document starts and padding have
none). The head's weight must be frozen (LoRA never adapts the output head; see
modeling._adaptable_modules): its gradient is not formed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
CHUNK = 256  # target positions per chunk: 256 x 50k fp32 logits = 51 MB, reused chunk after chunk


def _fused_function():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk):
            # Plain matrix products in the head's own dtype (bf16 when the base is held in bf16),
            # the log-softmax in fp32, as the unfused path under autocast does.
            with torch.autocast(hidden.device.type, enabled=False):
                w = weight.detach()
                h = hidden.detach().to(w.dtype)
                total = torch.zeros((), dtype=torch.float32, device=hidden.device)
                grad = torch.empty_like(h) if hidden.requires_grad else None
                fused = _cpu_kernels(h)
                # One logits buffer for every chunk (a fresh 25-50 MB tensor each chunk is a fresh
                # mapping to fault in), the products written straight into it and into `grad`.
                buffer = h.new_empty(min(chunk, h.shape[0]), w.shape[0]) if fused is not None else None
                for s in range(0, h.shape[0], chunk):
                    y = targets[s:s + chunk]
                    if fused is not None:
                        # One pass over the chunk's logits in their own dtype (cpu_kernels.cpp): the
                        # same fp32 loss, and softmax - onehot written over them, rounded once.
                        logits = torch.mm(h[s:s + chunk], w.T, out=buffer[:y.shape[0]])
                        total += fused.cross_entropy_(logits, y.contiguous()).sum()
                        if grad is not None:
                            torch.mm(logits, w, out=grad[s:s + chunk])
                        continue
                    logits = (h[s:s + chunk] @ w.T).float()
                    # One pass each for the max, exp and sum, all in place on the chunk (logsumexp
                    # then exp(logits - lse) takes two more over positions x vocabulary).
                    top = logits.amax(dim=-1, keepdim=True)
                    target = logits.gather(1, y[:, None]) - top
                    exps = logits.sub_(top).exp_()
                    norm = exps.sum(dim=-1, keepdim=True)
                    total += (norm.log() - target).sum()
                    if grad is not None:
                        probs = exps.div_(norm)
                        probs[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                        grad[s:s + chunk] = probs.to(w.dtype) @ w
            ctx.save_for_backward(grad)
            ctx.hidden_dtype = hidden.dtype
            return total

        @staticmethod
        def backward(ctx, grad_total):
            (grad,) = ctx.saved_tensors
            return (grad * grad_total).to(ctx.hidden_dtype), None, None, None

    return LinearCrossEntropy


_FUNCTION = None


def _cpu_kernels(h):
    import torch

    if h.device.type != "cpu" or h.dtype not in (torch.float32, torch.bfloat16):
        return None
    from loraflow import cpu_kernels

    return cpu_kernels.kernels()


def summed_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Sum over target positions of -log p(label), with the causal shift: `hidden` [B, T, H] are
    the states the output head reads, `labels` [B, T] the model's labels (IGNORE_INDEX: no target);
    position t predicts labels[t + 1], as transformers' ForCausalLM loss. Divide by the number of
    targets of the (accumulated) batch for the mean."""
    import torch

    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _fused_function()
    if weight.requires_grad:
        raise ValueError("lm_loss.summed_loss forms no gradient for the output head; it must be frozen")
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    keep = (shifted != IGNORE_INDEX).nonzero().squeeze(1)
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    return _FUNCTION.apply(flat, weight, shifted.index_select(0, keep), chunk)
