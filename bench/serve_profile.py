"""Where a generation step's time goes: the scheduler's prefill and decode steps at 1, 4, 16 rows
on GPT-2 small's shape (random weights) with LoRA adapters, in the service's precision (bf16 base
under autocast where the CPU has it) and in fp32; then torch.profiler's top ops for one config.

    flock /tmp/loraflow-cpu.lock .venv/bin/python bench/serve_profile.py --rows 1,4,16 --adapters 4
    git show 063c4d1:src/loraflow/serving/scheduler.py > /tmp/before.py   # the scheduler before the buffers
    flock /tmp/loraflow-cpu.lock .venv/bin/python bench/serve_profile.py --before /tmp/before.py

`--before FILE` times another version of serving/scheduler.py the same way, line by line beside
this checkout's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

PROMPT = "The movie was a pleasant surprise: the acting was good, the story kept me interested and the ending"


def build(tmp: Path, shape: str, adapters: int, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.demo.tiny_models import make_gpt2_model_dir

    model_dir = make_gpt2_model_dir(tmp / "base", shape)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, config, adapter_name="v0")
    for i in range(1, adapters):
        model.add_adapter(f"v{i}", config)
    for name, p in model.named_parameters():
        if "lora" in name:
            p.data = p.data.float()  # peft keeps adapters fp32 beside a bf16 base (as the service loads them)
            if "lora_B" in name:
                torch.nn.init.normal_(p, 0, 1e-3)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per measurement (the bench's max_tokens)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--profile", default="bfloat16:16", help="DTYPE:ROWS to run torch.profiler on ('' for none)")
    parser.add_argument("--before", help="another serving/scheduler.py to time the same way")
    args = parser.parse_args()

    import torch

    import importlib.util

    from loraflow.serving import scheduler

    versions = {"now": scheduler}
    if args.before:
        spec = importlib.util.spec_from_file_location("scheduler_before", args.before)
        versions["before"] = sys.modules["scheduler_before"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(versions["before"])

    print(f"# serve_profile: GPT-2 {args.shape}, {args.adapters} adapters (r=8 c_attn/c_proj), prompt "
          f"{PROMPT!r}, {args.steps} decode steps; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for dtype_name in args.dtypes.split(","):
            model, tok = build(Path(tmp) / dtype_name, args.shape, args.adapters, getattr(torch, dtype_name))
            ids = tok(PROMPT)["input_ids"]

            def run(rows: int, sched=scheduler):
                seqs = [sched.Sequence(SimpleNamespace(slot=f"v{i % args.adapters}"), list(ids),
                                       sched.Sampling(max_tokens=args.steps + 1), tok.decode) for i in range(rows)]
                batch = sched.Batch()
                t0 = time.perf_counter()
                batch.prefill(model, seqs, set())
                t1 = time.perf_counter()
                steps = []
                while batch.rows:
                    s = time.perf_counter()
                    batch.decode(model, set())
                    steps.append(time.perf_counter() - s)
                return t1 - t0, steps

            run(1)
            for rows, (version, sched) in [(int(r), v) for r in args.rows.split(",") for v in versions.items()]:
                run(rows, sched)
                prefill, steps = run(rows, sched)
                print(f"{version:6s} {dtype_name} rows={rows:2d}: prefill {prefill * 1e3:7.1f} ms, decode step median "
                      f"{statistics.median(steps) * 1e3:6.1f} ms (first {steps[0] * 1e3:.1f}, last {steps[-1] * 1e3:.1f}), "
                      f"{rows * len(steps) / sum(steps):6.1f} tokens/s in decode", flush=True)
            if args.profile and args.profile.split(":")[0] == dtype_name:
                rows = int(args.profile.split(":")[1])
                from torch.profiler import ProfilerActivity, profile

                for version, sched in versions.items():
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        run(rows, sched)
                    print(f"# torch.profiler, {version}, {dtype_name}, {rows} rows, prefill + {args.steps} decode steps")
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
