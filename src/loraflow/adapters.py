"""Loading a published adapter onto its base model: `load_adapter` (public as
`loraflow.load_adapter`). It lives outside the registry so that the registry (pull, publish,
aliases) never imports torch, transformers or peft: a service that only moves adapters stays light.

The base model is checked against the manifest's recorded weight hashes before (local directory)
or right after (hub download) it loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loraflow.errors import StorageError
from loraflow.registry.manifest import base_identity
from loraflow.registry.pull import pull_adapter
from loraflow.storage.transfer import MANIFEST


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


def modeling_settings(name: str, revision: str | None):
    """The model section that names a manifest's base model, for loraflow.modeling's resolvers."""
    from loraflow.settings import ModelSettings

    return ModelSettings(name_or_path=name, revision=revision)
