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


def _start(tmp_path: Path, settings, run_key: str, tag: str) -> list[Node]:
    spec = tmp_path / f"spec-{tag}.json"
    spec.write_text(settings.model_dump_json())
    return [Node(tmp_path, f"{tag}-node{rank}", spec, run_key, rank) for rank in (0, 1)]


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
    settings = _settings(s3_server, bucket, no_dropout_model_dir, imdb_data_dir, gradient_accumulation_steps=2,
                         save_strategy="no")
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
    from loraflow.checkpoints import latest_checkpoint
    from loraflow.launch import fetch_trained

    bucket = create_bucket(s3_server, "mn-b-")
    settings = _two_nodes(_settings(s3_server, bucket, no_dropout_model_dir, imdb_data_dir,
                                    gradient_accumulation_steps=1, save_steps=1), _free_port())
    first = _start(tmp_path, settings, "mn-run-b", "first")
    deadline = time.monotonic() + 180
    while latest_checkpoint(settings.storage, "mn-run-b") is None:
        assert time.monotonic() < deadline and all(n.proc.poll() is None for n in first), \
            "\n\n".join(n.text()[-3000:] for n in first)
        time.sleep(0.05)
    # The node of global rank 0 (the one that writes whole checkpoints) is lost with its disk.
    victim = next(n for n in first if any(n.out.glob("checkpoint-*/adapter_model.safetensors")))
    victim.kill()
    survivor = next(n for n in first if n is not victim)
    assert survivor.wait(150) != 0  # its rank lost its peer: the node fails, it does not hang
    stored = latest_checkpoint(settings.storage, "mn-run-b")
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
