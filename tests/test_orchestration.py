"""Orchestration that saves GPU time and scales: the cheap change check and the Skipped state,
`--force`, training under torchrun through the flow (2 gloo processes on CPU), the Kubernetes job
template against prefect-kubernetes' schema, the event trigger and `loraflow emit`, and gc of
abandoned run checkpoints. Real Prefect server, real S3 (rclone), real training of a tiny model."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest
from fixtures_prefect import ROOT, tiny_flow_settings
from fixtures_s3 import create_bucket, s3_settings_for


def _quick_eval(settings):
    """Generation health with 4 new tokens instead of 64: the flow tests measure orchestration."""
    return settings.model_copy(update={"eval": settings.eval.model_copy(update={"max_new_tokens": 4})})


def _flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(flow_run_id)

    return asyncio.run(read())


def _logs(flow_run_ids, wanted: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()

    async def read():
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)))

    for _ in range(20):  # logs are shipped in the background
        logs = asyncio.run(read())
        if any(wanted in log.message for log in logs):
            break
        time.sleep(0.5)
    return logs


# --- the cheap change check ---------------------------------------------------------------------

def test_input_stamp_sees_an_object_replaced_at_the_same_size_and_names_changed_settings(s3_server, tmp_path):
    from loraflow.changes import compare, input_stamp
    from loraflow.storage.store import Store

    bucket = create_bucket(s3_server, "chg-")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    settings = s3_settings_for(s3_server, bucket, data={"source": f"s3://{bucket}/data/"},
                               model={"name_or_path": str(model)})
    store = Store(settings.storage, bucket)
    store.put_bytes("data/train.csv", b"text\nfirst review\n")
    before = input_stamp(settings)
    assert before["data"]["how"] == "s3-listing" and before["base_model"]["how"] == "file-stats"
    assert compare(input_stamp(settings), before) == []

    store.put_bytes("data/train.csv", b"text\nother review\n")  # same size, new ETag
    changed = compare(input_stamp(settings), before)
    assert changed == [f"data s3://{bucket}/data/: s3-listing differs"]

    tweaked = settings.model_copy(update={"training": settings.training.model_copy(update={"learning_rate": 1e-3}),
                                          "lora": settings.lora.model_copy(update={"r": 2})})
    lines = compare(input_stamp(tweaked), input_stamp(settings))
    assert lines == ["settings: lora.r, training.learning_rate"]
    # Where checkpoints go or how many processes train does not change what is learned.
    inert = settings.model_copy(update={"training": settings.training.model_copy(
        update={"save_steps": 7, "nproc_per_node": 2, "output_dir": str(tmp_path / "elsewhere")})})
    assert compare(input_stamp(inert), input_stamp(settings)) == []
    # A champion published before stamps existed cannot be compared: retrain.
    assert compare(before, None) == ["the champion's manifest records no input stamp"]
    # A hub id that cannot be resolved offline cannot be told cheaply: retrain.
    hub = settings.model_copy(update={"model": settings.model.model_copy(update={"name_or_path": "org/unknown-model"})})
    assert any("cannot tell cheaply" in line for line in compare(input_stamp(hub), before))


@pytest.mark.slow
def test_unchanged_inputs_skip_force_retrains_changed_data_retrains(
        prefect_server, s3_server, tiny_model_dir, imdb_data_dir, flow_home, tmp_path):
    from loraflow.flows.retrain import retrain

    from loraflow.registry import get_alias, list_versions, read_manifest

    data = tmp_path / "reviews"
    shutil.copytree(imdb_data_dir, data)
    bucket = create_bucket(s3_server, "skip-")
    settings = _quick_eval(tiny_flow_settings(s3_server, bucket, tiny_model_dir, data, max_steps=2, save_steps=2))
    first = retrain(settings)
    assert first["promoted"], first["reason"]
    inputs = read_manifest(settings, "imdb-tiny", first["version"])["inputs"]
    assert inputs["data"]["how"] == "file-stats" and inputs["settings"]["training"]["max_steps"] == 2

    started = time.perf_counter()
    state = retrain(settings, return_state=True)
    skip_s = time.perf_counter() - started
    assert state.is_completed() and state.name == "Skipped"
    assert state.message == f"skipped: nothing changed since imdb-tiny=={first['version']}"
    result = state.result()
    assert result["skipped"] and result["champion"] == first["version"]
    assert [v["version"] for v in list_versions(settings, "imdb-tiny")] == [first["version"]]
    # The state is the one the server (and so the UI) shows for the run.
    run = _flow_run(state.state_details.flow_run_id)
    assert (run.state.type.value, run.state.name) == ("COMPLETED", "Skipped")
    print(f"skipped run: {skip_s:.2f} s wall (in-process flow call against a running server), "
          f"{result['timings']['change check']:.3f} s of it inside the flow up to the decision")

    forced = retrain(settings.model_copy(update={"registry": settings.registry.model_copy(update={"force": True})}))
    assert forced["version"] != first["version"]

    # New data lands: one more review file next to the others; the stats listing changes.
    extra = next(p for p in sorted(data.rglob("*")) if p.is_file())
    shutil.copy2(extra, extra.with_name("landed-" + extra.name))
    changed = retrain(settings)
    assert changed.get("version") not in (None, first["version"], forced["version"])
    assert len(list_versions(settings, "imdb-tiny")) == 3
    assert get_alias(settings, "imdb-tiny", "champion") is not None


# --- several processes per worker -----------------------------------------------------------------

@pytest.mark.slow
def test_train_adapter_flow_runs_two_gloo_processes_and_stages_one_adapter(
        prefect_server, s3_server, tiny_model_dir, imdb_data_dir, flow_home):
    from loraflow.flows.train_adapter import train_adapter_flow

    from loraflow.storage.store import Store

    bucket = create_bucket(s3_server, "ddp-")
    settings = _quick_eval(tiny_flow_settings(s3_server, bucket, tiny_model_dir, imdb_data_dir, max_steps=2,
                                              save_steps=2, nproc_per_node=2))
    state = train_adapter_flow(settings, run_key="ddp-run", return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["nproc"] == 2 and result["global_step"] == 2
    # Both ranks' tokens are counted: 2 steps x 2 ranks x 4 rows of up to 64 tokens.
    assert result["train_tokens"] > 2 * 2 * 4 * 40
    assert result["evaluation"]["adapter_ppl"] > 0 and result["champion"]["version"] is None
    keys = [o["Key"] for o in Store(settings.storage, bucket).list("checkpoints/ddp-run/")]
    staged_configs = [k for k in keys if k.endswith("adapter_config.json") and "/checkpoint-" not in k]
    assert staged_configs == ["checkpoints/ddp-run/final/adapter_config.json"]
    assert "checkpoints/ddp-run/checkpoint-2/manifest.json" in keys
    # Rank 0's progress reaches the run's logs in Prefect.
    logs = _logs([state.state_details.flow_run_id], "launching 2 training processes")
    messages = [log.message for log in logs if log.name.startswith("loraflow")]
    assert any("launching 2 training processes" in m for m in messages)
    assert any("step 2/2" in m or "step 2 " in m for m in messages), messages[-20:]


@pytest.mark.slow
def test_a_failing_rank_fails_the_flow_with_its_error(prefect_server, s3_server, tiny_model_dir, imdb_data_dir,
                                                     flow_home):
    from loraflow.flows.train_adapter import train_adapter_flow

    from loraflow.errors import TrainingError

    bucket = create_bucket(s3_server, "ddpfail-")
    # A batch no machine holds: the ranks' memory check refuses it (after data preparation, which
    # the flow does before launching, so the failure is the ranks' own).
    settings = tiny_flow_settings(s3_server, bucket, tiny_model_dir, imdb_data_dir, max_steps=2, nproc_per_node=2,
                                  per_device_train_batch_size=1_000_000)
    # A hang would show as the suite's timeout; the error must be the rank's own.
    with pytest.raises(TrainingError, match=r"training failed on rank \d \(torchrun exit 1\): ConfigError: "
                                            r"training.per_device_train_batch_size=1000000 x data.max_length=64"):
        train_adapter_flow(settings, run_key="ddp-fail")


async def _pause_schedules(name: str) -> None:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployment = await client.read_deployment_by_name(name)
        for schedule in deployment.schedules:
            await client.update_deployment_schedule(deployment.id, schedule.id, active=False)


# --- deployments: Kubernetes gpu pool, the event trigger ------------------------------------------

K8S_TEMPLATE = ROOT / "deployments" / "kubernetes" / "gpu-base-job-template.json"


def test_kubernetes_gpu_job_template_fits_prefect_kubernetes_and_renders_a_gpu_job():
    import json

    import jsonschema
    from kubernetes_asyncio.client import ApiClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

    template = json.loads(K8S_TEMPLATE.read_text())
    default = KubernetesWorker.get_default_base_job_template()
    jsonschema.Draft202012Validator.check_schema(template["variables"])
    # Every variable the worker's own template offers is still there (job variables keep working).
    assert set(default["variables"]["properties"]) <= set(template["variables"]["properties"])
    assert set(template["job_configuration"]) == set(default["job_configuration"])

    # What the worker does with a deployment's job variables (from_template_and_values, minus the
    # block/variable lookups that need an API): defaults, then the values, into the template.
    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    values.update(image="registry.example/loraflow-gpu:1.0", gpu_count=4)
    config = KubernetesWorkerJobConfiguration.model_validate(apply_values(template["job_configuration"], values))
    config.prepare_for_flow_run(FlowRun(flow_id="00000000-0000-0000-0000-000000000001", name="t"))
    manifest = config.job_manifest
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/loraflow-gpu:1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["envFrom"] == [{"secretRef": {"name": "loraflow-storage"}}]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "loraflow" and "AWS_SECRET_ACCESS_KEY" not in env
    assert container["args"][:3] == ["prefect", "flow-run", "execute"] or "prefect" in " ".join(container["args"])
    # The rendered manifest is a valid batch/v1 Job for the Kubernetes client's models.
    async def as_v1_job():
        async with ApiClient() as api:
            return api._ApiClient__deserialize(manifest, "V1Job")

    job = asyncio.run(as_v1_job())
    assert job.spec.template.spec.volumes[0].empty_dir.medium == "Memory"


@pytest.mark.slow
def test_kubernetes_template_creates_a_work_pool_on_a_real_server(prefect_server):
    import json

    created = prefect_server.cli("work-pool", "create", "gpu-k8s-test", "--type", "kubernetes",
                                 "--base-job-template", str(K8S_TEMPLATE), "--overwrite")
    assert created.returncode == 0, created.stdout + created.stderr

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_work_pool("gpu-k8s-test")

    pool = asyncio.run(read())
    assert pool.type == "kubernetes"
    assert pool.base_job_template == json.loads(K8S_TEMPLATE.read_text())


@pytest.mark.slow
def test_retrain_on_new_data_applies_and_the_data_landed_event_starts_a_run(prefect_server, cli, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    prefect_server.cli("work-pool", "create", "cpu", "--type", "process")  # may exist already (other modules)
    deployed = prefect_server.cli("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                                  "--name", "retrain-on-new-data")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    # No worker runs here; keep the 15-minute schedule from queueing runs for other tests' workers.
    asyncio.run(_pause_schedules("retrain/retrain-on-new-data"))

    async def read():
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("retrain/retrain-on-new-data")
            automations = await client.read_automations_by_name(
                f"{deployment.name}__automation_1")
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
            return deployment, automations, runs

    deployment, automations, runs_before = asyncio.run(read())
    assert [s.schedule.interval.total_seconds() for s in deployment.schedules] == [900]
    assert deployment.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert deployment.work_pool_name == "cpu"
    assert len(automations) == 1
    trigger = automations[0].trigger
    assert trigger.expect == {"loraflow.data.landed"}
    assert trigger.match.model_dump().get("prefect.resource.id") == "loraflow.data.*"

    monkeypatch.setenv("PREFECT_API_URL", prefect_server.api_url)
    code, out, err = cli("emit", "data-landed", "s3://landing/reviews/2026-11-29/", "--adapter", "imdb-tiny")
    assert code == 0, err
    assert out.startswith("emitted loraflow.data.landed for s3://landing/reviews/2026-11-29/")

    for _ in range(120):  # the server's triggers service acts on the event within seconds
        _, _, runs = asyncio.run(read())
        if len(runs) > len(runs_before):
            break
        time.sleep(1)
    new = [r for r in runs if r.id not in {b.id for b in runs_before}]
    assert len(new) == 1, "the loraflow.data.landed event should have started one retrain-on-new-data run"
    assert new[0].parameters["settings"]["prefect"]["train_deployment"] == "train-adapter/train-adapter"
    # Nothing will run it here; cancel it so no later worker picks it up.
    from prefect.states import Cancelled

    async def cancel():
        async with get_client() as client:
            await client.set_flow_run_state(new[0].id, Cancelled(), force=True)

    asyncio.run(cancel())


# --- checkpoints of abandoned runs ------------------------------------------------------------------

def test_gc_removes_checkpoints_of_abandoned_runs_after_the_grace_period(s3_server, cli, tmp_path):
    """`gc A` removes A's abandoned runs only: B's stay, and so do runs checkpointed before the
    adapter name was recorded (reported, since gc cannot know whose they are)."""
    import os
    from types import SimpleNamespace

    from loraflow import checkpoints
    from loraflow.storage.store import Store

    bucket = create_bucket(s3_server, "ckgc-")
    settings = s3_settings_for(s3_server, bucket)
    out_dir = tmp_path / "out"
    local = out_dir / "checkpoint-2"
    local.mkdir(parents=True)
    (local / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (local / "trainer_state.json").write_text("{}")
    runs = {"a-dead": "adapter-a", "a-live": "adapter-a", "b-dead": "adapter-b", "old-dead": None}
    for run_key, adapter in runs.items():
        # What Trainer's on_save hands the callback that training registers.
        callback = checkpoints.checkpoint_upload_callback(settings.storage, run_key, adapter_name=adapter)
        callback.on_save(SimpleNamespace(output_dir=str(out_dir)),
                         SimpleNamespace(global_step=2, is_world_process_zero=True), None)
    # rclone reports a file's mtime as LastModified: the dead runs last wrote two days ago.
    two_days_ago = time.time() - 2 * 86400
    for run_key in ("a-dead", "b-dead", "old-dead"):
        for path in (s3_server.root / bucket / "checkpoints" / run_key).rglob("*"):
            os.utime(path, (two_days_ago, two_days_ago))
    time.sleep(1.5)  # rclone's directory cache (1 s)
    args = ["--set", f"storage.bucket={bucket}", "--set", f"storage.endpoint_url={s3_server.endpoint_url}"]

    def stored() -> set[str]:
        return {o["Key"].split("/")[1] for o in Store(settings.storage, bucket).list("checkpoints/")}

    code, out, err = cli("gc", "adapter-a", "--dry-run", *args)
    assert code == 0, err
    assert "would remove checkpoints of 1 failed or abandoned training run(s) of adapter-a; kept 1 recent run(s)" in out
    assert "  checkpoints/a-dead/  3 objects" in out
    assert "left 1 abandoned run(s) whose checkpoints name no adapter" in out and "  checkpoints/old-dead/" in out
    assert "b-dead" not in out
    code, out, err = cli("gc", "adapter-a", *args)
    assert code == 0, err
    assert "removed checkpoints of 1 failed or abandoned training run(s) of adapter-a; kept 1 recent run(s)" in out
    assert stored() == {"a-live", "b-dead", "old-dead"}
    time.sleep(1.5)
    code, out, err = cli("gc", "adapter-b", *args)
    assert code == 0, err
    assert "removed checkpoints of 1 failed or abandoned training run(s) of adapter-b; kept 0 recent run(s)" in out
    assert stored() == {"a-live", "old-dead"}


# --- a dead gpu worker ------------------------------------------------------------------------------

def _kill_tree(pid: int) -> list[int]:
    """SIGKILL a worker and everything it started (its flow-run processes have their own sessions),
    as when its machine goes away."""
    import os
    import signal

    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in procs:
        try:
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return [p.pid for p in procs]


@pytest.mark.slow
def test_a_killed_gpu_worker_does_not_lose_the_run(prefect_server, s3_server, tiny_model_dir, imdb_data_dir,
                                                    flow_home, tmp_path):
    import json
    import re
    import subprocess
    import sys

    from fixtures_prefect import PREFECT_BIN
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from safetensors.torch import load_file

    from loraflow import training
    from loraflow.registry import pull_adapter
    from loraflow.storage.store import Store

    prefect_server.cli("work-pool", "create", "gpu", "--type", "process")  # may exist already (other modules)
    deployed = prefect_server.cli("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                                  "--name", "train-adapter")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    bucket = create_bucket(s3_server, "dead-")
    settings = tiny_flow_settings(s3_server, bucket, tiny_model_dir, imdb_data_dir, name="imdb-dead",
                                  max_steps=12, save_steps=2)
    settings = settings.model_copy(update={
        "eval": settings.eval.model_copy(update={"max_new_tokens": 4}),
        "prefect": settings.prefect.model_copy(update={"train_deployment": "train-adapter/train-adapter",
                                                       "heartbeat_timeout_s": 60, "train_attempts": 3})})
    reference = training.train_adapter(settings, output_dir=tmp_path / "uninterrupted")

    env = {**prefect_server.env, "AWS_ACCESS_KEY_ID": s3_server.access_key,
           "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}

    def start_worker(n: int) -> subprocess.Popen:
        with open(tmp_path / f"worker-{n}.log", "wb") as fh:
            return subprocess.Popen([PREFECT_BIN, "worker", "start", "--pool", "gpu", "--type", "process",
                                     "--name", f"dead-test-{n}"],
                                    env={**env, "LORAFLOW_HOME": str(tmp_path / f"worker-{n}-home")}, cwd=ROOT,
                                    stdout=fh, stderr=fh, stdin=subprocess.DEVNULL, start_new_session=True)

    (tmp_path / "settings.json").write_text(settings.model_dump_json())
    script = ("import json, sys\nfrom loraflow.settings import Settings\nfrom loraflow.flows.retrain import retrain\n"
              "s = Settings.model_validate_json(open(sys.argv[1]).read())\n"
              "print('RESULT ' + json.dumps(retrain(s), default=str), flush=True)\n")
    workers = [start_worker(1)]
    with open(tmp_path / "retrain.log", "wb") as fh:
        parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "settings.json")], cwd=ROOT,
                                  env={**env, "LORAFLOW_HOME": str(tmp_path / "cpu-home")}, stdout=fh, stderr=fh,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    store = Store(settings.storage, bucket)
    try:
        # Kill worker 1 and its flow run once a checkpoint is in storage, mid-training.
        stored: list[int] = []
        for _ in range(600):
            stored = [int(m.group(1)) for o in store.list("checkpoints/")
                      if (m := re.search(r"/checkpoint-(\d+)/manifest\.json$", o["Key"]))]
            if stored or parent.poll() is not None:
                break
            time.sleep(0.5)
        assert stored and max(stored) < 12, (tmp_path / "retrain.log").read_text()[-3000:]
        _kill_tree(workers[0].pid)
        workers[0].wait(30)
        workers.append(start_worker(2))  # a fresh machine: empty disk
        parent.wait(600)
        log = (tmp_path / "retrain.log").read_text()
        assert parent.returncode == 0, log[-4000:]
    finally:
        for proc in [*workers, parent]:
            if proc.poll() is None:
                _kill_tree(proc.pid)
    result = json.loads(next(line for line in log.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert 0 < result["resumed_from_step"] < 12
    assert result["metrics"]["global_step"] == 12
    assert "submitting it again with run key" in log

    async def train_runs():
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train-adapter"])))
            return [r for r in runs if r.parameters.get("run_key") == result["flow_run_id"]]

    runs = sorted(asyncio.run(train_runs()), key=lambda r: r.created)
    assert [r.state.type.value for r in runs] == ["CRASHED", "COMPLETED"]
    assert "no heartbeat" in runs[0].state.message

    published = load_file(str(pull_adapter(f"imdb-dead=={result['version']}", settings=settings)
                              / "adapter_model.safetensors"))
    expected = load_file(str(reference.adapter_dir / "adapter_model.safetensors"))
    assert published.keys() == expected.keys()
    for key in expected:
        assert published[key].allclose(expected[key], rtol=1e-4, atol=1e-7), key
