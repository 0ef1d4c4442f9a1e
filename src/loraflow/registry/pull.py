"""What downstream services call: `pull_adapter` fetches a version into a local cache keyed by
version, verified file by file against its manifest; `load_adapter` returns a PeftModel on top of
the base model the manifest names.

The cache is `LORAFLOW_HOME/adapters/<name>/<version>/` (or `<dest>/<name>/<version>/`). A version
directory only ever appears there by the storage layer's atomic rename of a fully verified
temporary directory, so its presence means it is complete; a cached version costs no download
(an alias costs one GET). The base model of `load_adapter` is checked against the manifest's
recorded weight hashes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loraflow.errors import StorageError
from loraflow.log import get_logger
from loraflow.registry.aliases import current_version
from loraflow.registry.catalog import complete_versions, fetch_manifest, open_registry
from loraflow.registry.layout import check_version, parse_ref
from loraflow.storage.transfer import MANIFEST, download_dir, verified_copy

log = get_logger("registry")


def cache_root(dest: str | os.PathLike | None = None) -> Path:
    if dest is not None:
        from loraflow.paths import ensure_dir

        return ensure_dir(dest, "--dest")
    from loraflow.paths import cache_dir

    return cache_dir("adapters")


def pull_adapter(ref: str, *, settings=None, dest: str | os.PathLike | None = None) -> Path:
    """`NAME` (= `NAME@latest`), `NAME@ALIAS` or `NAME==VERSION` -> the local directory holding
    the verified adapter (PEFT layout plus README.md, metrics.json, manifest.json)."""
    name, alias, version = parse_ref(ref)
    root = cache_root(dest) / name
    if version and verified_copy(root / version) is not None:
        return root / version  # pinned, cached and untouched since verified: no network at all
    if settings is None:
        from loraflow.settings import load_settings

        settings = load_settings()
    store, layout = open_registry(settings, name)
    if alias:
        version = current_version(store, layout, alias)
        if version is None:
            store.check_bucket()
            known = complete_versions(store, layout)
            if not known:
                raise StorageError(f"no adapter named {name!r} in {layout.uri()}")
            raise StorageError(f"adapter {name!r} has no alias {alias!r}; pull {name}=={known[-1]} "
                               "or move the alias with `loraflow promote`")
    final = root / check_version(version)  # an alias object is data from the store: never a path
    if verified_copy(final) is not None:
        log.debug("%s %s already cached at %s", name, version, final)
        return final
    if final.exists():
        log.warning("%s: changed since it was verified; pulling %s==%s again", final, name, version)

    manifest = fetch_manifest(store, layout, version)
    root.mkdir(parents=True, exist_ok=True)
    download_dir(store, layout.version_prefix(version), final, "adapter", manifest=manifest)
    log.info("pulled %s %s into %s", name, version, final)
    return final


def load_adapter(ref: str, *, settings=None, base_model=None, dest=None, **model_kwargs):
    """Pull `ref` and return `PeftModel.from_pretrained(base, adapter_dir)`. By default the base
    model is the one the manifest names (a hub id, or an `s3://` mirror fetched into this host's
    cache), refused when its weights do not match the sha256s recorded at training. `base_model`
    (a loaded model, hub id or local directory) overrides that, unverified."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraflow import modeling

    if settings is None:
        from loraflow.settings import load_settings

        settings = load_settings()
    adapter_dir = pull_adapter(ref, settings=settings, dest=dest)
    if base_model is None:
        manifest = json.loads((adapter_dir / MANIFEST).read_text())
        recorded = base_identity(manifest)
        if not recorded.get("id"):
            raise StorageError(f"{adapter_dir / MANIFEST}: names no base model; pass base_model=")
        source = modeling.resolve_model_source(
            modeling_settings(recorded["id"], recorded.get("revision")), settings.storage)
        if Path(source).is_dir():
            modeling.check_model_identity(recorded, settings.storage, ref)  # before loading anything
        if recorded.get("revision") and not Path(source).is_dir():
            model_kwargs.setdefault("revision", recorded["revision"])
        base_model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True, **model_kwargs)
        if not Path(source).is_dir():
            modeling.check_model_identity(recorded, settings.storage, ref)  # hub: files exist only now
    elif isinstance(base_model, (str, os.PathLike)):
        base_model = AutoModelForCausalLM.from_pretrained(str(base_model), use_safetensors=True, **model_kwargs)
    with modeling.peft_quietly():
        return PeftModel.from_pretrained(base_model, str(adapter_dir))


def base_identity(manifest: dict) -> dict:
    """The manifest's base model as {id, revision, weights}; schema-1 manifests named it
    `name_or_path` and recorded no weight hashes."""
    base = dict(manifest.get("base_model") or {})
    if "id" not in base and "name_or_path" in base:
        base["id"] = base.pop("name_or_path")
    return base


def modeling_settings(name: str, revision: str | None):
    from loraflow.settings import ModelSettings

    return ModelSettings(name_or_path=name, revision=revision)
