"""Training past one machine (docs/scaling.md, "Past one node"), without a cluster: two "nodes" on
this machine, each its own `python -m loraflow.launch node` (the command a Kubernetes pod runs)
with its own LORAFLOW_HOME and scratch folder, sharing only the S3 store; torchrun's c10d
rendezvous on 127.0.0.1, gloo on CPU. They train the same adapter as one process with the same
effective batch; a node killed mid-run is resumed from rank 0's stored checkpoint by nodes that
land on empty disks. The Indexed Job that runs the nodes renders from the settings and validates
against Kubernetes' own schema (kubernetes-validate) and client models. Real S3 (rclone), real
training of the tiny GPT-2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_s3 import create_bucket, s3_settings_for

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 8

# One process adds two micro-batches' gradients in place; two processes add the same two terms in
# gloo's allreduce (loss x 2 ranks, then DDP's average over 2: both exact in binary floating point).
# Measured here: bitwise equal (max difference 0). Bitwise equality is not promised across
# machines or versions (DDP bucketing, another reduction order), so the bound is float32 resolution
# at these weights (O(1e-2)): 1e-6 absolute, far below what one step of another batch moves them
# (~lr = 3e-3).
ATOL = 1e-6


@pytest.fixture(scope="module")
def no_dropout_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny GPT-2 with its dropout off (same weights). Dropout masks come from each process's
    own RNG stream, so one process and two can only agree without dropout (GPT-2's attention,
    residual and embedding dropout, and LoRA's); the data order and the effective batch are the
    same by construction (accelerate shards one seeded sampler's batches across ranks in turn)."""
    import shutil

    dest = tmp_path_factory.mktemp("tiny-gpt2-no-dropout")
    for path in tiny_model_dir.iterdir():
        shutil.copy2(path, dest / path.name)
    config = json.loads((dest / "config.json").read_text())
    config.update({k: 0.0 for k in config if k.endswith("pdrop") or k.endswith("_dropout")})
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _settings(server, bucket: str, model_dir: Path, data_dir: Path, **training):
    return s3_settings_for(
        server, bucket,
        model={"name_or_path": str(model_dir)},
        data={"source": str(data_dir), "max_length": 64, "max_train_samples": 48, "max_eval_samples": 8},
        lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["c_attn", "c_proj"]},
        training={"max_steps": MAX_STEPS, "logging_steps": 1, "per_device_train_batch_size": 4,
                  "warmup_steps": 0, "learning_rate": 3e-3, "save_total_limit": None, "seed": 11, **training},
        registry={"adapter_name": "multinode-tiny"},
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(settings, port: int):
    return settings.model_copy(update={"cluster": settings.cluster.model_copy(
        update={"nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{port}", "pending_timeout_s": 60})})


class Node:
    """One "machine": its own LORAFLOW_HOME and scratch folder, a process group of its own (so a
    kill takes the launcher, torchrun and the rank together, like a lost pod)."""

    def __init__(self, root: Path, name: str, spec: Path, run_key: str, rank: int):
        self.home, self.out, self.log = root / f"{name}-home", root / f"{name}-scratch", root / f"{name}.log"
        env = {**os.environ, "LORAFLOW_HOME": str(self.home), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loraflow.launch", "node", "--settings", str(spec), "--output", str(self.out),
                 "--run-key", run_key, "--node-rank", str(rank)],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.log.name} did not finish in {timeout} s: {self.text()[-3000:]}")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def text(self) -> str:
        return self.log.read_text()


def _start(tmp_path: Path, settings, run_key: str, tag: str, ranks=(0, 1)) -> list[Node]:
    """The nodes, started in the order of `ranks`; returned by node rank."""
    spec = tmp_path / f"spec-{tag}.json"
    spec.write_text(settings.model_dump_json())
    nodes = {}
    for rank in ranks:
        nodes[rank] = Node(tmp_path, f"{tag}-node{rank}", spec, run_key, rank)
        time.sleep(0.5)  # so that each node's torchrun gets a higher pid than the one before
    return [nodes[rank] for rank in sorted(nodes)]


