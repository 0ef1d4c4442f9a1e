"""Will a training run fit in memory? An estimate from the settings and the model's config, made
before anything is loaded. It refuses a run only when it certainly cannot fit; otherwise it warns.

Why two figures: an estimate that refuses is a guess that blocks real work (the previous version
counted a seq² score tensor that SDPA and FlashAttention never build, and refused a Llama-2-7B
at 4 x 4096 in bf16 on a 141 GB GPU, where that run fits). So:

- `floor`: bytes that are certainly alive together at the loss. A run whose floor exceeds the
  device's memory is refused (ConfigError, one line, naming the figure and what to change).
- `total`: the expected peak. Above the device's memory: one warning line with the figure; above
  `WARN_SHARE` of it: one "close to the limit" line. Never a refusal.

The formula (b micro-batch rows, s max_length, L layers, h hidden, i intermediate, a heads,
V vocab, P frozen parameters; p = 2 bytes under bf16/fp16 autocast, 4 in fp32; w = bytes per
frozen weight, from `Precision.model_dtype`):

    weights      = P * w                                  (frozen base; no grads, no optimizer state)
    lora         = 16 * (LoRA parameters)                 (fp32 param + grad + AdamW m and v; peft
                                                           keeps adapters in fp32 under half-precision bases)
    per layer    = b*s*p*(C_H*h + C_I*i)                  (saved for backward: norms, q/k/v, attention
                                                           output, residuals, LoRA inputs and their dropout
                                                           copies; C_I = 5.25 for a GELU MLP (GPT-2's
                                                           composite tanh-GELU saves four i-wide tensors),
                                                           3 for a gated SiLU MLP (Llama family))
               + b*a*s² * score_bytes                     (only where the scores are materialised: "eager",
                                                           or "sdpa" on a CPU with attention dropout > 0,
                                                           which falls back to the math kernel. SDPA on CUDA
                                                           and flash_attention_2 never build them.)
    activations  = L * per layer                          without gradient checkpointing
                 = L * b*s*h*p + 1 * per layer            with it (layer inputs kept, one layer recomputed)
    logits       = b*s*V * (12 + (2 if p == 2))           (transformers upcasts the logits to fp32 for the
                                                           loss: log_softmax output, its gradient and the
                                                           logits' gradient coexist in fp32 at the loss)
    transient    = b*s*p*(2h + 2i) + attention mask       (gradients in flight through one layer; the
                                                           b x 1 x s x s mask SDPA/eager get from packed rows)
    total        = BASE[device] + weights + lora + ACTIVATION_FACTOR * (activations + logits + transient)
    floor        = weights + 8*b*s*V + L*b*s*h*p          (two fp32 copies of the logits and every layer's
                                                           input exist at the loss whatever the settings)

GQA (num_key_value_heads) shrinks the weights (k/v projections of h*kv_dim) and the LoRA counts;
its k/v activations are counted at full width (a repeat_kv copy is what the eager/math path builds).

Calibration (this machine, CPU, fp32, December 2026, torch 2.13 + transformers 5.24 + peft 0.21):
the per-layer constants come from counting the bytes autograd saves (torch's
saved_tensors_hooks, storages de-duplicated) for GPT-2- and Llama-shaped layers with LoRA:
GPT-2 (h 768, LoRA on c_attn/c_proj, dropout 0) 34.7 x b*s*h fp32 values per layer, 61 with
GPT-2's 0.1 attention dropout (the math fallback: ~3.3 copies of the b*a*s² scores); a
Llama/SmolLM2 layer (h 576, i 1536, 9/3 heads, LoRA on q/k/v/o) 23. `BASE` (0.39 GB measured
after imports, plus the optimizer's and data's share) and `ACTIVATION_FACTOR` then come from peak
RSS of a fresh process per shape (bench/memory_estimate.py: random weights, LoRA r=16, packed
rows, 3 AdamW steps) and from the whole-Trainer peaks recorded in ASSETS.md and README.md:

    shape (fp32, CPU, sdpa default)        estimate  measured
    GPT-2-small 4 x 128 (bench)            2.55 GB   2.57 GB   0.99x
    GPT-2-small 2 x 512 (bench)            4.90 GB   6.09 GB   0.80x  (4.67 GB in a 2-step run)
    SmolLM2-135M 2 x 256 (bench, GQA)      2.61 GB   2.85 GB   0.91x
    seed DialoGPT-small 4 x 128 / 4 x 512  2.55 / 8.68 GB   2.5 / 8.3 GB    1.02x / 1.05x
    seed DialoGPT-medium 4 x 128 / 4 x 512 5.23 / 19.58 GB  5.3 / 18.7 GB   0.99x / 1.05x
    loraflow DialoGPT-small / medium 1x512 3.01 / 6.45 GB   2.87 / 6.17 GB  1.05x / 1.05x

Peak RSS on a CPU is partly glibc's fragmentation, hence the 0.80..1.05 spread (the same shape
moved by 30% between two processes). Nothing here was measured on a GPU: there the same
activation count is used with a 1 GiB base for the CUDA context and workspaces, and SDPA's and
FlashAttention's not building the scores is their documented behaviour, not a measurement.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraflow.errors import ConfigError
from loraflow.log import get_logger

if TYPE_CHECKING:
    from loraflow.modeling import Precision
    from loraflow.settings import Settings

log = get_logger("train")

GIB = 1024 ** 3
WARN_SHARE = 0.85  # of the device's memory: above it, "close to the limit"

C_H = 16.0
C_I_GELU = 5.25
C_I_GATED = 3.0
# What the interpreter, torch, transformers and peft take before any tensor (CPU: the process's
# RSS), or the CUDA context, cuBLAS workspaces and the caching allocator's reserve on a GPU.
BASE = {"cpu": int(0.55 * GIB), "mps": int(0.55 * GIB), "cuda": int(1.0 * GIB)}
# Allocator slack and autograd temporaries on top of the saved tensors (fitted on the peaks above).
ACTIVATION_FACTOR = 1.25

# Families whose MLP is gate * act(up) -> down (three h x i matrices).
GATED_MLP = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
             "gemma3_text", "phi3", "olmo", "olmo2", "cohere", "granite", "smollm3", "deepseek_v3", "glm"}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    params: int  # frozen base parameters
    gated_mlp: bool
    attention_dropout: float = 0.0
    # (in, out) features of each module a LoRA target name matches in one layer.
    module_shapes: dict[str, list[tuple[int, int]]] | None = None


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    lora: int
    activations: int
    attention_scores: int
    logits: int
    transient: int
    base: int
    total: int
    floor: int


def model_shape(config) -> ModelShape | None:
    """The shape the estimate needs, from a transformers config; None for one it does not know."""
    def get(*names):
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)

    layers, hidden = get("num_hidden_layers", "n_layer"), get("hidden_size", "n_embd")
    heads, vocab = get("num_attention_heads", "n_head"), get("vocab_size")
    if not all(isinstance(v, int) and v > 0 for v in (layers, hidden, heads, vocab)):
        return None
    kv_heads = get("num_key_value_heads") or heads
    intermediate = get("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    model_type = getattr(config, "model_type", "") or ""
    gated = model_type in GATED_MLP or (get("hidden_act") in ("silu", "swish") and model_type not in ("gpt2",))
    head_dim = get("head_dim") or hidden // heads
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    mlp = (3 if gated else 2) * hidden * intermediate
    embeddings = vocab * hidden * (1 if getattr(config, "tie_word_embeddings", True) else 2)
    if model_type == "gpt2":
        embeddings += (get("n_positions") or 0) * hidden  # learned positions
    dropout = float(get("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob") or 0.0)
    modules = {
        "q_proj": [(hidden, q_out)], "k_proj": [(hidden, kv_out)], "v_proj": [(hidden, kv_out)],
        "o_proj": [(q_out, hidden)], "out_proj": [(hidden, hidden)], "qkv_proj": [(hidden, q_out + 2 * kv_out)],
        "query_key_value": [(hidden, 3 * hidden)], "c_attn": [(hidden, 3 * hidden)],
        "c_proj": [(hidden, hidden), (intermediate, hidden)],  # GPT-2: attention and MLP output
        "c_fc": [(hidden, intermediate)], "fc1": [(hidden, intermediate)], "fc2": [(intermediate, hidden)],
        "gate_proj": [(hidden, intermediate)], "up_proj": [(hidden, intermediate)],
        "down_proj": [(intermediate, hidden)], "gate_up_proj": [(hidden, 2 * intermediate)],
        "dense": [(hidden, hidden)], "dense_h_to_4h": [(hidden, intermediate)],
        "dense_4h_to_h": [(intermediate, hidden)],
    }
    return ModelShape(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                      vocab=vocab, params=layers * (attention + mlp) + embeddings, gated_mlp=gated,
                      attention_dropout=dropout, module_shapes=modules)


def lora_parameters(shape: ModelShape, r: int, targets: list[str]) -> int:
    """Adapter parameters for `targets` (an unknown name counts as the layer's widest matrix)."""
    widest = [(shape.hidden, max(shape.intermediate, 3 * shape.hidden))]
    per_layer = 0
    for target in targets:
        name = target.rsplit(".", 1)[-1]
        for fan_in, fan_out in (shape.module_shapes or {}).get(name, widest):
            per_layer += r * (fan_in + fan_out)
    return shape.layers * per_layer


def scores_materialised(attn_implementation: str, device: str, attention_dropout: float) -> bool:
    """Does the attention build the b x heads x s x s scores? eager always; torch's CPU SDPA only
    when dropout is on (its flash kernel has none, so it falls back to the math kernel), and so
    does loraflow.dropout's attention, which is SDPA itself without dropout."""
    if attn_implementation == "eager":
        return True
    from loraflow.modeling import CPU_DROPOUT_ATTENTION

    return attn_implementation in ("sdpa", CPU_DROPOUT_ATTENTION) and device != "cuda" and attention_dropout > 0


def estimate_training_memory(shape: ModelShape, *, batch: int, seq: int, compute_bytes: int, weight_bytes: int,
                             attn_implementation: str, device: str, gradient_checkpointing: bool,
                             lora_params: int = 0) -> MemoryEstimate:
    """Peak bytes of one training step of a LoRA run (pure: no torch, no device). See the module
    docstring for the formula and its calibration."""
    b, s, p = batch, seq, compute_bytes
    h, i, L, V = shape.hidden, shape.intermediate, shape.layers, shape.vocab
    c_i = C_I_GATED if shape.gated_mlp else C_I_GELU
    per_layer = b * s * p * (C_H * h + c_i * i)
    from loraflow.modeling import CPU_DROPOUT_ATTENTION

    scores = 0
    if scores_materialised(attn_implementation, device, shape.attention_dropout):
        if attn_implementation == CPU_DROPOUT_ATTENTION:
            # loraflow.dropout's attention keeps the softmax output and the dropped probabilities in
            # the compute dtype (the mask is recomputed from its seed, not stored); counted over the
            # whole square, though its blocks skip what the causal mask hides (5/8 of it at 512).
            score_bytes = 2 * p
        else:
            score_bytes = (4 if p == 4 else 4 + p) + ((2 * p + 1) if shape.attention_dropout > 0 else 0)
        scores = b * shape.heads * s * s * score_bytes
    if gradient_checkpointing:
        activations, layer_scores = L * b * s * h * p + per_layer, scores
    else:
        activations, layer_scores = L * per_layer, L * scores
    mask = 0 if attn_implementation == "flash_attention_2" else b * s * s * (p if attn_implementation == "eager" else 1)
    transient = b * s * p * (2 * h + 2 * i) + mask
    logits = b * s * V * (12 + (2 if p == 2 else 0))
    weights = shape.params * weight_bytes
    lora = 16 * lora_params
    base = BASE.get(device, BASE["cpu"])
    total = base + weights + lora + ACTIVATION_FACTOR * (activations + layer_scores + logits + transient)
    floor = weights + 8 * b * s * V + L * b * s * h * p
    return MemoryEstimate(weights=weights, lora=lora, activations=int(activations), attention_scores=int(layer_scores),
                          logits=logits, transient=int(transient), base=base, total=int(total), floor=int(floor))


def device_memory(device: str) -> int | None:
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[1])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_attention(precision: Precision) -> str:
    """What the run's model will use: loraflow's choice on CUDA; elsewhere transformers' default,
    which is "sdpa" for the causal LMs loraflow trains (checked with transformers 5.24)."""
    from loraflow.modeling import attention_implementation

    return attention_implementation(precision) or "sdpa"


