"""Training throughput and memory: the seed notebook's stack vs loraflow, alternated step by step.

The seed's stack (the reference): transformers Trainer + peft LoRA r=16 on c_attn/c_proj, batch 4,
grad-accum 4, every review tokenised with padding="max_length" (pad = eos, the usual collator); on a
GPU in bf16 with bf16 weights. loraflow: `loraflow.training.train_adapter` (packed rows with
per-document position ids; micro-batch 4 x grad-accum 4 on a CPU (the recipe's own, as the seed's),
16 x 1 on a GPU: the same 16 rows of max_length per optimizer step; precision auto).

Both run on the same DialoGPT-architecture model (GPT2Config with random weights at the real
small / medium shapes, the real GPT-2 tokenizer), the same real IMDB review texts, the same number
of optimizer steps and the same effective batch.

A noisy machine decides the ratio of two runs made one after the other, so the stacks run as two
live processes taking turns: each waits at the end of every optimizer step (or every
--steps-per-turn steps) until the other has done its turn, and times only its own steps. Each
process measures its own peak memory (RSS on a CPU, torch's peak allocated bytes on a GPU). The
first turn is not timed (one-off costs). The report gives, per stack, the median time per step and
its spread over the timed turns ((max - min) / median), and the ratio of useful tokens/s turn by
turn; a run whose spread exceeds --disturbed (default 20%) is flagged: compare only quiet runs.

    .venv/bin/python bench/train_throughput.py --arch small --max-length 512 --steps 5
    .venv/bin/python bench/train_throughput.py --device cuda --arch medium --steps 60 --steps-per-turn 10

Model FLOPs per useful token (forward plus the activation gradients; the frozen weights get no
weight gradients, LoRA's own FLOPs are < 1% and left out):
    4 * N + 12 * n_layer * d_model * A
N = n_layer * 12 * d_model^2 + vocab * d_model (the matrix-multiply parameters: attention, MLP, LM
head) and A = the mean number of keys a useful token attends to (its position in its document + 1),
measured from each stack's own rows. MFU = useful tokens/s * FLOPs per token / the GPU's dense bf16
peak (--peak-tflops; H100/H200 SXM: 989 TFLOP/s). On a CPU the rate is set against a matrix product
in the precision loraflow trained in, measured in the same run before and after the steps; fp32 and
bf16 are both measured, so a CPU with native bf16 shows its gain and one without shows the trap.
Each loraflow turn is also set against the product measured just before and just after it (the
workers idle), and the median of those turn-by-turn ratios is reported: a CPU's own speed moves
within a run (a shared host), and a best-of-two measure taken minutes away from the steps does not
follow it; a run where the product moved over 10% between before and after is flagged UNSTEADY.

--precision sets loraflow's training.precision (default auto: bf16 on a CPU with native bf16, else
fp32). --compare-precision adds a loraflow stack in the other one (fp32 when loraflow's resolves to
bf16, bf16 when it resolves to fp32: emulated, so only a tiny model finishes on such a CPU) and
reports their eval losses after the same steps side by side.

    .venv/bin/python bench/train_throughput.py --arch tiny --max-length 128 --steps 3 --compare-precision
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EFFECTIVE_ROWS = 16  # the seed's 4 x 4
EVAL_DOCS = 24
RECIPE_STEPS = 1000
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}


@functools.lru_cache(maxsize=1)
def review_texts() -> tuple[list[str], list[str]]:
    """Read once, from the wheel cache of the LORAFLOW_HOME the process started with (a worker
    points LORAFLOW_HOME at a scratch directory afterwards, which has no wheels to read)."""
    from loraflow.demo.assets import imdb_sample_rows

    clean = lambda t: t.replace("<br />", "\n")  # noqa: E731  (same cleaning for both stacks)
    return ([clean(r["text"]) for r in imdb_sample_rows("train")],
            [clean(r["text"]) for r in imdb_sample_rows("test")][:EVAL_DOCS])


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def eval_loss(model, tokenizer, texts: list[str], max_length: int) -> float:
    """Token-weighted loss over whole documents (EOS included), one document per forward:
    the same measure for both stacks, in the precision the model's base is held in (autocast)."""
    import torch

    from loraflow.modeling import autocast, precision_of

    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad(), autocast(precision_of(model)):
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length - 1)["input_ids"] + [tokenizer.eos_token_id]
            x = torch.tensor([ids], device=device)
            logits = model(input_ids=x).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
            total += loss.item()
            count += len(ids) - 1
    return total / count


