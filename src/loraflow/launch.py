"""Distributed training under torchrun (`python -m torch.distributed.run`): one process per device,
on one worker or on several machines ("nodes").

One node (`launch_training`): the caller (tasks/train.py) syncs the run's newest checkpoint from
storage first and stages the adapter afterwards; the ranks only train (`train_ranks`), rank 0
uploading checkpoints as Trainer saves them and writing the result as JSON.

Several nodes (`run_node`, `python -m loraflow.launch node`): every node runs the same command
(on Kubernetes, one pod of an Indexed Job, loraflow.kubernetes_job). The nodes meet through
torchrun's own c10d rendezvous at `cluster.rdzv_endpoint`, served by node 0; everything they need
is in the run's spec (settings), nothing is guessed from a machine's environment. Before torchrun
starts, each node makes its scratch folder hold the run's newest verified checkpoint from object
storage, or nothing when storage has none: a node that lands on an empty disk, or on one holding
an earlier attempt's unfinished checkpoints, resumes exactly where the others do. Global rank 0
alone uploads checkpoints; its node, once torchrun succeeds, uploads the trained adapter and its
result under `checkpoints/<run key>/trained/` for the flow run that waits for the nodes.

Rank 0's console lines (on each node, its local rank 0's) are streamed into the `loraflow` logger
line by line (Prefect's run logs, a pod's log); every rank's output also goes to a log file under
the run directory. A rank that raises writes its error to a file and torchrun stops the others (no
hang on a collective that will never complete); the launch then fails with that rank's error, in
one line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.errors import ConfigError, TrainingError
from loraflow.log import get_logger

if TYPE_CHECKING:
    from loraflow.settings import Settings

log = get_logger("launch")

RESULT_FILE = "launch-result.json"
ERRORS_DIR = "launch-errors"
LOGS_DIR = "launch-logs"


def resolve_nproc(value: str | int) -> int:
    """training.nproc_per_node: "auto" is one process per CUDA device (1 without any); an int is used as is."""
    if value == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"training.nproc_per_node: {value!r} is not 'auto' or a positive integer")
    return value


RDZV_PORT = 29400  # torchrun's default c10d port
TRAINED = "trained/"  # under the run's prefix: the adapter a multi-node run trained, with its result
TRAINED_LOGS = "trained-logs/"


def _rank_command(out: Path, run_key: str, settings_path: Path) -> list[str]:
    # Every rank's output to files; only local rank 0's to the console (our pipe).
    return ["--log-dir", str(out / LOGS_DIR), "--tee", "3", "--local-ranks-filter", "0",
            "-m", "loraflow.launch", "--settings", str(settings_path), "--output", str(out), "--run-key", run_key]


def torchrun_command(nproc: int, out: Path, run_key: str, settings_path: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            *_rank_command(out, run_key, settings_path)]


def node_command(settings: Settings, run_key: str, out: Path, settings_path: Path, *, node_rank: int,
                 nproc: int, python: str = sys.executable) -> list[str]:
    """torchrun for one node of a multi-node run: c10d rendezvous at cluster.rdzv_endpoint, hosted
    by node 0 (said explicitly: inferring it from hostnames fails behind Kubernetes DNS names),
    no in-place restarts (a failed node fails the run, whose next attempt resumes from storage)."""
    c = settings.cluster
    if c.rdzv_endpoint is None:
        raise ConfigError("cluster.rdzv_endpoint: unset; a run on several nodes needs HOST:PORT of node 0 "
                          f"(e.g. node0.example:{RDZV_PORT})")
    if not 0 <= node_rank < c.nnodes:
        raise ConfigError(f"--node-rank {node_rank}: must be between 0 and cluster.nnodes-1 ({c.nnodes - 1})")
    # Nodes may start minutes apart (scheduling, image pulls): wait for the others as long as a
    # node may stay pending.
    wait = c.pending_timeout_s
    return [python, "-m", "torch.distributed.run", "--nnodes", str(c.nnodes), "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", c.rdzv_endpoint, "--rdzv-id", c.rdzv_id or run_key,
            "--rdzv-conf", f"is_host={1 if node_rank == 0 else 0},join_timeout={wait},read_timeout={wait}",
            "--max-restarts", "0", *_rank_command(out, run_key, settings_path)]


def _prepare_out(out: Path, settings: Settings) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / RESULT_FILE, out / ERRORS_DIR):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    settings_path = out / "launch-settings.json"
    settings_path.write_text(settings.model_dump_json())  # settings hold no secrets
    return settings_path


def _run_torchrun(cmd: list[str], out: Path, timeout_s: float | None) -> None:
    """Run torchrun, rank 0's lines into the logger; TrainingError naming the first failed rank."""
    from loraflow.stopping import die_with_parent

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    tail: list[str] = []
    # torchrun gets SIGTERM (and stops its ranks) when this thread dies, even by SIGKILL: a launcher
    # killed without unwinding must not leave a node training under PID 1.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, bufsize=1, env=env, preexec_fn=die_with_parent)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                log.info("%s", line)
                tail = (tail + [line])[-40:]
        code = proc.wait(timeout=timeout_s)
    except BaseException:
        # The flow run is cancelled or the task timed out: the ranks must not outlive it.
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if code != 0:
        raise TrainingError(_failure(out, code, tail))


