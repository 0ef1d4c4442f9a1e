"""Typed settings: the seed notebook's recipe as defaults, nested the way the libraries they feed
name things (peft's LoraConfig, transformers' TrainingArguments), so users recognise every key.

`Settings` is a run's spec: a plain pydantic model. Validating one (a flow parameter, a JSON file
handed to torchrun's ranks) never reads the environment, so a run means the same thing in every
process that receives it: fields it leaves out are the documented defaults, never "whatever this
worker's LORAFLOW_* variables say". The environment is read in one place, `load_settings`, by
whoever starts the run (the CLI, the demo), with this precedence, lowest to highest: defaults <
YAML file (``--config``) < environment (``LORAFLOW_`` prefix, ``__`` between levels) <
command-line overrides (``--set a.b=V``). A flow run takes from its machine only credentials
(boto3's chain) and, when its spec leaves it unset, the storage location as one unit
(`loraflow.run_spec`).

Which settings change a result is field metadata (`result=`), read by `result_fields`: the change
check, the resume identity and the data fingerprint all ask it, so they cannot drift apart.
"""

from __future__ import annotations

import contextvars
import copy
import json
import os
import string
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from pydantic.fields import FieldInfo

from loraflow.errors import ConfigError


def expand_path_vars(value: str) -> str:
    """`~` and `${VAR}` in path-like settings, so one YAML serves every machine; `LORAFLOW_HOME`
    resolves to its default (`~/.cache/loraflow`) when unset. Hub ids and s3:// URIs pass through."""
    if "$" not in value and not value.startswith("~"):
        return value
    env = dict(os.environ)
    env.setdefault("LORAFLOW_HOME", str(Path("~/.cache/loraflow").expanduser()))
    expanded = os.path.expanduser(string.Template(value).safe_substitute(env))
    return expanded


# A path-like setting: `~` and `${VAR}` expanded after validation.
PathSetting = Annotated[str, AfterValidator(expand_path_vars)]

# What a setting does to the trained adapter; one rule, read by the change check (loraflow.changes),
# the resume identity (loraflow.resume) and the data fingerprint (loraflow.data.prepare):
#   changes   (unmarked) a different value trains a different adapter
#   inert     where and how often files are written, how the work is spread: never the weights
#   schedule  how long training runs: a different adapter, but resuming with a longer schedule
#             is how a run is extended, so the resume identity leaves it out
#   resolved  a request that resolves per machine (precision): the change check compares the
#             request; the resume identity compares what it resolved to (recorded by training)
#   source    where data or weights come from: identified by content (the data fingerprint
#             hashes the texts, the resume identity the weights), by id everywhere else
RESULT_SECTIONS = ("model", "data", "lora", "training")
ResultRole = Literal["changes", "inert", "schedule", "resolved", "source"]


def role(kind: ResultRole) -> dict[str, Any]:
    return {"result": kind}


def result_role(field: FieldInfo) -> ResultRole:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return extra.get("result", "changes")  # type: ignore[return-value]


class _Section(BaseModel):
    # A typo in a key must be an error, not a silently ignored setting; inf/nan are never a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSettings(_Section):
    name_or_path: PathSetting = Field("microsoft/DialoGPT-medium", min_length=1, json_schema_extra=role("source"),
                              description="Hub id, local directory, or s3:// prefix of the base model.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).",
                                 json_schema_extra=role("source"))
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "bfloat16", description=("Weights dtype on a GPU; on a CPU the base follows the resolved "
                                 "precision (bfloat16 or float32)."),
        json_schema_extra=role("resolved"))
    device_map: str | None = Field("auto", json_schema_extra=role("inert"))
    trust_remote_code: bool = False


class DataSettings(_Section):
    source: PathSetting = Field("imdb", min_length=1, json_schema_extra=role("source"),
                        description="Hub dataset id, local file/folder, or s3:// prefix.")
    config_name: str | None = Field(None, description="Hub dataset configuration name.",
                                    json_schema_extra=role("source"))
    revision: str | None = Field(None, description="Hub dataset revision.", json_schema_extra=role("source"))
    text_column: str = Field("text", min_length=1)
    train_split: str = "train"
    eval_split: str | None = Field("test", description="Used when the source has it; else eval_size is held out.")
    eval_size: float = Field(0.05, gt=0, lt=1, description="Fraction held out when the source has no eval split.")
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)
    max_length: int = Field(512, gt=1)
    packing: bool = Field(True, description="Concatenate documents into max_length blocks (no attention across documents).")
    clean_html: bool = Field(True, description="Turn IMDB's <br /> markup into newlines.")


