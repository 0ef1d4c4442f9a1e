"""Base model, tokenizer, precision and LoRA: everything about *which* network is trained.

The base model comes from a hub id, a local directory or an `s3://` prefix (air-gapped clusters
mirror base models into object storage; we download only safetensors and tokenizer files, never
pickled weights). Precision is resolved per device, because the seed's `fp16=True` and bfloat16
dtype are right on a GPU and a trap on a CPU without native half-precision maths.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loraflow.errors import ModelError
from loraflow.log import get_logger
from loraflow.paths import cache_dir
from loraflow.s3 import is_s3_uri, parse_s3_uri

if TYPE_CHECKING:
    import torch
    from loraflow.settings import LoraSettings, ModelSettings, Settings, StorageSettings, TrainingSettings

log = get_logger("model")

# peft 0.21 still reads `is_gradient_checkpointing`, which transformers 5.2x deprecated: a
# FutureWarning on every model load that a user can do nothing about. Only that one is silenced.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# Files a base-model mirror may hold. Weights only as safetensors: a .bin/.pt/.pkl from storage
# would be unpickled by torch, i.e. code execution from whoever can write to the bucket.
# No .py either: remote code would run with trust_remote_code.
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja", ".tiktoken", ".md")

# LoRA targets by architecture, used when the configured target_modules match nothing (the seed's
# GPT-2 names `c_attn/c_proj` on a Llama). peft's own table only lists q/v for Llama; all four
# attention projections are the common recipe and what ASSETS.md measured.
ARCH_DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "falcon": ["query_key_value", "dense"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
}


@dataclass(frozen=True)
class Precision:
    """What a run computes in. `name` is the compute precision (fp32/bf16/fp16, i.e. the Trainer's
    autocast flags); `model_dtype` is the dtype the frozen base weights are loaded in."""

    device: Literal["cpu", "cuda", "mps"]
    name: Literal["fp32", "bf16", "fp16"]
    model_dtype: str  # "float32" | "bfloat16" | "float16"

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    @property
    def fp16(self) -> bool:
        return self.name == "fp16"

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.model_dtype)


def detect_device() -> Literal["cpu", "cuda", "mps"]:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_precision(training: TrainingSettings, model_settings: ModelSettings, *,
                      device: str | None = None, bf16_supported: bool | None = None) -> Precision:
    """CPU (and MPS): always fp32, with one warning when the settings asked for half precision
    (no native bf16/fp16 maths on such CPUs: a step runs ~60x slower, see ASSETS.md).
    CUDA: explicit `training.precision` wins; `auto` gives bf16 where the GPU has it (or when
    `training.bf16`), else fp16 when `training.fp16` (the seed), else fp32."""
    device = device or detect_device()
    requested = _requested_description(training, model_settings)
    if device != "cuda":
        if requested:
            log.warning("precision: settings request %s; using fp32 on %s (no native half-precision maths there)",
                        requested, device)
        return Precision(device=device, name="fp32", model_dtype="float32")  # type: ignore[arg-type]

    if bf16_supported is None:
        import torch

        bf16_supported = torch.cuda.is_bf16_supported()
    choice = training.precision
    if choice == "auto":
        if bf16_supported:
            choice = "bf16"
        elif training.fp16 or training.bf16:
            choice = "fp16"
        else:
            choice = "fp32"
    elif choice == "bf16" and not bf16_supported:
        log.warning("precision: training.precision=bf16 but this GPU has no bf16; using fp16")
        choice = "fp16"

    dtype = model_settings.dtype
    if dtype == "auto":
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[choice]
    elif dtype == "bfloat16" and not bf16_supported:
        dtype = "float16" if choice == "fp16" else "float32"
        log.warning("precision: model.dtype=bfloat16 but this GPU has no bf16; loading the base model in %s", dtype)
    elif choice == "fp32" and dtype != "float32":
        # Half-precision weights without autocast would run the whole forward in half precision.
        dtype = "float32"
    return Precision(device="cuda", name=choice, model_dtype=dtype)  # type: ignore[arg-type]


def _requested_description(training: TrainingSettings, model_settings: ModelSettings) -> str:
    asked = []
    if training.precision in ("bf16", "fp16"):
        asked.append(f"training.precision={training.precision}")
    if training.fp16:
        asked.append("training.fp16=true")
    if training.bf16:
        asked.append("training.bf16=true")
    if model_settings.dtype in ("bfloat16", "float16"):
        asked.append(f"model.dtype={model_settings.dtype}")
    return ", ".join(asked)


# --------------------------------------------------------------------------------------------
# Where the base model lives


def resolve_model_source(model_settings: ModelSettings, storage: StorageSettings | None = None) -> str:
    """A hub id or local directory that `from_pretrained` can open. `s3://` prefixes are mirrored
    into `LORAFLOW_HOME/models/s3/<bucket>/<key>` first (files already there with the same size
    are kept, so a second run downloads nothing)."""
    name = model_settings.name_or_path
    if is_s3_uri(name):
        if storage is None:
            raise ModelError(f"model.name_or_path={name!r} is an s3:// prefix but no storage settings were given")
        from loraflow.s3 import download_prefix

        bucket, key = parse_s3_uri(name)
        dest = cache_dir("models", "s3", bucket, *[p for p in key.split("/") if p])
        log.info("mirroring base model %s -> %s", name, dest)
        download_prefix(storage, name, dest, allowed_suffixes=MODEL_FILE_SUFFIXES)
        return str(dest)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name.startswith(("/", "./", "../", "~")) or path.exists():
        raise ModelError(f"model.name_or_path={name!r}: no such model directory")
    return name  # a hub id


def load_tokenizer(settings: Settings):
    """The base model's tokenizer, unchanged. GPT-2 has no pad token; we do not invent one, since
    our collator pads by position (see `pad_token_id`)."""
    from transformers import AutoTokenizer

    source = resolve_model_source(settings.model, settings.storage)
    try:
        return AutoTokenizer.from_pretrained(source, revision=settings.model.revision,
                                             trust_remote_code=settings.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of model.name_or_path={settings.model.name_or_path!r}: {exc}") from None


def pad_token_id(tokenizer) -> int:
    """The id the collator pads with. Padding is masked by position, never by id, so using EOS
    here does not mask the real EOS tokens (the seed's pad = eos mistake)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ModelError("the tokenizer has neither a pad nor an eos token")
    return int(pid)


def load_base_model(settings: Settings, precision: Precision | None = None):
    """The frozen base model in `precision.model_dtype`, on the CPU.

    `model.device_map` is deliberately not passed to `from_pretrained`: with "auto" accelerate
    spreads the layers over every visible GPU inside each process, which breaks DDP (each rank
    must hold a whole replica on its own device) and the Trainer moves the model itself."""
    from transformers import AutoModelForCausalLM

    precision = precision or resolve_precision(settings.training, settings.model)
    source = resolve_model_source(settings.model, settings.storage)
    if settings.model.device_map not in (None, "", "auto"):
        log.info("model.device_map=%r is ignored for training: the Trainer places the model (DDP-safe)",
                 settings.model.device_map)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=settings.model.revision, trust_remote_code=settings.model.trust_remote_code,
            dtype=precision.torch_dtype, use_safetensors=True,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model.name_or_path={settings.model.name_or_path!r} "
                         f"(only safetensors weights are accepted): {exc}") from None
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # the KV cache is useless in training and costs memory
    return model


