"""Training throughput and memory: the seed notebook's stack vs loraflow, in one run.

The seed's stack (the reference): transformers Trainer + peft LoRA r=16 on c_attn/c_proj, batch 4,
grad-accum 4, every review tokenised with padding="max_length" (pad = eos, the usual collator).
loraflow: `loraflow.training.train_adapter` with its defaults (packed rows with per-document
position ids, micro-batch 1 x grad-accum 16: the same 16 rows of max_length per optimizer step).

Both run on the same DialoGPT-architecture model (GPT2Config with random weights at the real small
/ medium shapes, the real GPT-2 tokenizer), the same real IMDB review texts, the same number of
optimizer steps and the same effective batch (16 rows of max_length). Each run is a separate
process so peak RSS is its own; the two are alternated within this one invocation because the
machine's speed drifts over an afternoon (see shared/ASSETS.md).

    .venv/bin/python bench/train_throughput.py --arch small,medium --max-length 512 --steps 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EFFECTIVE_ROWS = 16  # the seed's 4 x 4
EVAL_DOCS = 24


def review_texts() -> tuple[list[str], list[str]]:
    from loraflow.demo.assets import imdb_sample_rows

    clean = lambda t: t.replace("<br />", "\n")  # noqa: E731  (same cleaning for both stacks)
    return ([clean(r["text"]) for r in imdb_sample_rows("train")],
            [clean(r["text"]) for r in imdb_sample_rows("test")][:EVAL_DOCS])


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def eval_loss(model, tokenizer, texts: list[str], max_length: int) -> float:
    """Token-weighted loss over whole documents (EOS included), one document per forward:
    the same measure for both stacks."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length - 1)["input_ids"] + [tokenizer.eos_token_id]
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
            total += loss.item()
            count += len(ids) - 1
    return total / count


class StepClock:
    """TrainerCallback recording wall time at every optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self
        self.stamps: list[float] = []

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                clock.stamps.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                clock.stamps.append(time.perf_counter())

        self.callback = _CB()

    def seconds_per_step(self) -> float:
        steps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        # The first step pays one-off costs (allocator warm-up, thread pools); skip it when we can.
        timed = steps[1:] if len(steps) > 1 else steps
        return sum(timed) / len(timed)


def run_seed(model_dir: Path, max_length: int, steps: int, micro_batch: int = 4) -> dict:
    """The seed notebook's stack, verbatim in spirit: padding='max_length', pad = eos.
    `micro_batch` 1 (x16 accumulation) separates what packing buys from what a smaller
    micro-batch buys: the same effective batch, a quarter of the activations."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments)

    train_texts, eval_texts = review_texts()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # bf16 is a trap on this CPU
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                                             task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj"],
                                             fan_in_fan_out=True))
    ds = Dataset.from_dict({"text": train_texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, padding="max_length", max_length=max_length),
        batched=True, remove_columns=["text"])
    useful = sum(sum(m) for m in ds["attention_mask"]) / len(ds)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=micro_batch,
                                 gradient_accumulation_steps=EFFECTIVE_ROWS // micro_batch,
                                 max_steps=steps, warmup_steps=0, learning_rate=2e-4, logging_steps=1,
                                 save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=42)
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[clock.callback],
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
        trainer.train()
    sps = clock.seconds_per_step()
    return {"s_per_step": sps, "tokens_per_s": EFFECTIVE_ROWS * max_length / sps,
            "useful_tokens_per_s": EFFECTIVE_ROWS * useful / sps, "padding": 1 - useful / max_length,
            "useful_tokens_per_step": EFFECTIVE_ROWS * useful,
            "eval_loss": eval_loss(model, tokenizer, eval_texts, max_length), "peak_rss_gb": peak_rss_gb()}


