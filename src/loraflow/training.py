"""LoRA training with transformers' `Trainer`.

Why `Trainer` and not TRL's `SFTTrainer`: loraflow owns tokenisation (EOS in the loss, padding-free
packing with per-document position ids) and caches it by a content fingerprint
(`loraflow.data.prepare_dataset`). SFTTrainer would tokenise and pack again in its own way, and
its packing does not reset position ids per document unless configured. The plain Trainer gives
everything else we need: checkpoints with optimizer/scheduler/RNG state and resume, DDP under
torchrun/accelerate, and a loss normalised by the number of label tokens over the whole effective
batch (`num_items_in_batch`, gathered across ranks by `average_tokens_across_devices`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.errors import TrainingError
from loraflow.log import get_logger

if TYPE_CHECKING:
    from transformers import TrainerCallback, TrainingArguments

    from loraflow.data import PreparedDataset
    from loraflow.modeling import Precision
    from loraflow.recipe import Recipe
    from loraflow.settings import Settings

log = get_logger("train")

ADAPTER_SUBDIR = "adapter"
HISTORY_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


@dataclass
class TrainResult:
    adapter_dir: Path
    output_dir: Path
    global_step: int
    train_tokens: int  # label tokens (labels != -100) trained on in total, across ranks and resumes
    train_time_s: float  # this session
    tokens_per_s: float  # this session
    final_loss: float
    history_path: Path
    loss_curve_path: Path
    session_tokens: int = 0
    resumed_from: str | None = None
    precision: str = "fp32"
    trainable_params: dict[str, Any] = field(default_factory=dict)
    # Logical ids (hub id or s3:// URI, never a local mirror path) and what the weights hash to.
    base_model: str = ""
    base_model_revision: str | None = None
    base_model_identity: dict[str, Any] = field(default_factory=dict)
    dataset_source: str = ""
    dataset_fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def resolve_output_dir(settings: Settings, output_dir: str | Path | None) -> Path:
    return Path(output_dir if output_dir is not None else settings.training.output_dir).expanduser().resolve()


def data_path_arguments(num_workers: int, device: str) -> dict[str, Any]:
    """How batches reach the device. On CUDA: page-locked host batches copied without blocking, so
    the next copy overlaps the running step, and workers (if any) kept alive across epochs. On a
    CPU there is nothing to copy to: the settings' plain values."""
    if device != "cuda":
        return {"dataloader_num_workers": num_workers}
    return {
        "dataloader_num_workers": num_workers,
        "dataloader_pin_memory": True,
        "accelerator_config": {"non_blocking": True},
        # Rows are tokenised ahead (loraflow.data); collating is a few tensor copies, so workers are
        # opt-in (training.dataloader_num_workers), and when on they survive the epoch boundary.
        "dataloader_persistent_workers": num_workers > 0,
        "dataloader_prefetch_factor": 4 if num_workers > 0 else None,
    }


def build_training_arguments(settings: Settings, output_dir: Path, precision: Precision) -> TrainingArguments:
    from transformers import TrainingArguments

    t = settings.training
    # transformers 5.2x renamed gradient_checkpointing -> activation_checkpointing (old name warns).
    ckpt = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
            else "gradient_checkpointing")
    checkpointing = {
        ckpt: t.gradient_checkpointing,
        # Non-reentrant checkpointing works with frozen embeddings (LoRA) without input-grad hacks.
        f"{ckpt}_kwargs": {"use_reentrant": False} if t.gradient_checkpointing else None,
    }
    return TrainingArguments(
        **checkpointing,
        output_dir=str(output_dir),
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        max_grad_norm=t.max_grad_norm,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=precision.device == "cpu",
        logging_steps=t.logging_steps,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        save_only_model=False,  # keep optimizer, scheduler and RNG state: resume must be exact
        seed=t.seed,
        **data_path_arguments(t.dataloader_num_workers, precision.device),
        # Its per-micro-batch isnan() check is a host sync; a non-finite loss stops the run anyway.
        logging_nan_inf_filter=False,
        remove_unused_columns=False,  # rows carry position_ids, which the collator needs
        report_to=[],
        disable_tqdm=not sys.stderr.isatty(),
        eval_strategy="no",  # evaluation is loraflow.evaluation, on base and adapter alike
        average_tokens_across_devices=True,
        # Every LoRA parameter takes part in each step; searching for unused ones costs a graph walk.
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="no",  # counted by label tokens in _LoraflowTrainer instead
    )


