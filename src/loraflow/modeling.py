"""Base model, tokenizer, precision and LoRA: everything about *which* network is trained.

The base model comes from a hub id, a local directory or an `s3://` prefix (air-gapped clusters
mirror base models into object storage; we download only safetensors and tokenizer files, never
pickled weights). Precision is resolved per device, because the seed's `fp16=True` and bfloat16
dtype are right on a GPU and a trap on a CPU without native half-precision maths.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loraflow.errors import ConfigError, IntegrityError, ModelError
from loraflow.log import get_logger, log_once
from loraflow.paths import cache_dir
from loraflow.storage.client import is_s3_uri, parse_s3_uri

if TYPE_CHECKING:
    import torch
    from loraflow.settings import LoraSettings, ModelSettings, Settings, StorageSettings, TrainingSettings

log = get_logger("model")

# peft 0.21 still reads `is_gradient_checkpointing`, which transformers 5.2x deprecated: a
# FutureWarning on every model load that a user can do nothing about. Only that one is silenced:
# for the process here, and around each peft call by `peft_quietly` (pytest, or anything else that
# resets the warning filters, drops the process-wide one).
_PEFT_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"
warnings.filterwarnings("ignore", message=_PEFT_DEPRECATION, category=FutureWarning)


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PEFT_DEPRECATION, category=FutureWarning)
        yield

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


@dataclass(frozen=True)
class CpuBf16:
    """Whether this CPU multiplies bf16 in hardware; `evidence` says why in a few words."""

    native: bool
    evidence: str


CPU_BF16_VARIABLE = "LORAFLOW_CPU_BF16"


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> CpuBf16:
    """Native bf16 maths: x86's avx512_bf16 or AMX (oneDNN then runs bf16 matrix products at 2-3x
    the fp32 rate), aarch64's bf16 extension. Without them torch emulates bf16, ~60x slower than fp32
    (ASSETS.md: 1.2 against 90 GFLOP/s on an AVX2-only EPYC). torch's own probe asks the processor
    (cpuid, as oneDNN does); /proc/cpuinfo's flags stand in where this torch has no probe.

    `LORAFLOW_CPU_BF16=0` (or 1) overrides the detection, as CUDA_VISIBLE_DEVICES hides a GPU: a
    property of the machine, not a setting. CI sets 0 so that the suite computes the same fp32
    numbers on every processor (its tests compare logits and adapters across processes)."""
    import torch

    forced = os.environ.get(CPU_BF16_VARIABLE, "").strip()
    if forced in ("0", "1"):
        return CpuBf16(forced == "1", f"{CPU_BF16_VARIABLE}={forced}")
    if forced:
        raise ConfigError(f"{CPU_BF16_VARIABLE}={forced!r}: use 0 (fp32 on this CPU) or 1 (native bf16), or unset it")
    arm = platform.machine().lower() in ("aarch64", "arm64")
    flags = _proc_cpu_flags()
    probed = None if arm else _torch_bf16_probe()
    if arm:
        found = ["bf16"] if "bf16" in flags else []
    elif probed is not None:
        found = probed
    else:
        found = [name for name in ("avx512_bf16", "amx_bf16") if name in flags]
    if found:
        return CpuBf16(True, " and ".join(found))
    missing = "no bf16 extension" if arm else "no avx512_bf16, no AMX"
    return CpuBf16(False, f"{torch.backends.cpu.get_cpu_capability()}: {missing}")


def _torch_bf16_probe() -> list[str] | None:
    """torch's own cpuid probe, in builds that expose it (torch 2.13's `torch._C._cpu` has only
    `_get_cpu_capability` and `_init_amx`): None where it does not."""
    import torch

    probe = getattr(torch._C, "_cpu", None)
    checks = (("avx512_bf16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
    if probe is None or not all(hasattr(probe, fn) for _, fn in checks):
        return None
    return [name for name, fn in checks if getattr(probe, fn)()]


def _proc_cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def resolve_precision(training: TrainingSettings, model_settings: ModelSettings, *,
                      device: str | None = None, bf16_supported: bool | None = None) -> Precision:
    """What a run computes in on `device` (default: this machine's), said in one line.

    CPU: `auto` gives bf16 where the CPU multiplies bf16 natively (`cpu_bf16`), else fp32, whatever
    the seed's `fp16=True` / bfloat16 dtype ask for (half precision without native maths is a trap:
    one micro-batch ~235 s against ~4 s, ASSETS.md). An explicit `training.precision=bf16` is honoured
    everywhere, with a warning where it is emulated; fp16 on a CPU resolves like auto. In bf16 the
    frozen base is held in bf16 and the Trainer computes under autocast; peft keeps the LoRA weights
    (so the optimizer state and the published adapter) in fp32.
    MPS: fp32. CUDA: explicit `training.precision` wins; `auto` gives bf16 where the GPU has it (or
    when `training.bf16`), else fp16 when `training.fp16` (the seed), else fp32.
    `bf16_supported`: what the device offers, when the caller knows (tests); detected otherwise."""
    device = device or detect_device()
    requested = _requested_description(training, model_settings)
    if device == "cpu":
        return _resolve_cpu(training, requested, bf16_supported)
    if device != "cuda":
        if requested:
            # Training, evaluation and the gate each resolve precision: one warning per process.
            log_once(log, logging.WARNING, "precision: settings request %s; using fp32 on %s (no native "
                     "half-precision maths there)", requested, device)
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
        log_once(log, logging.WARNING, "precision: training.precision=bf16 but this GPU has no bf16; using fp16")
        choice = "fp16"

    dtype = model_settings.dtype
    if dtype == "auto":
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[choice]
    elif dtype == "bfloat16" and not bf16_supported:
        dtype = "float16" if choice == "fp16" else "float32"
        log_once(log, logging.WARNING, "precision: model.dtype=bfloat16 but this GPU has no bf16; loading the base "
                 "model in %s", dtype)
    elif choice == "fp32" and dtype != "float32":
        # Half-precision weights without autocast would run the whole forward in half precision.
        dtype = "float32"
    return Precision(device="cuda", name=choice, model_dtype=dtype)  # type: ignore[arg-type]


_CPU_FP32 = Precision(device="cpu", name="fp32", model_dtype="float32")
_CPU_BF16 = Precision(device="cpu", name="bf16", model_dtype="bfloat16")
_BF16_RECIPE = "frozen base in bf16, LoRA weights in fp32, compute under autocast"


def _resolve_cpu(training: TrainingSettings, requested: str, bf16_supported: bool | None) -> Precision:
    support = cpu_bf16() if bf16_supported is None else \
        CpuBf16(bf16_supported, "as given" if bf16_supported else "none, as given")
    if training.precision == "fp32":
        return _CPU_FP32
    if training.precision == "bf16":
        if support.native:
            log_once(log, logging.INFO, "precision: bf16 on cpu as training.precision=bf16 asks (native bf16 "
                     "maths: %s): %s", support.evidence, _BF16_RECIPE)
        else:
            log_once(log, logging.WARNING, "precision: bf16 on cpu as training.precision=bf16 asks, but this CPU "
                     "has no native bf16 maths (%s): emulated, many times slower than fp32 (auto would use fp32)",
                     support.evidence)
        return _CPU_BF16
    # auto, or fp16: no CPU trains fast in fp16, so it resolves like auto and says so.
    explicit_fp16 = training.precision == "fp16"
    if support.native:
        log_once(log, logging.WARNING if explicit_fp16 else logging.INFO,
                 "precision: %sbf16 on cpu: this CPU multiplies bf16 natively (%s): %s",
                 f"settings request {requested}; using " if requested else "", support.evidence, _BF16_RECIPE)
        return _CPU_BF16
    log_once(log, logging.WARNING if requested else logging.INFO,
             "precision: %sfp32 on cpu: this CPU has no native bf16 maths (%s), where half precision runs many "
             "times slower", f"settings request {requested}; using " if requested else "", support.evidence)
    return _CPU_FP32


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


def autocast(precision: Precision):
    """The compute context of `precision`: autocast to bf16/fp16 on its device, nothing in fp32.
    The Trainer enters it itself (its bf16/fp16 flags); evaluation, generation and the service
    enter it around their forwards, so half-precision weights meet fp32 adapters the same way in
    all of them: matrix products in half precision, reductions and the loss in fp32."""
    import torch

    if precision.name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(precision.device, dtype=torch.bfloat16 if precision.bf16 else torch.float16)


def precision_of(model) -> Precision:
    """The precision a loaded model computes in, read from its frozen base weights (the input
    embeddings, which LoRA never trains): bf16/fp16 weights compute under autocast to that dtype,
    fp32 weights in fp32. For code that holds a model but not the run's resolution."""
    import torch

    try:
        weight = model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):  # a model without the accessor: its first weights
        weight = next(model.parameters())
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(weight.dtype, "fp32")
    return Precision(device=weight.device.type, name=name,  # type: ignore[arg-type]
                     model_dtype=str(weight.dtype).removeprefix("torch."))