def _lora_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def one_process(s3_server, no_dropout_model_dir, imdb_data_dir, tmp_path_factory):
    """The reference: one process, 4 rows x 2 accumulated batches = 8 rows per optimizer step."""
    import torch

    from loraflow.training import train_adapter

    root = tmp_path_factory.mktemp("one-process")
    bucket = create_bucket(s3_server, "mn-ref-")
    # The model's own loss, as under DDP: training.fused_loss applies in one process only, and its
    # chunked sums round differently from the loss the two nodes compute (beyond ATOL after 8 steps).
    settings = _settings(s3_server, bucket, no_dropout_model_dir, imdb_data_dir, gradient_accumulation_steps=2,
                         save_strategy="no", fused_loss=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each node's rank (OMP_NUM_THREADS=1): the same matmul kernels
    old_home = os.environ.get("LORAFLOW_HOME")
    os.environ["LORAFLOW_HOME"] = str(root / "home")
    try:
        result = train_adapter(settings, output_dir=root / "out")
    finally:
        torch.set_num_threads(threads)
        if old_home is None:
            os.environ.pop("LORAFLOW_HOME", None)
        else:
            os.environ["LORAFLOW_HOME"] = old_home
    assert result.global_step == MAX_STEPS
    return _lora_tensors(Path(result.adapter_dir)), result


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_rendezvous_and_train_the_one_process_adapter(one_process, s3_server, no_dropout_model_dir,
                                                                imdb_data_dir, tmp_path):
    from loraflow.launch import fetch_trained
    from loraflow.storage.store import Store

    bucket = create_bucket(s3_server, "mn-a-")
    # 2 nodes x 1 process x 4 rows, no accumulation: 8 rows per optimizer step, as the reference.
    settings = _two_nodes(_settings(s3_server, bucket, no_dropout_model_dir, imdb_data_dir, gradient_accumulation_steps=1,
                                    save_steps=4), _free_port())
    started = time.perf_counter()
    nodes = _start(tmp_path, settings, "mn-run-a", "a")
    codes = [node.wait(240) for node in nodes]
    elapsed = time.perf_counter() - started
    assert codes == [0, 0], "\n\n".join(n.text()[-3000:] for n in nodes)
    logs = [n.text() for n in nodes]
    # Each node launched torchrun for its share: 2 nodes x 1 process, one c10d rendezvous.
    assert all("node %d of 2: launching 1 training process, rendezvous 127.0.0.1:" % r in t
               for r, t in enumerate(logs)), logs[0][-2000:]
    assert any("x 2 processes" in t for t in logs), logs  # the effective batch names both ranks
    # Global rank 0 ran on exactly one node; that node alone uploaded checkpoints and the adapter.
    holders = [n for n in nodes if (n.out / "launch-result.json").is_file()]
    assert len(holders) == 1
    keys = {o["Key"] for o in Store(settings.storage, bucket).list("checkpoints/mn-run-a/")}
    assert {"checkpoints/mn-run-a/checkpoint-4/manifest.json", "checkpoints/mn-run-a/checkpoint-8/manifest.json",
            "checkpoints/mn-run-a/trained/manifest.json"} <= keys

    trained = fetch_trained(settings, "mn-run-a", tmp_path / "flow-side")
    assert trained["global_step"] == MAX_STEPS and trained["resumed_from_step"] == 0
    reference, ref_result = one_process
    # Both ranks' label tokens are counted, and they are the reference's: the same rows were seen.
    assert trained["train_tokens"] == ref_result.train_tokens
    difference = _max_difference(_lora_tensors(Path(trained["adapter_dir"])), reference)
    print(f"two nodes: {elapsed:.1f} s wall; max |two nodes - one process| over LoRA weights = {difference:.3g}")
    assert difference <= ATOL


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_node_is_resumed_from_rank_0s_stored_checkpoint(one_process, s3_server, no_dropout_model_dir,
                                                                 imdb_data_dir, tmp_path):
    import psutil

    from loraflow.checkpoints import latest_checkpoint
    from loraflow.launch import fetch_trained

    bucket = create_bucket(s3_server, "mn-b-")
    settings = _two_nodes(_settings(s3_server, bucket, no_dropout_model_dir, imdb_data_dir,
                                    gradient_accumulation_steps=1, save_steps=1), _free_port())
    # torchrun's rendezvous numbers the nodes by (address, pid): node 1 started first takes global
    # rank 0, so the node to be lost is not the one that serves the rendezvous store. That is the
    # case where nothing but the rank's own tie to its agent stops it (a lost node 0 takes the
    # store with it, which fails every rank).
    first = _start(tmp_path, settings, "mn-run-b", "first", ranks=(1, 0))
    deadline = time.monotonic() + 180
    while latest_checkpoint(settings.storage, "mn-run-b") is None:
        assert time.monotonic() < deadline and all(n.proc.poll() is None for n in first), \
            "\n\n".join(n.text()[-3000:] for n in first)
        time.sleep(0.05)
    # The node of global rank 0 (the one that writes whole checkpoints) is lost with its disk.
    victim = next(n for n in first if any(n.out.glob("checkpoint-*/adapter_model.safetensors")))
    assert victim is first[1], "global rank 0 was expected on node 1 (started first)"
    below = psutil.Process(victim.proc.pid).children(recursive=True)  # torchrun and its rank
    assert len(below) >= 2, [p.cmdline() for p in below]
    victim.kill()
    # torchrun starts its rank in a session of its own, out of reach of the kill: the rank must
    # die with its agent, not train on under PID 1 (the survivor would then wait at torchrun's
    # exit barrier for an agent that is gone, instead of failing).
    gone, alive = psutil.wait_procs(below, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    at_kill = latest_checkpoint(settings.storage, "mn-run-b").step
    survivor = next(n for n in first if n is not victim)
    assert survivor.wait(150) != 0  # its rank lost its peer: the node fails, it does not hang
    stored = latest_checkpoint(settings.storage, "mn-run-b")
    assert stored.step == at_kill, "a checkpoint was stored after its node was lost"
    assert 0 < stored.step < MAX_STEPS, f"the kill came too late: step {stored.step} was stored"

    # The engine starts the nodes again, on empty disks: the checkpoint can only come from storage.
    again = _start(tmp_path, settings, "mn-run-b", "again")
    codes = [node.wait(240) for node in again]
    assert codes == [0, 0], "\n\n".join(n.text()[-3000:] for n in again)
    for node in again:
        assert f"resuming run mn-run-b from checkpoint step {stored.step}" in node.text()
    trained = fetch_trained(settings, "mn-run-b", tmp_path / "flow-side")
    assert trained["resumed_from_step"] == stored.step and trained["global_step"] == MAX_STEPS
    difference = _max_difference(_lora_tensors(Path(trained["adapter_dir"])), one_process[0])
    print(f"killed at stored step {stored.step}; resumed on fresh disks; max |resumed - one process| = {difference:.3g}")
    assert difference <= ATOL


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_a_node_stops_its_torchrun_and_ranks(s3_server, no_dropout_model_dir, imdb_data_dir, tmp_path):
    """Kubernetes stops a pod by SIGTERM to its PID 1, the launcher alone (not its process group):
    torchrun and the rank must stop with it, and the node say so in one line, not train on
    orphaned under PID 1."""
    import psutil

    from loraflow.checkpoints import latest_checkpoint

    bucket = create_bucket(s3_server, "mn-c-")
    settings = _two_nodes(_settings(s3_server, bucket, no_dropout_model_dir, imdb_data_dir,
                                    gradient_accumulation_steps=1, save_steps=1, max_steps=400), _free_port())
    nodes = _start(tmp_path, settings, "mn-run-c", "c")
    try:
        deadline = time.monotonic() + 180
        while latest_checkpoint(settings.storage, "mn-run-c") is None:  # the ranks are training
            assert time.monotonic() < deadline and all(n.proc.poll() is None for n in nodes), \
                "\n\n".join(n.text()[-3000:] for n in nodes)
            time.sleep(0.05)
        node = nodes[0]
        below = psutil.Process(node.proc.pid).children(recursive=True)  # torchrun and its rank
        assert len(below) >= 2, [p.cmdline() for p in below]
        os.kill(node.proc.pid, signal.SIGTERM)
        code = node.proc.wait(60)
        assert code == 130, node.text()[-3000:]
        assert "RunStopped: node 0 of run mn-run-c stopped by SIGTERM" in node.text()
        gone, alive = psutil.wait_procs(below, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        for n in nodes:
            n.kill()


# --- the engine: a Kubernetes Indexed Job, rendered and checked without a cluster ----------------

RUN_KEY = "0b7e6a6c-5d1e-4a39-9d7a-2f3c1e0a9b11"  # a flow run id
# The oldest and newest Kubernetes whose schemas kubernetes-validate ships (strict: unknown fields fail).
SCHEMA_VERSIONS = ("1.29", "1.37")


def _cluster_settings(*more: str):
    from loraflow.settings import load_settings

    return load_settings(overrides=[
        "storage.endpoint_url=https://s3.example.internal", "storage.bucket=my-adapters",
        "cluster.nnodes=2", "cluster.image=registry.example/loraflow-gpu:1.0", "cluster.gpus_per_node=8",
        "cluster.namespace=training", "cluster.service_account=loraflow-trainer", *more])


def _strictly_valid(manifest: dict) -> None:
    import kubernetes_validate

    for version in SCHEMA_VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)


def test_the_job_renders_from_settings_and_validates_against_kubernetes(tmp_path, capsys):
    from loraflow.errors import ConfigError
    from loraflow.kubernetes_job import check, render
    from loraflow.launch import SPEC_ENV, node_command
    from loraflow.launch import main as launch_main
    from loraflow.settings import Settings

    service, job = render(_cluster_settings(), RUN_KEY)
    for manifest in (service, job):
        _strictly_valid(manifest)  # Kubernetes' own schema (its OpenAPI spec)
    check([service, job])  # and the client's models keep every field
    name = job["metadata"]["name"]
    assert len(name) + len("-0") <= 63 and service["metadata"]["name"] == name

    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["suspend"]) == ("Indexed", 2, 2, True)
    pod = spec["template"]["spec"]
    # Node 0's stable name, <job>-0.<service>, comes from the pods' subdomain and the headless
    # Service selecting them, which publishes it before the pod is Ready.
    assert pod["subdomain"] == name and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "loraflow.launch", "node", "--output", "/scratch/run",
                                    "--run-key", RUN_KEY, "--node-rank", "$(NODE_RANK)"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["envFrom"] == [{"secretRef": {"name": "loraflow-storage"}}]
    assert pod["serviceAccountName"] == "loraflow-trainer"
    # The nodes' spec: the run's, with the rendezvous decided once (node 0 of this Job, the run key).
    node = Settings.model_validate_json(env[SPEC_ENV]["value"])
    assert node.cluster.rdzv_endpoint == f"{name}-0.{name}:29400" and node.cluster.rdzv_id == RUN_KEY
    assert node.storage.bucket == "my-adapters" and node.training == _cluster_settings().training
    # No credential anywhere in what is created (the Secret supplies them in the pod).
    text = json.dumps([service, job])
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text and "AWS_SECRET_ACCESS_KEY" not in text

    # What each pod then starts: torchrun's c10d rendezvous, node 0 serving it.
    commands = [node_command(node, RUN_KEY, tmp_path, tmp_path / "s.json", node_rank=r, nproc=8) for r in (0, 1)]
    for rank, cmd in enumerate(commands):
        joined = " ".join(cmd)
        assert f"--nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint {name}-0.{name}:29400 " \
               f"--rdzv-id {RUN_KEY}" in joined
        assert f"is_host={1 if rank == 0 else 0}," in joined and "--max-restarts 0" in joined

    # Bad input: one line naming the field or object.
    with pytest.raises(ConfigError, match=r"^cluster.image: unset"):
        render(_cluster_settings("cluster.image=null"), RUN_KEY)
    with pytest.raises(ConfigError, match=r"^training.nproc_per_node=4 with cluster.gpus_per_node=8: one training"):
        render(_cluster_settings("training.nproc_per_node=4"), RUN_KEY)
    with pytest.raises(ConfigError, match=r"--node-rank 2: must be between 0 and cluster.nnodes-1 \(1\)"):
        node_command(node, RUN_KEY, tmp_path, tmp_path / "s.json", node_rank=2, nproc=1)
    # A node started by hand with a spec that names no shared storage: exit 2, one line.
    local = tmp_path / "local.json"
    local.write_text(_cluster_settings("storage.endpoint_url=local").model_dump_json())
    capsys.readouterr()
    assert launch_main(["node", "--settings", str(local), "--output", str(tmp_path / "n"), "--run-key", RUN_KEY,
                        "--node-rank", "0"]) == 2
    assert "ConfigError: storage.endpoint_url: local; the nodes of a run share checkpoints through object storage" \
        in capsys.readouterr().err
    misplaced = json.loads(json.dumps(job))
    misplaced["spec"]["template"]["spec"]["completions"] = 2  # a Job field inside the pod spec
    with pytest.raises(ConfigError, match=rf"^Job {name}: spec.template.spec.completions: not kept by Kubernetes' V1Job"):
        check([misplaced])


def test_the_gpu_pool_job_template_renders_a_strictly_valid_job():
    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from loraflow.kubernetes_job import check

    template = json.loads((ROOT / "deployments" / "kubernetes" / "gpu-base-job-template.json").read_text())
    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    # cpu_limit's default is null, which leaves `cpu: null` in the limits (not a quantity): a
    # deployment that sets it is what is checked here.
    values.update(image="registry.example/loraflow-gpu:1.0", gpu_count=1, namespace="training", cpu_limit="16")
    config = KubernetesWorkerJobConfiguration.model_validate(apply_values(template["job_configuration"], values))
    config.prepare_for_flow_run(FlowRun(flow_id="00000000-0000-0000-0000-000000000001", name="t"))
    job = json.loads(json.dumps(config.job_manifest))
    job["metadata"]["name"] = "loraflow-flow-run"  # the worker fills generateName in; the schema needs a name
    # prefect-kubernetes' own default template puts `completions` and `parallelism` inside the pod
    # spec, and its job configuration requires them there; Kubernetes drops them (they are Job
    # fields). Everything else must be where Kubernetes reads it.
    pod = job["spec"]["template"]["spec"]
    assert (pod.pop("completions"), pod.pop("parallelism")) == (1, 1)
    _strictly_valid(job)
    check([job])


def test_the_flow_runs_account_may_make_every_request_of_the_wait():
    import yaml

    documents = list(yaml.safe_load_all((ROOT / "deployments" / "kubernetes" / "multinode-rbac.yaml").read_text()))
    for document in documents:
        _strictly_valid(document)
    role = next(d for d in documents if d["kind"] == "Role")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    # run_job: create, resume (patch), read and, when stuck or cancelled, delete the Job; create the
    # Service; list the Job's pods.
    assert granted == {("batch", "jobs", "create"), ("batch", "jobs", "patch"), ("batch", "jobs", "get"),
                       ("batch", "jobs", "delete"), ("", "services", "create"), ("", "pods", "list")}


def _model(kind: str, document: dict):
    import asyncio

    from kubernetes_asyncio.client import ApiClient

    async def read():
        async with ApiClient() as api:
            return api._ApiClient__deserialize(document, kind)

    return asyncio.run(read())


def _pod(index: int, phase: str, *, created: str = "2026-12-02T10:00:00Z", container: dict | None = None,
         conditions: list | None = None) -> dict:
    return {"metadata": {"name": f"loraflow-x-abc123-{index}-q7w2z", "creationTimestamp": created,
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "status": {"phase": phase, "containerStatuses": [container] if container else [],
                       "conditions": conditions or []}}


def _job(conditions: list | None = None) -> dict:
    return {"metadata": {"name": "loraflow-x-abc123", "namespace": "training"},
            "spec": {"parallelism": 2, "template": {"spec": {"containers": []}}},
            "status": {"conditions": conditions or []}}


def test_a_jobs_status_reads_as_done_running_or_one_failure_line():
    """The wait's decisions, on status documents of the shape the API returns, read through the
    client's models. The API calls themselves need a cluster: not tested here."""
    from datetime import datetime, timezone

    from loraflow.kubernetes_job import job_progress

    now = datetime(2026, 12, 2, 10, 5, tzinfo=timezone.utc)

    def progress(job: dict, pods: list[dict], timeout: float = 1800):
        return job_progress(_model("V1Job", job), [_model("V1Pod", p) for p in pods], pending_timeout_s=timeout,
                            now=now)

    running = {"name": "node", "ready": True, "restartCount": 0, "image": "i", "imageID": "", "state": {"running": {}}}
    p = progress(_job(), [_pod(0, "Running", container=running), _pod(1, "Running", container=running)])
    assert (p.done, p.failure, p.line) == (False, None, "job training/loraflow-x-abc123: 2/2 nodes running, 0 pending, 0 done")
    assert progress(_job([{"type": "Complete", "status": "True"}]), []).done

    failed = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
               "message": "Job has reached the specified backoff limit"}]
    own = {**running, "state": {"terminated": {
        "exitCode": 1, "reason": "Error", "finishedAt": "2026-12-02T10:04:00Z",
        "message": "TrainingError: training failed on rank 3 (torchrun exit 1): ConfigError: training.per_device_"
                   "train_batch_size=1000000 x data.max_length=64 needs about 9 TB"}}}
    p = progress(_job(failed), [_pod(1, "Failed", container=own)])
    assert p.failure == ("kubernetes job training/loraflow-x-abc123 failed (BackoffLimitExceeded: Job has reached the "
                         "specified backoff limit): pod loraflow-x-abc123-1-q7w2z (node 1) exited 1 (Error): "
                         "TrainingError: training failed on rank 3 (torchrun exit 1): ConfigError: training.per_device_"
                         "train_batch_size=1000000 x data.max_length=64 needs about 9 TB")
    assert not p.lost and p.finished  # the nodes' own error: not retried, the Job kept for its logs
    # A node whose peer vanished fails too, with its own exit 1: still a lost node (retried).
    orphan = {**running, "state": {"terminated": {
        "exitCode": 1, "reason": "Error", "finishedAt": "2026-12-02T10:04:00Z",
        "message": "TrainingError: training under torchrun failed (exit 1): torch.distributed.elastic.rendezvous."
                   "api.RendezvousConnectionError: The connection to the C10d store has failed."}}}
    assert progress(_job(failed), [_pod(1, "Failed", container=orphan)]).lost
    oom = {**running, "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled",
                                               "finishedAt": "2026-12-02T10:04:00Z"}}}
    p = progress(_job(failed), [_pod(0, "Failed", container=oom)])
    assert p.lost and p.failure.endswith("pod loraflow-x-abc123-0-q7w2z (node 0) exited 137 (OOMKilled)")

    pulling = {**running, "ready": False, "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": 'Back-off pulling image "registry.example/loraflow-gpu:1.0"'}}}
    p = progress(_job(), [_pod(0, "Pending", container=pulling)])
    assert p.failure == ('kubernetes job training/loraflow-x-abc123: pod loraflow-x-abc123-0-q7w2z (node 0) cannot start: '
                         'ImagePullBackOff: Back-off pulling image "registry.example/loraflow-gpu:1.0"')
    unscheduled = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]
    assert progress(_job(), [_pod(1, "Pending", conditions=unscheduled)]).failure is None  # 5 min < 30 min
    p = progress(_job(), [_pod(1, "Pending", conditions=unscheduled)], timeout=60)
    assert p.failure.endswith("(node 1) not running after 60 s (cluster.pending_timeout_s): 0/3 nodes are available: "
                              "3 Insufficient nvidia.com/gpu.")


