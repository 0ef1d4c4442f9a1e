"""What downstream services call: `pull_adapter` fetches a version into a local cache keyed by
version, verified file by file against its manifest; `load_adapter` returns a PeftModel on top of
the base model the manifest names.

The cache is `LORAFLOW_HOME/adapters/<name>/<version>/` (or `<dest>/<name>/<version>/`). A version
directory only ever appears there by an atomic rename of a fully verified temporary directory, so
its presence means it is complete; a cached version costs no download (an alias costs one GET).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loraflow.errors import IntegrityError, StorageError
from loraflow.hashing import sha256_file
from loraflow.log import get_logger
from loraflow.registry.aliases import current_version
from loraflow.registry.catalog import complete_versions, fetch_manifest, open_registry
from loraflow.registry.layout import MANIFEST, parse_ref

log = get_logger("registry")


def cache_root(dest: str | os.PathLike | None = None) -> Path:
    if dest is not None:
        root = Path(dest).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        return root
    from loraflow.paths import cache_dir

    return cache_dir("adapters")


def pull_adapter(ref: str, *, settings=None, dest: str | os.PathLike | None = None) -> Path:
    """`NAME` (= `NAME@latest`), `NAME@ALIAS` or `NAME==VERSION` -> the local directory holding
    the verified adapter (PEFT layout plus README.md, metrics.json, manifest.json)."""
    name, alias, version = parse_ref(ref)
    root = cache_root(dest) / name
    if version and (root / version / MANIFEST).is_file():
        return root / version  # pinned and cached: no network at all
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
    final = root / version
    if (final / MANIFEST).is_file():
        log.debug("%s %s already cached at %s", name, version, final)
        return final

    manifest = fetch_manifest(store, layout, version)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".part", dir=root))
    try:
        def fetch(entry: dict) -> None:
            path = tmp / entry["name"]
            store.download_file(layout.file_key(version, entry["name"]), path)
            size = path.stat().st_size
            if size != entry["size"] or sha256_file(path) != entry["sha256"]:
                raise IntegrityError(
                    f"{layout.uri(layout.file_key(version, entry['name']))}: checksum does not match "
                    f"the manifest ({size} bytes, expected {entry['size']}); refusing this adapter")

        entries = [e for e in manifest["files"] if e["name"] != MANIFEST]
        # The big safetensors file is itself fetched in parallel ranges; the small ones go beside it.
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="lf-pull") as pool:
            for future in [pool.submit(fetch, e) for e in entries]:
                future.result()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # a concurrent pull may have won the rename
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("pulled %s %s into %s", name, version, final)
    return final


def load_adapter(ref: str, *, settings=None, base_model=None, dest=None, **model_kwargs):
    """Pull `ref` and return `PeftModel.from_pretrained(base, adapter_dir)`. `base_model` is a
    loaded model, a hub id or a local directory; by default the one the manifest names."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = pull_adapter(ref, settings=settings, dest=dest)
    if base_model is None or isinstance(base_model, (str, os.PathLike)):
        manifest = json.loads((adapter_dir / MANIFEST).read_text())
        base = manifest.get("base_model") or {}
        name_or_path = str(base_model or base.get("name_or_path") or "")
        if not name_or_path:
            raise StorageError(f"{adapter_dir / MANIFEST}: names no base model; pass base_model=")
        if base_model is None and base.get("revision"):
            model_kwargs.setdefault("revision", base["revision"])
        if name_or_path.startswith("s3://"):
            name_or_path = str(_mirror_base(settings, name_or_path))
            model_kwargs.pop("revision", None)
        base_model = AutoModelForCausalLM.from_pretrained(name_or_path, **model_kwargs)
    return PeftModel.from_pretrained(base_model, str(adapter_dir))


def _mirror_base(settings, uri: str) -> Path:
    import hashlib

    from loraflow.paths import cache_dir
    from loraflow.s3 import download_prefix

    if settings is None:
        from loraflow.settings import load_settings

        settings = load_settings()
    dest = cache_dir("models", hashlib.sha256(uri.encode()).hexdigest()[:16])
    # Base weights from storage are safetensors only, like adapters: nothing gets unpickled.
    return download_prefix(settings.storage, uri, dest,
                           allowed_suffixes=(".safetensors", ".json", ".txt", ".model", ".jinja", ".md"))