# --------------------------------------------------------------------------------------------
# Where the base model lives


def resolve_model_source(model_settings: ModelSettings, storage: StorageSettings | None = None) -> str:
    """A hub id or local directory that `from_pretrained` can open. An `s3://` prefix is mirrored
    into `LORAFLOW_HOME/models/s3/<bucket>/<key>` by the storage layer (safetensors, configs and
    tokenizer files only; an object replaced in the bucket is fetched again, by ETag)."""
    name = model_settings.name_or_path
    if is_s3_uri(name):
        return str(_mirror(name, storage).path)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name.startswith(("/", "./", "../", "~")) or path.exists():
        raise ModelError(f"model.name_or_path={name!r}: no such model directory")
    return name  # a hub id


def _mirror(uri: str, storage: StorageSettings | None):
    if storage is None:
        raise ModelError(f"model.name_or_path={uri!r} is an s3:// prefix but no storage settings were given")
    from loraflow.errors import StorageError
    from loraflow.storage.transfer import mirror_uri

    bucket, key = parse_s3_uri(uri)
    try:
        return mirror_uri(storage, uri, cache_dir("models", "s3", bucket, *[p for p in key.split("/") if p]), "model")
    except StorageError as exc:
        raise ModelError(f"model.name_or_path={uri}: {exc}") from None


