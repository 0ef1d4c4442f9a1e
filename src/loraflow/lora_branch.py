"""PEFT's LoRA branch as one autograd node for CPU training: result + scaling * B(A(dropout(x))).

PEFT computes the branch as `result + lora_B(lora_A(dropout(x))) * scaling`: beside its two small
products, a pass that scales the [tokens, out] branch output, another that adds it to the base
output (a third tensor of that size), and in the backward the scaling pass again, a dropout pass
that allocates, and six autograd nodes a layer. On a CPU those [tokens, out] passes cost more than
the r=16 products themselves (36 LoRA layers on DialoGPT: ~5% of a bf16 training step). Here the
up-projection accumulates into the base output inside the matrix product (`addmm_`, alpha =
scaling), the scaling lands on the [tokens, r] side, and the dropout is loraflow.dropout's
counter-based mask, drawn with one seed from torch's generator as loraflow.dropout.CpuDropout
draws it (the same masks as that module would give) and recomputed in the backward.

Installed through PEFT's own extension point for a layer's LoRA computation, `lora_variant` (what
DoRA uses), by loraflow.dropout.use_cpu_dropout for a run training on the CPU; the adapter's
tensors, their names and the saved files are untouched. Anywhere else (evaluation, no_grad, a GPU,
a LoRA bias, torch's own dropout) the variant computes PEFT's vanilla expression.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import LoraVariant
from torch import nn


class _Branch(torch.autograd.Function):
    """result += scaling * (dropout(x) @ A^T) @ B^T, in place on the base output (which the base
    layer's backward does not read: its frozen weight needs no input, its input gradient no output)."""

    @staticmethod
    def forward(ctx, result, x, weight_a, weight_b, scaling, mask):
        from loraflow import dropout

        x2 = x.reshape(-1, x.shape[-1])
        # The products in the activations' dtype: the casts autocast would make of the fp32 LoRA
        # weights (no-ops in an fp32 run).
        a, b = weight_a.to(x2.dtype), weight_b.to(x2.dtype)
        dropped = dropout._apply(x2.contiguous(), *mask) if mask else x2
        h = torch.mm(dropped, a.t())
        result.view(-1, result.shape[-1]).addmm_(h, b.t(), alpha=scaling)
        ctx.mark_dirty(result)
        ctx.save_for_backward(dropped, h, a, b)
        ctx.scaling, ctx.mask, ctx.x_shape = scaling, mask, x.shape
        ctx.dtypes = (weight_a.dtype, weight_b.dtype)
        return result

    @staticmethod
    def backward(ctx, grad):
        from loraflow import dropout

        dropped, h, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        g_h = torch.mm(g, b).mul_(ctx.scaling)  # [tokens, r]
        grad_a = torch.mm(g_h.t(), dropped).to(ctx.dtypes[0]) if ctx.needs_input_grad[2] else None
        grad_b = torch.mm(g.t(), h).mul_(ctx.scaling).to(ctx.dtypes[1]) if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[1]:
            # Shaped before the dropout pass, whose output is then a fresh tensor of x's shape (not
            # a view): autograd adds the base layer's input gradient into it in place instead of
            # allocating the sum (measured: 2.3 ms a call for [4, 512, 3072] bf16 out of place).
            grad_x = torch.mm(g_h, a).view(ctx.x_shape)
            if ctx.mask:
                grad_x = dropout._apply(grad_x, *ctx.mask)
        return grad, grad_x, grad_a, grad_b, None, None


class CpuLoraBranch(LoraVariant):
    """PEFT LoRA variant: vanilla LoRA's function, the training forward as one `_Branch` node."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        pass

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        from loraflow import dropout

        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        drop = module.lora_dropout[active_adapter]
        scaling = module.scaling[active_adapter]
        dropping = drop.training and getattr(drop, "p", 0.0) > 0
        # The tensor to accumulate into: transformers' Conv1D (GPT-2) returns a view of its addmm's
        # output, and an in-place change through a view would make autograd wrap the node in
        # CopySlices (two more copies of the gradient); the whole base tensor is changed instead.
        target = result if result._base is None else result._base
        if (not module.training or not torch.is_grad_enabled() or x.device.type != "cpu" or lora_b.bias is not None
                or result.dtype != x.dtype or not result.is_contiguous() or not target.is_contiguous()
                or target.numel() != result.numel() or target.data_ptr() != result.data_ptr()
                or (dropping and (not isinstance(drop, dropout.CpuDropout) or dropout.keep_level(drop.p)[0] <= 0))):
            return result + lora_b(lora_a(drop(x))) * scaling
        # One draw from torch's generator, as CpuDropout makes: the same mask as the module gives.
        mask = (dropout._seed(), *dropout.keep_level(drop.p)) if dropping else ()
        return _Branch.apply(target, x, lora_a.weight, lora_b.weight, scaling, mask).view(result.shape)


def use_cpu_lora_branch(model, on: bool = True) -> int:
    """Give every vanilla LoRA linear layer of `model` (PEFT's lora.Linear, adapters without a variant)
    the CpuLoraBranch variant, or take it away again (`on=False`: PEFT's own expression, as an A/B
    needs); returns how many layers were changed."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        for name in list(module.lora_A):
            variant = module.lora_variant.get(name)
            if on and (variant is None or isinstance(variant, CpuLoraBranch)):
                module.lora_variant[name] = CpuLoraBranch()
                count += 1
            elif not on and isinstance(variant, CpuLoraBranch):
                del module.lora_variant[name]
                count += 1
    return count
