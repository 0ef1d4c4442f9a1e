"""Many adapters under load: `loraflow serve` with K adapters of one base, C concurrent clients,
fixed prompt and output lengths; generated tokens/s and latency p50/p95 per (K, C).

    .venv/bin/python bench/serve_load.py --systems one-at-a-time,batched,transformers-serve --adapters 1,4,16 \
        --clients 1,4,16 --duration 20 --warmup 3 --move-aliases   # one-model systems: at K=1 only
    mkdir -p /tmp/prev && git archive 4bebce3~1 src | tar -x -C /tmp/prev   # the service before batching
    .venv/bin/python bench/serve_load.py --systems one-at-a-time,batched,previous --previous-src /tmp/prev/src --adapters 1
    .venv/bin/python bench/serve_load.py --systems transformers-serve --adapters 1
    .venv/bin/python bench/serve_load.py --systems one-at-a-time,batched --adapters 4 --move-aliases

The systems of one run are all started, then measured one after the other for each (K, C), so
that the machine's drift hits them alike. Systems: `batched` is `loraflow serve` as it ships (one generation loop, every adapter in one
batch, `--max-batch 16`); `one-at-a-time` is the same server with `--max-batch 1`, which admits a
request only when the previous one has finished (the behaviour of the service before batching);
`batched-fp32` is `batched` with `LORAFLOW_CPU_BF16=0` (an fp32 base where the CPU would give bf16);
`previous` runs the service of an older checkout (`git archive <commit> src | tar -x -C DIR`, then
`--previous-src DIR/src`), which hosts one adapter; `transformers-serve` is
`transformers serve --continuous-batching` on `loraflow export --merged` of the first adapter (it
cannot choose adapters per request).

The base is DialoGPT-small's shape (GPT-2, 12 layers, 768 wide, 124M parameters, random weights:
speed does not depend on them) with the real GPT-2 tokenizer; adapters are LoRA r=8 on
c_attn/c_proj with small random weights, two versions each, published to a local rclone S3 server.
Client i asks for adapter i mod K, greedy, `max_tokens` fixed, a closed loop (next request when the
previous answer arrived). Counted: requests that finished inside the measured window; tokens/s is
their completion tokens over the window. `--move-aliases` moves every alias to its other version
twice during one more window of the batched system at the largest C (the other systems stopped
first: they follow the same aliases); any answer but 200 counts as failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPT = "The movie was a pleasant surprise: the acting was good, the story kept me interested and the ending"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def make_adapters(model_dir: Path, root: Path, count: int) -> list[Path]:
    """`count` LoRA adapters (r=8, c_attn/c_proj), each a small random step away from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM"))
    out = []
    for i in range(count):
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 1e-3)
        model.save_pretrained(root / f"adapter-{i}")
        out.append(root / f"adapter-{i}")
    return out


