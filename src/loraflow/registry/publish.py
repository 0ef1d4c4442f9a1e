"""Publish an adapter directory as a new immutable version: upload and verify every file, write
the manifest last, then move the aliases. A version without a manifest does not exist for
readers, so a publish that dies half-way leaves only garbage for `gc`, never a broken version."""

from __future__ import annotations

import json
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loraflow.errors import ConfigError
from loraflow.log import get_logger
from loraflow.registry.aliases import advance_alias
from loraflow.registry.layout import (
    MANIFEST, PICKLE_SUFFIXES, REQUIRED_FILES, Layout, check_file_name, check_name, new_version,
)
from loraflow.registry.manifest import build_manifest
from loraflow.registry.store import FileDigest, Store, digest_file

log = get_logger("registry")


@dataclass
class PublishedVersion:
    name: str
    version: str
    uri: str
    manifest: dict = field(repr=False)
    aliases: dict[str, str | None] = field(default_factory=dict)  # alias -> where it points now

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "uri": self.uri, "aliases": self.aliases}


def collect_files(adapter_dir: Path) -> dict[str, Path]:
    """The files of a PEFT adapter directory that go up; refuses pickles and unknown files."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ConfigError(f"adapter directory not found: {adapter_dir}")
    files: dict[str, Path] = {}
    for path in sorted(adapter_dir.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue  # checkpoints and editor droppings are not part of an adapter
        if path.name == MANIFEST:
            continue  # a pulled directory carries the old manifest; publish writes a new one
        if path.name.endswith(PICKLE_SUFFIXES):
            raise ConfigError(f"{path}: pickled weights are refused; save the adapter with safetensors")
        try:
            check_file_name(path.name)
        except ConfigError:
            raise ConfigError(f"{path}: not an adapter file; remove it or publish a directory holding "
                              "only the adapter (adapter_config.json, adapter_model.safetensors, ...)") from None
        files[path.name] = path
    missing = [n for n in REQUIRED_FILES if n not in files]
    if missing:
        raise ConfigError(f"{adapter_dir}: not a PEFT adapter directory (missing {', '.join(missing)})")
    return files


def read_adapter_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable adapter config ({exc})") from None
    for key in ("base_model_name_or_path", "r"):
        if not config.get(key):
            # vLLM's LoRA resolver and LoRAX read both; an adapter without them cannot be served.
            raise ConfigError(f"{path}: adapter config lacks {key!r}")
    return config


def _model_card(name: str, config: dict) -> str:
    return (f"---\nbase_model: {config.get('base_model_name_or_path')}\nlibrary_name: peft\n---\n\n"
            f"# {name}\n\nLoRA adapter (r={config.get('r')}, alpha={config.get('lora_alpha')}, "
            f"targets {config.get('target_modules')}) published by loraflow.\n")


def publish_adapter(settings, adapter_dir: Path, *, name: str | None = None,
                    aliases: list[str] | None = None, extra: dict | None = None) -> PublishedVersion:
    """Upload `adapter_dir` as a new version of `name` (default `registry.adapter_name`) and move
    `aliases` (default `registry.aliases`) to it unless they already point at a newer version.
    `extra` is merged into the manifest (`dataset_fingerprint`, `metrics`, `flow_run_id`, ...)."""
    name = check_name(name or settings.registry.adapter_name)
    aliases = list(settings.registry.aliases if aliases is None else aliases)
    for alias in aliases:
        check_name(alias, "alias")
    adapter_dir = Path(adapter_dir)
    files = collect_files(adapter_dir)
    adapter_config = read_adapter_config(files["adapter_config.json"])

    metrics: dict = {}
    if "metrics.json" in files:
        try:
            metrics = json.loads(files["metrics.json"].read_text())
        except ValueError:
            raise ConfigError(f"{files['metrics.json']}: not valid JSON") from None
        if not isinstance(metrics, dict):
            raise ConfigError(f"{files['metrics.json']}: expected a JSON object")

    store = Store(settings.storage)
    layout = Layout.for_name(settings.storage, name)
    store.check_bucket()
    version = new_version()

    with tempfile.TemporaryDirectory(prefix="loraflow-publish-") as scratch:
        # Every version has the full layout; generate what the directory lacks.
        if "metrics.json" not in files:
            metrics = dict((extra or {}).get("metrics") or {})
            files["metrics.json"] = Path(scratch, "metrics.json")
            files["metrics.json"].write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if "README.md" not in files:
            files["README.md"] = Path(scratch, "README.md")
            files["README.md"].write_text(_model_card(name, adapter_config))
        digests = _upload_all(store, layout, version, files)

        # Verified right before the manifest makes the version visible, which also catches a gc
        # that removed this (manifest-less) version because the publish outlived its grace period.
        store.verify_uploads(layout.version_prefix(version),
                             {n: (files[n], d) for n, d in digests.items()})

    entries = [{"name": n, "size": d.size, "sha256": d.sha256} for n, d in sorted(digests.items())]
    manifest = build_manifest(name=name, version=version, files=entries, adapter_config=adapter_config,
                              settings=settings, metrics=metrics, extra=extra)
    store.put_json(layout.manifest_key(version), manifest)
    uri = layout.uri(layout.version_prefix(version))
    log.info("published %s version %s (%s)", name, version, uri)

    moved = {alias: advance_alias(store, layout, alias, version) for alias in aliases}
    for alias, target in moved.items():
        if target != version:
            log.info("alias %s stays on newer version %s", alias, target)
    return PublishedVersion(name=name, version=version, uri=uri, manifest=manifest, aliases=moved)


def _upload_all(store: Store, layout: Layout, version: str, files: dict[str, Path]) -> dict[str, FileDigest]:
    # Hashing runs beside the upload (hashlib releases the GIL), so a large file costs one read
    # for the checksum while the network is busy, not a second pass before it.
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="lf-hash") as hashers, \
            ThreadPoolExecutor(max_workers=4, thread_name_prefix="lf-upload") as uploaders:
        hashes: dict[str, Future] = {n: hashers.submit(digest_file, p) for n, p in files.items()}
        uploads = {n: uploaders.submit(store.upload_file, p, layout.file_key(version, n))
                   for n, p in files.items()}
        for future in uploads.values():
            future.result()
        return {n: f.result() for n, f in hashes.items()}