def test_creating_the_job_without_a_reachable_cluster_fails_in_one_line(tmp_path, monkeypatch):
    """As far as the create-and-wait goes without a cluster: rendered, checked, config loaded, one
    real request to an API address where nothing listens; no Job exists, so nothing is left."""
    import asyncio

    from loraflow.errors import ConfigError
    from loraflow.kubernetes_job import ClusterError, run_job

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not a pod
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"^no Kubernetes cluster to create the training job in: this is not a pod"):
        asyncio.run(run_job(_cluster_settings(), RUN_KEY))

    port = _free_port()  # closed: nothing listens there
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "not-a-secret"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    with pytest.raises(ClusterError, match=rf"^kubernetes API http://127.0.0.1:{port} unreachable while creating job "
                                           r"training/loraflow-0b7e6a6c-5d1e-4a39-9d7a-[0-9a-f]{6}: "):
        asyncio.run(run_job(_cluster_settings(), RUN_KEY))


@pytest.mark.slow
def test_the_flow_refuses_a_cluster_run_it_cannot_create_before_any_data_work(prefect_server, s3_server,
                                                                              tiny_model_dir, imdb_data_dir,
                                                                              flow_home):
    from loraflow.errors import ConfigError
    from loraflow.flows.train_adapter import train_adapter_flow

    settings = _settings(s3_server, create_bucket(s3_server, "mn-flow-"), tiny_model_dir, imdb_data_dir)
    two_nodes = settings.model_copy(update={"cluster": settings.cluster.model_copy(update={"nnodes": 2})})
    with pytest.raises(ConfigError, match=r"^cluster.image: unset; training on several nodes runs in pods"):
        train_adapter_flow(two_nodes, run_key="mn-flow")
    assert not (flow_home / "prepared").exists()  # no data was prepared for it