def model_max_positions(settings: Settings) -> int | None:
    """The base model's context length from its config (no weights loaded), for data checks."""
    from transformers import AutoConfig

    source = resolve_model_source(settings.model, settings.storage)
    try:
        config = AutoConfig.from_pretrained(source, revision=settings.model.revision,
                                            trust_remote_code=settings.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the config of model.name_or_path={settings.model.name_or_path!r}: {exc}") from None
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# --------------------------------------------------------------------------------------------
# LoRA


def _adaptable_modules(model) -> dict[str, str]:
    """Full module name -> class name, for every layer LoRA can wrap (Linear, GPT-2's Conv1D).
    The output head is left out: adapting it is never the intent of a `target_modules` list."""
    import torch
    from transformers.pytorch_utils import Conv1D

    out = {}
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is output_head:
            continue
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            out[name] = type(module).__name__
    return out


def _matches(full_name: str, target: str) -> bool:
    # peft's rule for a list of names: the module's name equals the target or ends with ".target".
    return full_name == target or full_name.endswith("." + target)


def resolve_target_modules(model, lora: LoraSettings) -> tuple[list[str], bool]:
    """(target names, fan_in_fan_out). Configured names that match nothing fall back to the
    architecture's default with a warning; if that fails too, ModelError lists what exists."""
    modules = _adaptable_modules(model)
    wanted = list(lora.target_modules)
    hits = {t: [n for n in modules if _matches(n, t)] for t in wanted}
    missing = [t for t, names in hits.items() if not names]
    targets = [t for t, names in hits.items() if names]
    model_type = getattr(getattr(model, "config", None), "model_type", None) or "?"
    if not targets:
        default = ARCH_DEFAULT_TARGETS.get(model_type)
        if default is None:
            from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

            default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        default_hits = [t for t in (default or []) if any(_matches(n, t) for n in modules)]
        if not default_hits:
            names = sorted({n.rsplit(".", 1)[-1] for n in modules})
            raise ModelError(
                f"lora.target_modules={wanted} match no layer of this {model_type} model; "
                f"Linear/Conv1D layer names that exist: {', '.join(names)}")
        log.warning("lora.target_modules=%s match no layer of this %s model; using the %s default %s instead",
                    wanted, model_type, model_type, default_hits)
        targets = default_hits
    elif missing:
        log.warning("lora.target_modules: %s match no layer of this %s model (training %s)",
                    missing, model_type, targets)
    matched_classes = {modules[n] for t in targets for n in modules if _matches(n, t)}
    # GPT-2 stores Conv1D weights transposed (in, out); peft must know, or it warns and fixes it
    # up itself. A mix of Conv1D and Linear under one config cannot be expressed; peft then
    # corrects per layer with a warning, which is the best available.
    fan_in_fan_out = matched_classes == {"Conv1D"}
    return targets, fan_in_fan_out


def apply_lora(model, lora: LoraSettings):
    """Wrap `model` in a peft LoRA model; logs trainable parameters like the seed notebook's
    `print_trainable_parameters()`. Never returns a model with zero trainable parameters."""
    from peft import LoraConfig, get_peft_model

    targets, fan_in_fan_out = resolve_target_modules(model, lora)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, bias=lora.bias,
        task_type=lora.task_type, target_modules=targets, fan_in_fan_out=fan_in_fan_out,
    )
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    if trainable == 0:
        raise ModelError(f"LoRA on {targets} left no trainable parameters")
    log.info("trainable params: %s || all params: %s || trainable%%: %.4f (LoRA r=%d on %s)",
             f"{trainable:,}", f"{total:,}", 100 * trainable / total, lora.r, ", ".join(targets))
    return peft_model


def trainable_parameters(model) -> dict[str, Any]:
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable": int(trainable), "total": int(total), "percent": round(100 * trainable / total, 4)}
