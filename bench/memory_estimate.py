"""loraflow.memory's estimate against measured peak memory, side by side.

Each shape trains in a fresh process (peak RSS is per process): a random-weight model from a
transformers config, LoRA r=16 through `loraflow.modeling.apply_lora`, packed rows (per-document
position ids, as loraflow feeds them), a few AdamW steps, fp32 on the CPU, transformers' default
attention. The child reports `ru_maxrss`; the parent prints it next to
`loraflow.memory.estimate_training_memory` for the same shape. Then the peaks recorded in ASSETS.md
and README.md (whole Trainer runs, not re-measured here) against the estimate for their shapes.

    .venv/bin/python bench/memory_estimate.py            # measures (about 3 minutes on one core)
    .venv/bin/python bench/memory_estimate.py --no-measure

One core is enough (OMP_NUM_THREADS=1 is set for the children): peak memory does not depend on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import warnings

GB = 1e9  # ASSETS.md and README.md quote decimal GB

# name: (architecture, config kwargs, LoRA targets, batch, seq)
SHAPES = {
    "gpt2-small 4x128": ("gpt2", {"n_layer": 12, "n_embd": 768, "n_head": 12}, ["c_attn", "c_proj"], 4, 128),
    "gpt2-small 2x512": ("gpt2", {"n_layer": 12, "n_embd": 768, "n_head": 12}, ["c_attn", "c_proj"], 2, 512),
    "smollm2-135m 2x256": ("llama", {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
                                     "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                                     "tie_word_embeddings": True}, ["q_proj", "k_proj", "v_proj", "o_proj"], 2, 256),
}
# Recorded elsewhere (whole Trainer processes, 2 cores, fp32, transformers 5.24): name ->
# (config kwargs, batch, seq, peak GB, where). The seed pads to max_length (an attention mask,
# so SDPA's mask path); loraflow packs.
RECORDED = {
    "seed DialoGPT-small 4x128": ({"n_layer": 12, "n_embd": 768, "n_head": 12}, 4, 128, 2.5, "ASSETS.md"),
    "seed DialoGPT-small 4x512": ({"n_layer": 12, "n_embd": 768, "n_head": 12}, 4, 512, 8.3, "ASSETS.md"),
    "seed DialoGPT-medium 4x128": ({"n_layer": 24, "n_embd": 1024, "n_head": 16}, 4, 128, 5.3, "ASSETS.md"),
    "seed DialoGPT-medium 4x512": ({"n_layer": 24, "n_embd": 1024, "n_head": 16}, 4, 512, 18.7, "ASSETS.md"),
    "loraflow DialoGPT-small 1x512": ({"n_layer": 12, "n_embd": 768, "n_head": 12}, 1, 512, 2.87, "README.md"),
    "loraflow DialoGPT-medium 1x512": ({"n_layer": 24, "n_embd": 1024, "n_head": 16}, 1, 512, 6.17, "README.md"),
}
STEPS = 3


def make_config(arch: str, kwargs: dict):
    from transformers import GPT2Config, LlamaConfig

    if arch == "gpt2":
        return GPT2Config(vocab_size=50257, n_positions=1024, **kwargs)
    return LlamaConfig(**kwargs)


def estimate(config, targets: list[str], batch: int, seq: int) -> int:
    from loraflow.memory import estimate_training_memory, lora_parameters, model_shape

    shape = model_shape(config)
    return estimate_training_memory(shape, batch=batch, seq=seq, compute_bytes=4, weight_bytes=4,
                                    attn_implementation="sdpa", device="cpu", gradient_checkpointing=False,
                                    lora_params=lora_parameters(shape, 16, targets)).total


def child(name: str) -> None:
    """Train STEPS steps of one shape and print its peak RSS as JSON (runs in its own process)."""
    import psutil
    import torch
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    from loraflow.modeling import apply_lora
    from loraflow.settings import LoraSettings

    warnings.filterwarnings("ignore")
    arch, kwargs, targets, batch, seq = SHAPES[name]
    imported = psutil.Process().memory_info().rss
    torch.manual_seed(0)
    config = make_config(arch, kwargs)
    model = (GPT2LMHeadModel if arch == "gpt2" else LlamaForCausalLM)(config)
    model.config.use_cache = False
    model.loss_type = "ForCausalLM"
    model = apply_lora(model, LoraSettings(r=16, target_modules=targets))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
        # Three documents per row, position ids restarting at each, like loraflow's packed rows.
        cuts = sorted(torch.randint(1, seq, (2,), generator=generator).tolist())
        row = torch.cat([torch.arange(n) for n in (cuts[0], cuts[1] - cuts[0], seq - cuts[1]) if n])
        loss = model(input_ids=ids, position_ids=row.repeat(batch, 1), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak": peak, "imported": imported}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-measure", action="store_true", help="print the estimates and recorded peaks only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    print(f"{'shape (fp32, CPU, LoRA r=16, sdpa default)':42} {'estimate':>9} {'measured':>9} {'est/meas':>8}")
    if not args.no_measure:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        for name, (arch, kwargs, targets, batch, seq) in SHAPES.items():
            done = subprocess.run([sys.executable, __file__, "--child", name], env=env, capture_output=True,
                                  text=True, check=True)
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            guess = estimate(make_config(arch, kwargs), targets, batch, seq)
            print(f"{name + ' (measured now)':42} {guess / GB:8.2f}G {measured['peak'] / GB:8.2f}G "
                  f"{guess / measured['peak']:7.2f}x   (after imports {measured['imported'] / GB:.2f}G)")
    for name, (kwargs, batch, seq, peak, where) in RECORDED.items():
        guess = estimate(make_config("gpt2", kwargs), ["c_attn", "c_proj"], batch, seq)
        print(f"{name + f' ({where})':42} {guess / GB:8.2f}G {peak:8.2f}G {guess / (peak * GB):7.2f}x")


if __name__ == "__main__":
    main()
