"""A version's manifest: the last object written for a version, and the only proof that the version
is complete. The storage layer's manifest format (every file's size and sha256) plus where the
adapter came from: base model identity, dataset, metrics, settings, loraflow version, flow run."""

from __future__ import annotations

import os
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loraflow.errors import IntegrityError
from loraflow.registry.layout import REQUIRED_FILES
from loraflow.storage.transfer import MANIFEST
from loraflow.storage.transfer import validate_manifest as validate_files

# metrics.json keys that the manifest keeps in its own sections (base_model, dataset) or leaves to
# the model card (generations).
NOT_METRICS = ("generations", "base_model", "base_model_revision", "dataset_source", "dataset_fingerprint",
               "loss_curve")
SCHEMA = 2  # 2: base_model is {id, revision, weights}
# Keys publish owns; `extra` cannot overwrite them.
PROTECTED = ("schema", "name", "version", "created_at", "files")


def git_commit() -> str | None:
    """The commit loraflow runs from: `LORAFLOW_GIT_COMMIT`, else `git rev-parse` next to the
    package (an editable install in a checkout); None for a wheel install."""
    if os.environ.get("LORAFLOW_GIT_COMMIT"):
        return os.environ["LORAFLOW_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_manifest(*, name: str, version: str, files: list[dict], adapter_config: dict, metrics: dict,
                   snapshot: dict, base_model: dict | None, extra: dict | None) -> dict:
    """A version's manifest, in the storage layer's format (`files`: name, size, sha256) plus what
    a reader needs to trust and reproduce it. `base_model` is the identity training recorded
    (id, revision, sha256 per weight file); without one, the adapter config's id is all we know."""
    from loraflow import __version__

    extra = dict(extra or {})
    base = dict(base_model or {"id": adapter_config.get("base_model_name_or_path"),
                               "revision": adapter_config.get("revision"), "weights": None})
    manifest: dict[str, Any] = {
        "schema": SCHEMA,
        "name": name,
        "version": version,
        "created_at": now_iso(),
        "files": files,
        "base_model": base,
        "lora": {k: adapter_config.get(k) for k in ("peft_type", "task_type", "r", "lora_alpha",
                                                      "lora_dropout", "target_modules")},
        "dataset": {"source": metrics.get("dataset_source") or (snapshot.get("data") or {}).get("source"),
                    "fingerprint": metrics.get("dataset_fingerprint")},
        "metrics": {k: v for k, v in metrics.items() if k not in NOT_METRICS},
        "settings": snapshot,
        "loraflow": {"version": __version__, "git_commit": git_commit()},
        "flow_run_id": extra.pop("flow_run_id", None),
    }
    for key, value in extra.items():
        if key not in PROTECTED:
            manifest[key] = value
    return manifest


def validate_manifest(manifest: Any, where: str) -> dict:
    """What a reader needs from a version's manifest before trusting any file it lists."""
    manifest = validate_files(manifest, "adapter", where)
    names = set()
    for entry in manifest["files"]:
        if "/" in entry["name"] or entry["name"] == MANIFEST:
            raise IntegrityError(f"{where}: refusing manifest entry {entry['name']!r}")
        names.add(entry["name"])
    if not set(REQUIRED_FILES) <= names:
        raise IntegrityError(f"{where}: manifest lacks adapter_model.safetensors or adapter_config.json")
    return manifest


def base_identity(manifest: dict) -> dict:
    """The manifest's base model as {id, revision, weights}; schema-1 manifests named it
    `name_or_path` and recorded no weight hashes."""
    base = dict(manifest.get("base_model") or {})
    if "id" not in base and "name_or_path" in base:
        base["id"] = base.pop("name_or_path")
    return base
