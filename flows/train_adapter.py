"""The `train-adapter` flow: everything that needs the accelerator, on the worker that has it (`gpu`).

Prepare the data (once per run, where it is used), train (one process per device under torchrun when
the worker has several), evaluate the candidate against the base model and re-measure the current
champion on the same eval documents, then stage the adapter with those numbers in object storage.
The CPU-side `retrain` flow keeps the cheap parts: the change check, the gate, publishing.

`retrain` calls it in-process by default, or through `run_deployment` when
`settings.prefect.train_deployment` names its deployment. Checkpoints go to object storage under the
run key, so when a worker dies the next attempt (a Prefect retry, or a new run with the same key)
resumes from the last checkpoint instead of step 0."""

from __future__ import annotations

import time
from typing import Any

from loraflow.flows._common import (
    current_run_key,
    library_logs_in_prefect,
    seed_settings,
    with_worker_environment,
)
from prefect import flow, get_run_logger

from loraflow.errors import LoraflowError
from loraflow.settings import Settings
from loraflow.tasks.evaluate import evaluate_task
from loraflow.tasks.prepare import prepare_dataset_task
from loraflow.tasks.promote import evaluate_champion_task, pull_version_task, read_champion_task
from loraflow.tasks.train import remove_run_scratch, stage_task, train_task


def measure_champion(settings: Settings) -> dict[str, Any]:
    """The current champion scored on this run's eval documents: {"version", "evaluation" (None when
    there is no champion or it could not be measured), "ppl", "remeasured"}."""
    champion: dict[str, Any] = {"version": read_champion_task(settings), "evaluation": None, "ppl": None,
                                "remeasured": False}
    if champion["version"] is not None:
        logger = get_run_logger()
        logger.info("scoring champion %s on this run's eval documents", champion["version"])
        try:
            path = pull_version_task(settings, champion["version"])
            champion["evaluation"] = evaluate_champion_task(settings, path)
            champion["ppl"] = champion["evaluation"]["adapter_ppl"]
            champion["remeasured"] = True
        except LoraflowError as exc:
            logger.warning("could not evaluate champion %s: %s", champion["version"], exc)
    return champion


@flow(name="train-adapter")
def train_adapter_flow(settings: Settings = seed_settings(), run_key: str | None = None) -> dict[str, Any]:
    """Prepare data, train a LoRA adapter, evaluate it and the champion, and stage it in object
    storage under `checkpoints/<run_key>/final/`.

    `run_key` names the run's checkpoint folder; reuse it to resume a crashed run."""
    with library_logs_in_prefect():
        settings = with_worker_environment(settings)
        run_key = run_key or current_run_key()
        timings: dict[str, float] = {}
        t = time.perf_counter()
        data = prepare_dataset_task(settings)
        timings["preparation"] = time.perf_counter() - t
        get_run_logger().info("dataset %s: %s", data["fingerprint"], "cache hit" if data["from_cache"] else "prepared")
        t = time.perf_counter()
        train = train_task(settings, run_key)
        timings["training"] = time.perf_counter() - t
        t = time.perf_counter()
        evaluation = evaluate_task(settings, train["adapter_dir"])
        timings["evaluation"] = time.perf_counter() - t
        t = time.perf_counter()
        champion = measure_champion(settings)
        timings["champion evaluation"] = time.perf_counter() - t
        data = {k: data[k] for k in ("fingerprint", "from_cache", "stats")}
        train = {**train, "worker_timings": timings}
        staged = stage_task(settings, run_key, train, {"data": data, "evaluation": evaluation, "champion": champion})
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        if context is not None and context.flow_run is not None and context.flow_run.deployment_id is not None:
            # On a worker of its own (the gpu pool): everything the caller needs is staged in
            # object storage, so this machine's scratch for the run goes. In-process, the caller
            # still reads it and removes it after publishing.
            remove_run_scratch(run_key)
        return {**train, "data": data, "evaluation": evaluation, "champion": champion, "staged_uri": staged}