_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def check_training_memory(settings: Settings, precision: Precision, config, *,
                          attn_implementation: str | None = None, device_bytes: int | None = None) -> int | None:
    """Estimate a training step's peak memory; refuse only what certainly cannot fit, warn otherwise.
    Returns the estimate in bytes (None for an architecture it does not know)."""
    shape = model_shape(config)
    if shape is None:
        return None  # an architecture this estimate does not know: no claim either way
    seq, batch = settings.data.max_length, settings.training.per_device_train_batch_size
    from loraflow.modeling import training_attention

    attn = training_attention(attn_implementation or default_attention(precision), precision.device,
                              shape.attention_dropout, cpu_dropout=settings.training.cpu_dropout)
    estimate = estimate_training_memory(
        shape, batch=batch, seq=seq, compute_bytes=4 if precision.name == "fp32" else 2,
        weight_bytes=_BYTES.get(precision.model_dtype, 4), attn_implementation=attn, device=precision.device,
        gradient_checkpointing=settings.training.gradient_checkpointing,
        lora_params=lora_parameters(shape, settings.lora.r, list(settings.lora.target_modules)))
    have = device_bytes if device_bytes is not None else device_memory(precision.device)
    if not have:
        return estimate.total
    where = f"{precision.device} ({have / GIB:.1f} GiB there)"
    what = f"training.per_device_train_batch_size={batch} x data.max_length={seq}"
    if estimate.floor > have:
        if estimate.weights > have / 2:
            change = ("the frozen weights alone are "
                      f"{estimate.weights / GIB:.1f} GiB in {precision.model_dtype}: use a smaller model, a device "
                      "with more memory" + (", or half precision (model.dtype=bfloat16 on a GPU)"
                                            if precision.model_dtype == "float32" else ""))
        else:
            change = ("lower data.max_length or the batch size (gradient_accumulation_steps keeps the "
                      "effective batch)")
        raise ConfigError(f"{what} cannot fit on {where}: at least {estimate.floor / GIB:.1f} GiB (weights, "
                          f"fp32 logits for the loss, each layer's input); {change}")
    need = f"{what} needs about {estimate.total / GIB:.1f} GiB with {attn} attention on {where}"
    if estimate.total > have:
        hint = "" if settings.training.gradient_checkpointing else ", or set training.gradient_checkpointing=true"
        log.warning("%s: it may not fit; if the run is killed, lower data.max_length or the batch size%s",
                    need, hint)
    elif estimate.total > WARN_SHARE * have:
        log.warning("%s: close to the limit; lower them if the run is killed", need)
    return estimate.total
