"""What the canary's parity check adds to a swap: the canary of a new version loaded beside the
serving one (the service's own ModelHolder and run_canary, a real rclone S3 store), run with and
without parity, alternating, on the same loaded model.

    .venv/bin/python bench/parity_cost.py [--rounds 4]
    .venv/bin/python bench/parity_cost.py --tiny     # a 2-layer random GPT-2 instead of SmolLM2-135M

Printed per round: the canary's seconds with and without parity, and parity's two parts: the
plain-PEFT reference (a fresh load of base + adapter and its greedy generations, outside the model
lock: requests keep being served) and the serving side (inside the model lock: requests wait).
Then the medians, and the export's parity (`loraflow export --merged`: the merged model read back
and compared) on the same version.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def make_adapter(model_dir: Path, dest: Path, *, seed: int, tiny: bool) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    targets = ["c_attn", "c_proj"] if tiny else ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-3)
    model.save_pretrained(dest)
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random GPT-2 instead of SmolLM2-135M")
    parser.add_argument("--rounds", type=int, default=4, help="canaries with and without parity, alternating")
    args = parser.parse_args()

    import torch

    from loraflow.demo.s3server import LocalS3Server
    from loraflow.export import PROVENANCE, export_merged
    from loraflow.registry import publish_adapter
    from loraflow.registry.pull import pull_adapter
    from loraflow.serving.canary import DEFAULT_DOCUMENTS, run_canary
    from loraflow.serving.model import ModelHolder
    from loraflow.settings import load_settings
    from loraflow.storage.transfer import MANIFEST

    with tempfile.TemporaryDirectory(prefix="loraflow-bench-parity-") as tmp:
        tmp = Path(tmp)
        if args.tiny:
            from loraflow.demo.tiny_models import make_gpt2_model_dir

            model_dir, label = make_gpt2_model_dir(tmp / "tiny-gpt2"), "tiny GPT-2 (2 layers, random)"
        else:
            from loraflow.demo.assets import demo_assets

            model_dir, label = demo_assets().model_dir, "SmolLM2-135M-Instruct (fp32)"
        print(f"model: {label}; torch threads {torch.get_num_threads()}", flush=True)
        adapters = [make_adapter(model_dir, tmp / f"adapter-{i}", seed=i, tiny=args.tiny) for i in (1, 2)]
        with LocalS3Server(tmp / "s3", "127.0.0.1:0", "bench-access", "bench-secret-local",
                           buckets=("bench",)) as server:
            os.environ.update(server.env())
            settings = load_settings(storage=server.storage_overrides("bench"))
            versions = [publish_adapter(settings, a, name="bench", aliases=[]).version for a in adapters]
            cache = tmp / "adapters"

            def pulled(version):
                path = pull_adapter(f"bench=={version}", settings=settings, dest=cache)
                return path, json.loads((path / MANIFEST).read_text())

            holder = ModelHolder()
            holder.load_first(f"bench=={versions[0]}", *pulled(versions[0]), settings=settings, dest=cache)
            new = holder.add(*pulled(versions[1]))
            documents = list(DEFAULT_DOCUMENTS)
            run_canary(holder, new, documents, parity=False)  # warm-up
            with_parity, without, reference, serving = [], [], [], []
            for r in range(args.rounds):
                for parity in (True, False) if r % 2 == 0 else (False, True):
                    canary = run_canary(holder, new, documents, parity=parity)
                    assert canary.ok, canary.reason
                    (with_parity if parity else without).append(canary.seconds)
                    if parity:
                        reference.append(canary.parity["reference_seconds"])
                        serving.append(canary.parity["serving_seconds"])
                        tokens = canary.parity["tokens_compared"]
                        drift = canary.parity["max_abs_logit_diff"]
                print(f"round {r + 1}: canary with parity {with_parity[-1]:.2f} s, without {without[-1]:.2f} s; "
                      f"parity: reference {reference[-1]:.2f} s (outside the lock), serving side "
                      f"{serving[-1]:.2f} s (inside the lock); {tokens} tokens equal, max logit difference "
                      f"{drift:.3g}", flush=True)
            med = statistics.median
            print(f"median over {args.rounds} rounds: canary {med(with_parity):.2f} s with parity, "
                  f"{med(without):.2f} s without (+{med(with_parity) - med(without):.2f} s); "
                  f"reference {med(reference):.2f} s outside the model lock, serving side {med(serving):.2f} s "
                  f"inside it", flush=True)

            os.environ["LORAFLOW_HOME"] = str(tmp / "home")
            started = time.monotonic()
            out = export_merged(f"bench=={versions[1]}", tmp / "merged", settings=settings, cache=cache)
            recorded = json.loads((out / PROVENANCE).read_text())["parity"]
            print(f"export --merged: {time.monotonic() - started:.2f} s in all; parity ok={recorded['ok']}, "
                  f"{recorded['tokens_compared']} tokens equal, max logit difference "
                  f"{recorded['max_abs_logit_diff']:.3g}, generations {recorded['seconds']:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