class LoraSettings(_Section):
    r: int = Field(16, gt=0)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"
    target_modules: list[str] = Field(default_factory=lambda: ["c_attn", "c_proj"], min_length=1)


class TrainingSettings(_Section):
    output_dir: PathSetting = Field(
        "./lora-dialogpt", json_schema_extra=role("inert"), description="Where `loraflow train` writes checkpoints and the adapter. Flow runs use "
                                       "LORAFLOW_HOME/runs/<flow run id> instead, removed after a successful publish "
                                       "(the result is the published version).")
    num_train_epochs: float = Field(1, gt=0, json_schema_extra=role("schedule"))
    per_device_train_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    max_steps: int = Field(1000, description="-1 trains for num_train_epochs instead.",
                           json_schema_extra=role("schedule"))

    @field_validator("max_steps")
    @classmethod
    def _max_steps_sign(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("must be positive, or -1 to train for num_train_epochs")
        return value

    learning_rate: float = Field(2e-4, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    # transformers' SchedulerType values (5.x), checked here so `config validate` catches a typo.
    lr_scheduler_type: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                               "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr",
                               "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy"] = "linear"
    max_grad_norm: float = Field(1.0, ge=0)
    fp16: bool = Field(True, description="The seed's flag: use fp16 where no bf16 is available on a GPU.",
                       json_schema_extra=role("resolved"))
    bf16: bool = Field(False, json_schema_extra=role("resolved"))
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", json_schema_extra=role("resolved"),
        description=("auto: bf16 on GPUs that have it, fp16 on older GPUs (if fp16); on a CPU bf16 where it "
                     "multiplies bf16 natively (avx512_bf16, AMX), else fp32."))
    gradient_checkpointing: bool = False
    fused_loss: bool = Field(
        True, json_schema_extra=role("inert"),
        description=("Output head and cross-entropy fused in chunks (loraflow.lm_loss): the same loss without "
                     "materialising every position's logits; falls back to the model's own loss where it does "
                     "not apply. false: always the model's own loss."))
    # Not inert: the same drop rate and mean, but other random draws, so another adapter.
    cpu_dropout: bool = Field(
        True,
        description=("On a CPU, dropout with counter-based masks computed inside fused kernels "
                     "(loraflow.dropout, loraflow.cpu_kernels), attention dropout included, and each LoRA branch "
                     "as one autograd node (loraflow.lora_branch): the same drop rate (to 2^-32) and mean, a "
                     "different random stream. false: torch's dropout and PEFT's branch. No effect on a GPU."))
    logging_steps: int = Field(25, gt=0, json_schema_extra=role("inert"))
    save_strategy: Literal["steps", "epoch", "no"] = Field("steps", json_schema_extra=role("inert"))

    @field_validator("save_strategy", mode="before")
    @classmethod
    def _unquoted_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # `save_strategy: no` in YAML 1.1 is False
    save_steps: int = Field(500, gt=0, json_schema_extra=role("inert"))
    save_total_limit: int | None = Field(2, gt=0, json_schema_extra=role("inert"))
    seed: int = 42
    dataloader_num_workers: int = Field(0, ge=0, json_schema_extra=role("inert"))
    # The effective batch is per-device x accumulation x processes, so the process count does change
    # the result; the setting is inert because "auto" resolves per worker (a worker with more GPUs
    # must not force a retrain by itself). The resume identity compares the world size it resolved to.
    nproc_per_node: Literal["auto"] | int = Field(
        "auto", json_schema_extra=role("inert"), description=("Training processes on the worker (torchrun, one per device): auto = the number of "
                             "CUDA devices, 1 on CPU; an integer forces it (e.g. 2 gloo processes on a CPU)."))

    @field_validator("nproc_per_node")
    @classmethod
    def _nproc_positive(cls, value: Any) -> Any:
        if value != "auto" and value < 1:
            raise ValueError("must be 'auto' or a positive integer")
        return value


