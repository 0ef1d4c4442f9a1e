"""GPT-2's activation as one kernel.

DialoGPT (GPT-2) configs name `gelu_new`, which transformers computes as the formula written out
in Python: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), seven elementwise passes
over the [tokens, 4 * hidden] MLP activations forward and more backward, each saving its input.
`torch.nn.functional.gelu(x, approximate="tanh")` is the same function in one kernel (transformers
ships it as GELUTanh, "gelu_pytorch_tanh"); results differ by rounding only. Swapped for training,
where the passes and the saved tensors cost most; the base model's files are not touched.
"""

from __future__ import annotations


def use_fused_gelu(model) -> int:
    """Replace every NewGELUActivation in `model` with transformers' GELUTanh; returns how many."""
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped
