"""Train on several nodes through a Kubernetes Indexed Job (loraflow.kubernetes_job): the gpu
pool's flow run creates the Job, waits for it, and fetches the adapter the nodes trained.

One retry, like the single-worker training task: a node lost (killed, evicted, out of memory)
fails this attempt with NodeLost and the next attempt, a new Job, resumes from the newest stored
checkpoint; the nodes' own error (bad settings, a diverged run) fails the flow run in one line."""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.settings import Settings
from loraflow.tasks._retry import retry_transient


@task(name="train-on-cluster", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def train_on_cluster_task(settings: Settings, run_key: str) -> dict[str, Any]:
    from loraflow.kubernetes_job import run_job
    from loraflow.launch import fetch_trained
    from loraflow.tasks.train import run_dir

    job = asyncio.run(run_job(settings, run_key))
    info = fetch_trained(settings, run_key, run_dir(run_key))
    return {**info, "run_key": run_key, "nnodes": settings.cluster.nnodes, "kubernetes_job": job}