def eval_adapter(model_dir: Path, adapter_dir: Path, device: str, max_length: int, dtype: str = "float32") -> float:
    """Every stack's adapter on the same fp32 base, the seed notebook's loading snippet; `dtype`: the
    base in another dtype (a bf16 run's own evaluation: bf16 base, fp32 adapter, autocast)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(base, adapter_dir).to(device)
    return eval_loss(model, AutoTokenizer.from_pretrained(model_dir), review_texts()[1], max_length)


def flops_per_token(model_dir: Path, mean_keys: float) -> float:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    n = c.n_layer * 12 * c.n_embd**2 + c.vocab_size * c.n_embd
    return 4 * n + 12 * c.n_layer * c.n_embd * mean_keys


class TurnTaker:
    """TrainerCallback: waits for "go" on stdin before its first step and after every
    `per_turn` optimizer steps, and reports the seconds its own turn took on stdout."""

    def __init__(self, device: str, per_turn: int):
        from transformers import TrainerCallback

        taker = self

        def now() -> float:
            if device == "cuda":
                import torch

                torch.cuda.synchronize()  # the turn's GPU work belongs to the turn
            return time.perf_counter()

        def wait_turn(step: int) -> None:
            if step == 0 and not taker.ready:
                taker.ready = True
                print("READY", flush=True)  # loaded and about to train: the parent may measure now
            line = sys.stdin.readline()
            if line.strip() != "go":
                raise SystemExit(f"turn-taking: expected 'go', got {line!r}")
            taker.t0, taker.step0 = now(), step

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                wait_turn(state.global_step)

            def on_step_end(self, args, state, control, **kw):
                if state.global_step % per_turn == 0 or state.global_step >= state.max_steps:
                    dt = now() - taker.t0
                    print(f"TURN {state.global_step} {dt / (state.global_step - taker.step0):.6f}", flush=True)
                    wait_turn(state.global_step)

        self.callback = _CB()
        self.t0, self.step0, self.ready = 0.0, 0, False


def run_seed(model_dir: Path, max_length: int, steps: int, device: str, per_turn: int, micro_batch: int = 4) -> dict:
    """The seed notebook's stack, verbatim in spirit: padding='max_length', pad = eos; bf16 on a GPU.
    `micro_batch` 1 (x16 accumulation) separates what packing buys from what a smaller micro-batch
    buys: the same effective batch, a quarter of the activations."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments)

    gpu = device == "cuda"
    train_texts, _ = review_texts()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    # bf16 on a GPU as the seed does; fp32 on this CPU, where bf16 is a trap (shared/ASSETS.md).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                                             task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj"],
                                             fan_in_fan_out=True))
    ds = Dataset.from_dict({"text": train_texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, padding="max_length", max_length=max_length),
        batched=True, remove_columns=["text"])
    masks = ds["attention_mask"]
    useful = sum(sum(m) for m in masks) / len(ds)
    mean_keys = sum(n * (n + 1) / 2 for n in (sum(m) for m in masks)) / sum(sum(m) for m in masks)
    turns = TurnTaker(device, per_turn)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=micro_batch,
                                 gradient_accumulation_steps=EFFECTIVE_ROWS // micro_batch,
                                 max_steps=steps, warmup_steps=0, learning_rate=2e-4,
                                 logging_steps=25 if gpu else 1, save_strategy="no", report_to=[],
                                 disable_tqdm=True, use_cpu=not gpu, bf16=gpu, seed=42)
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[turns.callback],
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
        trainer.train()
        peak = peak_memory_gb(device)
        model.save_pretrained(Path(out) / "adapter")
        del trainer, model
        loss = eval_adapter(model_dir, Path(out) / "adapter", device, max_length)
    return {"useful_tokens_per_step": EFFECTIVE_ROWS * useful, "padding": 1 - useful / max_length,
            "flops_per_token": flops_per_token(model_dir, mean_keys), "eval_loss": loss, "peak_memory_gb": peak,
            "precision": "bf16" if gpu else "fp32"}