class StorageSettings(_Section):
    """Where objects go. Never credentials: boto3's standard chain supplies them (environment,
    shared config/profile, instance or pod role), so no settings dump, flow parameter or manifest
    can carry a secret."""

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint URL (MinIO, Ceph RGW, R2, ...); 'aws': AWS S3; 'local': the "
                          "local store under LORAFLOW_HOME; None: AWS_ENDPOINT_URL_S3, else AWS S3 when AWS "
                          "credentials are configured, else the local store.")
    bucket: str = Field("loraflow", min_length=3, max_length=63)
    prefix: str = Field("", description="Key prefix for everything loraflow writes in the bucket.")
    region: str | None = Field(None, description="None: the profile's or AWS_REGION's, else us-east-1.")
    profile: str | None = Field(None, description="A profile of the shared AWS config files; None: the default chain.")


class RegistrySettings(_Section):
    adapter_name: str = Field("dialogpt-imdb", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    aliases: list[str] = Field(default_factory=lambda: ["latest"], description="Moved on every publish.")
    promote_alias: str = Field("champion", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    promotion_metric: Literal["adapter_ppl"] = "adapter_ppl"
    promotion_margin: float = Field(
        0.0, ge=0, description=("Relative: the upper confidence bound of candidate ppl / champion ppl on the same "
                                "documents must be <= 1 + margin (0: better than the champion with confidence)."))
    gc_grace_seconds: int = Field(3600, ge=0)
    gc_checkpoint_grace_seconds: int = Field(
        86400, ge=0, description=("`loraflow gc` removes a training run's checkpoints once it wrote nothing for this "
                                  "long (failed or abandoned runs; longer than any gap between two checkpoints)."))
    force: bool = Field(
        False, description="Retrain even when data, base model and training settings are unchanged since the champion.")
    gc_keep_champions: int = Field(
        3, ge=0, description="gc --keep-last never deletes a version that held promote_alias in its last K moves.")
    gate_resamples: int = Field(2000, ge=100, description="Paired bootstrap resamples of the eval documents.")
    gate_confidence: float = Field(0.95, gt=0.5, lt=1, description="Two-sided confidence of the gate's intervals.")
    health_eos_tolerance: float = Field(
        0.25, ge=0, le=1, description="How far the share of generations that end with EOS may fall below the champion's.")
    health_distinct_tolerance: float = Field(
        0.1, ge=0, le=1, description="How far distinct-2 of the generations may fall below the champion's.")


class EvalSettings(_Section):
    """What evaluation measures besides the eval split's perplexity (see docs/gate.md)."""

    max_new_tokens: int = Field(64, gt=0, description="Greedy generation budget per fixed prompt (generation health).")
    general_source: PathSetting | None = Field(
        None, description="Forgetting check: a second, general-text source (any data.source form); None: off.")
    general_text_column: str = Field("text", min_length=1)
    max_general_samples: int | None = Field(200, gt=0, description="Documents of general_source's eval split used.")


class PrefectSettings(_Section):
    train_deployment: str | None = Field(
        None, description="'flow/deployment' to run training on a GPU work pool; None trains in-process.")
    train_attempts: int = Field(
        3, ge=1, description="Submissions of a training run whose worker died (same run key: each resumes).")
    heartbeat_timeout_s: int = Field(
        600, ge=30, description=("A training run Running this long without a Prefect heartbeat "
                                 "(PREFECT_FLOWS_HEARTBEAT_FREQUENCY on the worker) counts as crashed."))


class ClusterSettings(_Section):
    """Training past one machine (docs/scaling.md): `nnodes` machines, each running torchrun with
    training.nproc_per_node processes, meeting at torchrun's c10d rendezvous. Decided in the run's
    spec, never guessed from a machine's environment. All inert, like nproc_per_node: how the work
    is spread; what it does to the result (the effective batch) is the world size, which the resume
    identity records as resolved. With nnodes > 1 the gpu pool's flow run trains through a
    Kubernetes Indexed Job rendered from these fields (loraflow.kubernetes_job)."""

    nnodes: int = Field(1, ge=1, json_schema_extra=role("inert"),
                        description="Machines that train together (torchrun --nnodes); 1: the worker alone.")
    rdzv_endpoint: str | None = Field(
        None, pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?:[0-9]{1,5}$", json_schema_extra=role("inert"),
        description="HOST:PORT of the c10d rendezvous, served by node 0. None: on Kubernetes, node 0's hostname "
                    "through the Job's headless Service (port 29400); required when nodes are started by hand.")
    rdzv_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", json_schema_extra=role("inert"),
        description="Rendezvous id shared by the nodes of one run. None: the run key.")
    image: str | None = Field(None, min_length=1, json_schema_extra=role("inert"),
                              description="Kubernetes: the nodes' image (loraflow with a CUDA torch).")
    namespace: str = Field("default", pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
                           json_schema_extra=role("inert"), description="Kubernetes: namespace of the Job.")
    gpus_per_node: int = Field(1, ge=0, json_schema_extra=role("inert"),
                               description="Kubernetes: nvidia.com/gpu per node; nproc_per_node=auto starts one "
                                           "process per GPU (one on a node without).")
    cpu: str = Field("8", pattern=r"^[0-9]+(\.[0-9]+|m)?$", json_schema_extra=role("inert"),
                     description="Kubernetes: CPU request per node.")
    memory: str = Field("64Gi", pattern=r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?)?$", json_schema_extra=role("inert"),
                        description="Kubernetes: memory request and limit per node.")
    shm_size: str = Field("8Gi", pattern=r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?)?$", json_schema_extra=role("inert"),
                          description="Kubernetes: memory-backed /dev/shm per node (NCCL, DataLoader workers).")
    storage_secret: str = Field(
        "loraflow-storage", pattern=r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$", json_schema_extra=role("inert"),
        description="Kubernetes: Secret whose keys become the nodes' environment (AWS_ACCESS_KEY_ID, ...).")
    service_account: str | None = Field(None, json_schema_extra=role("inert"),
                                        description="Kubernetes: the nodes' service account (None: the namespace's default).")
    backoff_limit: int = Field(
        0, ge=0, json_schema_extra=role("inert"),
        description="Kubernetes: node failures the Job absorbs (each restart resumes from the newest stored "
                    "checkpoint); past it the Job and the flow run fail. 0: Prefect's retry decides.")
    pending_timeout_s: int = Field(
        1800, ge=60, json_schema_extra=role("inert"),
        description="Kubernetes: how long the nodes may wait to be scheduled (free GPUs) before the run fails.")