_weight_hashes: dict[tuple, str] = {}


def _hash_weights(directory: Path) -> dict[str, str]:
    """sha256 of every safetensors file of a local model directory, memoised per process by path,
    size and mtime (a run hashes its base model once, not once per step that loads it)."""
    from loraflow.hashing import sha256_file

    out = {}
    for path in sorted(directory.rglob("*.safetensors")):
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _weight_hashes:
            _weight_hashes[key] = sha256_file(path)
        out[path.relative_to(directory).as_posix()] = _weight_hashes[key]
    return out


@dataclass(frozen=True)
class BaseSource:
    """Where a run's base model is on this machine, resolved once (loraflow.recipe): `path` is what
    `from_pretrained` opens (a directory or a hub id); `weights`, for an s3:// mirror, the sha256 of
    each safetensors file, verified as it landed, so nothing is synced or hashed again."""

    path: str
    weights: dict[str, str] | None = None


def resolve_base(settings: Settings) -> BaseSource:
    name = settings.model.name_or_path
    if is_s3_uri(name):
        mirror = _mirror(name, settings.storage)
        return BaseSource(str(mirror.path), {e.name: e.sha256 for e in mirror.files if e.name.endswith(".safetensors")})
    return BaseSource(resolve_model_source(settings.model, settings.storage))


def base_model_identity(settings: Settings, base: BaseSource | None = None) -> dict[str, Any]:
    """What the manifest records about the base model: its logical id (hub id, s3:// URI or the
    directory as given, never a mirror path), revision, and the sha256 of each weight file, so a
    host loading the adapter can check it got the same base."""
    if base is not None and base.weights is not None:
        return {"id": settings.model.name_or_path, "revision": settings.model.revision, "weights": dict(base.weights)}
    return model_identity(settings.model.name_or_path, settings.model.revision, settings.storage)


