"""Hot swaps under load: `loraflow serve` on the demo model, N concurrent clients for a fixed time,
the alias moved K times between two published versions.

    .venv/bin/python bench/serve_swap.py [--clients 4] [--duration 90] [--moves 4] [--poll-interval 2]
    .venv/bin/python bench/serve_swap.py --tiny      # a 2-layer random GPT-2 instead of SmolLM2-135M

The service runs as its own process (`loraflow serve NAME@champion`) against a local rclone S3
server; the clients are threads here. Two adapters (LoRA r=8 on q/v projections, small random
weights, so both behave like the base model but differ) are published with the perplexity they
score on the canary's built-in documents as their recorded `adapter_ppl`. After a warm-up the
alias alternates between them every duration / (moves + 1) seconds.

Printed: requests served and failed (anything but 200, including dropped connections), latency
p50/p95 in steady state and during swaps (a request is "during a swap" when it overlaps the time
from an alias move to the first response from the new version), and move-to-first-response-from-
the-new-version p50/p95. Targets: 0 failed; move-to-served <= poll interval + 10 s; p95 during
swaps <= 1.5x steady state.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = ["The movie was", "I expected more from this film because", "The best scene in the film is",
           "My honest review of the sequel:"]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def make_adapter(model_dir: Path, dest: Path, *, seed: int, tiny: bool) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    targets = ["c_attn"] if tiny else ["q_proj", "v_proj"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-3)  # a small step away from the base, different per seed
    model.save_pretrained(dest)
    return dest


def canary_ppl(model_dir: Path, adapter_dir: Path) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.serving.canary import DEFAULT_DOCUMENTS

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      str(adapter_dir)).eval()
    nll = count = 0
    with torch.no_grad():
        for doc in DEFAULT_DOCUMENTS:
            ids = tok(doc, return_tensors="pt")["input_ids"]
            nll += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random GPT-2 instead of SmolLM2-135M")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of load after the warm-up")
    parser.add_argument("--moves", type=int, default=4)
    parser.add_argument("--poll-interval", type=float, default=2.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=10.0)
    args = parser.parse_args()

    import httpx

    from loraflow.demo.s3server import LocalS3Server, free_port
    from loraflow.registry import publish_adapter, set_alias
    from loraflow.settings import load_settings

    with tempfile.TemporaryDirectory(prefix="loraflow-bench-serve-") as tmp:
        tmp = Path(tmp)
        if args.tiny:
            from loraflow.demo.tiny_models import make_gpt2_model_dir

            model_dir, label = make_gpt2_model_dir(tmp / "tiny-gpt2"), "tiny GPT-2 (2 layers, random)"
        else:
            from loraflow.demo.assets import demo_assets

            model_dir, label = demo_assets().model_dir, "SmolLM2-135M-Instruct (fp32)"
        adapters = [make_adapter(model_dir, tmp / f"adapter-{i}", seed=i, tiny=args.tiny) for i in (1, 2)]
        with LocalS3Server(tmp / "s3", "127.0.0.1:0", "bench-access", "bench-secret-local",
                           buckets=("bench",)) as server:
            os.environ.update(server.env())
            settings = load_settings(storage=server.storage_overrides("bench"))
            versions = [publish_adapter(settings, a, name="bench", aliases=["champion"] if i == 0 else [],
                                        evaluation={"adapter_ppl": canary_ppl(model_dir, a)}).version
                        for i, a in enumerate(adapters)]
            port = free_port()
            env = {**os.environ, "LORAFLOW_HOME": str(tmp / "home"), "TOKENIZERS_PARALLELISM": "false",
                   **{f"LORAFLOW_STORAGE__{k.upper()}": str(v) for k, v in server.storage_overrides("bench").items()
                      if v is not None}}
            log_path = tmp / "serve.log"
            with open(log_path, "w") as log:
                proc = subprocess.Popen([sys.executable, "-m", "loraflow.cli", "serve", "bench@champion",
                                         "--port", str(port), "--poll-interval", str(args.poll_interval)],
                                        env=env, stdout=log, stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 300
                while True:
                    try:
                        if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if proc.poll() is not None or time.monotonic() > deadline:
                        print(log_path.read_text()[-3000:], file=sys.stderr)
                        return 1
                    time.sleep(0.5)
                results = run_load(url, versions, settings, set_alias, args)
                results["adapter"] = httpx.get(f"{url}/v1/adapter", timeout=30).json()
            finally:
                proc.terminate()
                proc.wait(30)
    report(results, versions, label, args)
    return 0 if results["failed"] == 0 else 1


def run_load(url, versions, settings, set_alias, args) -> dict:
    import httpx

    records: list[tuple[float, float, int, str | None]] = []  # start, end, status, model
    lock = threading.Lock()
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            n = 0
            while not stop.is_set():
                body = {"prompt": PROMPTS[(i + n) % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": 0}
                n += 1
                t0 = time.monotonic()
                try:
                    r = http.post("/v1/completions", json=body)
                    status, model = r.status_code, (r.json().get("model") if r.status_code == 200 else None)
                except httpx.HTTPError:
                    status, model = 0, None
                with lock:
                    records.append((t0, time.monotonic(), status, model))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(args.warmup)
    start = time.monotonic()
    step = args.duration / (args.moves + 1)
    moves: list[tuple[float, str]] = []
    for k in range(args.moves):
        time.sleep(max(0.0, start + step * (k + 1) - time.monotonic()))
        target = versions[(k + 1) % 2]
        set_alias(settings, "bench", "champion", target)
        # Timed from when the move is done (set_alias returned), not from when it began: on a
        # server without conditional writes the move itself holds a lock for ~1 s.
        moves.append((time.monotonic(), f"bench=={target}"))
    time.sleep(max(0.0, start + args.duration - time.monotonic()))
    stop.set()
    for t in threads:
        t.join(180)

    measured = [r for r in records if r[0] >= start]
    served_at = []
    windows = []
    for t_move, model in moves:
        firsts = [end for s, end, status, m in records if m == model and s >= t_move and status == 200]
        first = min(firsts) if firsts else math.inf
        served_at.append(first - t_move)
        windows.append((t_move, first))
    during = [e - s for s, e, st, _ in measured if st == 200 and any(s < w1 and e > w0 for w0, w1 in windows)]
    steady = [e - s for s, e, st, _ in measured if st == 200 and not any(s < w1 and e > w0 for w0, w1 in windows)]
    return {"served": sum(1 for r in measured if r[2] == 200), "failed": sum(1 for r in measured if r[2] != 200),
            "steady": steady, "during": during, "served_at": served_at, "moves": len(moves)}


def report(results: dict, versions: list[str], label: str, args) -> None:
    steady, during, served_at = results["steady"], results["during"], results["served_at"]
    print(f"model: {label}; {args.clients} clients, {args.duration:.0f} s after a {args.warmup:.0f} s warm-up, "
          f"max_tokens {args.max_tokens}, greedy; alias moved {results['moves']} times between 2 versions; "
          f"poll interval {args.poll_interval:g} s")
    print(f"requests served:  {results['served']}")
    print(f"requests failed:  {results['failed']}")
    print(f"latency steady:   p50 {pct(steady, 50):.3f} s  p95 {pct(steady, 95):.3f} s  (n={len(steady)})")
    ratio = pct(during, 95) / pct(steady, 95) if steady and during else float("nan")
    print(f"latency in swaps: p50 {pct(during, 50):.3f} s  p95 {pct(during, 95):.3f} s  (n={len(during)}; "
          f"p95 {ratio:.2f}x steady)")
    print(f"move -> first response from the new version: p50 {pct(served_at, 50):.2f} s  "
          f"p95 {pct(served_at, 95):.2f} s  (max {max(served_at) if served_at else float('nan'):.2f} s; "
          f"target <= {args.poll_interval + 10:g} s)")
    if served_at:
        print(f"  per move: {', '.join(f'{s:.2f}' for s in served_at)} s; mean {statistics.mean(served_at):.2f} s")
    info = results.get("adapter") or {}
    if info.get("last_swap"):
        print(f"last swap inside the service (load beside the current + canary + switch + unload old): {info['last_swap']['seconds']:.2f} s, "
              f"of which canary {info['last_canary']['seconds']:.2f} s; swaps done {info['swaps']}, "
              f"loaded versions now {len(info['loaded_versions'])}")


if __name__ == "__main__":
    sys.exit(main())
