"""Publish an adapter directory as a new immutable version: upload and verify every file, write
the manifest last, then move the aliases. A version without a manifest does not exist for
readers, so a publish that dies half-way leaves only garbage for `gc`, never a broken version."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loraflow.errors import ConfigError
from loraflow.log import get_logger
from loraflow.registry.aliases import advance_alias
from loraflow.registry.layout import Layout, check_name, new_version
from loraflow.registry.manifest import build_manifest
from loraflow.registry.weights import check_adapter_dir, check_config, check_weights
from loraflow.storage.store import Store
from loraflow.storage.transfer import local_files, upload_files

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


def read_adapter_config(path: Path) -> dict:
    return check_config(path)


def check_safetensors(path: Path) -> None:
    """The weights file must really be safetensors (its header describes its data), not a renamed
    pickle, and hold finite values only."""
    check_weights(path)


def publish_adapter(settings, adapter_dir: Path, *, name: str | None = None,
                    aliases: list[str] | None = None, train: dict | None = None,
                    evaluation: dict | None = None, extra: dict | None = None) -> PublishedVersion:
    """Upload `adapter_dir` as a new version of `name` (default `registry.adapter_name`) and move
    `aliases` (default `registry.aliases`) to it unless they already point at a newer version.

    The version's directory is written once, by `loraflow.release.write_release`, from the PEFT
    files of `adapter_dir` and the `train`/`evaluation` results; `extra` goes into the manifest
    (`flow_run_id`, `eval_fingerprint`, ...)."""
    from loraflow.release import write_release

    name = check_name(settings.registry.adapter_name if name is None else name)
    aliases = list(settings.registry.aliases if aliases is None else aliases)
    for alias in aliases:
        check_name(alias, "alias")
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ConfigError(f"directory not found: {adapter_dir}")
    check_adapter_dir(adapter_dir)  # before anything is written, even to scratch
    store = Store(settings.storage)
    layout = Layout.for_name(settings.storage, name)

    with tempfile.TemporaryDirectory(prefix="loraflow-publish-") as scratch:
        release = write_release(adapter_dir, Path(scratch) / "release", settings=settings, train=train,
                                evaluation=evaluation, name=name)
        files = local_files(release, "adapter")
        adapter_config = read_adapter_config(files["adapter_config.json"])
        metrics = json.loads(files["metrics.json"].read_text())
        snapshot = yaml.safe_load(files["loraflow.yaml"].read_text()) if "loraflow.yaml" in files else {}
        store.check_bucket()
        version = new_version()
        # Verified (in upload_files) right before the manifest makes the version visible, which
        # also catches a gc that removed this manifest-less version because the publish outlived
        # its grace period.
        entries = upload_files(store, files, layout.version_prefix(version), "adapter")

    manifest = build_manifest(name=name, version=version, files=[e.to_dict() for e in entries],
                              adapter_config=adapter_config, metrics=metrics, snapshot=snapshot or {},
                              base_model=(train or {}).get("base_model_identity") or None, extra=extra)
    store.put_json(layout.manifest_key(version), manifest)
    uri = layout.uri(layout.version_prefix(version))
    log.info("published %s version %s (%s)", name, version, uri)

    moved = {alias: advance_alias(store, layout, alias, version) for alias in aliases}
    for alias, target in moved.items():
        if target != version:
            log.info("alias %s stays on newer version %s", alias, target)
    return PublishedVersion(name=name, version=version, uri=uri, manifest=manifest, aliases=moved)