def launch_training(settings: Settings, out: Path, run_key: str, nproc: int, *, resume: bool,
                    timeout_s: float | None = None) -> dict[str, Any]:
    """Train under torchrun with `nproc` processes into `out`; returns rank 0's TrainResult dict."""
    settings_path = _prepare_out(out, settings)
    cmd = torchrun_command(nproc, out, run_key, settings_path) + (["--resume"] if resume else [])
    log.info("launching %d training processes: torchrun --nproc_per_node %d (logs: %s)", nproc, nproc,
             out / LOGS_DIR)
    _run_torchrun(cmd, out, timeout_s)
    result = out / RESULT_FILE
    if not result.is_file():
        raise TrainingError(f"torchrun exited 0 but rank 0 wrote no {result}")
    return json.loads(result.read_text())


def sync_node_from_storage(settings: Settings, run_key: str, out: Path) -> int:
    """Make a node's `out` hold exactly the run's newest stored checkpoint (its step), or no
    checkpoint at all (0) when storage has none: every node then resumes from the same step,
    whatever its disk held before (tasks/train.py's single-worker sync keeps local checkpoints
    when storage has none; across nodes that would split the ranks between two steps)."""
    from loraflow import checkpoints
    from loraflow.resume import checkpoints as local_checkpoints

    stored = checkpoints.latest_checkpoint(settings.storage, run_key)
    for step, path in local_checkpoints(out):
        if stored is None or step != stored.step:
            shutil.rmtree(path, ignore_errors=True)
    if stored is None:
        log.info("run %s has no stored checkpoint: training from step 0", run_key)
        return 0
    checkpoints.download(settings.storage, stored.uri, out / f"checkpoint-{stored.step}")
    log.info("resuming run %s from checkpoint step %d (%s, sha256 verified)", run_key, stored.step, stored.uri)
    return stored.step


def run_node(settings: Settings, run_key: str, out: Path, *, node_rank: int,
             timeout_s: float | None = None) -> dict[str, Any] | None:
    """One node of a multi-node run (module docstring). Returns the training result on the node
    that held global rank 0 (after uploading the adapter), None on the others."""
    from loraflow import checkpoints

    if settings.storage.endpoint_url in (None, "local"):
        raise ConfigError(f"storage.endpoint_url: {settings.storage.endpoint_url or 'unset'}; the nodes of a run share "
                          "checkpoints through object storage: give an S3 endpoint URL, or `aws` for AWS S3")
    step = sync_node_from_storage(settings, run_key, out)
    settings_path = _prepare_out(out, settings)
    nproc = resolve_nproc(settings.training.nproc_per_node)
    cmd = node_command(settings, run_key, out, settings_path, node_rank=node_rank, nproc=nproc)
    log.info("node %d of %d: launching %d training process%s, rendezvous %s (id %s); logs: %s", node_rank,
             settings.cluster.nnodes, nproc, "" if nproc == 1 else "es", settings.cluster.rdzv_endpoint,
             settings.cluster.rdzv_id or run_key, out / LOGS_DIR)
    _run_torchrun(cmd + (["--resume"] if step else []), out, timeout_s)
    result_file = out / RESULT_FILE
    if not result_file.is_file():
        return None  # global rank 0 ran on another node, which uploads the result
    result = {**json.loads(result_file.read_text()), "resumed_from_step": step}
    prefix = checkpoints.run_prefix(settings.storage, run_key)
    checkpoints.upload_trained(settings.storage, result, prefix + TRAINED, prefix + TRAINED_LOGS,
                               out / "trained-logs", adapter_name=settings.registry.adapter_name)
    log.info("trained adapter (step %d) uploaded to %s", result["global_step"], prefix + TRAINED)
    return result


def fetch_trained(settings: Settings, run_key: str, dest: Path) -> dict[str, Any]:
    """The adapter a multi-node run trained (sha256-verified into `dest/trained`), with its result;
    paths in it point into `dest`."""
    from loraflow import checkpoints

    prefix = checkpoints.run_prefix(settings.storage, run_key)
    _, info = checkpoints.download_trained(settings.storage, prefix + TRAINED, prefix + TRAINED_LOGS,
                                           dest / "trained", dest / "trained-logs")
    return {**info, "adapter_dir": str(dest / "trained"), "output_dir": str(dest)}


def _failure(out: Path, code: int, tail: list[str]) -> str:
    # The earliest error is the cause; later ones are ranks that lost their peer.
    errors = sorted((out / ERRORS_DIR).glob("rank-*.txt"), key=lambda p: p.stat().st_mtime_ns)
    if errors:
        first = errors[0]
        return f"training failed on {first.stem.replace('-', ' ')} (torchrun exit {code}): {first.read_text().strip()}"
    last = next((line for line in reversed(tail) if line.strip()), "no output")
    return f"training under torchrun failed (exit {code}): {last}"


