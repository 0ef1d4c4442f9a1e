"""`loraflow run` with a Prefect server configured (what `make up` sets up): the run is submitted to
the `retrain` deployment and lands on the work pools' real workers (training on the gpu pool), and
the command prints the run's URL, follows its logs and exits with its final state.

The workers' environment says other things than the runs' specs (max_steps, LoRA rank, bucket):
each run trains and publishes exactly what its spec says, into one storage location."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import yaml
from fixtures_prefect import ROOT, tiny_flow_settings, wait_final_state
from fixtures_s3 import create_bucket
from test_deployments import _start_worker, _stop, applied_deployments  # noqa: F401 - a fixture



def _submit(deployment: str, parameters: dict):
    from prefect.client.orchestration import get_client

    async def create():
        async with get_client() as client:
            found = await client.read_deployment_by_name(deployment)
            return await client.create_flow_run_from_deployment(found.id, parameters=parameters)

    return asyncio.run(create())


def _run_details(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterParentFlowRunId, FlowRunFilterId,
                                                LogFilter, LogFilterFlowRunId)

    async def read():
        async with get_client() as client:
            children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
                any_=[flow_run_id, *[c.id for c in children]])))
            return children, tasks, logs

    return asyncio.run(read())


def test_loraflow_run_submits_to_the_deployment_and_follows_it(
        prefect_server, applied_deployments, s3_server, tiny_model_dir, imdb_data_dir, tmp_path):  # noqa: F811
    from loraflow.registry import list_versions, read_manifest

    bucket = create_bucket(s3_server, "submit-")
    worker_bucket = create_bucket(s3_server, "worker-")
    settings = tiny_flow_settings(s3_server, bucket, tiny_model_dir, imdb_data_dir, name="imdb-submitted",
                                  max_steps=2, save_steps=2)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))  # a whole location: endpoint and bucket

    # The workers' own environment disagrees with every run's spec, and names another bucket.
    base_env = {**prefect_server.env, "AWS_ACCESS_KEY_ID": s3_server.access_key,
                "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "LORAFLOW_HOME": str(tmp_path / "worker-home"),
                "LORAFLOW_TRAINING__MAX_STEPS": "7", "LORAFLOW_LORA__R": "2",
                "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    env = {**base_env, "LORAFLOW_STORAGE__ENDPOINT_URL": s3_server.endpoint_url,
           "LORAFLOW_STORAGE__BUCKET": worker_bucket}
    workers = [_start_worker(prefect_server, pool, env, tmp_path / f"worker-{pool}.log") for pool in ("cpu", "gpu")]
    try:
        cli_env = {**prefect_server.env, "LORAFLOW_HOME": str(tmp_path / "cli-home")}
        done = subprocess.run([sys.executable, "-m", "loraflow.cli", "run", "--config", str(config), "--json"],
                              env=cli_env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        # A deployment run with partial parameters (a Quick run with the form half filled): no
        # storage, no lora.r. The rest is the documented defaults, the location the worker's, whole.
        partial = settings.model_dump(mode="json", exclude={"storage"})
        del partial["lora"]["r"]
        partial["training"]["max_steps"] = 3
        partial["registry"]["adapter_name"] = "imdb-partial"
        partial["prefect"]["train_deployment"] = "train-adapter/train-adapter"
        partial_run = wait_final_state(_submit("retrain/retrain-imdb", {"settings": partial}).id)
    finally:
        for worker in workers:
            _stop(worker)
    logs = "\n".join(p.read_text()[-1500:] for p in tmp_path.glob("worker-*.log"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + logs
    out = done.stdout.splitlines()
    assert out[0].startswith("submitted retrain/retrain-imdb: flow run")
    assert out[1].strip().startswith(prefect_server.url) and "/runs/flow-run/" in out[1]
    assert json.loads(out[-1])["state"] == "Completed"
    assert "published imdb-submitted" in done.stderr  # the run's own log lines, followed live
    [version] = list_versions(settings, "imdb-submitted")
    manifest = read_manifest(settings, "imdb-submitted", version["version"])
    assert manifest["flow_run_id"] == json.loads(out[-1])["flow_run_id"]
    assert not (tmp_path / "cli-home" / "runs").exists()  # nothing ran in the CLI's process
    # Exactly the spec, in the spec's bucket: not the workers' 7 steps, rank 2 or bucket.
    assert manifest["metrics"]["global_step"] == 2 and manifest["spec"]["lora"]["r"] == 4
    assert manifest["spec"]["storage"]["bucket"] == bucket and manifest["spec"]["training"]["max_steps"] == 2
    worker_store = settings.model_copy(update={"storage": settings.storage.model_copy(update={"bucket": worker_bucket})})
    assert list_versions(worker_store, "imdb-submitted") == []

    assert partial_run.state.is_completed(), f"{partial_run.state}\n{logs}"
    [partial_version] = list_versions(worker_store, "imdb-partial")  # the worker's location, whole
    assert list_versions(settings, "imdb-partial") == []
    manifest = read_manifest(worker_store, "imdb-partial", partial_version["version"])
    assert manifest["metrics"]["global_step"] == 3 and manifest["spec"]["lora"]["r"] == 16  # defaults, not env
    assert manifest["spec"]["storage"]["bucket"] == worker_bucket
    children, _, run_logs = _run_details(partial_run.id)
    assert [c.work_pool_name for c in children] == ["gpu"]  # trained on the gpu pool, from the same spec
    assert children[0].parameters["settings"]["storage"]["bucket"] == worker_bucket
    ignored = [r.message for r in run_logs if r.message.startswith("ignoring LORAFLOW_")]
    # Said on both workers; the gpu worker also names its storage variables: the spec's location won.
    assert len(ignored) == 2 and all("LORAFLOW_LORA__R" in m and "LORAFLOW_TRAINING__MAX_STEPS" in m for m in ignored)
    assert sum("LORAFLOW_STORAGE__BUCKET" in m for m in ignored) == 1

    # A worker with no storage location: the run fails at its start, in one line, nothing started.
    workers = [_start_worker(prefect_server, "cpu", base_env, tmp_path / "worker-bare.log")]
    try:
        bare = dict(partial, registry={**partial["registry"], "adapter_name": "imdb-nowhere"})
        failed = wait_final_state(_submit("retrain/retrain-imdb", {"settings": bare}).id, timeout=240)
    finally:
        for worker in workers:
            _stop(worker)
    assert failed.state.is_failed(), failed.state
    assert "no storage location" in (failed.state.message or ""), failed.state.message
    children, tasks, _ = _run_details(failed.id)
    assert children == [] and tasks == []  # no change check, no training run, nothing published
    assert list_versions(worker_store, "imdb-nowhere") == []
