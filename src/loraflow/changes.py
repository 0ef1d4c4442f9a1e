"""Has anything that shapes the adapter changed since the champion was trained? Answered cheaply:
object listings (key, size, ETag) for `s3://` sources, file stats (path, size, mtime) for local
ones, the commit a hub revision resolves to for hub ids, and the training settings themselves. No
download, no hashing of contents, no tokenisation: a scheduled run that would retrain on the same
inputs ends in seconds instead of taking a GPU.

Every published version records the stamp of the inputs it was trained on (`inputs` in its
manifest, see `input_stamp`); a run compares its own stamp with the champion's. Anything that
cannot be told cheaply (a hub that does not answer, a champion published before stamps existed)
counts as changed: the check may retrain needlessly, never skip wrongly."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.log import get_logger
from loraflow.storage.client import is_s3_uri, parse_s3_uri

if TYPE_CHECKING:
    from loraflow.settings import Settings, StorageSettings

log = get_logger("changes")

STAMP_SCHEMA = 1
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class ChangeCheck:
    champion: str | None  # the champion's version, None when there is none
    changed: list[str] = field(default_factory=list)  # one line per input that changed (or could not be told)
    stamp: dict[str, Any] = field(default_factory=dict)  # this run's inputs, to be recorded with its version

    @property
    def unchanged(self) -> bool:
        return self.champion is not None and not self.changed

    def to_dict(self) -> dict[str, Any]:
        return {"champion": self.champion, "changed": self.changed, "stamp": self.stamp, "unchanged": self.unchanged}


def _digest(rows: list[Any]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def _s3_listing(storage: StorageSettings, uri: str) -> list[list[Any]]:
    from loraflow.storage.store import Store

    bucket, key = parse_s3_uri(uri)
    store = Store(storage, bucket)
    return sorted([obj["Key"][len(key):], obj["Size"], obj.get("ETag", "").strip('"')] for obj in store.list(key))


def _file_stats(path: Path) -> list[list[Any]]:
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    rows = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            full = Path(root) / name
            st = full.stat()
            rows.append([str(full.relative_to(path)), st.st_size, st.st_mtime_ns])
    return sorted(rows)


def _hub_commit(repo_id: str, revision: str | None, repo_type: str) -> str | None:
    if revision and _COMMIT.match(revision):
        return revision  # a pinned commit cannot move
    try:
        from huggingface_hub import HfApi

        info = HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type, timeout=10)
        return info.sha
    except Exception as exc:  # noqa: BLE001 - offline, gated, renamed: all mean "cannot tell"
        log.info("%s %s: revision not resolvable (%s); treating it as changed", repo_type, repo_id, type(exc).__name__)
        return None


def source_stamp(source: str, revision: str | None, storage: StorageSettings, repo_type: str) -> dict[str, Any]:
    """{"id", "revision", "how", "digest"} for a data source or base model; digest None: unknown."""
    stamp: dict[str, Any] = {"id": str(source), "revision": revision}
    if is_s3_uri(str(source)):
        stamp.update(how="s3-listing", digest=_digest(_s3_listing(storage, str(source))))
    elif Path(str(source)).expanduser().exists():
        stamp.update(how="file-stats", digest=_digest(_file_stats(Path(str(source)).expanduser())))
    else:
        stamp.update(how="hub-revision", digest=_hub_commit(str(source), revision, repo_type))
    return stamp


def training_settings(settings: Settings) -> dict[str, Any]:
    """The settings that shape the adapter, by section: every field but the inert ones
    (loraflow.settings.result_fields, the one rule)."""
    from loraflow.settings import RESULT_SECTIONS, result_fields

    subset: dict[str, dict[str, Any]] = {section: {} for section in RESULT_SECTIONS}
    for key, value in result_fields(settings).items():
        section, name = key.split(".", 1)
        subset[section][name] = value
    return subset


def input_stamp(settings: Settings) -> dict[str, Any]:
    """What this run would train on, cheaply identified. Recorded as `inputs` in the version's manifest."""
    subset = training_settings(settings)
    return {
        "schema": STAMP_SCHEMA,
        "data": source_stamp(settings.data.source, settings.data.revision, settings.storage, "dataset"),
        "base_model": source_stamp(settings.model.name_or_path, settings.model.revision, settings.storage, "model"),
        "settings": subset,
        "settings_digest": _digest([subset]),
    }


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def compare(current: dict[str, Any], recorded: dict[str, Any] | None) -> list[str]:
    """One line per input that differs between two stamps (or cannot be compared)."""
    if not recorded or recorded.get("schema") != current["schema"]:
        return ["the champion's manifest records no input stamp"]
    changed = []
    for what, label in (("data", "data"), ("base_model", "base model")):
        now, then = current[what], recorded.get(what) or {}
        if now["digest"] is None:
            changed.append(f"{label} {now['id']}: cannot tell cheaply ({now['how']} unavailable)")
        elif (now["id"], now["revision"], now["digest"]) != (then.get("id"), then.get("revision"), then.get("digest")):
            changed.append(f"{label} {now['id']}: {now['how']} differs")
    if current["settings_digest"] != recorded.get("settings_digest"):
        now, then = _flatten(current["settings"]), _flatten(recorded.get("settings") or {})
        keys = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
        changed.append("settings: " + (", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "") if keys else "differ"))
    return changed


def check_since_champion(settings: Settings) -> ChangeCheck:
    """Compare this run's input stamp with the one the current champion's manifest recorded."""
    from loraflow.registry import get_alias, read_manifest

    name = settings.registry.adapter_name
    stamp = input_stamp(settings)
    champion = get_alias(settings, name, settings.registry.promote_alias)
    if champion is None:
        return ChangeCheck(None, [f"{name} has no {settings.registry.promote_alias} yet"], stamp)
    recorded = read_manifest(settings, name, champion).get("inputs")
    return ChangeCheck(champion, compare(stamp, recorded), stamp)