def loraflow_settings(model_dir: Path, data_dir: Path, out: Path, max_length: int, steps: int, micro_batch: int,
                      logging_steps: int, precision: str = "auto", extra: tuple[str, ...] = ()):
    from loraflow.settings import load_settings

    return load_settings(overrides=[
        f"model.name_or_path={model_dir}", f"data.source={data_dir}", f"data.max_length={max_length}",
        "data.packing=true", f"training.per_device_train_batch_size={micro_batch}",
        f"training.gradient_accumulation_steps={EFFECTIVE_ROWS // micro_batch}", f"training.max_steps={steps}",
        # The recipe as it is (warmup 100, checkpoints every 500 steps); short runs skip both.
        *([] if steps == RECIPE_STEPS else ["training.warmup_steps=0", "training.save_strategy=no"]),
        f"training.logging_steps={logging_steps}", f"training.output_dir={out}", f"training.precision={precision}",
        *extra,
    ])


def write_reviews(data_dir: Path, train_texts: list[str] | None = None, eval_texts: list[str] | None = None) -> Path:
    """The reviews as a train/test jsonl folder loraflow reads (default: the real reviews)."""
    if train_texts is None or eval_texts is None:
        train_texts, eval_texts = review_texts()
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, texts in (("train", train_texts), ("test", eval_texts)):
        with open(data_dir / f"{split}.jsonl", "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
    return data_dir


def run_loraflow(model_dir: Path, max_length: int, steps: int, device: str, per_turn: int, micro_batch: int,
                 precision: str = "auto", extra: tuple[str, ...] = ()) -> dict:
    from transformers import AutoTokenizer

    from loraflow.data import prepare_dataset
    from loraflow.training import train_adapter

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_reviews(Path(tmp) / "data")
        os.environ["LORAFLOW_HOME"] = str(Path(tmp) / "home")  # a fresh prepared-data cache
        settings = loraflow_settings(model_dir, data_dir, Path(tmp) / "out", max_length,
                                     steps, micro_batch, 25 if device == "cuda" else 1, precision, extra)
        prepared = prepare_dataset(settings, AutoTokenizer.from_pretrained(model_dir))
        rows = prepared.train
        useful = sum(len(r) for r in rows["input_ids"]) / len(rows)
        positions = [p for r in rows["position_ids"] for p in r]
        mean_keys = sum(p + 1 for p in positions) / len(positions)
        turns = TurnTaker(device, per_turn)
        result = train_adapter(settings, prepared=prepared, callbacks=[turns.callback])
        peak = peak_memory_gb(device)
        loss = eval_adapter(model_dir, result.adapter_dir, device, max_length)
        own = loss if result.precision == "fp32" else eval_adapter(
            model_dir, result.adapter_dir, device, max_length, dtype=modeling_dtype(settings, device))
    return {"useful_tokens_per_step": EFFECTIVE_ROWS * useful, "padding": 1 - useful / max_length,
            "flops_per_token": flops_per_token(model_dir, mean_keys), "eval_loss": loss, "peak_memory_gb": peak,
            "precision": result.precision, "own_eval_loss": own}


def modeling_dtype(settings, device: str) -> str:
    from loraflow.modeling import resolve_precision

    return resolve_precision(settings.training, settings.model, device=device).model_dtype


def run_recipe(model_dir: Path, max_length: int, micro_batch: int) -> dict:
    """The whole seed recipe (1000 steps, warmup 100, logging 25) through loraflow, from a cold
    process: the parent times it from spawn to exit, imports and model load included."""
    from loraflow.training import train_adapter

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_reviews(Path(tmp) / "data")
        os.environ["LORAFLOW_HOME"] = str(Path(tmp) / "home")
        settings = loraflow_settings(model_dir, data_dir, Path(tmp) / "out", max_length, RECIPE_STEPS, micro_batch, 25)
        result = train_adapter(settings)
    return {"final_loss": result.final_loss, "train_time_s": result.train_time_s, "steps": result.global_step}


def run_eval_speed(model_dir: Path, max_length: int, rounds: int = 3) -> dict:
    """loraflow.evaluation's scoring (token_loss over the eval split, the collator and batch size
    evaluation uses) and its greedy generations (the 6 fixed prompts), base + a fresh LoRA adapter
    held in fp32 and in bf16 in the same process, passes alternating; the first round is a warm-up.
    Returns the median tokens/s per precision."""
    from transformers import AutoTokenizer

    from loraflow import evaluation, modeling
    from loraflow.data import PackedCollator, prepare_dataset

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LORAFLOW_HOME"] = str(Path(tmp) / "home")
        models, settings = {}, None
        for name in ("fp32", "bf16"):
            settings = loraflow_settings(model_dir, write_reviews(Path(tmp) / "data"), Path(tmp) / "out", max_length,
                                         1, 1, 1, name)
            precision = modeling.resolve_precision(settings.training, settings.model)
            models[name] = modeling.apply_lora(modeling.load_base_model(settings, precision), settings.lora).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prepared = prepare_dataset(settings, tokenizer)
        collator = PackedCollator(modeling.pad_token_id(tokenizer))
        batch = settings.training.per_device_train_batch_size
        scoring, generating = {n: [] for n in models}, {n: [] for n in models}
        losses = {}
        for r in range(rounds):
            for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
                t = time.perf_counter()
                loss, n_tokens = evaluation.token_loss(models[name], prepared.eval, collator, batch_size=batch,
                                                       device="cpu")
                t_score = time.perf_counter() - t
                t = time.perf_counter()
                samples = evaluation.generate_samples(models[name], tokenizer, device="cpu", seed=42)
                t_gen = time.perf_counter() - t
                if r:
                    scoring[name].append(n_tokens / t_score)
                    generating[name].append(sum(len(s["ids"]) for s in samples) / t_gen)
                losses[name] = loss
                print(f"eval round {r + 1}/{rounds} {name}: scoring {n_tokens / t_score:.0f} tok/s, "
                      f"generation {sum(len(s['ids']) for s in samples) / t_gen:.1f} tok/s", file=sys.stderr, flush=True)
    return {n: {"scoring_tokens_per_s": statistics.median(scoring[n]), "scoring_tokens": n_tokens,
                "generation_tokens_per_s": statistics.median(generating[n]), "eval_loss": losses[n],
                "rounds": rounds - 1} for n in models}


def worker(args) -> None:
    model_dir = Path(args.model_dir)
    if args.worker == "eval-speed":
        result = run_eval_speed(model_dir, args.max_length)
    elif args.worker == "recipe":
        result = run_recipe(model_dir, args.max_length, args.micro_batch)
    elif args.worker == "loraflow":
        result = run_loraflow(model_dir, args.max_length, args.steps, args.device, args.steps_per_turn,
                              args.micro_batch, args.precision, tuple(args.set))
    else:
        result = run_seed(model_dir, args.max_length, args.steps, args.device, args.steps_per_turn,
                          micro_batch=4 if args.worker == "seed" else 1)
    print("RESULT " + json.dumps(result), flush=True)


class Live:
    """One stack's worker process, driven turn by turn over its stdin/stdout."""

    def __init__(self, name: str, which: str, common: list[str], log_dir: Path, micro_batch: int,
                 which_worker: str | None = None):
        self.name = name
        self.log_path = log_dir / f"{which}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", which_worker or which, "--micro-batch", str(micro_batch), *common],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        self.turns: list[float] = []
        self.gemm: list[float] = []  # cpu, loraflow stacks: the product's rate around each turn
        self.result: dict = {}

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        self.proc.wait()
        self.log.flush()
        tail = self.log_path.read_text()[-4000:]
        raise SystemExit(f"{self.name} worker ended ({self.proc.returncode}) without {prefix.strip()}:\n{tail}")

    def wait_ready(self) -> None:
        self._read("READY")

    def turn(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        seconds = float(self._read("TURN ").split()[1])
        self.turns.append(seconds)
        return seconds

    def release(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> dict:
        self.result = json.loads(self._read("RESULT "))
        self.proc.wait()
        return self.result


def gemm_gflops(device: str, precision: str = "bf16") -> float:
    """A matrix product at DialoGPT-medium's MLP shape (512 rows on a CPU, 8192 on a GPU) in `precision`:
    the best of 3 to 5 timed windows after a warm-up (about 2 s in all). A CPU emulating bf16 runs at
    0.1-1.5 GFLOP/s (tens of seconds for one such product): there 64 rows, one product, is the measure."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    b = torch.randn(1024, 4096, dtype=dtype, device=device)
    a = torch.randn(64, 1024, dtype=dtype, device=device)
    t = time.perf_counter()
    a @ b
    if device == "cuda" or time.perf_counter() - t < 0.1:  # else emulated (<5 GFLOP/s): 64 rows say it in seconds
        a = torch.randn(8192 if device == "cuda" else 512, 1024, dtype=dtype, device=device)

    def timed(reps: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps

    first = timed(1)  # the warm-up; where one product takes over a second (emulated bf16), the measure
    best, windows, t0 = first, 0, time.perf_counter()
    reps = max(1, min(10, int(0.4 / first)))
    while first < 1.0 and (windows < 3 or (time.perf_counter() - t0 < 2.0 and windows < 5)):
        best = min(best, timed(reps))
        windows += 1
    return 2 * a.shape[0] * 1024 * 4096 / best / 1e9


def gemm_rates(device: str) -> dict[str, float]:
    """GFLOP/s of the matrix product per precision: bf16 and fp32 on a CPU (native bf16 or not shows
    here), bf16 on a GPU (what MFU is counted against)."""
    return {p: gemm_gflops(device, p) for p in (("bf16",) if device == "cuda" else ("fp32", "bf16"))}


def gemm_rates_names(device: str) -> tuple[str, ...]:
    return ("bf16",) if device == "cuda" else ("fp32", "bf16")


def loraflow_precision(args) -> str:
    """What loraflow's training.precision resolves to on this machine (said in one line, as a run says it)."""
    from loraflow.modeling import resolve_precision
    from loraflow.settings import load_settings

    settings = load_settings(overrides=[f"training.precision={args.precision}"])
    return resolve_precision(settings.training, settings.model, device=args.device).name


def spread(xs: list[float]) -> float:
    return (max(xs) - min(xs)) / statistics.median(xs) if len(xs) > 1 else 0.0


def compare(arch: str, model_dir: Path, args, log_dir: Path) -> list[str]:
    common = ["--model-dir", str(model_dir), "--max-length", str(args.max_length), "--steps", str(args.steps),
              "--device", args.device, "--steps-per-turn", str(args.steps_per_turn),
              *(f"--set={o}" for o in args.set)]
    mb = args.micro_batch or (16 if args.device == "cuda" else 4)
    stacks = [Live("seed", "seed", common, log_dir, 4),
              Live("loraflow", "loraflow", [*common, "--precision", args.precision], log_dir, mb)]
    if args.seed_mb1:
        stacks.append(Live("seed 1x16", "seed-mb1", common, log_dir, 1))
    other = None
    if args.compare_precision:
        other = "fp32" if loraflow_precision(args) != "fp32" else "bf16"
        stacks.append(Live(f"lf {other}", f"loraflow-{other}", [*common, "--precision", other], log_dir, mb,
                           which_worker="loraflow"))
    n_turns = math.ceil(args.steps / args.steps_per_turn)
    for s in stacks:  # the first rates are measured with no stack still loading (it would take the cores)
        s.wait_ready()
    print(f"   measuring matrix-product rates ({', '.join(gemm_rates_names(args.device))})", flush=True)
    gemm_before = gemm_rates(args.device)
    # On a CPU the machine's own rate moves within a run (this EPYC's bf16 product: 913 before and
    # 760 GFLOP/s after the steps of one run): each loraflow turn is also set against the product
    # in its precision measured just before and just after it (all workers idle), turn by turn.
    around = {}
    if args.device == "cpu":
        around = {stacks[1].name: loraflow_precision(args), **({stacks[-1].name: other} if other else {})}
    try:
        for t in range(n_turns):
            order = stacks if t % 2 == 0 else stacks[::-1]  # neither always goes first
            line = "   turn %d/%d:" % (t + 1, n_turns)
            for s in order:
                before = gemm_gflops(args.device, around[s.name]) if s.name in around else None
                line += f"  {s.name} {s.turn():.2f} s/step"
                if before is not None:
                    s.gemm.append((before + gemm_gflops(args.device, around[s.name])) / 2)
            print(line, flush=True)
        print("   measuring matrix-product rates again, then each stack evaluates its adapter", flush=True)
        gemm_after = gemm_rates(args.device)
        for s in stacks:
            s.release()
        for s in stacks:
            s.finish()
    finally:
        for s in stacks:
            if s.proc.poll() is None:
                s.proc.kill()
    recipe = None
    if args.device == "cuda" and args.recipe:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--worker", "recipe", "--micro-batch", str(mb), *common],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode == 0:
            recipe = {"wall_s": wall, **json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])}
        else:
            sys.stderr.write(proc.stderr[-3000:])

    eval_speed = None
    if args.device == "cpu" and args.eval_speed:
        # After the stacks, alone on the machine: fp32 and bf16 alternate inside one process.
        print("   evaluation speed: loraflow.evaluation's scoring and generation, fp32 and bf16 alternating",
              flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", "eval-speed", *common], capture_output=True,
                              text=True)
        if proc.returncode == 0:
            eval_speed = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
        else:
            sys.stderr.write(proc.stderr[-3000:])

    peak = args.peak_tflops
    if peak is None and args.device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    label = f"DialoGPT-{arch}/{args.max_length}"
    out = []
    head = (f"{'model':<20}{'stack':<11}{'s/step':>8}{'spread':>8}{'useful tok/s':>14}{'padding':>9}"
            f"{'GFLOP/tok':>10}{'TFLOP/s':>9}{'MFU':>7}{'peak mem GB':>13}{'eval loss':>11}")
    out += [head, "-" * len(head)]
    for s in stacks:
        timed = s.turns[1:] or s.turns
        s.sps = statistics.median(timed)
        s.spread = spread(timed)
        r = s.result
        s.tps = r["useful_tokens_per_step"] / s.sps
        tflops = s.tps * r["flops_per_token"] / 1e12
        mfu = f"{tflops / peak:.0%}" if peak else "n/a"
        out.append(f"{label:<20}{s.name:<11}{s.sps:>8.2f}{s.spread:>8.0%}{s.tps:>14.1f}{r['padding']:>9.0%}"
                   f"{r['flops_per_token'] / 1e9:>10.3f}{tflops:>9.4f}{mfu:>7}{r['peak_memory_gb']:>13.2f}"
                   f"{r['eval_loss']:>11.3f}")
    seed, ours = stacks[0], stacks[1]
    ratios = [(b_s / b_o) * (ours.result["useful_tokens_per_step"] / seed.result["useful_tokens_per_step"])
              for b_s, b_o in zip(seed.turns[1:] or seed.turns, ours.turns[1:] or ours.turns)]
    out.append(f"{'':<20}loraflow / seed, turn by turn: useful tokens/s x{statistics.median(ratios):.2f} median "
               f"(x{min(ratios):.2f} .. x{max(ratios):.2f} over {len(ratios)} turns); peak memory "
               f"x{ours.result['peak_memory_gb'] / seed.result['peak_memory_gb']:.2f}; eval loss "
               f"{ours.result['eval_loss'] - seed.result['eval_loss']:+.3f}")
    if args.device == "cpu":
        def best_rate(p: str) -> float:
            return max(gemm_before[p], gemm_after[p])

        rates = ", ".join(f"{p} {gemm_before[p]:.1f} / {gemm_after[p]:.1f}" for p in gemm_before)
        out.append(f"{'':<20}matrix products in this run (GFLOP/s before / after the steps): {rates}; "
                   f"bf16 / fp32 x{best_rate('bf16') / best_rate('fp32'):.3g}")
        for s in stacks[1:]:
            if "precision" not in s.result or s.name.startswith("seed"):
                continue
            used = s.result["precision"]
            rate = s.tps * s.result["flops_per_token"] / 1e9
            best = best_rate(used)
            out.append(f"{'':<20}{s.name} trained in {used}: model FLOP rate {rate:.1f} GFLOP/s = {rate / best:.0%} of "
                       f"the faster {used} matrix product")
            if s.gemm:
                per_turn = [s.result["useful_tokens_per_step"] * s.result["flops_per_token"] / 1e9 / sec / g
                            for sec, g in zip(s.turns[1:] or s.turns, s.gemm[1:] or s.gemm)]
                out.append(f"{'':<20}{'':<{len(s.name)}} turn by turn, against the {used} product measured around "
                           f"each turn ({min(s.gemm[1:] or s.gemm):.0f}..{max(s.gemm[1:] or s.gemm):.0f} GFLOP/s): "
                           f"{statistics.median(per_turn):.0%} median ({min(per_turn):.0%} .. {max(per_turn):.0%} "
                           f"over {len(per_turn)} turns)")
        moved = {p: abs(gemm_after[p] - gemm_before[p]) / max(gemm_before[p], gemm_after[p]) for p in gemm_before}
        if max(moved.values()) > 0.10:
            p = max(moved, key=moved.get)
            out.append(f"{'':<20}UNSTEADY: the {p} matrix product moved {moved[p]:.0%} between before and after: the "
                       "machine's own speed changed during the run; read the turn-by-turn rate")
    else:
        out.append(f"{'':<20}MFU against {peak if peak else '?'} TFLOP/s dense bf16 "
                   f"({'--peak-tflops' if args.peak_tflops else 'by device name'}); bf16 matrix product measured "
                   f"{gemm_before['bf16'] / 1e3:.0f} / {gemm_after['bf16'] / 1e3:.0f} TFLOP/s before / after")
    if other is not None:
        a, b = stacks[1], stacks[-1]
        fp32_run, half_run = (a, b) if a.result["precision"] == "fp32" else (b, a)
        diff = half_run.result["eval_loss"] - fp32_run.result["eval_loss"]
        own = half_run.result.get("own_eval_loss", half_run.result["eval_loss"]) - fp32_run.result["eval_loss"]
        out.append(f"{'':<20}{half_run.result['precision']} vs fp32 after the same {args.steps} steps: eval loss "
                   f"{half_run.result['eval_loss']:.4f} vs {fp32_run.result['eval_loss']:.4f} ({diff:+.4f} nats, both "
                   f"evaluated in fp32); {half_run.result['own_eval_loss']:.4f} evaluated in "
                   f"{half_run.result['precision']} ({own:+.4f}); "
                   f"{'within' if max(abs(diff), abs(own)) <= 0.02 else 'OUTSIDE'} 0.02 nats")
    if eval_speed:
        f, b = eval_speed["fp32"], eval_speed["bf16"]
        out.append(f"{'':<20}evaluation (loraflow.evaluation, {f['scoring_tokens']} eval tokens, median of "
                   f"{f['rounds']} alternating rounds): scoring {b['scoring_tokens_per_s']:.0f} tok/s in bf16 vs "
                   f"{f['scoring_tokens_per_s']:.0f} in fp32 (x{b['scoring_tokens_per_s'] / f['scoring_tokens_per_s']:.2f}); "
                   f"greedy generation {b['generation_tokens_per_s']:.1f} vs {f['generation_tokens_per_s']:.1f} tok/s "
                   f"(x{b['generation_tokens_per_s'] / f['generation_tokens_per_s']:.2f}); eval loss "
                   f"{b['eval_loss']:.4f} vs {f['eval_loss']:.4f}")
    if recipe:
        out.append(f"{'':<20}the 1000-step recipe through loraflow, cold process to adapter written: "
                   f"{recipe['wall_s']:.1f} s wall ({recipe['train_time_s']:.1f} s training), final loss "
                   f"{recipe['final_loss']:.3f}")
    worst = max(stacks, key=lambda s: s.spread)
    if worst.spread > args.disturbed:
        out.append(f"{'':<20}DISTURBED: {worst.name}'s step time spread {worst.spread:.0%} over the timed turns "
                   f"exceeds {args.disturbed:.0%}: something else ran on this machine; rerun before quoting")
    else:
        out.append(f"{'':<20}quiet run: every stack's step time spread <= {args.disturbed:.0%}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small,medium", help="comma list of: tiny, small, medium")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per stack (the first turn is not timed)")
    parser.add_argument("--steps-per-turn", type=int, default=1, help="optimizer steps a stack runs per turn")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--micro-batch", type=int, default=0,
                        help=f"loraflow's micro-batch (grad-accum = {EFFECTIVE_ROWS} / it); 0: 4 on cpu (the recipe's), "
                             "16 on cuda")
    parser.add_argument("--seed-mb1", action="store_true",
                        help="a third stack in the rotation: the seed's at micro-batch 1 x 16 (separates packing's gain)")
    parser.add_argument("--disturbed", type=float, default=0.20, help="flag a run whose step-time spread exceeds this")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="loraflow's training.precision (auto: bf16 on a CPU with native bf16 or a GPU with bf16)")
    parser.add_argument("--compare-precision", action="store_true",
                        help="a loraflow stack in the other precision too (fp32 vs bf16), eval losses side by side")
    parser.add_argument("--no-recipe", dest="recipe", action="store_false",
                        help="cuda: skip timing the whole 1000-step recipe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a loraflow settings override for its stacks (repeatable), e.g. training.fused_loss=false")
    parser.add_argument("--no-eval-speed", dest="eval_speed", action="store_false",
                        help="cpu: skip timing loraflow.evaluation's scoring and generation in fp32 vs bf16")
    parser.add_argument("--worker", choices=["seed", "seed-mb1", "loraflow", "recipe", "eval-speed"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"train_throughput: --device cuda but no CUDA device is visible (torch {torch.__version__})")
    if args.micro_batch and EFFECTIVE_ROWS % args.micro_batch:
        raise SystemExit(f"--micro-batch must divide {EFFECTIVE_ROWS}, got {args.micro_batch}")

    from loraflow.demo.tiny_models import make_gpt2_model_dir

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch.split(","):
            model_dir = make_gpt2_model_dir(Path(tmp) / arch, arch)
            print(f"== DialoGPT-{arch} arch, max_length {args.max_length}, {args.steps} optimizer steps x "
                  f"{EFFECTIVE_ROWS} rows, {args.device}, stacks alternating every {args.steps_per_turn} step(s)",
                  flush=True)
            lines += compare(arch, model_dir, args, Path(tmp))
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