def run_loraflow(model_dir: Path, max_length: int, steps: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.data import prepare_dataset
    from loraflow.settings import load_settings
    from loraflow.training import train_adapter

    train_texts, eval_texts = review_texts()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        for split, texts in (("train", train_texts), ("test", eval_texts)):
            with open(data_dir / f"{split}.jsonl", "w") as f:
                for t in texts:
                    f.write(json.dumps({"text": t}) + "\n")
        os.environ["LORAFLOW_HOME"] = str(Path(tmp) / "home")
        settings = load_settings(overrides=[
            f"model.name_or_path={model_dir}", f"data.source={data_dir}", f"data.max_length={max_length}",
            "data.packing=true", "training.per_device_train_batch_size=1",
            f"training.gradient_accumulation_steps={EFFECTIVE_ROWS}", f"training.max_steps={steps}",
            "training.warmup_steps=0", "training.logging_steps=1", "training.save_strategy=no",
            f"training.output_dir={tmp}/out",
        ])
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prepared = prepare_dataset(settings, tokenizer)
        rows = prepared.train
        useful = sum(len(r) for r in rows["input_ids"]) / len(rows)
        clock = StepClock()
        result = train_adapter(settings, prepared=prepared, callbacks=[clock.callback])
        rss = peak_rss_gb()
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, result.adapter_dir)
        loss = eval_loss(model, tokenizer, eval_texts, max_length)
    sps = clock.seconds_per_step()
    return {"s_per_step": sps, "tokens_per_s": EFFECTIVE_ROWS * max_length / sps,
            "useful_tokens_per_s": EFFECTIVE_ROWS * useful / sps, "padding": 1 - useful / max_length,
            "useful_tokens_per_step": EFFECTIVE_ROWS * useful, "eval_loss": loss, "peak_rss_gb": rss}


def worker(args) -> None:
    fn = {"seed": run_seed, "seed-mb1": lambda *a: run_seed(*a, micro_batch=1), "loraflow": run_loraflow}[args.worker]
    result = fn(Path(args.model_dir), args.max_length, args.steps)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(which: str, model_dir: Path, max_length: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--model-dir", str(model_dir),
           "--max-length", str(max_length), "--steps", str(steps)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{which} worker failed ({proc.returncode})")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["wall_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small,medium", help="comma list of: tiny, small, medium")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--worker", choices=["seed", "seed-mb1", "loraflow"], help=argparse.SUPPRESS)
    parser.add_argument("--no-seed-mb1", action="store_true",
                        help="skip the seed stack at micro-batch 1 x 16 (the row that separates packing's gain)")
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from loraflow.demo.tiny_models import make_gpt2_model_dir

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch.split(","):
            model_dir = make_gpt2_model_dir(Path(tmp) / arch, arch)
            print(f"== DialoGPT-{arch} arch, max_length {args.max_length}, {args.steps} optimizer steps "
                  f"x {EFFECTIVE_ROWS} rows", flush=True)
            seed = spawn("seed", model_dir, args.max_length, args.steps)
            print(f"   seed stack done in {seed['wall_s']:.0f} s", flush=True)
            ours = spawn("loraflow", model_dir, args.max_length, args.steps)
            print(f"   loraflow done in {ours['wall_s']:.0f} s", flush=True)
            mb1 = None
            if not args.no_seed_mb1:
                mb1 = spawn("seed-mb1", model_dir, args.max_length, args.steps)
                print(f"   seed stack at micro-batch 1 done in {mb1['wall_s']:.0f} s", flush=True)
            rows.append((arch, seed, ours, mb1))

    head = (f"{'model':<20}{'stack':<11}{'s/step':>8}{'tok/s':>8}{'useful tok/s':>14}{'padding':>9}"
            f"{'useful tok/step':>17}{'peak RSS GB':>13}{'eval loss':>11}")
    print("\n" + head + "\n" + "-" * len(head))
    for arch, seed, ours, mb1 in rows:
        runs = [("seed", seed), ("loraflow", ours)] + ([("seed 1x16", mb1)] if mb1 else [])
        for name, r in runs:
            print(f"{'DialoGPT-' + arch + '/' + str(args.max_length):<20}{name:<11}{r['s_per_step']:>8.1f}"
                  f"{r['tokens_per_s']:>8.0f}{r['useful_tokens_per_s']:>14.1f}{r['padding']:>9.0%}"
                  f"{r['useful_tokens_per_step']:>17.0f}{r['peak_rss_gb']:>13.2f}{r['eval_loss']:>11.3f}")
        speed = ours["useful_tokens_per_s"] / seed["useful_tokens_per_s"]
        rss = ours["peak_rss_gb"] / seed["peak_rss_gb"]
        print(f"{'':<20}{'ratio':<10} useful tokens/s x{speed:.2f} (target >= 2), peak RSS x{rss:.2f} "
              f"(target <= 0.5), eval loss {ours['eval_loss'] - seed['eval_loss']:+.3f}")
        if mb1:
            print(f"{'':<20}{'':<10} vs the seed stack at micro-batch 1 x 16: useful tokens/s "
                  f"x{ours['useful_tokens_per_s'] / mb1['useful_tokens_per_s']:.2f}, "
                  f"peak RSS x{ours['peak_rss_gb'] / mb1['peak_rss_gb']:.2f}")
    if any(math.isnan(r[2]["eval_loss"]) for r in rows):
        raise SystemExit("loraflow eval loss is NaN")


if __name__ == "__main__":
    main()