def model_identity(name: str, revision: str | None, storage: StorageSettings | None) -> dict[str, Any]:
    if is_s3_uri(name):
        mirror = _mirror(name, storage)
        weights = {e.name: e.sha256 for e in mirror.files if e.name.endswith(".safetensors")}
    else:
        weights = _hash_weights(local_model_dir(name, revision))
    return {"id": name, "revision": revision, "weights": weights}


def local_model_dir(name: str, revision: str | None) -> Path:
    """Where a model's files are on this machine: the directory itself, or the hub cache's snapshot
    of a hub id (after `from_pretrained` fetched it)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, local_files_only=True,
                                      allow_patterns=["*.safetensors", "*.json"]))
    except Exception as exc:  # noqa: BLE001 - hub errors have many types; one line names the model
        raise ModelError(f"{name}: the base model's files are not in the local hub cache ({type(exc).__name__})") from None


def check_model_identity(recorded: dict[str, Any], storage: StorageSettings | None, where: str) -> None:
    """Refuse, with one line, a base model whose weights differ from the recorded sha256s."""
    expected = recorded.get("weights") or {}
    if not expected:
        log.warning("%s records no base-model weight hashes; the base model is not verified", where)
        return
    actual = model_identity(recorded["id"], recorded.get("revision"), storage)["weights"]
    for file_name, digest in sorted(expected.items()):
        if actual.get(file_name) != digest:
            got = actual.get(file_name)
            raise IntegrityError(
                f"base model {recorded['id']}: {file_name} "
                f"{'is missing' if got is None else f'has sha256 {got[:12]}…'}, but {where} was trained on "
                f"sha256 {digest[:12]}…; refusing to load the adapter onto different weights")


def load_tokenizer(settings: Settings, source: str | None = None):
    """The base model's tokenizer, unchanged. GPT-2 has no pad token; we do not invent one, since
    our collator pads by position (see `pad_token_id`). `source`: the already resolved local
    directory or hub id (loraflow.recipe resolves an s3:// mirror once per run)."""
    from transformers import AutoTokenizer

    from loraflow.loads import count

    source = source or resolve_model_source(settings.model, settings.storage)
    count("tokenizer")
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


CPU_DROPOUT_ATTENTION = "loraflow_cpu_sdpa"  # registered with transformers by loraflow.dropout


def training_attention(attn_implementation: str, device: str, attention_dropout: float, *, cpu_dropout: bool) -> str:
    """The attention a loaded model trains with: on a CPU with attention dropout and
    training.cpu_dropout, loraflow.dropout's in place of SDPA (which there falls back to its math
    kernel). loraflow.dropout switches to it; the memory estimate counts its scores."""
    if cpu_dropout and device == "cpu" and attn_implementation == "sdpa" and attention_dropout > 0:
        return CPU_DROPOUT_ATTENTION
    return attn_implementation


def attention_implementation(precision: Precision) -> str | None:
    """The attention kernel for packed rows (per-document position ids, no attention mask).

    On CUDA in half precision, FlashAttention-2 when the `flash_attn` package is installed:
    transformers turns position-id restarts into `cu_seqlens` and runs its varlen kernel, so each
    document attends only to itself and no block mask is materialised. Otherwise SDPA, which gets the
    block-diagonal causal mask transformers builds from the same position ids. None elsewhere:
    the CPU keeps transformers' default path, the one the packed == per-document tests check."""
    import importlib.util

    if precision.device != "cuda":
        return None
    if precision.name in ("bf16", "fp16") and precision.model_dtype in ("bfloat16", "float16") \
            and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_base_model(settings: Settings, precision: Precision | None = None, source: str | None = None):
    """The frozen base model in `precision.model_dtype`, on the CPU.

    `model.device_map` is deliberately not passed to `from_pretrained`: with "auto" accelerate
    spreads the layers over every visible GPU inside each process, which breaks DDP (each rank
    must hold a whole replica on its own device) and the Trainer moves the model itself."""
    from transformers import AutoModelForCausalLM

    precision = precision or resolve_precision(settings.training, settings.model)
    # A long wait (a download from s3://, then reading and converting the weights): say so first.
    from loraflow.loads import count

    log.info("loading base model %s (%s)", settings.model.name_or_path, precision.model_dtype)
    source = source or resolve_model_source(settings.model, settings.storage)
    count("base_model")
    if settings.model.device_map not in (None, "", "auto"):
        log.info("model.device_map=%r is ignored for training: the Trainer places the model (DDP-safe)",
                 settings.model.device_map)
    attn = attention_implementation(precision)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, revision=settings.model.revision, trust_remote_code=settings.model.trust_remote_code,
                dtype=precision.torch_dtype, use_safetensors=True,
                **({"attn_implementation": attn} if attn else {}),
            )
        except (ImportError, ValueError) as exc:
            if attn != "flash_attention_2":
                raise
            # An architecture without FlashAttention-2 support, or a flash_attn build that does not
            # match this GPU/torch: SDPA gives the same results with the block mask.
            log.info("flash_attention_2 unavailable for %s (%s): using sdpa", settings.model.name_or_path,
                     str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            attn = "sdpa"
            model = AutoModelForCausalLM.from_pretrained(
                source, revision=settings.model.revision, trust_remote_code=settings.model.trust_remote_code,
                dtype=precision.torch_dtype, use_safetensors=True, attn_implementation=attn,
            )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model.name_or_path={settings.model.name_or_path!r} "
                         f"(only safetensors weights are accepted): {exc}") from None
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if getattr(model, "loss_type", "") is None:
        # Classes not named *ForCausalLM (GPT-2's LMHeadModel: the seed's DialoGPT) get no loss
        # type, and transformers warns that it falls back to ForCausalLM, which is what a causal
        # LM means. Naming it is the same loss without a warning nobody can act on.
        model.loss_type = "ForCausalLM"
    return model


