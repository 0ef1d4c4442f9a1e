"""The adapter's `README.md` model card: the one renderer, called by `loraflow.release` when it
writes a release directory. Its YAML header follows the Hub's PEFT convention (`library_name: peft`,
`base_model`, `datasets`, tags, and a `model-index` with the evaluation results), so the card renders
on the Hub and in any PEFT-aware tool."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "–" if value is None else str(value)


def _use_snippet(name: str | None, base: str) -> list[str]:
    lines = []
    if name:
        # loraflow resolves the base model from the version's manifest (hub, or an s3:// mirror)
        # and checks its weights against the recorded sha256s.
        lines += ["```python", "import loraflow", "",
                  f'model = loraflow.load_adapter("{name}@champion")  # or "{name}==<version>"', "```", ""]
    if not base.startswith(("s3://", "/", ".", "~")):
        lines += ["With transformers and peft alone, from a local copy of this directory:", "",
                  "```python", "from transformers import AutoModelForCausalLM", "from peft import PeftModel", "",
                  f"base = AutoModelForCausalLM.from_pretrained({base!r})",
                  'model = PeftModel.from_pretrained(base, "path/to/this/adapter")', "```", ""]
    return lines


def card_header(name: str | None, base: str, dataset: str | None, metrics: dict[str, Any]) -> dict[str, Any]:
    header: dict[str, Any] = {"library_name": "peft", "base_model": base, "pipeline_tag": "text-generation",
                              "tags": ["lora", "loraflow", "causal-lm", "base_model:adapter:" + base]}
    if dataset:
        header["datasets"] = [dataset]
    results = [{"type": "perplexity", "name": f"{who} perplexity", "value": round(float(metrics[key]), 4)}
               for who, key in (("adapter", "adapter_ppl"), ("base model", "base_ppl")) if metrics.get(key) is not None]
    if results:
        header["model-index"] = [{
            "name": name or "adapter",
            "results": [{"task": {"type": "text-generation", "name": "Causal language modeling"},
                         "dataset": {"name": dataset or "eval split", "type": dataset or "custom",
                                     "split": "eval"},
                         "metrics": results}],
        }]
    return header


def render_model_card(metrics: dict[str, Any], snapshot: dict[str, Any], name: str | None = None) -> str:
    import yaml

    model = snapshot.get("model", {})
    data = snapshot.get("data", {})
    lora = snapshot.get("lora", {})
    training = snapshot.get("training", {})
    base = metrics.get("base_model") or model.get("name_or_path", "?")
    dataset = metrics.get("dataset_source") or data.get("source")
    lines = [
        "---",
        yaml.safe_dump(card_header(name, base, dataset, metrics), sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name or 'LoRA adapter'} for `{base}`",
        "",
        "Trained by loraflow (transformers Trainer + peft LoRA).",
        "",
        "## Use",
        "",
        *_use_snippet(name, base),
        "## Data",
        "",
        f"- source: `{dataset or '?'}`"
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
        *(["## Training loss", "", f"![training loss]({metrics['loss_curve']})", ""] if metrics.get("loss_curve") else []),
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in ("global_step", "train_tokens", "train_time_s", "tokens_per_s", "final_loss",
                "base_ppl", "adapter_ppl", "base_eval_loss", "eval_loss", "eval_tokens", "eval_documents"):
        if key in metrics:
            lines.append(f"| {key} | {_fmt(metrics[key])} |")
    health = metrics.get("generation_health") or {}
    if health.get("adapter"):
        who = [w for w in ("adapter", "base") if health.get(w)]
        lines += ["", f"## Generation health (greedy, {health.get('prompts')} fixed prompts, "
                      f"{health.get('max_new_tokens')} new tokens at most)", "",
                  "| measure | " + " | ".join(who) + " |", "|---|" + "---|" * len(who)]
        for key in ("eos_rate", "distinct_2", "repeated_4gram_rate"):
            lines.append(f"| {key} | " + " | ".join(_fmt(health[w].get(key)) for w in who) + " |")
    if metrics.get("general_adapter_ppl") is not None:
        lines += ["", f"Forgetting check on `{metrics.get('general_source')}`: perplexity base "
                      f"{_fmt(metrics.get('general_base_ppl'))}, adapter {_fmt(metrics['general_adapter_ppl'])}."]
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