def _trainer_class():
    import torch
    from transformers import Trainer

    class _LoraflowTrainer(Trainer):
        """Adds two things to every micro-batch: a finite-loss check (a NaN/inf stops the run with
        TrainingError instead of writing a garbage adapter) and a count of trained label tokens.

        Both stay on the device between optimizer steps: reading them per micro-batch would make the
        CPU wait for the GPU every time and starve its queue. They are read (and reduced across ranks
        in one collective) only when the Trainer is about to log, save, evaluate or stop, i.e. at the
        same step on every rank and always before a checkpoint or the adapter is written."""

        _pending = None  # float64 [label tokens, non-finite losses, first bad step, its loss]

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            from loraflow.data import PackedCollator

            attn = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
            if attn == "flash_attention_2" and isinstance(self.data_collator, PackedCollator):
                # FlashAttention's varlen kernel separates documents only in one flattened row with
                # its boundaries given (see PackedCollator); the block mask of SDPA/eager needs none.
                self.data_collator = dataclasses.replace(self.data_collator, flatten=True)

        fused_loss = False  # training.fused_loss, where fused_loss_applies() said it may

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # The fused head + cross-entropy (loraflow.lm_loss) in place of the model's own loss,
            # which would materialise every position's logits; only when nothing needs the logits.
            if not self.fused_loss or return_outputs or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            from loraflow import lm_loss

            body, head = _body_and_head(model)
            labels = inputs["labels"]
            # The body is called past the model's forward, which accelerate wrapped in the run's
            # autocast (bf16/fp16 flags): enter it here, so that the body computes as the unfused
            # path, evaluation and the service do (modeling.autocast).
            with self.accelerator.autocast():
                hidden = body(**{k: v for k, v in inputs.items() if k != "labels"},
                              use_cache=False).last_hidden_state
            total = lm_loss.summed_loss(hidden, head.weight, labels)
            # As the model's loss with num_items_in_batch: normalised over the whole accumulated batch.
            n = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != -100).sum()
            return total / n

        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs.get("labels")
            loss = super().training_step(model, inputs, num_items_in_batch)
            detached = loss.detach()
            if self._pending is None:
                self._pending = torch.tensor([0.0, 0.0, math.inf, 0.0], dtype=torch.float64,
                                             device=detached.device)
            pending = self._pending
            if labels is not None:
                pending[0] += (labels != -100).sum().to(pending.device, torch.float64)
            bad = ~torch.isfinite(detached)
            first = bad & torch.isinf(pending[2])
            pending[1] += bad.to(torch.float64)
            step = torch.tensor(float(self.state.global_step + 1), dtype=torch.float64, device=pending.device)
            pending[2] = torch.where(first, step, pending[2])
            pending[3] = torch.where(first, detached.to(torch.float64), pending[3])
            return loss

        def _flush_step_stats(self) -> None:
            pending, self._pending = self._pending, None
            if pending is None:
                return
            counts = pending[:2]
            if self.args.world_size > 1:
                counts = self.accelerator.reduce(counts.clone(), reduction="sum")
            n_tokens, bad = counts.tolist()
            self.state.num_input_tokens_seen += int(n_tokens)
            if bad:
                step, value = pending[2:].tolist()
                where = (f"({value}) at step {int(step)}" if math.isfinite(step)
                         else f"on another rank by step {self.state.global_step}")
                raise TrainingError(
                    f"non-finite training loss {where} "
                    f"(training.learning_rate={self.args.learning_rate}); no adapter was written")

        def _maybe_log_save_evaluate(self, *args, **kwargs):
            # Runs after every optimizer step with the Trainer's decisions already made; the flags and
            # global_step are the same on every rank, so every rank joins the same reductions.
            c = self.control
            if c.should_log or c.should_save or c.should_evaluate or c.should_training_stop \
                    or c.should_epoch_stop or self.state.global_step >= self.state.max_steps:
                self._flush_step_stats()
            return super()._maybe_log_save_evaluate(*args, **kwargs)

        def train(self, *args, **kwargs):
            try:
                return super().train(*args, **kwargs)
            finally:
                self._pending = None  # an interrupted run leaves nothing half-counted for the next

    return _LoraflowTrainer