def train_ranks(settings: Settings, out: Path, run_key: str, resume: bool) -> None:
    """What every rank runs: train with checkpoint uploads (rank 0 uploads); rank 0 writes the result."""
    from loraflow import checkpoints, training

    callbacks = []
    if settings.training.save_strategy != "no":
        callbacks.append(checkpoints.checkpoint_upload_callback(settings.storage, run_key,
                                                                   adapter_name=settings.registry.adapter_name))
    result = training.train_adapter(settings, output_dir=out, resume=resume, callbacks=callbacks)
    if training.is_main_process():
        tmp = out / (RESULT_FILE + ".partial")
        tmp.write_text(json.dumps(result.to_dict()))
        tmp.replace(out / RESULT_FILE)


SPEC_ENV = "LORAFLOW_RUN_SPEC"  # a node's run spec (Settings JSON) when no --settings file is given


def _node_main(argv: list[str]) -> int:
    from loraflow.errors import LoraflowError
    from loraflow.log import setup_console
    from loraflow.settings import Settings
    from loraflow.stopping import stop_on_signals

    parser = argparse.ArgumentParser(prog="python -m loraflow.launch node",
                                     description="one node of a multi-node training run (torchrun, c10d rendezvous)")
    parser.add_argument("--settings", help=f"the run's spec (Settings JSON); default: the {SPEC_ENV} variable")
    parser.add_argument("--output", required=True, help="this node's scratch folder (checkpoints, logs)")
    parser.add_argument("--run-key", required=True, help="names the run's checkpoints in storage")
    parser.add_argument("--node-rank", required=True, type=int, help="0 on the node that serves the rendezvous")
    args = parser.parse_args(argv)
    setup_console()
    try:
        if args.settings:
            spec, where = Path(args.settings).read_text(), args.settings
        elif os.environ.get(SPEC_ENV):
            spec, where = os.environ[SPEC_ENV], SPEC_ENV
        else:
            raise ConfigError(f"no run spec: pass --settings FILE or set {SPEC_ENV}")
        try:
            settings = Settings.model_validate_json(spec)
        except ValueError as exc:
            raise ConfigError(f"{where}: not a valid run spec: {str(exc).splitlines()[0]}") from None
        # A pod is stopped by SIGTERM to this process (its PID 1): unwind like Ctrl-C, so that
        # torchrun and the ranks are stopped too, and say so in one line.
        with stop_on_signals(f"node {args.node_rank} of run {args.run_key}",
                             "checkpoints it stored are kept: the nodes started again resume from them"):
            run_node(settings, args.run_key, Path(args.output), node_rank=args.node_rank)
    except LoraflowError as exc:
        message = f"{type(exc).__name__}: {exc}"
        log.error("%s", message)
        _termination_message(message)
        return exc.exit_code
    return 0


def _termination_message(message: str) -> None:
    # Kubernetes shows this file as the container's termination message: the pod's failure in one
    # line for whoever waits on the Job (loraflow.kubernetes_job).
    path = Path("/dev/termination-log")
    if path.exists() and os.access(path, os.W_OK):
        path.write_text(message[:4000])


def _die_with_agent() -> None:
    """A rank stops when its torchrun agent dies. torchrun starts each rank in a session of its
    own, so a node lost by `kill -9` of its process group (the launcher and torchrun) left the rank
    running under PID 1: still in the collective with the other nodes, uploading checkpoints, and
    holding the surviving node's agent at its exit barrier (seen: a survivor waited out its 150 s
    test budget instead of failing). SIGKILL: its agent, the only one that would hear a cleaner
    exit, is gone. Racy only if the agent died before this line runs (the rank then keeps the
    old behaviour)."""
    import signal

    from loraflow.stopping import die_with_parent

    if os.environ.get("TORCHELASTIC_RUN_ID"):
        die_with_parent(signal.SIGKILL, os.getppid())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["node"]:
        return _node_main(argv[1:])
    _die_with_agent()

    from torch.distributed.elastic.multiprocessing.errors import record

    from loraflow.log import setup_console
    from loraflow.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m loraflow.launch", description="one torchrun rank of a training run")
    parser.add_argument("--settings", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--run-key", required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    setup_console()
    out = Path(args.output)
    rank = os.environ.get("RANK", "0")

    @record  # torchrun reports the root-cause traceback of the first failed rank
    def run() -> None:
        try:
            settings = Settings.model_validate_json(Path(args.settings).read_text())
            train_ranks(settings, out, args.run_key, args.resume)
        except BaseException as exc:
            errors = out / ERRORS_DIR
            errors.mkdir(parents=True, exist_ok=True)
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            (errors / f"rank-{rank}.txt").write_text(f"{type(exc).__name__}: {message}\n")
            traceback.print_exc()
            raise

    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
