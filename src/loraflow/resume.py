"""Which local checkpoint a run may continue from, and which it must not.

transformers' `get_last_checkpoint` takes the highest `checkpoint-N` in the folder, whatever run
wrote it and whether or not it was finished. loraflow marks a checkpoint complete only after
Trainer has written all of it (`on_save`), with the identity of the run that wrote it: the data
fingerprint and every setting that changes what training computes. Resume takes the newest
complete checkpoint, skips incomplete ones with a log line, and refuses (one line naming what
differs) a checkpoint of another run; `fresh` removes old checkpoints instead, saying so.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.errors import ConfigError
from loraflow.log import get_logger

if TYPE_CHECKING:
    from loraflow.settings import Settings

log = get_logger("train")

RUN_MARKER = "loraflow-run.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What changes the weights a step computes. max_steps / epochs are left out on purpose: resuming
# with a longer schedule is how a run is extended.
_TRAINING_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
                  "lr_scheduler_type", "warmup_steps", "max_grad_norm", "seed", "precision")


def run_identity(settings: Settings, data_fingerprint: str) -> dict[str, Any]:
    return {
        "data.fingerprint": data_fingerprint,
        "model.name_or_path": settings.model.name_or_path,
        "model.revision": settings.model.revision,
        **{f"lora.{k}": v for k, v in settings.lora.model_dump(mode="json").items()},
        **{f"training.{k}": getattr(settings.training, k) for k in _TRAINING_KEYS},
    }


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """`checkpoint-N` folders of `out`, newest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found, reverse=True)


def mark_complete(checkpoint: Path, identity: dict[str, Any]) -> None:
    tmp = checkpoint / f".{RUN_MARKER}.part"
    tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))
    tmp.replace(checkpoint / RUN_MARKER)


def choose_checkpoint(out: Path, identity: dict[str, Any]) -> Path | None:
    """The newest complete checkpoint of this run in `out`, or None. ConfigError when the newest
    complete one belongs to a run with other data or settings."""
    for step, path in checkpoints(out):
        marker = path / RUN_MARKER
        if not marker.is_file():
            log.warning("skipping %s: incomplete (the process died while saving it)", path)
            continue
        try:
            recorded = json.loads(marker.read_text())
        except ValueError:
            log.warning("skipping %s: unreadable %s", path, RUN_MARKER)
            continue
        differs = [f"{k} {recorded.get(k)!r} -> {v!r}" for k, v in identity.items() if recorded.get(k) != v]
        if differs:
            raise ConfigError(f"--resume: {path} belongs to another run ({'; '.join(differs[:4])}); "
                              "resume with the settings it was made with, or pass --fresh to start over")
        return path
    return None


def clear_checkpoints(out: Path) -> None:
    """A fresh run must not leave an older run's checkpoints where a later --resume would find them."""
    old = checkpoints(out)
    if old:
        log.info("starting fresh in %s: removing %d checkpoint(s) of an earlier run (%s)", out, len(old),
                 ", ".join(p.name for _, p in old[:5]))
        for _, path in old:
            shutil.rmtree(path, ignore_errors=True)


def marker_callback(identity: dict[str, Any]):
    """A TrainerCallback marking each checkpoint complete once Trainer has written all of it; it
    must come before callbacks that act on a finished checkpoint (the storage upload)."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if path.is_dir():
                    mark_complete(path, identity)
            return control

    return MarkComplete()