def _body_and_head(model):
    """The transformer body (its output: the states the head reads) and the output head of a peft
    causal LM."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.base_model, lm.get_output_embeddings()


def fused_loss_applies(model, precision: Precision) -> str | None:
    """Why loraflow.lm_loss cannot stand in for `model`'s own loss, or None when it can: the head
    must be frozen and read the body's last hidden state unchanged. Checked on a few tokens against
    the model's own logits, so a head with extra arithmetic (logit scaling or soft-capping in some
    architectures) falls back to the model's loss instead of training on a different one."""
    import torch

    from loraflow.modeling import autocast

    try:
        body, head = _body_and_head(model)
        weight = head.weight
    except (AttributeError, NotImplementedError) as exc:
        return f"no body/output head to fuse ({type(exc).__name__})"
    if weight.requires_grad:
        return "the output head is trained"
    ids = torch.arange(8, device=weight.device)[None] % weight.shape[0]
    with torch.no_grad(), autocast(precision):
        was_training = model.training
        model.eval()
        try:
            logits = model(input_ids=ids, use_cache=False).logits.float()
            ours = (body(input_ids=ids, use_cache=False).last_hidden_state.to(weight.dtype) @ weight.T).float()
        finally:
            model.train(was_training)
    if logits.shape != ours.shape or not torch.allclose(logits, ours, rtol=2e-2, atol=2e-2):
        return "the model's logits are not its output head applied to its last hidden state"
    return None


def progress_callback_class():
    from transformers import TrainerCallback

    class ProgressLogger(TrainerCallback):
        """One log line per `logging_steps` (step/max, loss, lr, tokens/s, elapsed, ETA), a
        `metrics.jsonl` history and a loss-curve PNG; files only on the main process."""

        def __init__(self, output_dir: Path, resumed_step: int = 0):
            self.output_dir = output_dir
            self.history_path = output_dir / HISTORY_FILE
            self.curve_path = output_dir / LOSS_CURVE_FILE
            self.resumed_step = resumed_step
            self.last_loss: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = self.t_last = time.perf_counter()
            self.step0 = state.global_step
            self.tokens0 = self.tokens_last = state.num_input_tokens_seen
            if state.is_world_process_zero:
                self._trim_history(state.global_step)
            return control

        def _trim_history(self, step: int) -> None:
            # On resume, lines logged after the restored checkpoint will be logged again.
            if not self.history_path.exists():
                return
            keep = []
            for line in self.history_path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue
            self.history_path.write_text("".join(k + "\n" for k in keep))

        def on_step_end(self, args, state, control, **kwargs):
            from loraflow.stopping import at

            at(f"training, after step {state.global_step}/{state.max_steps}")
            if state.global_step >= state.max_steps:
                control.should_log = True  # the curve always ends at the last step
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs or not state.is_world_process_zero:
                return control
            now = time.perf_counter()
            tokens = state.num_input_tokens_seen
            tps = (tokens - self.tokens_last) / max(now - self.t_last, 1e-9)
            elapsed = now - self.t0
            done = state.global_step - self.step0
            eta = (state.max_steps - state.global_step) * elapsed / done if done else float("nan")
            self.t_last, self.tokens_last = now, tokens
            self.last_loss = float(logs["loss"])
            record = {
                "step": state.global_step, "max_steps": state.max_steps, "epoch": round(state.epoch or 0, 4),
                "loss": self.last_loss, "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"), "tokens": tokens, "tokens_per_s": round(tps, 2),
                "elapsed_s": round(elapsed, 2), "eta_s": None if math.isnan(eta) else round(eta, 1),
            }
            with self.history_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            log.info("step %d/%d  loss %.4f  lr %.3g  %.0f tok/s  elapsed %s  eta %s",
                     state.global_step, state.max_steps, self.last_loss, logs.get("learning_rate") or 0.0,
                     tps, _hms(elapsed), _hms(eta))
            return control

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                write_loss_curve(self.history_path, self.curve_path)
            return control

    return ProgressLogger