class Settings(BaseModel):
    """A run's spec (see the module docstring): validating it never reads the environment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    prefect: PrefectSettings = Field(default_factory=PrefectSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)

    def public_dict(self) -> dict[str, Any]:
        """JSON-able dump (for logs, manifests, `config show`); settings hold no secrets."""
        return self.model_dump(mode="json")


def result_fields(settings: Settings, *, leave_out: tuple[ResultRole, ...] = ("inert",)) -> dict[str, Any]:
    """{"section.field": value} of every setting that shapes the adapter (RESULT_SECTIONS), less the
    roles in `leave_out`. The change check leaves out `inert`; the resume identity also `schedule`
    and `resolved` (it records what they resolved to instead)."""
    out: dict[str, Any] = {}
    for section in RESULT_SECTIONS:
        model = getattr(settings, section)
        dumped = model.model_dump(mode="json")
        for name, field in type(model).model_fields.items():
            if result_role(field) not in leave_out:
                out[f"{section}.{name}"] = dumped[name]
    return out


_yaml_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("loraflow_yaml_file", default=None)


class _FromSources(Settings, BaseSettings):
    """The one reader of LORAFLOW_* variables (and the YAML file): `load_settings` resolves through
    it and hands back a plain `Settings`, so nothing downstream can re-read the environment."""

    model_config = SettingsConfigDict(
        env_prefix="LORAFLOW_", env_nested_delimiter="__", extra="forbid", validate_assignment=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_path = _yaml_file.get()
        if yaml_path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_path))
        return tuple(sources)


class StorageFromEnvironment(StorageSettings, BaseSettings):
    """The storage location a worker's environment names (LORAFLOW_STORAGE__*), read as one unit."""

    model_config = SettingsConfigDict(env_prefix="LORAFLOW_STORAGE__", extra="forbid")


