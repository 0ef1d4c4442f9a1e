"""`loraflow export NAME[@ALIAS|==VERSION] --merged DIR`: the base model with a version's LoRA merged
into its weights (PEFT's `merge_and_unload`), for engines that cannot apply LoRA to the
architecture (vLLM on GPT-2 / DialoGPT) or should not pay for it at inference.

The directory is an ordinary transformers model: `model.safetensors` (fp32, the precision the merge
ran in), `config.json`, the base model's tokenizer, a model card naming the version it came from,
and `loraflow-export.json` (name, version, base model, adapter manifest sha256, parity) for
machines. It is written beside DIR and renamed into place, so DIR is either the previous export or
the new one.

Before it is placed, the model *as written* (read back from the new files) must generate, greedily,
the same tokens as base + adapter under plain PEFT on the fixed prompts (loraflow.parity); the
verdict and the largest logit difference seen go into `loraflow-export.json`. A merge that changed
what the model says (a wrong scaling, a damaged save) fails the export in one line and leaves DIR
as it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from loraflow import parity
from loraflow.errors import ConfigError
from loraflow.log import get_logger

log = get_logger("export")

PROVENANCE = "loraflow-export.json"


def _check_dest(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"--merged {dest}: exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / PROVENANCE).is_file():
        # Only a previous export is replaced; anything else in DIR could be someone's work.
        raise ConfigError(f"--merged {dest}: directory is not empty and holds no previous loraflow export")
    from loraflow.paths import check_dir_usable

    # The export is written beside DIR and renamed into place: its parent must be writable, and
    # that is known before anything is pulled or loaded.
    check_dir_usable(dest.parent, f"--merged {dest}: its folder")


def _card(name: str, version: str, manifest: dict, base_id: str) -> str:
    metrics = manifest.get("metrics") or {}
    ppl = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("adapter_ppl", "base_ppl")
                    if isinstance(metrics.get(k), (int, float)))
    lines = [
        "---", "library_name: transformers", f"base_model: {base_id}", "pipeline_tag: text-generation",
        "tags: [loraflow, merged-lora, causal-lm]", "---", "",
        f"# {name}=={version} (merged)", "",
        f"The base model `{base_id}` with the LoRA adapter `{name}` version `{version}` merged into its "
        "weights by `loraflow export --merged` (PEFT `merge_and_unload`). It loads with "
        "`AutoModelForCausalLM.from_pretrained` and needs no LoRA support from the serving engine.", "",
        f"- adapter version: `{version}` (created {manifest.get('created_at', '?')})",
        f"- LoRA: r={manifest.get('lora', {}).get('r')}, alpha={manifest.get('lora', {}).get('lora_alpha')}, "
        f"targets {manifest.get('lora', {}).get('target_modules')}",
    ]
    if ppl:
        lines.append(f"- evaluation at publish: {ppl}")
    lines += ["", "Regenerate with:", "", "```bash", f"loraflow export {name}=={version} --merged DIR", "```", ""]
    return "\n".join(lines)


def _umask() -> int:
    try:  # read, not set-and-restore: os.umask is process-wide, and other threads may be creating files
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_modes(directory: Path) -> None:
    """safetensors writes its file owner-only (0600) while the tokenizer and JSON files get the
    umask's modes (0644): one export, one mode, the one any file the user writes would get."""
    mask = _umask()
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def export_merged(ref: str, dest: str | Path, *, settings=None, cache=None) -> Path:
    """Merge `ref`'s adapter into its (verified) base model and write it to `dest`."""
    import torch

    from loraflow.adapters import load_adapter
    from loraflow.modeling import pad_token_id
    from loraflow.registry.layout import parse_ref
    from loraflow.registry.manifest import base_identity
    from loraflow.registry.pull import pull_adapter
    from loraflow.serving.model import base_tokenizer
    from loraflow.storage.transfer import MANIFEST, place_atomically

    if settings is None:
        from loraflow.settings import load_settings

        settings = load_settings()
    dest = Path(dest).expanduser()
    _check_dest(dest)
    name = parse_ref(ref)[0]
    adapter_dir = pull_adapter(ref, settings=settings, dest=cache)
    manifest_bytes = (adapter_dir / MANIFEST).read_bytes()
    manifest = json.loads(manifest_bytes)
    version = manifest["version"]
    # Pinned from here on: an alias that moves mid-export cannot mix two versions.
    model = load_adapter(f"{name}=={version}", settings=settings, dest=cache, dtype=torch.float32)
    tokenizer = base_tokenizer(manifest, settings)
    base_id = base_identity(manifest).get("id")
    # Plain PEFT's answer first: merge_and_unload rewrites this very model's weights.
    prompt_ids, pad = parity.encode(lambda text: tokenizer(text)["input_ids"]), pad_token_id(tokenizer)
    log.info("parity: base + adapter (plain PEFT) on %d fixed prompts, %d greedy tokens each",
             len(prompt_ids), parity.NEW_TOKENS)
    ends = parity.end_ids(model, tokenizer)
    reference = parity.observe(model, prompt_ids, parity.greedy(model, pad, ends))
    merged = model.merge_and_unload()

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        del model, merged
        verdict = _check_written(tmp, reference, tokenizer, pad, ends)
        if not verdict.ok:
            raise parity.ParityError(f"export of {name}=={version} refused: {verdict.reason}")
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_card(name, version, manifest, base_id))
        (tmp / PROVENANCE).write_text(json.dumps({
            "name": name, "version": version, "base_model": base_identity(manifest),
            "adapter_manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "merged": True,
            "parity": verdict.to_dict(),
        }, indent=2) + "\n")
        _usual_modes(tmp)
        place_atomically(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s==%s merged into %s at %s (parity: %d/%d greedy tokens equal, max logit difference %.3g)",
             name, version, base_id, dest, verdict.tokens_compared, verdict.prompts * verdict.new_tokens,
             verdict.max_abs_logit_diff)
    return dest


def _check_written(directory: Path, reference, tokenizer, pad: int, ends: set[int]):
    """The merged model read back from the files just written, against plain PEFT's continuations."""
    import torch
    from transformers import AutoModelForCausalLM

    written = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, dtype=torch.float32).eval()
    observed = parity.observe(written, reference.prompt_ids, parity.greedy(written, pad, ends), reference=reference)
    return parity.compare(reference, observed, tokenizer, subject="the merged model")