def _hms(seconds: float) -> str:
    if seconds is None or math.isnan(seconds) or math.isinf(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_loss_curve(history_path: Path, png_path: Path) -> Path:
    # Figure + Agg canvas directly: no global matplotlib backend switch inside a library.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    history = read_history(history_path)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if history:
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (per label token)")
    ax.set_title("loraflow training loss")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    return png_path


def main_process_first():
    """Context manager: the local main process runs the block first (e.g. preparing the dataset
    cache), the others wait and then read what it wrote. A no-op outside torchrun/accelerate."""
    from accelerate import PartialState

    return PartialState().local_main_process_first()


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _steps_already_done(checkpoint: Path | None, settings: Settings) -> int | None:
    """The checkpoint's step when it already reached `max_steps` (nothing left to train)."""
    if checkpoint is None or settings.training.max_steps <= 0:
        return None
    step = int(checkpoint.name.rsplit("-", 1)[1])
    return step if step >= settings.training.max_steps else None


def _finish_from_checkpoint(settings, checkpoint: Path, step: int, out: Path, adapter_dir: Path, recipe,
                            main: bool) -> TrainResult:
    """Resuming a finished run trains nothing more: the checkpoint's adapter is the result (Trainer
    would otherwise run one extra step past max_steps)."""
    prepared, precision = recipe.prepared, recipe.precision
    log.info("%s already reached training.max_steps=%d: nothing left to train; its adapter is the result",
             checkpoint, settings.training.max_steps)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state.get("log_history", []) if "loss" in e]
    if main:
        tmp_dir = out / f".{ADAPTER_SUBDIR}.partial"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(checkpoint / name, tmp_dir / name)
        tmp_dir.replace(adapter_dir)
    return TrainResult(
        adapter_dir=adapter_dir, output_dir=out, global_step=step,
        train_tokens=int(state.get("num_input_tokens_seen") or 0), train_time_s=0.0, tokens_per_s=0.0,
        final_loss=float(losses[-1]) if losses else float("nan"), history_path=out / HISTORY_FILE,
        loss_curve_path=out / LOSS_CURVE_FILE, resumed_from=str(checkpoint), precision=precision.name,
        base_model=settings.model.name_or_path, base_model_revision=settings.model.revision,
        base_model_identity=recipe.base_identity if main else {},
        dataset_source=settings.data.source, dataset_fingerprint=prepared.fingerprint,
    )


