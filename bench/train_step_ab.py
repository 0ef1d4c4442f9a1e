"""One training micro-step (forward + backward) of loraflow's bf16 recipe, variant against variant,
alternating in one process: which of the memory-bound remedies wins on this CPU.

The same 4 packed rows (DialoGPT-small shape, random weights, real reviews, max_length 512, LoRA
r=16 on c_attn/c_proj, bf16 base under autocast) go through each variant per round; rounds
alternate the variants' order; the first round is a warm-up and not counted. Reported: the median
seconds per row over the timed rounds, its spread, and each variant's loss and LoRA gradients
against the reference ("hf": the model's own loss, as the Trainer computes it).

Variants:
  hf          model(**batch).loss (full logits, transformers' ForCausalLM loss), micro-batch 1
  fused       loraflow.lm_loss: head + cross-entropy fused in chunks, targets only, micro-batch 1
  hf-mb2/4    hf at micro-batch 2 / 4 (the same rows; bigger matrix products, more activations)
  fused-mb2/4 fused at micro-batch 2 / 4
  compile     torch.compile(model) (inductor, CPU) of hf; the first round (the compile) reported apart
  compile-fused  torch.compile of the transformer body, then fused
  fused-cpudrop  fused with loraflow.dropout (counter-based masks in fused kernels, attention dropout outside
              SDPA's math kernel), as training.cpu_dropout switches it on; the other variants run with
              torch's dropout. Other masks, so its loss and gradients differ from the reference's by
              the dropout's noise, not by an error.
  ...-nocast  PEFT's LoRA layers do not cast their input to the LoRA weights' fp32 (PEFT's own
              cast_input_dtype_enabled switch): under autocast the LoRA products run in bf16 anyway.
  fused-gelu, fused-cpudrop-gelu  with GPT-2's gelu_new as torch's one-kernel tanh GELU, as training
              does (loraflow.activations); the other variants run transformers' written-out formula.
  ...-qbN     cpudrop's attention in blocks of N queries (default loraflow.dropout.QUERY_BLOCK);
              -qb0: one block of all queries over all keys (the whole [s, s] square)
  ...-peftbranch  cpudrop with PEFT's own LoRA branch (scale, add, dropout module) instead of
              loraflow.lora_branch's one node
  ...-unfused cpudrop's masks and attention in torch operations (loraflow.cpu_kernels' reference, the
              fallback where the C++ kernels cannot be built) instead of the fused kernels

The demo's shape (the model directory `loraflow assets demo` or `make demo` builds):
--model ~/.cache/loraflow/models/SmolLM2-135M-Instruct --targets q_proj,k_proj,v_proj,o_proj --max-length 256

    .venv/bin/python bench/train_step_ab.py --variants hf,fused,hf-mb2,fused-mb4 --rounds 4
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

ROWS = 4


def setup(arch: str, max_length: int, precision: str, model_path: str | None = None, targets: str | None = None):
    from train_throughput import loraflow_settings, write_reviews
    from transformers import AutoTokenizer

    from loraflow import modeling
    from loraflow.data import PackedCollator, prepare_dataset
    from loraflow.demo.tiny_models import make_gpt2_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="loraflow-bench-"))
    atexit.register(shutil.rmtree, tmp, True)  # ~0.6 GB a run (model, data, LORAFLOW_HOME)
    model_dir = Path(model_path).expanduser() if model_path else make_gpt2_model_dir(tmp / arch, arch)
    import os

    os.environ["LORAFLOW_HOME"] = str(tmp / "home")
    extra = (f"lora.target_modules=[{targets}]",) if targets else ()
    settings = loraflow_settings(model_dir, write_reviews(tmp / "data"), tmp / "out", max_length, 1, 1, 1, precision,
                                 extra)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prepared = prepare_dataset(settings, tokenizer)
    resolved = modeling.resolve_precision(settings.training, settings.model)
    model = modeling.apply_lora(modeling.load_base_model(settings, resolved), settings.lora)
    model.train()
    rows = [prepared.train[i] for i in range(ROWS)]
    return model, PackedCollator(modeling.pad_token_id(tokenizer)), rows, resolved


def make_step(name: str, model, collator, rows):
    import torch

    from loraflow import cpu_kernels, dropout, lm_loss

    mb = int(name.split("-mb")[1].split("-")[0]) if "-mb" in name else 1
    batches = [collator(rows[i:i + mb]) for i in range(0, len(rows), mb)]
    n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    lm = model.get_base_model()
    body, head = lm.base_model, lm.get_output_embeddings()
    compiled = None
    if name == "compile":
        compiled = torch.compile(model)
    elif name.startswith("compile-fused"):
        body = torch.compile(body)

    default_block = dropout.QUERY_BLOCK  # make_step runs for every variant before any step
    fused = cpu_kernels.kernels()

    def step() -> float:
        dropout.QUERY_BLOCK = default_block
        if "-qb" in name:
            dropout.QUERY_BLOCK = int(name.split("-qb")[1].split("-")[0]) or 1 << 30
        cpu_kernels._state["module"] = None if "-unfused" in name else fused
        set_cpu_dropout(model, "cpudrop" in name, "-peftbranch" not in name)
        set_fused_gelu(model, "gelu" in name)
        for m in model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = "nocast" not in name
        total = 0.0
        for b in batches:
            if "fused" in name:
                h = body(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).last_hidden_state
                loss = lm_loss.summed_loss(h, head.weight, b["labels"]) / n_targets
            else:
                out = (compiled or model)(**b, num_items_in_batch=torch.tensor(n_targets))
                loss = out.loss
            loss.backward()
            total += float(loss)
        return total

    return step


def set_cpu_dropout(model, on: bool, branch: bool = True) -> None:
    """loraflow.dropout on (as training switches it) or back to torch's dropout and SDPA."""
    from torch import nn

    from loraflow import dropout

    from loraflow.lora_branch import use_cpu_lora_branch

    if on:
        dropout.use_cpu_dropout(model)
        use_cpu_lora_branch(model, branch)
        return
    use_cpu_lora_branch(model, False)
    for m in model.modules():
        if type(m) is dropout.CpuDropout:
            m.__class__ = nn.Dropout
    base = model.get_base_model()
    if base.config._attn_implementation == dropout.ATTENTION:
        base.set_attn_implementation("sdpa")