def wait_http(url: str, proc, log_path: Path, ready, timeout: float = 900) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log_path.read_text()[-3000:]}")
        try:
            if ready(httpx.get(url, timeout=5)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def run_cell(url: str, models: list[str], clients: int, args, mover=None) -> dict:
    import httpx

    records: list[tuple[float, float, int, int]] = []  # start, end, status, completion tokens
    lock = threading.Lock()
    stop = threading.Event()

    def client(i: int) -> None:
        body = {"model": models[i % len(models)], "prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0}
        with httpx.Client(base_url=url, timeout=600) as http:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = http.post("/v1/completions", json=body)
                    status = r.status_code
                    tokens = r.json()["usage"]["completion_tokens"] if status == 200 else 0
                except (httpx.HTTPError, ValueError, KeyError):
                    status, tokens = 0, 0
                with lock:
                    records.append((t0, time.monotonic(), status, tokens))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(args.warmup)
    start = time.monotonic()
    moves = mover(start, start + args.duration) if mover else 0
    time.sleep(max(0.0, start + args.duration - time.monotonic()))
    end = time.monotonic()
    stop.set()
    for t in threads:
        t.join(600)
    # Every request that ended inside the window counts, with its whole latency (queueing
    # included), even if it started before: with 16 clients one at a time, a request takes longer
    # than the window.
    ended = [r for r in records if start <= r[1] <= end]
    ok = [r for r in ended if r[2] == 200]
    tokens = sum(r[3] for r in ok)
    lat = [r[1] - r[0] for r in ok]
    return {"clients": clients, "adapters": len(models), "window_s": round(end - start, 1),
            "requests": len(ended), "failed": sum(1 for r in records if r[2] != 200),
            "tokens": tokens, "tokens_per_s": round(tokens / (end - start), 2),
            "p50_s": round(pct(lat, 50), 3), "p95_s": round(pct(lat, 95), 3), "latency_n": len(lat), "moves": moves}


SYSTEMS = ("one-at-a-time", "batched", "batched-fp32", "previous", "transformers-serve")
ONE_MODEL = ("previous", "transformers-serve")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default="one-at-a-time,batched",
                        help=f"comma-separated, measured alternately cell by cell: {', '.join(SYSTEMS)}")
    parser.add_argument("--adapters", default="1,4,16", help="K values, comma-separated")
    parser.add_argument("--clients", default="1,4,16", help="C values, comma-separated")
    parser.add_argument("--duration", type=float, default=40.0, help="measured seconds per (system, K, C)")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of load before each window")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--shape", default="small", choices=["tiny", "small", "medium"], help="GPT-2 shape")
    parser.add_argument("--move-aliases", action="store_true",
                        help="then one more window for batched at the largest C, the other systems stopped, "
                             "every alias moved twice during it")
    parser.add_argument("--previous-src", help="src/ of an older checkout, for the previous system")
    parser.add_argument("--out", help="append the JSON lines here too")
    args = parser.parse_args()
    systems = args.systems.split(",")
    ks = [int(k) for k in args.adapters.split(",")]
    cs = [int(c) for c in args.clients.split(",")]
    if unknown := [x for x in systems if x not in SYSTEMS]:
        parser.error(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    if (set(systems) & set(ONE_MODEL)) and 1 not in ks:
        parser.error("previous and transformers-serve serve one model: include 1 in --adapters")
    if "previous" in systems and not args.previous_src:
        parser.error("previous needs --previous-src DIR (src/ of an older checkout)")
    if args.move_aliases and "batched" not in systems:
        parser.error("--move-aliases: needs the batched system")

    import torch

    from loraflow.demo.s3server import LocalS3Server, free_port
    from loraflow.modeling import cpu_bf16
    from loraflow.demo.tiny_models import make_gpt2_model_dir
    from loraflow.registry import publish_adapter, set_alias
    from loraflow.settings import load_settings

    print(f"# {', '.join(systems)}: GPT-2 {args.shape} (random weights), prompt {PROMPT!r}, "
          f"max_tokens {args.max_tokens}, greedy; {args.duration:.0f} s window after {args.warmup:.0f} s warm-up, "
          f"systems alternated cell by cell; torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"native bf16: {cpu_bf16().native} ({cpu_bf16().evidence}), "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-load-") as tmp:
        tmp = Path(tmp)
        model_dir = make_gpt2_model_dir(tmp / "base", args.shape)
        kmax = max(ks)
        adapters = make_adapters(model_dir, tmp, 2 * kmax)
        with LocalS3Server(tmp / "s3", "127.0.0.1:0", "bench-access", "bench-secret-local",
                           buckets=("bench",)) as server:
            os.environ.update(server.env())
            settings = load_settings(storage=server.storage_overrides("bench"))
            versions = [[publish_adapter(settings, adapters[2 * i + j], name=f"load{i}",
                                         aliases=["champion"] if j == 0 else []).version for j in (0, 1)]
                        for i in range(kmax)]
            env = {**os.environ, "LORAFLOW_HOME": str(tmp / "home"), "TOKENIZERS_PARALLELISM": "false",
                   "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   **{f"LORAFLOW_STORAGE__{k.upper()}": str(v) for k, v in server.storage_overrides("bench").items()
                      if v is not None}}
            for k in ks:
                # A system that serves one model is measured at K=1 only (more adapters change nothing for it).
                servers = [Server(system, k, args, tmp, env, free_port()) for system in systems
                           if k == 1 or system not in ONE_MODEL]
                try:
                    for srv in servers:
                        srv.ready()
                    cells = [(srv, c, False) for c in cs for srv in servers]
                    if args.move_aliases:
                        cells.append((next(s for s in servers if s.system == "batched"), max(cs), True))
                    for srv, c, moving in cells:
                        if moving:  # every loraflow server follows the aliases: only the measured one runs
                            for other in servers:
                                if other is not srv:
                                    other.stop()
                        row = srv.measure(c, args, versions, settings, set_alias, moving)
                        line = json.dumps({"system": srv.system, **row})
                        print(line, flush=True)
                        if args.out:
                            with open(args.out, "a") as f:
                                f.write(line + "\n")
                finally:
                    for srv in servers:
                        srv.stop()
    return 0


