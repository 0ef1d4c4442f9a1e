"""Distributed training on one worker: one process per device under torchrun
(`python -m torch.distributed.run`), started from a flow's task and watched by it.

The caller (tasks/train.py) syncs the run's newest checkpoint from storage first and stages the
adapter afterwards; the ranks only train (`train_ranks`), rank 0 uploading checkpoints as Trainer
saves them and writing the result as JSON. Rank 0's console lines are streamed into the `loraflow`
logger line by line (Prefect's run logs); every rank's output also goes to a log file under the run
directory. A rank that raises writes its error to a file and torchrun stops the others (no hang on a
collective that will never complete); the launch then fails with that rank's error, in one line.
"""

from __future__ import annotations

import argparse
import json
import os
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


def torchrun_command(nproc: int, out: Path, run_key: str, settings_path: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            # Every rank's output to files; only rank 0's to the console (our pipe).
            "--log-dir", str(out / LOGS_DIR), "--tee", "3", "--local-ranks-filter", "0",
            "-m", "loraflow.launch", "--settings", str(settings_path), "--output", str(out), "--run-key", run_key]


def launch_training(settings: Settings, out: Path, run_key: str, nproc: int, *, resume: bool,
                    timeout_s: float | None = None) -> dict[str, Any]:
    """Train under torchrun with `nproc` processes into `out`; returns rank 0's TrainResult dict."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / RESULT_FILE, out / ERRORS_DIR):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    settings_path = out / "launch-settings.json"
    settings_path.write_text(settings.model_dump_json())  # settings hold no secrets
    cmd = torchrun_command(nproc, out, run_key, settings_path) + (["--resume"] if resume else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    log.info("launching %d training processes: torchrun --nproc_per_node %d (logs: %s)", nproc, nproc,
             out / LOGS_DIR)
    tail: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, bufsize=1, env=env)
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
    result = out / RESULT_FILE
    if not result.is_file():
        raise TrainingError(f"torchrun exited 0 but rank 0 wrote no {result}")
    return json.loads(result.read_text())


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


def main(argv: list[str] | None = None) -> int:
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