def set_fused_gelu(model, on: bool) -> None:
    """GPT-2's gelu_new as torch's one-kernel tanh GELU (as training swaps it) or as transformers writes it."""
    from transformers.activations import GELUTanh, NewGELUActivation

    from loraflow.activations import use_fused_gelu

    if on:
        use_fused_gelu(model)
        return
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is GELUTanh:
                setattr(parent, name, NewGELUActivation())


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small")
    parser.add_argument("--model", help="a model directory instead of --arch's random DialoGPT")
    parser.add_argument("--targets", help="LoRA target modules, comma-separated (default: the recipe's)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--variants", default="hf,fused")
    parser.add_argument("--rounds", type=int, default=4, help="rounds including the untimed first")
    parser.add_argument("--profile", action="store_true", help="top operators of one hf step (torch.profiler)")
    args = parser.parse_args()

    import torch

    from loraflow.modeling import autocast

    model, collator, rows, precision = setup(args.arch, args.max_length, args.precision, args.model, args.targets)
    label = Path(args.model).name if args.model else f"DialoGPT-{args.arch}"
    print(f"{label}/{args.max_length}, {precision.name} (base {precision.model_dtype}), "
          f"{ROWS} packed rows per round, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    names = args.variants.split(",")
    steps, times, losses, grads, first = {}, {n: [] for n in names}, {}, {}, {}
    with autocast(precision):
        for n in names:
            t = time.perf_counter()
            steps[n] = make_step(n, model, collator, rows)
            first[n] = time.perf_counter() - t
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            steps[names[0]]()  # warm
            model.zero_grad(set_to_none=True)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[names[0]]()
            model.zero_grad(set_to_none=True)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            line = f"round {r + 1}/{args.rounds}:"
            for n in order:
                model.zero_grad(set_to_none=True)
                torch.manual_seed(1234)  # the same dropout masks for every variant
                t = time.perf_counter()
                loss = steps[n]()
                dt = time.perf_counter() - t
                if r == 0:
                    first[n] += dt
                    losses[n], grads[n] = loss, lora_grads(model)
                else:
                    times[n].append(dt / ROWS)
                line += f"  {n} {dt / ROWS:.3f} s/row"
            print(line, flush=True)
    ref = names[0]
    print(f"\n{'variant':<12}{'s/row':>8}{'spread':>8}{'vs ' + ref:>10}{'first round s':>15}{'loss':>10}"
          f"{'grad rel err':>14}")
    for n in names:
        med = statistics.median(times[n])
        spread = (max(times[n]) - min(times[n])) / med if len(times[n]) > 1 else 0.0
        num = sum(float((grads[n][k] - grads[ref][k]).float().norm() ** 2) for k in grads[ref]) ** 0.5
        den = sum(float(grads[ref][k].float().norm() ** 2) for k in grads[ref]) ** 0.5
        print(f"{n:<12}{med:>8.3f}{spread:>8.0%}{statistics.median(times[ref]) / med:>9.2f}x{first[n]:>15.1f}"
              f"{losses[n]:>10.4f}{num / den:>14.2e}")


if __name__ == "__main__":
    main()