class Server:
    """One system under test, started as its own process."""

    def __init__(self, system: str, k: int, args, tmp: Path, env: dict, port: int) -> None:
        self.system, self.k = system, k
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = tmp / f"serve-{system}-{k}.log"
        refs = [f"load{i}@champion" for i in range(k)]
        env = dict(env)
        if system == "transformers-serve":
            merged = tmp / "merged"
            subprocess.run([sys.executable, "-m", "loraflow.cli", "export", refs[0], "--merged", str(merged)],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            cmd = [str(Path(sys.executable).with_name("transformers")), "serve", str(merged),
                   "--continuous-batching", "--host", "127.0.0.1", "--port", str(port)]
            self.models = [str(merged)]
        else:
            cmd = [sys.executable, "-m", "loraflow.cli", "serve", *refs, "--port", str(port), "--poll-interval", "1"]
            self.models = refs
            if system == "previous":  # the old CLI: one NAME@ALIAS, no --max-batch; it ignores `model`
                env["PYTHONPATH"] = str(Path(args.previous_src).resolve())
                self.models = [None]
            else:
                cmd += ["--max-batch", "1" if system == "one-at-a-time" else "16", "--max-loaded", str(max(k, 8))]
                if system == "batched-fp32":  # the machine's bf16 detection overridden: an fp32 base
                    env["LORAFLOW_CPU_BF16"] = "0"
        self.started = time.monotonic()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def ready(self) -> None:
        if self.system == "transformers-serve":
            wait_http(f"{self.url}/health", self.proc, self.log_path, lambda r: r.status_code == 200)
        else:
            wait_http(f"{self.url}/v1/models", self.proc, self.log_path,
                      lambda r: len(r.json().get("data", [])) == self.k)
        print(f"# {self.system} K={self.k}: ready after {time.monotonic() - self.started:.1f} s", flush=True)

    def measure(self, c: int, args, versions, settings, set_alias, moving: bool = False) -> dict:
        import httpx

        mover = None
        if moving:
            def mover(t0, t1):
                moves = 0
                for n, at in enumerate((t0 + (t1 - t0) / 3, t0 + 2 * (t1 - t0) / 3)):
                    time.sleep(max(0.0, at - time.monotonic()))
                    for i in range(self.k):
                        set_alias(settings, f"load{i}", "champion", versions[i][(n + 1) % 2])
                        moves += 1
                return moves
        row = run_cell(self.url, self.models, c, args, mover)
        if self.system in ("batched", "batched-fp32", "one-at-a-time"):
            info = httpx.get(f"{self.url}/v1/adapter", timeout=30).json()
            row["peak_batch"] = info["scheduler"]["peak_batch"]
            if moving:
                row["swaps"] = sum(a["swaps"] for a in info["adapters"])
                row["swap_errors"] = [a["last_swap_error"] for a in info["adapters"] if a["last_swap_error"]]
        print(f"# {self.system} K={self.k} C={c}: {row['tokens_per_s']} tokens/s, p50 {row['p50_s']} s, "
              f"p95 {row['p95_s']} s, {row['requests']} requests, {row['failed']} failed", flush=True)
        return row

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


if __name__ == "__main__":
    sys.exit(main())
