"""The GPU path, end to end, on a CUDA machine (run through bench/gpu_check.sh).

DialoGPT-medium's architecture (random weights: the hub is unreachable; the real GPT-2 tokenizer),
the seed recipe (LoRA r=16 on c_attn/c_proj, lr 2e-4, warmup 100, 16 rows x 512 tokens per optimizer
step, precision auto: bf16 where the GPU has it, else fp16 with loss scaling) for a few hundred steps
on the 200 real IMDB training reviews, through `loraflow.training.train_adapter`. Then:

  * the training loss is finite at every logged step and falls (last logged < first - --min-drop);
  * the saved adapter reloads with the seed notebook's snippet,
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dir)`, and moves the
    eval loss away from the base model's (it holds trained weights, not zeros);
  * eval loss of that model in the half precision it trained in is within --tolerance (relative)
    of the same model in fp32;
  * packed rows through the attention path training uses (FlashAttention-2 varlen or SDPA with the
    block mask) give each document the loss it gets alone, within 0.02 nats in half precision.

One summary table; exit status 0 only when every check passes. Without CUDA: one line, exit 3.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

# Run as a script (`python bench/gpu_check.py`), so its own folder is already first on the path.
from train_throughput import EFFECTIVE_ROWS, eval_loss, review_texts, write_reviews

NO_CUDA_EXIT = 3


def packed_vs_alone(model_dir: Path, precision, device: str, rows: list[dict], eos: int) -> float:
    """Largest |packed - alone| per-document loss (nats/token) over the documents of `rows`, with the
    attention implementation and dtype training uses on this device."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraflow import modeling
    from loraflow.data import FORWARD_KWARGS, PackedCollator

    attn = modeling.attention_implementation(precision)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=precision.torch_dtype,
                                                 **({"attn_implementation": attn} if attn else {})).to(device)
    model.eval()
    batch = PackedCollator(eos, flatten=attn == "flash_attention_2")(rows)
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    labels = batch.pop("labels")
    worst = 0.0
    with torch.no_grad():
        logits = model(**batch, **FORWARD_KWARGS).logits.float()
        pos = batch["position_ids"]
        for r in range(pos.shape[0]):
            starts = (pos[r] == 0).nonzero().flatten().tolist() + [pos.shape[1]]
            for a, b in zip(starts, starts[1:]):
                if (labels[r, a:b] == -100).all():
                    continue  # padding's own block
                ids = batch["input_ids"][r, a:b]
                alone = model(input_ids=ids[None], **FORWARD_KWARGS).logits[0].float()
                tgt = ids[1:]
                packed_loss = torch.nn.functional.cross_entropy(logits[r, a:b - 1], tgt).item()
                alone_loss = torch.nn.functional.cross_entropy(alone[:-1], tgt).item()
                worst = max(worst, abs(packed_loss - alone_loss))
    del model
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="medium", help="GPT-2 shape: tiny, small, medium (DialoGPT-medium)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4,
                        help=f"rows per micro-batch; grad-accum = {EFFECTIVE_ROWS} / this (the recipe: 4 x 4)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="allowed |half - fp32| / fp32 eval loss (default 1%%)")
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="the recipe's 2e-4")
    parser.add_argument("--min-drop", type=float, default=0.05,
                        help="the last logged loss must be this much below the first (nats/token)")
    parser.add_argument("--keep", help="keep the adapter and metrics in this directory")
    # Runs the same checks on the CPU (fp32 training, bf16 eval): how the tests exercise this script.
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}): this check needs a GPU", file=sys.stderr)
        return NO_CUDA_EXIT
    if EFFECTIVE_ROWS % args.micro_batch:
        print(f"gpu_check: --micro-batch must divide {EFFECTIVE_ROWS}, got {args.micro_batch}", file=sys.stderr)
        return 2

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.data import prepare_dataset
    from loraflow.demo.tiny_models import make_gpt2_model_dir
    from loraflow.modeling import attention_implementation, resolve_precision
    from loraflow.settings import load_settings
    from loraflow.training import read_history, train_adapter

    device = args.device
    checks: list[tuple[str, str, bool]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        out = Path(args.keep).resolve() if args.keep else tmp / "out"
        train_texts, eval_texts = review_texts()  # from the wheel cache of the current LORAFLOW_HOME
        os.environ["LORAFLOW_HOME"] = str(tmp / "home")  # a fresh prepared-data cache
        t0 = time.perf_counter()
        model_dir = make_gpt2_model_dir(tmp / "model", args.arch)
        data_dir = write_reviews(tmp / "data", train_texts, eval_texts)
        settings = load_settings(overrides=[
            f"model.name_or_path={model_dir}", f"data.source={data_dir}", f"data.max_length={args.max_length}",
            f"training.per_device_train_batch_size={args.micro_batch}",
            f"training.gradient_accumulation_steps={EFFECTIVE_ROWS // args.micro_batch}",
            f"training.max_steps={args.steps}", f"training.warmup_steps={min(100, args.steps // 3)}",
            f"training.logging_steps={max(1, min(25, args.steps // 6))}", "training.save_strategy=no",
            f"training.output_dir={out}", f"training.learning_rate={args.learning_rate}",
        ])
        precision = resolve_precision(settings.training, settings.model, device=device)
        half = precision.torch_dtype if precision.name != "fp32" else torch.bfloat16
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = train_adapter(settings, output_dir=out)
        train_wall = time.perf_counter() - t0
        peak_gb = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")
        losses = [h["loss"] for h in read_history(result.history_path)]
        finite = bool(losses) and all(math.isfinite(x) for x in losses)
        checks.append(("loss finite at every logged step", f"{len(losses)} logged", finite))
        falls = finite and len(losses) > 1 and losses[-1] < losses[0] - args.min_drop
        checks.append((f"loss falls (last < first - {args.min_drop:g})",
                       f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no losses", falls))

        # The seed notebook's snippet, verbatim: fp32 base, adapter on top.
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        base_loss = eval_loss(base.to(device), tokenizer, eval_texts, args.max_length)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), result.adapter_dir)
        model = model.to(device)
        fp32_loss = eval_loss(model, tokenizer, eval_texts, args.max_length)
        checks.append(("adapter reloads (PeftModel.from_pretrained)",
                       f"eval {fp32_loss:.4f} vs base {base_loss:.4f}", abs(fp32_loss - base_loss) > 1e-4))
        half_loss = eval_loss(model.to(half), tokenizer, eval_texts, args.max_length)
        rel = abs(half_loss - fp32_loss) / fp32_loss
        checks.append((f"{str(half).replace('torch.', '')} vs fp32 eval loss",
                       f"{half_loss:.4f} vs {fp32_loss:.4f} ({rel:.2%}; tolerance {args.tolerance:.0%})",
                       rel <= args.tolerance))
        del model, base

        prepared = prepare_dataset(settings, tokenizer)
        rows = [prepared.train[i] for i in range(min(4, len(prepared.train)))]
        worst = packed_vs_alone(model_dir, precision, device, rows, tokenizer.eos_token_id)
        limit = 0.02 if precision.name != "fp32" else 1e-3
        attn = attention_implementation(precision) or "default (cpu)"
        checks.append((f"packed == per-document loss ({attn})", f"max |diff| {worst:.4f} nats (limit {limit})",
                       worst <= limit))

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\ngpu_check: DialoGPT-{args.arch} architecture (random weights), {args.steps} steps x "
          f"{args.micro_batch} x {EFFECTIVE_ROWS // args.micro_batch} rows of {args.max_length}, "
          f"precision {precision.name} on {name}")
    print(f"train + load wall {train_wall:.1f} s, {result.tokens_per_s:.0f} label tokens/s, "
          f"peak GPU memory {peak_gb:.2f} GB")
    width = max(len(c[0]) for c in checks)
    print(f"{'check':<{width}}  {'measured':<48} result")
    for label, measured, ok in checks:
        print(f"{label:<{width}}  {measured:<48} {'PASS' if ok else 'FAIL'}")
    failed = [c for c in checks if not c[2]]
    print(f"gpu_check: {'all ' + str(len(checks)) + ' checks passed' if not failed else str(len(failed)) + ' FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
