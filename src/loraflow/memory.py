"""Will a training run fit in memory? An estimate from the settings and the model's config, made
before anything is loaded, so a request that cannot fit ends with one line and a figure instead
of the kernel's OOM kill with no message.

Activations per transformer layer follow Korthikanti et al. (2022), "Reducing Activation
Recomputation in Large Transformer Models": s*b*h*(34 + 5*a*s/h) bytes in 16-bit, the second term
being attention scores (eager/math attention materialises them; packed rows use a block mask, so
they do here). fp32 doubles it. The logits (b*s*V, kept for the loss and its gradient) and the
weights come on top. Calibrated on this project's measurement of the seed stack (ASSETS.md:
DialoGPT-medium, 4 x 512, fp32 on CPU: 18.7 GB peak RSS, where the formula gives 10.3 GB), hence
`ALLOCATOR_FACTOR`: allocator slack, autograd temporaries and the Python process itself.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from loraflow.errors import ConfigError
from loraflow.log import get_logger

if TYPE_CHECKING:
    from loraflow.modeling import Precision
    from loraflow.settings import Settings

log = get_logger("train")

ALLOCATOR_FACTOR = 1.8
WARN_SHARE = 0.7   # of the device's memory: warn above
REFUSE_SHARE = 1.5  # refuse above: even an overestimate by half would not fit


def estimate_bytes(*, layers: int, hidden: int, heads: int, vocab: int, params: int, seq: int, batch: int,
                   bytes_per_value: int, gradient_checkpointing: bool) -> int:
    per_layer_16bit = seq * batch * hidden * (34 + 5 * heads * seq / hidden)
    scale = bytes_per_value / 2
    stored_layers = 1 if gradient_checkpointing else layers  # recomputed: one layer's worth alive at a time
    activations = per_layer_16bit * scale * stored_layers + (layers * seq * batch * hidden * bytes_per_value
                                                             if gradient_checkpointing else 0)
    logits = 3 * batch * seq * vocab * 4  # fp32 logits, their softmax and gradient
    weights = params * bytes_per_value
    return int(ALLOCATOR_FACTOR * (activations + logits + weights))


def device_memory(device: str) -> int | None:
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[1])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_training_memory(settings: Settings, precision: Precision, config) -> int | None:
    """Estimate a training step's peak memory; warn near the device's size, refuse far above it."""
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None)), None)  # noqa: E731
    layers, hidden = get("num_hidden_layers", "n_layer"), get("hidden_size", "n_embd")
    heads, vocab = get("num_attention_heads", "n_head"), get("vocab_size")
    if not all(isinstance(v, int) for v in (layers, hidden, heads, vocab)):
        return None  # an architecture this estimate does not know: no claim either way
    intermediate = get("intermediate_size", "n_inner") or 4 * hidden
    params = layers * (4 * hidden * hidden + 2 * hidden * intermediate) + vocab * hidden
    seq, batch = settings.data.max_length, settings.training.per_device_train_batch_size
    need = estimate_bytes(layers=layers, hidden=hidden, heads=heads, vocab=vocab, params=params, seq=seq,
                          batch=batch, bytes_per_value=4 if precision.name == "fp32" else 2,
                          gradient_checkpointing=settings.training.gradient_checkpointing)
    have = device_memory(precision.device)
    if not have:
        return need
    gib = 1024 ** 3
    what = (f"training.per_device_train_batch_size={batch} x data.max_length={seq} needs about "
            f"{need / gib:.1f} GiB on {precision.device} ({have / gib:.1f} GiB there)")
    if need > REFUSE_SHARE * have:
        raise ConfigError(f"{what}: this cannot fit; lower data.max_length or the batch size "
                          "(gradient_accumulation_steps keeps the effective batch), or set "
                          "training.gradient_checkpointing=true")
    if need > WARN_SHARE * have:
        log.warning("%s: close to the limit; lower them if the run is killed", what)
    return need
