"""The manifest: the last object written for a version, and the only proof that the version is
complete. It records every file's size and sha256 and where the adapter came from."""

from __future__ import annotations

import os
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loraflow.errors import IntegrityError
from loraflow.registry.layout import check_file_name

SCHEMA = 1
# Keys publish owns; `extra` cannot overwrite them.
PROTECTED = ("schema", "name", "version", "created_at", "files")
_SECRET_KEY_RE = re.compile(r"secret|password|passwd|token|credential|access_key|api_key", re.I)
MASK = "**********"


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


def scrub(value: Any, secrets: tuple[str, ...] = ()) -> Any:
    """Mask anything that looks like a credential: values under secret-ish keys, and any string
    equal to (or containing) one of the known secrets."""
    if isinstance(value, dict):
        return {k: (MASK if _SECRET_KEY_RE.search(str(k)) and v not in (None, "", MASK) else scrub(v, secrets))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            if secret and secret in value:
                value = value.replace(secret, MASK)
    return value


def known_secrets(storage) -> tuple[str, ...]:
    out = []
    for field in ("aws_secret_access_key", "aws_session_token"):
        val = getattr(storage, field, None)
        if val is not None and val.get_secret_value():
            out.append(val.get_secret_value())
    return tuple(out)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_manifest(*, name: str, version: str, files: list[dict], adapter_config: dict,
                   settings, metrics: dict, extra: dict | None) -> dict:
    from loraflow import __version__

    extra = dict(extra or {})
    dataset = {"source": settings.data.source, "fingerprint": extra.pop("dataset_fingerprint", None)}
    dataset.update(extra.pop("dataset", None) or {})
    metrics = {**metrics, **(extra.pop("metrics", None) or {})}
    manifest: dict[str, Any] = {
        "schema": SCHEMA,
        "name": name,
        "version": version,
        "created_at": now_iso(),
        "files": files,
        "base_model": {
            "name_or_path": adapter_config.get("base_model_name_or_path") or settings.model.name_or_path,
            "revision": adapter_config.get("revision") or settings.model.revision,
        },
        "lora": {k: adapter_config.get(k) for k in ("peft_type", "task_type", "r", "lora_alpha",
                                                      "lora_dropout", "target_modules")},
        "dataset": dataset,
        "metrics": metrics,
        "settings": settings.public_dict(),
        "loraflow": {"version": __version__, "git_commit": git_commit()},
        "flow_run_id": extra.pop("flow_run_id", None),
    }
    for key, value in extra.items():
        if key not in PROTECTED:
            manifest[key] = value
    return scrub(manifest, known_secrets(settings.storage))


def validate_manifest(manifest: Any, where: str) -> dict:
    """What a reader needs from a manifest before trusting any file it lists."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise IntegrityError(f"{where}: manifest has no file list")
    names = set()
    for entry in manifest["files"]:
        if not isinstance(entry, dict) or not {"name", "size", "sha256"} <= entry.keys():
            raise IntegrityError(f"{where}: manifest file entry without name/size/sha256")
        try:
            check_file_name(entry["name"])
        except Exception as exc:
            raise IntegrityError(f"{where}: refusing manifest entry: {exc}") from None
        if not re.fullmatch(r"[0-9a-f]{64}", str(entry["sha256"])) or not isinstance(entry["size"], int):
            raise IntegrityError(f"{where}: manifest entry {entry['name']} has a bad size or sha256")
        names.add(entry["name"])
    if "adapter_model.safetensors" not in names or "adapter_config.json" not in names:
        raise IntegrityError(f"{where}: manifest lacks adapter_model.safetensors or adapter_config.json")
    return manifest
