"""deployments/prefect.yaml against a real Prefect server: it applies non-interactively, the
deployments carry their schedule, pools and concurrency limit, and two retrains started at once
run one after the other on real workers (the second waits for the deployment's slot)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fixtures_prefect import PREFECT_BIN, ROOT, tiny_flow_settings
from fixtures_s3 import create_bucket

pytestmark = pytest.mark.slow


async def _pause_schedules(name: str) -> None:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployment = await client.read_deployment_by_name(name)
        for schedule in deployment.schedules:
            await client.update_deployment_schedule(deployment.id, schedule.id, active=False)


@pytest.fixture(scope="module")
def applied_deployments(prefect_server):
    for pool in ("cpu", "gpu"):
        created = prefect_server.cli("work-pool", "create", pool, "--type", "process", "--overwrite")
        assert created.returncode == 0, created.stdout + created.stderr
    deployed = prefect_server.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    # Their schedules (every 15 minutes; daily at 04:00 UTC) would hand runs to this module's workers.
    for name in ("retrain/retrain-on-new-data", "retrain-fleet/retrain-fleet"):
        asyncio.run(_pause_schedules(name))
    return deployed


async def _read_deployment(name: str):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_deployment_by_name(name)


def test_prefect_yaml_applies_with_schedule_pools_and_concurrency_limit(prefect_server, applied_deployments):
    retrain = asyncio.run(_read_deployment("retrain/retrain-imdb"))
    train = asyncio.run(_read_deployment("train-adapter/train-adapter"))

    assert retrain.work_pool_name == "cpu" and train.work_pool_name == "gpu"
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in retrain.schedules] == [("0 3 * * 1", "UTC", True)]
    assert retrain.global_concurrency_limit is not None and retrain.global_concurrency_limit.limit == 1
    assert retrain.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert retrain.parameters == {"settings": {"prefect": {"train_deployment": "train-adapter/train-adapter"}}}
    assert retrain.job_variables["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "loraflow"
    # Workers run the code from the checkout the deployments were applied from.
    assert retrain.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    # The UI's run form: one `settings` object with the seed recipe's defaults and no secret in it.
    schema = retrain.parameter_openapi_schema
    assert list(schema["properties"]) == ["settings"]
    default = schema["properties"]["settings"]["default"]
    assert default["model"]["name_or_path"] == "microsoft/DialoGPT-medium"
    assert default["lora"] == {"r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05, "bias": "none",
                               "task_type": "CAUSAL_LM", "target_modules": ["c_attn", "c_proj"]}
    assert default["training"]["learning_rate"] == 2e-4 and default["training"]["max_steps"] == 1000
    assert default["storage"]["endpoint_url"] is None and "aws_secret_access_key" not in default["storage"]


def _start_worker(prefect_server, pool: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen([PREFECT_BIN, "worker", "start", "--pool", pool, "--type", "process",
                                 "--name", f"test-{pool}"], env=env, cwd=ROOT, stdout=fh, stderr=fh,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_two_retrains_at_once_run_one_at_a_time_on_real_workers(
        prefect_server, applied_deployments, s3_server, tiny_model_dir, imdb_data_dir, tmp_path):
    from prefect.client.orchestration import get_client

    from loraflow.registry import get_alias, list_versions

    bucket = create_bucket(s3_server, "deploy-")
    settings = tiny_flow_settings(s3_server, bucket, tiny_model_dir, imdb_data_dir, name="imdb-worker")
    # Both runs train on the same inputs: without force the second would end Skipped.
    settings = settings.model_copy(update={"registry": settings.registry.model_copy(update={"force": True})})
    # One run trains through the gpu pool (run_deployment), the other in-process.
    via_gpu = settings.model_dump(mode="json")
    via_gpu["prefect"]["train_deployment"] = "train-adapter/train-adapter"
    # On the gpu worker, training runs under torchrun: 2 gloo processes stand in for 2 GPUs.
    via_gpu["training"]["nproc_per_node"] = 2
    in_process = settings.model_dump(mode="json")
    assert s3_server.secret_key not in json.dumps(in_process)  # credentials never travel as parameters

    # Storage credentials come from the workers' environment, as on a real deployment.
    env = {**prefect_server.env, "AWS_ACCESS_KEY_ID": s3_server.access_key,
           "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "LORAFLOW_HOME": str(tmp_path / "worker-home"),
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    workers = [_start_worker(prefect_server, pool, env, tmp_path / f"worker-{pool}.log") for pool in ("cpu", "gpu")]

    async def start_both():
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("retrain/retrain-imdb")
            return [await client.create_flow_run_from_deployment(deployment.id, parameters={"settings": p})
                    for p in (via_gpu, in_process)]

    async def read(ids):
        async with get_client() as client:
            return [await client.read_flow_run(i) for i in ids]

    try:
        runs = asyncio.run(start_both())
        ids = [r.id for r in runs]
        seen_waiting, both_running = False, False
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            current = asyncio.run(read(ids))
            names = [r.state.name for r in current]
            seen_waiting |= "AwaitingConcurrencySlot" in names
            both_running |= all(r.state.type.value == "RUNNING" for r in current)
            if all(r.state.is_final() for r in current):
                break
            time.sleep(1)
        logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("worker-*.log"))
        assert all(r.state.is_completed() for r in current), f"{[r.state for r in current]}\n{logs}"
    finally:
        for worker in workers:
            _stop(worker)

    async def runs_of(flow_name: str):
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId

        async with get_client() as client:
            found = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
            return found, logs

    train_runs, logs = asyncio.run(runs_of("train-adapter"))
    # One run trained on the gpu pool (a deployment run started by retrain), the other in-process.
    # (Other modules' runs on the same server have other run keys.)
    trained_on_gpu_pool = [r for r in train_runs if r.work_pool_name == "gpu"
                           and r.parameters.get("run_key") in {str(i) for i in ids}]
    assert [r.state.type.value for r in trained_on_gpu_pool] == ["COMPLETED"]
    assert trained_on_gpu_pool[0].parent_task_run_id is not None

    async def logs_of(flow_run_id):
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    # Rank 0's progress under torchrun reaches the training run's logs.
    gpu_logs = [log.message for log in asyncio.run(logs_of(trained_on_gpu_pool[0].id))]
    assert any("launching 2 training processes" in m for m in gpu_logs)
    assert any("[default0]" in m and "step 6/6" in m for m in gpu_logs), gpu_logs[-20:]
    # The job env (PREFECT_LOGGING_EXTRA_LOGGERS=loraflow) brings the library's lines to the UI.
    assert any(log.name == "loraflow.registry" for log in logs)
    assert not both_running
    assert seen_waiting, "the second run should have waited for the deployment's concurrency slot"
    first, second = sorted(current, key=lambda r: r.start_time)
    assert first.end_time <= second.start_time  # never overlapped
    versions = list_versions(settings, "imdb-worker")
    assert len(versions) == 2
    assert get_alias(settings, "imdb-worker", "champion") in {v["version"] for v in versions}
    # The gpu-pool path (run_deployment, staged adapter) and the in-process path publish the same files.
    from loraflow.registry import read_manifest

    manifests = [read_manifest(settings, "imdb-worker", v["version"]) for v in versions]
    file_sets = [sorted(f["name"] for f in m["files"]) for m in manifests]
    assert file_sets[0] == file_sets[1] == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                            "loraflow.yaml", "loss_curve.png", "metrics.json"]
    assert {m["base_model"]["id"] for m in manifests} == {str(tiny_model_dir)}
    assert all(m["base_model"]["weights"] for m in manifests)
