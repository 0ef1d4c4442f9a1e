"""training.cpu_dropout on and off through the whole Trainer (loraflow.training.train_adapter),
alternating in one process: DialoGPT-small's shape (random weights, real GPT-2 tokenizer), the
200 real reviews packed to --max-length, --steps optimizer steps of 4 rows each, the CPU's
auto precision. Reported: each run's train_time_s and the medians after the first round.

    .venv/bin/python bench/train_dropout_ab.py --rounds 3
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="rounds including the untimed first")
    args = parser.parse_args()

    from train_throughput import loraflow_settings, write_reviews

    from loraflow.demo.tiny_models import make_gpt2_model_dir
    from loraflow.training import train_adapter

    tmp = Path(tempfile.mkdtemp(prefix="loraflow-bench-"))
    atexit.register(shutil.rmtree, tmp, True)  # ~0.6 GB a run (model, data, LORAFLOW_HOME)
    os.environ["LORAFLOW_HOME"] = str(tmp / "home")
    model_dir, data_dir = make_gpt2_model_dir(tmp / args.arch, args.arch), write_reviews(tmp / "data")
    times: dict[str, list[float]] = {"true": [], "false": []}
    for r in range(args.rounds):
        for value in ("true", "false") if r % 2 == 0 else ("false", "true"):
            settings = loraflow_settings(model_dir, data_dir, tmp / f"out-{value}", args.max_length, args.steps, 1, 1,
                                         "auto", (f"training.cpu_dropout={value}",
                                                  "training.gradient_accumulation_steps=4"))
            result = train_adapter(settings)
            times[value].append(result.train_time_s)
            print(f"round {r + 1}/{args.rounds}: cpu_dropout={value} {result.train_time_s:.2f} s "
                  f"({result.precision})", flush=True)
    on, off = (statistics.median(times[v][1:] or times[v]) for v in ("true", "false"))
    print(f"\nDialoGPT-{args.arch}/{args.max_length}, {args.steps} steps x 4 rows: training.cpu_dropout=true "
          f"{on:.2f} s, false {off:.2f} s (x{off / on:.2f}), medians of rounds 2..{args.rounds}")


if __name__ == "__main__":
    main()
