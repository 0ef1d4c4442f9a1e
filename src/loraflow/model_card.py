"""The adapter's `README.md` model card, rendered from what sits next to it (`metrics.json`,
`loraflow.yaml`), so training writes it first and evaluation re-renders it with its numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraflow.settings import Settings


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "–" if value is None else str(value)


def render_model_card(metrics: dict[str, Any], snapshot: dict[str, Any]) -> str:
    model = snapshot.get("model", {})
    data = snapshot.get("data", {})
    lora = snapshot.get("lora", {})
    training = snapshot.get("training", {})
    base = metrics.get("base_model") or model.get("name_or_path", "?")
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}",
        "tags: [lora, loraflow, causal-lm]",
        "---",
        "",
        f"# LoRA adapter for `{base}`",
        "",
        "Trained by loraflow (transformers Trainer + peft LoRA).",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({base!r})",
        'model = PeftModel.from_pretrained(base, "path/to/this/adapter")',
        "```",
        "",
        "## Data",
        "",
        f"- source: `{metrics.get('dataset_source') or data.get('source', '?')}`"
        f" (text column `{data.get('text_column', 'text')}`)",
        f"- fingerprint: `{metrics.get('dataset_fingerprint', '?')}`",
        f"- max_length {data.get('max_length', '?')}, packing {'on' if data.get('packing') else 'off'}, "
        "EOS appended to every document and trained on",
        "",
        "## Settings",
        "",
        f"- LoRA: r={lora.get('r')}, alpha={lora.get('lora_alpha')}, dropout={lora.get('lora_dropout')}, "
        f"targets {', '.join(lora.get('target_modules', []))} (as configured; the adapter_config.json "
        "lists what was trained)",
        f"- training: lr {training.get('learning_rate')}, {training.get('lr_scheduler_type')} schedule, "
        f"warmup {training.get('warmup_steps')}, batch {training.get('per_device_train_batch_size')} x "
        f"grad-accum {training.get('gradient_accumulation_steps')}, max_steps {training.get('max_steps')}, "
        f"seed {training.get('seed')}, precision {metrics.get('precision', '?')}",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in ("global_step", "train_tokens", "train_time_s", "tokens_per_s", "final_loss",
                "base_ppl", "adapter_ppl", "base_eval_loss", "eval_loss", "eval_tokens", "eval_documents"):
        if key in metrics:
            lines.append(f"| {key} | {_fmt(metrics[key])} |")
    gens = metrics.get("generations") or []
    if gens:
        lines += ["", "## Sample generations (greedy)", ""]
        for g in gens:
            lines.append(f"**Prompt:** {g['prompt']}")
            lines.append("")
            lines.append(f"> adapter: {g['text'].strip()}".replace("\n", " "))
            if g.get("base_text") is not None:
                lines.append(">")
                lines.append(f"> base: {g['base_text'].strip()}".replace("\n", " "))
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(adapter_dir: Path, settings: Settings | None = None) -> Path:
    import yaml

    adapter_dir = Path(adapter_dir)
    metrics_path = adapter_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    snap_path = adapter_dir / "loraflow.yaml"
    if snap_path.exists():
        snapshot = yaml.safe_load(snap_path.read_text()) or {}
    elif settings is not None:
        snapshot = settings.public_dict()
    else:
        snapshot = {}
    path = adapter_dir / "README.md"
    path.write_text(render_model_card(metrics, snapshot))
    return path
