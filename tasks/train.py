"""Train the adapter, resuming from the run's last checkpoint in object storage.

Checkpoints are uploaded as Trainer saves them (loraflow.checkpoints), so this task never retries
blindly: every attempt, on this worker or another one, first looks for the run's newest complete
checkpoint in storage, downloads and verifies it, and continues from there. A diverged run
(TrainingError: NaN/inf loss) is not retried at all."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.settings import Settings
from tasks._retry import retry_transient


def run_dir(run_key: str) -> Path:
    from loraflow.paths import cache_dir

    return cache_dir("runs", run_key)


def _local_steps(out: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in out.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))


def sync_checkpoint(settings: Settings, run_key: str, out: Path) -> int:
    """Make `out` hold the newest checkpoint the run has in storage. Returns its step (0: none).

    Local checkpoints newer than the stored one never finished uploading and may be partial
    (the worker died while saving): they are removed so Trainer cannot pick them."""
    from loraflow import checkpoints
    from loraflow.log import get_logger

    log = get_logger("train")
    stored = checkpoints.latest_checkpoint(settings.storage, run_key)
    if stored is None:
        return 0
    for step in _local_steps(out):
        if step > stored.step:
            shutil.rmtree(out / f"checkpoint-{step}")
    checkpoints.download_dir(settings.storage, stored.uri, out / f"checkpoint-{stored.step}")
    log.info("resuming run %s from checkpoint step %d (%s, sha256 verified)", run_key, stored.step, stored.uri)
    return stored.step


@task(name="train-adapter", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def train_task(settings: Settings, run_key: str) -> dict[str, Any]:
    from loraflow import checkpoints, training

    out = run_dir(run_key)
    sync_checkpoint(settings, run_key, out)
    local = _local_steps(out)
    callbacks = []
    if settings.training.save_strategy != "no":
        callbacks.append(checkpoints.checkpoint_upload_callback(settings.storage, run_key))
    result = training.train_adapter(settings, output_dir=out, resume=bool(local), callbacks=callbacks)
    info = result.to_dict()

    # Stage the finished adapter (+ loss history and curve) in storage, so evaluation and
    # publishing can happen on another machine than training (the GPU pool).
    staged = out / "staged"
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(result.adapter_dir, staged)
    for extra in (result.history_path, result.loss_curve_path):
        if extra and Path(extra).is_file() and not (staged / Path(extra).name).exists():
            shutil.copy2(extra, staged / Path(extra).name)
    staged_uri = checkpoints.upload_dir(settings.storage, staged, checkpoints.run_prefix(settings.storage, run_key) + "final/",
                                        extra={"train": info}, allowed_suffixes=checkpoints.ADAPTER_SUFFIXES)
    return {**info, "adapter_dir": str(result.adapter_dir), "staged_uri": staged_uri,
            "resumed_from_step": local[-1] if local else 0, "run_key": run_key}


@task(name="fetch-trained-adapter", retries=3, retry_delay_seconds=[2, 4, 8], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def fetch_staged_task(settings: Settings, run_key: str) -> dict[str, Any]:
    """After training ran on another worker: download the staged adapter (safetensors + JSON only,
    sha256-verified) and return the training result recorded with it."""
    from loraflow import checkpoints

    uri = checkpoints.run_prefix(settings.storage, run_key) + "final/"
    dest = run_dir(run_key) / "staged"
    manifest = checkpoints.download_dir(settings.storage, uri, dest, allowed_suffixes=checkpoints.ADAPTER_SUFFIXES)
    info = dict(manifest.get("train") or {})
    for key in ("history_path", "loss_curve_path"):
        if info.get(key):
            local = dest / Path(info[key]).name
            info[key] = str(local) if local.is_file() else None
    return {**info, "adapter_dir": str(dest), "staged_uri": uri, "run_key": run_key}
