"""The `train-adapter` flow: everything that needs the accelerator, on the worker that has it (`gpu`),
as one recipe (loraflow.recipe): set up once (base model files, tokenizer, config, prepared data),
train (one process per device under torchrun when the worker has several; with cluster.nnodes > 1,
on that many nodes of a Kubernetes Indexed Job this run creates and waits for), score the candidate,
the base model and the current champion on the same loaded base and eval documents, then stage the
adapter with those numbers in object storage. The CPU-side `retrain` flow keeps the cheap parts:
the change check, the gate, publishing.

`retrain` calls it in-process by default, or through `run_deployment` when
`settings.prefect.train_deployment` names its deployment; either way its `settings` parameter is
the run's whole spec, storage location included. Checkpoints go to object storage under the run
key, so when a worker dies the next attempt (a Prefect retry, or a new run with the same key)
resumes from the last checkpoint instead of step 0."""

from __future__ import annotations

import time
from typing import Any

from loraflow.flows._common import current_run_key, library_logs_in_prefect, seed_settings
from prefect import flow, get_run_logger

from loraflow.errors import LoraflowError
from loraflow.run_spec import for_flow_run
from loraflow.settings import Settings
from loraflow.tasks.evaluate import score_task
from loraflow.tasks.prepare import prepare_task
from loraflow.tasks.promote import pull_version_task, read_champion_task
from loraflow.tasks.cluster import train_on_cluster_task
from loraflow.tasks.train import remove_run_scratch, stage_task, train_task


def fetch_champion(settings: Settings) -> tuple[str | None, str | None]:
    """(the current champion's version, its verified local copy); the copy is None when there is
    no champion or it could not be fetched (the gate then has no champion to beat)."""
    version = read_champion_task(settings)
    if version is None:
        return None, None
    try:
        return version, pull_version_task(settings, version)
    except LoraflowError as exc:
        get_run_logger().warning("could not fetch champion %s: %s", version, exc)
        return version, None


@flow(name="train-adapter")
def train_adapter_flow(settings: Settings = seed_settings(), run_key: str | None = None) -> dict[str, Any]:
    """Prepare data, train a LoRA adapter, score it, the base model and the champion, and stage it in
    object storage under `checkpoints/<run_key>/final/`.

    `run_key` names the run's checkpoint folder; reuse it to resume a crashed run."""
    with library_logs_in_prefect():
        settings = for_flow_run(settings)
        run_key = run_key or current_run_key()
        if settings.cluster.nnodes > 1:
            from loraflow.kubernetes_job import check, render

            check(render(settings, run_key))  # a Job that cannot be created fails before any data work
        timings: dict[str, float] = {}
        t = time.perf_counter()
        recipe = prepare_task(settings)
        timings["preparation"] = time.perf_counter() - t
        t = time.perf_counter()
        if settings.cluster.nnodes > 1:
            train = train_on_cluster_task(settings, run_key)  # the nodes' own pods, rank 0 uploading
        else:
            train = train_task(recipe, run_key)
        timings["training"] = time.perf_counter() - t
        t = time.perf_counter()
        champion_version, champion_dir = fetch_champion(settings)
        if champion_version is not None:
            get_run_logger().info("scoring champion %s on this run's eval documents", champion_version)
        scores = score_task(recipe, train["adapter_dir"], champion_dir)
        evaluation, champion_eval = scores["evaluation"], scores["champion"]
        champion_s = float(champion_eval["eval_time_s"]) if champion_eval else 0.0
        timings["evaluation"] = time.perf_counter() - t - champion_s
        timings["champion evaluation"] = champion_s
        champion = {"version": champion_version, "evaluation": champion_eval,
                    "ppl": champion_eval["adapter_ppl"] if champion_eval else None,
                    "remeasured": champion_eval is not None}
        data = {"fingerprint": recipe.prepared.fingerprint, "from_cache": recipe.prepared.from_cache,
                "stats": recipe.prepared.stats}
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