def train_adapter(settings: Settings, *, output_dir: str | Path | None = None, resume: bool = False,
                  prepared: PreparedDataset | None = None, callbacks: list[TrainerCallback] | None = None,
                  recipe: Recipe | None = None) -> TrainResult:
    """Train a LoRA adapter; returns where it is. Checkpoints go to `output_dir/checkpoint-N`,
    the final adapter to `output_dir/adapter` (the PEFT files). `recipe`: the run's loaded
    tokenizer, data and base model (loraflow.recipe); one is set up when none is given."""
    from loraflow.paths import ensure_dir

    out = resolve_output_dir(settings, output_dir)
    created = not out.exists()
    ensure_dir(out, "--output" if output_dir is not None else "training.output_dir")
    try:
        if recipe is None:
            from loraflow.recipe import Recipe

            recipe = Recipe(settings, prepared=prepared)
        return _train(settings, out, resume=resume, recipe=recipe, callbacks=callbacks)
    except BaseException:
        # A failed run leaves nothing behind in a folder it made, unless it saved a checkpoint that
        # --resume can continue from.
        if created and out.is_dir() and not any(out.glob("checkpoint-*")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(settings: Settings, out: Path, *, resume: bool, recipe: Recipe,
           callbacks: list[TrainerCallback] | None) -> TrainResult:
    from transformers import PrinterCallback, set_seed

    from loraflow import modeling
    from loraflow import resume as resume_rules
    from loraflow.data import PackedCollator
    from loraflow.memory import check_training_memory

    precision, prepared, tokenizer = recipe.precision, recipe.prepared, recipe.tokenizer
    args = build_training_arguments(settings, out, precision)  # also sets up torch.distributed under torchrun
    main = args.process_index == 0
    check_training_memory(settings, precision, recipe.config)

    if settings.training.learning_rate == 0:
        log.warning("training.learning_rate=0: the weights will not move; the adapter will equal the base model")
    identity = resume_rules.run_identity(settings, prepared.fingerprint, base_weights=recipe.base_identity["weights"],
                                         precision=f"{precision.name}/{precision.model_dtype}",
                                         world_size=args.world_size)
    resume_from = None
    if resume:
        resume_from = resume_rules.choose_checkpoint(out, identity)
        if resume_from:
            log.info("resuming from %s", resume_from)
        else:
            log.info("resume requested but %s holds no complete checkpoint of this run: starting fresh", out)
    elif main:
        resume_rules.clear_checkpoints(out)

    adapter_dir = out / ADAPTER_SUBDIR
    if main and adapter_dir.exists():
        # A stale adapter next to a failed run would look like this run's result.
        log.info("removing the previous adapter in %s", adapter_dir)
        shutil.rmtree(adapter_dir)

    model = recipe.base_model()
    set_seed(settings.training.seed)  # LoRA's A matrices are initialised from this
    model = modeling.apply_lora(model, settings.lora, base_model=settings.model.name_or_path,
                                revision=settings.model.revision)
    from loraflow.activations import use_fused_gelu

    if fused := use_fused_gelu(model):
        log.info("activation: gelu_new as a one-kernel tanh GELU in %d layer(s): the same function (%s)", fused,
                 "loraflow.cpu_kernels on a CPU where built, else torch's")
    if settings.training.cpu_dropout and precision.device == "cpu":
        from loraflow.dropout import use_cpu_dropout

        line = use_cpu_dropout(model)
        if line:
            log.info("%s", line)
    recipe.adopt(model)

    progress = progress_callback_class()(out)
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=prepared.train,
        data_collator=PackedCollator(modeling.pad_token_id(tokenizer)),
        # The completeness marker first: callbacks after it (the storage upload) see whole checkpoints.
        callbacks=[progress, resume_rules.marker_callback(identity), *(callbacks or [])],
    )
    trainer.remove_callback(PrinterCallback)  # prints raw dicts; ProgressLogger says it better
    if settings.training.fused_loss:
        # One process only: DDP's forward hooks must see the wrapped model's forward, which the
        # fused path (body, then head) goes around.
        why_not = (f"{args.world_size} processes (DDP)" if args.world_size != 1
                   else fused_loss_applies(model, precision))
        trainer.fused_loss = why_not is None
        if why_not:
            log.info("training.fused_loss: using the model's own loss: %s", why_not)
    train_tokens = (prepared.stats.get("train") or {}).get("tokens")
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    log.info("training %s on %d rows (%s tokens), %s on %s: each optimizer step learns from %d rows of up to %d "
             "tokens (%d per batch x %d batches accumulated x %d process%s); a progress line every %s",
             settings.model.name_or_path, len(prepared.train),
             f"{train_tokens:,}" if isinstance(train_tokens, int) else "?", precision.name, precision.device,
             per_step, settings.data.max_length, args.per_device_train_batch_size, args.gradient_accumulation_steps,
             args.world_size, "" if args.world_size == 1 else "es",
             "step" if args.logging_steps == 1 else f"{args.logging_steps:g} steps")

    done = _steps_already_done(resume_from, settings)
    if done is not None:
        return _finish_from_checkpoint(settings, resume_from, done, out, adapter_dir, recipe, main)

    t0 = time.perf_counter()
    tokens_before = trainer.state.num_input_tokens_seen
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_time = time.perf_counter() - t0
    state = trainer.state
    # Progress callback saw the tokens restored from the checkpoint at on_train_begin.
    session_tokens = state.num_input_tokens_seen - getattr(progress, "tokens0", tokens_before)
    final_loss = progress.last_loss if progress.last_loss is not None else float(output.training_loss)

    result = TrainResult(
        adapter_dir=adapter_dir, output_dir=out, global_step=state.global_step,
        train_tokens=int(state.num_input_tokens_seen), train_time_s=round(train_time, 3),
        tokens_per_s=round(session_tokens / train_time, 2) if train_time > 0 else 0.0,
        final_loss=final_loss, history_path=out / HISTORY_FILE, loss_curve_path=out / LOSS_CURVE_FILE,
        session_tokens=int(session_tokens), resumed_from=str(resume_from) if resume_from else None,
        precision=precision.name,
        trainable_params=modeling.trainable_parameters(model),
        base_model=settings.model.name_or_path, base_model_revision=settings.model.revision,
        base_model_identity=recipe.base_identity if main else {},
        dataset_source=settings.data.source, dataset_fingerprint=prepared.fingerprint,
    )

    # Saved to a temporary name and renamed, so `adapter/` only ever holds a complete adapter. Only
    # the PEFT files: metrics, settings snapshot and model card are written once, at the end, by
    # loraflow.release from the results.
    tmp_dir = out / f".{ADAPTER_SUBDIR}.partial"
    if main and tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    trainer.save_model(str(tmp_dir))  # every rank calls it; only the main process writes
    if main:
        # Trainer.save_model also pickles TrainingArguments and writes peft's placeholder card.
        for extra in ("training_args.bin", "README.md"):
            (tmp_dir / extra).unlink(missing_ok=True)
        tmp_dir.replace(adapter_dir)
        log.info("adapter written to %s (step %d, %s label tokens in %.1f s, %.0f tokens/s)", adapter_dir,
                 result.global_step, f"{result.session_tokens:,}", train_time, result.tokens_per_s)
    trainer.accelerator.wait_for_everyone()
    return result