def format_validation_error(err: ValidationError, source_of: Callable[[tuple], str | None] | None = None) -> str:
    """One line per bad field; `source_of(loc)` names where its value came from, when known."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown setting"
        source = source_of(tuple(e["loc"])) if source_of else None
        lines.append(f"{path}: {msg}" + (f" (from {source})" if source else ""))
    return "invalid settings:\n  " + "\n  ".join(lines)


def _holds(tree: Any, loc: tuple) -> bool:
    """Whether a nested mapping supplies the value at `loc` (or a list/scalar above it)."""
    node = tree
    for part in loc:
        if not isinstance(node, dict):
            return True
        if part not in node:
            return False
        node = node[part]
    return True


def _env_source(loc: tuple) -> str | None:
    """The LORAFLOW_* variable that sets `loc`: the field's own (LORAFLOW_LORA__R) or a section's
    JSON (LORAFLOW_LORA='{"r": 0}'). pydantic-settings matches names case-insensitively."""
    env = {k.upper(): (k, v) for k, v in os.environ.items() if k.upper().startswith("LORAFLOW_")}
    for depth in range(len(loc), 0, -1):
        name = "LORAFLOW_" + "__".join(str(p) for p in loc[:depth]).upper()
        if name not in env:
            continue
        if depth == len(loc):
            return f"environment variable {env[name][0]}"
        try:
            value = json.loads(env[name][1])
        except ValueError:
            continue
        if _holds(value, loc[depth:]):
            return f"environment variable {env[name][0]}"
    return None


def _source_finder(overrides: list[str], sections: dict[str, Any], yaml_path: Path | None,
                   yaml_data: dict[str, Any]) -> Callable[[tuple], str | None]:
    """Where a bad value came from, checked in precedence order (the highest source that sets it
    is the one validated): --set, keyword arguments, the environment, the YAML file."""
    def source_of(loc: tuple) -> str | None:
        if not loc:
            return None
        for item in reversed(overrides):  # the last --set of a key wins
            if _holds(_nest([item]), loc):
                return f"--set {item}"
        if _holds(sections, loc):
            return f"keyword argument {loc[0]}="
        env = _env_source(loc)
        if env:
            return env
        if yaml_path is not None and _holds(yaml_data, loc):
            return str(yaml_path)
        return None

    return source_of


_YAML11_WORDS = {"yes", "no", "on", "off", "y", "n"}


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=V` -> (['a','b'], V); V is read as a YAML scalar or flow list (7, 2e-4, [q_proj,v_proj])."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    if raw.strip().lower() in _YAML11_WORDS:
        # YAML 1.1 reads `no`/`on`/`yes` as booleans; `--set training.save_strategy=no` means the word.
        return key.strip().split("."), raw.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _nest(overrides: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in overrides:
        path, value = parse_override(item)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(path)} is not a section")
        node[path[-1]] = value
    return tree


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`base` with `top` merged in, section by section (top wins on every key it names)."""
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merged(base[key], value)
        else:
            base[key] = value
    return base


def load_settings(config: str | os.PathLike | None = None, overrides: list[str] | None = None,
                  **sections: Any) -> Settings:
    """Resolve settings from every source; raise ConfigError naming each bad field."""
    path = None
    data: dict[str, Any] = {}
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    # Keyword sections first, --set on top (the precedence _source_finder names): a deployment's own
    # settings passed as sections must not undo the user's --set.
    init = _merged(copy.deepcopy(sections), _nest(overrides or []))
    token = _yaml_file.set(path)
    try:
        resolved = _FromSources(**init)
        # exclude_unset keeps which fields a source named (`model_fields_set`): a storage location
        # is told apart from the defaults by it (loraflow.run_spec).
        return Settings.model_validate(resolved.model_dump(exclude_unset=True))
    except ValidationError as err:
        source_of = _source_finder(overrides or [], sections, path, data)
        raise ConfigError(format_validation_error(err, source_of)) from None
    finally:
        _yaml_file.reset(token)
