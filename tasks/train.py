"""Train the adapter, resuming from the run's last checkpoint in object storage, and stage it.

Checkpoints are uploaded as Trainer saves them (loraflow.checkpoints), so this task never retries
blindly: every attempt, on this worker or another one, first looks for the run's newest complete
checkpoint in storage, downloads and verifies it, and continues from there. A diverged run
(TrainingError: NaN/inf loss) is not retried at all."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.recipe import Recipe
from loraflow.settings import Settings
from loraflow.tasks._retry import retry_transient


STAGED = "final/"
STAGED_LOGS = "final-logs/"
# What the training worker measured, carried in the staged adapter's manifest to the CPU-side flow.
STAGED_RESULTS = ("data", "evaluation", "champion")


def remove_run_scratch(run_key: str) -> None:
    from loraflow.paths import home

    shutil.rmtree(home() / "runs" / run_key, ignore_errors=True)


def run_dir(run_key: str) -> Path:
    from loraflow.paths import cache_dir

    return cache_dir("runs", run_key)


def _local_steps(out: Path) -> list[int]:
    from loraflow.resume import checkpoints  # the one rule for what a checkpoint folder is

    return sorted(step for step, _ in checkpoints(out))


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
    checkpoints.download(settings.storage, stored.uri, out / f"checkpoint-{stored.step}")
    log.info("resuming run %s from checkpoint step %d (%s, sha256 verified)", run_key, stored.step, stored.uri)
    return stored.step


# One retry: the second attempt resumes from the newest checkpoint in storage (see above).
@task(name="train-adapter", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def train_task(recipe: Recipe, run_key: str) -> dict[str, Any]:
    """Train in this process on the recipe's loaded base, or under torchrun with one process per
    device when training.nproc_per_node resolves to more than one (loraflow.launch)."""
    from loraflow import checkpoints
    from loraflow.launch import launch_training, resolve_nproc

    settings = recipe.settings
    out = run_dir(run_key)
    sync_checkpoint(settings, run_key, out)
    local = _local_steps(out)
    nproc = resolve_nproc(settings.training.nproc_per_node)
    if nproc > 1:
        info = launch_training(settings, out, run_key, nproc, resume=bool(local))
    else:
        callbacks = []
        if settings.training.save_strategy != "no":
            callbacks.append(checkpoints.checkpoint_upload_callback(settings.storage, run_key,
                                                                   adapter_name=settings.registry.adapter_name))
        info = recipe.train(out, resume=bool(local), callbacks=callbacks).to_dict()
    return {**info, "resumed_from_step": local[-1] if local else 0, "run_key": run_key, "nproc": nproc}


@task(name="stage-adapter", cache_policy=NO_CACHE)
def stage_task(settings: Settings, run_key: str, train: dict[str, Any], results: dict[str, Any]) -> str:
    """Stage the adapter's PEFT files (and, apart, the loss history and curve) in storage with the
    training and evaluation results in its manifest, so the CPU-side flow (gate, publish) can run on
    another machine than training (the GPU pool)."""
    from loraflow import checkpoints

    from loraflow.registry.weights import check_adapter_dir

    check_adapter_dir(Path(train["adapter_dir"]))  # a NaN/inf tensor never leaves the training machine
    out = run_dir(run_key)
    prefix = checkpoints.run_prefix(settings.storage, run_key)
    checkpoints.upload_trained(settings.storage, train, prefix + STAGED, prefix + STAGED_LOGS, out / "staged-logs",
                               adapter_name=settings.registry.adapter_name, **results)
    return prefix + STAGED


@task(name="fetch-trained-adapter", cache_policy=NO_CACHE)
def fetch_staged_task(settings: Settings, run_key: str) -> dict[str, Any]:
    """After training ran on another worker: download the staged adapter (PEFT files, sha256-verified)
    and its loss history, and return the training result recorded with it."""
    from loraflow import checkpoints

    prefix = checkpoints.run_prefix(settings.storage, run_key)
    dest = run_dir(run_key)
    manifest, info = checkpoints.download_trained(settings.storage, prefix + STAGED, prefix + STAGED_LOGS,
                                                  dest / "staged", dest / "staged-logs")
    results = {k: manifest.get(k) for k in STAGED_RESULTS}
    return {**info, **results, "adapter_dir": str(dest / "staged"), "staged_uri": prefix + STAGED, "run_key": run_key}
