"""GPT-2's activation as one kernel.

DialoGPT (GPT-2) configs name `gelu_new`, which transformers computes as the formula written out
in Python: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), seven elementwise passes
over the [tokens, 4 * hidden] MLP activations forward and more backward, each saving its input.
`torch.nn.functional.gelu(x, approximate="tanh")` is the same function in one kernel (transformers
ships it as GELUTanh, "gelu_pytorch_tanh"); results differ by rounding only. Swapped for training,
where the passes and the saved tensors cost most; the base model's files are not touched. On a CPU
where loraflow.cpu_kernels is built, its one-pass kernels compute it (torch's bf16 GELU takes ~0.7 ns
an element here, one pass forward and one backward of the same size).
"""

from __future__ import annotations

from transformers.activations import GELUTanh


class CpuGELUTanh(GELUTanh):
    """transformers' GELUTanh, through loraflow.cpu_kernels for fp32/bf16 CPU tensors."""

    def forward(self, x):
        import torch

        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            from loraflow import cpu_kernels

            if cpu_kernels.kernels() is not None:
                return _gelu().apply(x)
        return super().forward(x)


_GELU = None


def _gelu():
    global _GELU
    if _GELU is None:
        import torch

        from loraflow import cpu_kernels

        class Gelu(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                x = x.contiguous()
                ctx.save_for_backward(x)
                return cpu_kernels.kernels().gelu(x)

            @staticmethod
            def backward(ctx, grad):
                (x,) = ctx.saved_tensors
                return cpu_kernels.kernels().gelu_backward(grad.contiguous(), x)

        _GELU = Gelu
    return _GELU


def use_fused_gelu(model) -> int:
    """Replace every NewGELUActivation in `model` with GELUTanh (CpuGELUTanh); returns how many."""
    from transformers.activations import NewGELUActivation

    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, CpuGELUTanh())
                swapped += 1
    return swapped
