"""Training checkpoints in object storage, so a run that crashed on one worker resumes on the next.

Layout under `s3://BUCKET/PREFIX/checkpoints/<run key>/`:
    checkpoint-N/<files>            what transformers' Trainer wrote (minus training_args.bin)
    checkpoint-N/MANIFEST.json      {"step": N, "files": {name: {"sha256", "size"}}}, written LAST
    final/<files> + final/MANIFEST.json   the finished adapter, staged for evaluation elsewhere

A directory without a manifest is an interrupted upload and is ignored. On download every file is
checked against the manifest before anything reads it.

Security note: a Trainer checkpoint holds torch pickles (optimizer.pt, scheduler.pt, rng_state.pth).
transformers 5.24 reads every one of them with `torch.load(..., weights_only=True)` (trainer.py,
`_load_optimizer_and_scheduler` / `_load_rng_state`, behind `check_torch_load_is_safe()`, torch>=2.6),
which refuses arbitrary objects; `training_args.bin` (a full pickle) is written but never read back
by Trainer, so it is not uploaded. The sha256 manifest, written by us after the files, guards
integrity: only files it lists are downloaded, and only when their hashes match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.errors import IntegrityError, StorageError
from loraflow.hashing import sha256_file
from loraflow.log import get_logger
from loraflow.registry.store import Store
from loraflow.s3 import parse_s3_uri

if TYPE_CHECKING:
    from loraflow.settings import StorageSettings

log = get_logger("checkpoints")

MANIFEST = "MANIFEST.json"
# Written by Trainer but never loaded on resume, and a full pickle: it stays on the worker.
SKIPPED_FILES = frozenset({"training_args.bin"})
# What a checkpoint may hold. .pt/.pth are read by transformers with weights_only=True (see above).
CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".pt", ".pth", ".md", ".txt", ".jsonl", ".png", ".model")
# A finished adapter is safetensors + metadata only.
ADAPTER_SUFFIXES = (".safetensors", ".json", ".md", ".txt", ".jsonl", ".png", ".model")
_RUN_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class StoredCheckpoint:
    step: int
    uri: str


def run_prefix(storage: StorageSettings, run_key: str) -> str:
    """`s3://bucket/prefix/checkpoints/<run key>/` for one training run."""
    if not _RUN_KEY.match(run_key):
        raise StorageError(f"run key {run_key!r}: use letters, digits, '.', '_' or '-' (max 128)")
    prefix = storage.prefix.strip("/")
    return f"s3://{storage.bucket}/{prefix + '/' if prefix else ''}checkpoints/{run_key}/"


def _store(storage: StorageSettings, uri: str) -> tuple[Store, str]:
    """The registry's Store (retries, one-line errors) for the bucket `uri` names, and its key prefix."""
    bucket, key_prefix = parse_s3_uri(uri if uri.endswith("/") else uri + "/")
    return Store(storage.model_copy(update={"bucket": bucket})), key_prefix


def upload_dir(storage: StorageSettings, local_dir: Path, uri: str, *, extra: dict[str, Any] | None = None,
               allowed_suffixes: tuple[str, ...] = CHECKPOINT_SUFFIXES) -> str:
    """Upload the files of `local_dir` under `uri`, then `MANIFEST.json` with their sha256s."""
    store, key_prefix = _store(storage, uri)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        if path.name in SKIPPED_FILES or rel == MANIFEST or not rel.endswith(allowed_suffixes):
            continue
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        store.upload_file(path, key_prefix + rel)
    store.put_json(key_prefix + MANIFEST, {**(extra or {}), "files": files})
    return f"s3://{store.bucket}/{key_prefix}"


def download_dir(storage: StorageSettings, uri: str, dest: Path, *,
                 allowed_suffixes: tuple[str, ...] = CHECKPOINT_SUFFIXES) -> dict[str, Any]:
    """Download what `uri/MANIFEST.json` lists into `dest`, verifying every sha256 before the
    file is moved into place. Returns the manifest."""
    store, key_prefix = _store(storage, uri)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    got_manifest = store.get_json(key_prefix + MANIFEST)
    if got_manifest is None:
        raise StorageError(f"{uri}: no {MANIFEST} (the upload never completed)")
    manifest = got_manifest[0]
    for rel, meta in manifest["files"].items():
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise StorageError(f"{uri}: manifest lists a path outside the checkpoint: {rel!r}")
        if not rel.endswith(allowed_suffixes):
            raise StorageError(f"{uri}: refusing {rel!r}: only {', '.join(allowed_suffixes)} files are accepted")
        target = dest / rel
        if target.is_file() and target.stat().st_size == meta["size"] and sha256_file(target) == meta["sha256"]:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        store.download_file(key_prefix + rel, tmp)
        got = sha256_file(tmp)
        if got != meta["sha256"]:
            tmp.unlink(missing_ok=True)
            raise IntegrityError(f"{uri}{rel}: sha256 {got} does not match the manifest ({meta['sha256']})")
        tmp.replace(target)
    return manifest


def latest_checkpoint(storage: StorageSettings, run_key: str) -> StoredCheckpoint | None:
    """The highest-step checkpoint whose manifest was written (i.e. whose upload completed)."""
    store, key_prefix = _store(storage, run_prefix(storage, run_key))
    pattern = re.compile(re.escape(key_prefix) + r"checkpoint-(\d+)/" + re.escape(MANIFEST) + "$")
    steps = [int(m.group(1)) for obj in store.list(key_prefix) if (m := pattern.match(obj["Key"]))]
    if not steps:
        return None
    step = max(steps)
    return StoredCheckpoint(step, f"s3://{store.bucket}/{key_prefix}checkpoint-{step}/")


def delete_run(storage: StorageSettings, run_key: str) -> int:
    """Remove a run's checkpoints and staged adapter (after it was published). Returns objects deleted."""
    store, key_prefix = _store(storage, run_prefix(storage, run_key))
    keys = [obj["Key"] for obj in store.list(key_prefix)]
    store.delete(keys)
    return len(keys)


def checkpoint_upload_callback(storage: StorageSettings, run_key: str):
    """A transformers `TrainerCallback` whose `on_save` uploads `checkpoint-<step>` of the run.

    Built by a function so importing this module does not import transformers."""
    from transformers import TrainerCallback

    class UploadCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return control
            local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not local.is_dir():
                log.warning("checkpoint %s not found after save; nothing uploaded", local)
                return control
            uri = run_prefix(storage, run_key) + f"checkpoint-{state.global_step}/"
            upload_dir(storage, local, uri, extra={"step": state.global_step, "run_key": run_key})
            log.info("checkpoint step %d uploaded to %s", state.global_step, uri)
            return control

    return UploadCheckpoints()
