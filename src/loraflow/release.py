"""The one writer of an adapter's release directory: what a registry version holds and what
`loraflow train` leaves in its output.

Training writes only the PEFT files (adapter_config.json, adapter_model.safetensors); evaluation
writes nothing. At the end, `write_release` writes, once, from the results the steps returned:

    metrics.json   training and evaluation numbers, base model identity, dataset fingerprint
    loraflow.yaml  the settings that trained it (model, data, lora, training sections)
    README.md      the model card (loraflow.model_card, the one renderer)
    loss_curve.png the training loss, shown in the card (when training recorded one)

The in-process flow, the gpu-pool flow and `loraflow publish DIR` all go through here, so they
publish the same set of files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from loraflow.errors import ConfigError
from loraflow.model_card import render_model_card

METRICS_FILE = "metrics.json"
SETTINGS_SNAPSHOT = "loraflow.yaml"
MODEL_CARD = "README.md"
LOSS_CURVE = "loss_curve.png"
WRITTEN = (METRICS_FILE, SETTINGS_SNAPSHOT, MODEL_CARD, LOSS_CURVE)

# What training results carry into metrics.json (paths on the training machine stay out).
TRAIN_KEYS = ("global_step", "train_tokens", "train_time_s", "tokens_per_s", "final_loss", "session_tokens",
              "precision", "trainable_params", "base_model", "base_model_revision", "dataset_source",
              "dataset_fingerprint")
EVAL_KEYS = ("base_ppl", "adapter_ppl", "base_eval_loss", "eval_loss", "eval_tokens", "eval_documents",
             "eval_fingerprint", "eval_time_s", "generations", "generation_health", "general_source",
             "general_base_ppl", "general_adapter_ppl", "general_tokens")


def settings_snapshot(settings) -> dict[str, Any]:
    """The sections that define an adapter (storage, registry and prefect describe where it went)."""
    data = settings.public_dict()
    return {k: data[k] for k in ("model", "data", "lora", "training")}


def release_metrics(train: dict[str, Any] | None, evaluation: dict[str, Any] | None) -> dict[str, Any]:
    metrics = {k: train[k] for k in TRAIN_KEYS if train and k in train}
    metrics.update({k: evaluation[k] for k in EVAL_KEYS if evaluation and k in evaluation})
    return metrics


def write_release(adapter_dir: str | Path, dest: str | Path | None = None, *, settings=None,
                  train: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None,
                  name: str | None = None) -> Path:
    """Write the release directory `dest` (default: `adapter_dir` itself) from the PEFT files of
    `adapter_dir` and the step results. Without results (an adapter made elsewhere), the
    `metrics.json` and `loraflow.yaml` already in `adapter_dir` are kept; the card is always
    rendered anew from what the release holds."""
    import yaml

    from loraflow.storage.transfer import local_files

    src = Path(adapter_dir)
    dest = Path(dest) if dest is not None else src
    files = local_files(src, "adapter")
    if "adapter_config.json" not in files or "adapter_model.safetensors" not in files:
        raise ConfigError(f"{src}: not a PEFT adapter directory (needs adapter_config.json and "
                          "adapter_model.safetensors)")
    if dest != src:
        dest.mkdir(parents=True, exist_ok=True)
        for rel, path in files.items():
            if rel not in WRITTEN:
                shutil.copy2(path, dest / rel)

    metrics = release_metrics(train, evaluation)
    if not metrics and METRICS_FILE in files:
        try:
            metrics = json.loads(files[METRICS_FILE].read_text())
        except ValueError:
            raise ConfigError(f"{files[METRICS_FILE]}: not valid JSON") from None
        if not isinstance(metrics, dict):
            raise ConfigError(f"{files[METRICS_FILE]}: expected a JSON object")
    if settings is not None and train is not None:
        snapshot = settings_snapshot(settings)
    elif SETTINGS_SNAPSHOT in files:
        snapshot = yaml.safe_load(files[SETTINGS_SNAPSHOT].read_text()) or {}
    else:
        snapshot = {}
    if not metrics.get("base_model"):
        config = json.loads(files["adapter_config.json"].read_text())
        metrics["base_model"] = config.get("base_model_name_or_path")

    curve = Path(train["loss_curve_path"]) if train and train.get("loss_curve_path") else None
    if curve is not None and curve.is_file():
        shutil.copyfile(curve, dest / LOSS_CURVE)
    elif LOSS_CURVE in files and dest != src:
        shutil.copyfile(files[LOSS_CURVE], dest / LOSS_CURVE)
    metrics["loss_curve"] = LOSS_CURVE if (dest / LOSS_CURVE).is_file() else None
    (dest / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if snapshot:
        (dest / SETTINGS_SNAPSHOT).write_text(yaml.safe_dump(snapshot, sort_keys=False))
    (dest / MODEL_CARD).write_text(render_model_card(metrics, snapshot, name, settings=settings))
    return dest