def load_config(settings: Settings, source: str | None = None):
    """The base model's config (no weights loaded)."""
    from transformers import AutoConfig

    from loraflow.loads import count

    source = source or resolve_model_source(settings.model, settings.storage)
    count("config")
    try:
        return AutoConfig.from_pretrained(source, revision=settings.model.revision,
                                          trust_remote_code=settings.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the config of model.name_or_path={settings.model.name_or_path!r}: {exc}") from None


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


def apply_lora(model, lora: LoraSettings, *, base_model: str | None = None, revision: str | None = None):
    """Wrap `model` in a peft LoRA model; logs trainable parameters like the seed notebook's
    `print_trainable_parameters()`. Never returns a model with zero trainable parameters.

    `base_model` is the logical id written to adapter_config.json (`base_model_name_or_path`):
    the hub id or s3:// URI the run was configured with, not the local directory peft would record
    (a mirror under LORAFLOW_HOME means nothing on another host)."""
    from peft import LoraConfig, get_peft_model

    targets, fan_in_fan_out = resolve_target_modules(model, lora)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, bias=lora.bias,
        task_type=lora.task_type, target_modules=targets, fan_in_fan_out=fan_in_fan_out,
    )
    with peft_quietly():
        peft_model = get_peft_model(model, config)
    if base_model is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base_model
        peft_model.peft_config["default"].revision = revision
    trainable, total = peft_model.get_nb_trainable_parameters()
    if trainable == 0:
        raise ModelError(f"LoRA on {targets} left no trainable parameters")
    log.info("trainable params: %s || all params: %s || trainable%%: %.4f (LoRA r=%d on %s)",
             f"{trainable:,}", f"{total:,}", 100 * trainable / total, lora.r, ", ".join(targets))
    return peft_model


def trainable_parameters(model) -> dict[str, Any]:
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable": int(trainable), "total": int(total), "percent": round(100 * trainable / total, 4)}
