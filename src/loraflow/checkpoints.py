"""Training checkpoints in object storage, so a run that crashed on one worker resumes on the next.

Layout under `s3://BUCKET/PREFIX/checkpoints/<run key>/`:
    checkpoint-N/<files>            what transformers' Trainer wrote (minus training_args.bin)
    checkpoint-N/manifest.json      the storage layer's manifest (+ step, run key, adapter name),
                                    written LAST
    final/<files> + manifest.json   the finished adapter's PEFT files, staged for the next steps,
                                    with the training result (and adapter name) in its manifest

The run key is the flow run id, which says nothing about the adapter, so each manifest records
`adapter_name`: that is how `loraflow gc NAME` tells NAME's abandoned runs from other adapters'.
Recording it in the manifests, rather than moving runs under `checkpoints/<adapter>/<run key>/`,
keeps the layout: a run checkpointed before this change still resumes where it is, and only its
garbage collection differs (it names no adapter, so `gc NAME` leaves it alone and reports it).

Transfers go through `loraflow.storage.transfer`: a directory without a manifest is an interrupted
upload and is ignored; on download every file is checked against the manifest before anything
reads it.

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
from loraflow.log import get_logger
from loraflow.resume import UNUSED_ON_RESUME
from loraflow.storage.client import parse_s3_uri
from loraflow.storage.store import Store
from loraflow.storage.transfer import MANIFEST, download_dir, local_files, upload_files, write_manifest

if TYPE_CHECKING:
    from loraflow.settings import StorageSettings

log = get_logger("checkpoints")

# Written by Trainer but never loaded on resume, and a full pickle: it stays on the worker.
SKIPPED_FILES = UNUSED_ON_RESUME  # one rule: what resume never reads is never uploaded
_RUN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)


@dataclass(frozen=True)
class StoredCheckpoint:
    step: int
    uri: str


def run_prefix(storage: StorageSettings, run_key: str) -> str:
    """`s3://bucket/prefix/checkpoints/<run key>/` for one training run."""
    if not _RUN_KEY.fullmatch(run_key):  # fullmatch: `$` would let a final newline through
        raise StorageError(f"run key {run_key!r}: use letters, digits, '.', '_' or '-' (max 128)")
    prefix = storage.prefix.strip("/")
    return f"s3://{storage.bucket}/{prefix + '/' if prefix else ''}checkpoints/{run_key}/"


def _store(storage: StorageSettings, uri: str) -> tuple[Store, str]:
    bucket, key_prefix = parse_s3_uri(uri if uri.endswith("/") else uri + "/")
    return Store(storage, bucket), key_prefix


def upload_dir(storage: StorageSettings, local_dir: Path, uri: str, kind: str = "checkpoint", **fields: Any) -> str:
    """Upload a checkpoint (or, with kind="adapter", a finished adapter) under `uri`, manifest last."""
    store, key_prefix = _store(storage, uri)
    files = local_files(local_dir, kind, exclude=SKIPPED_FILES)
    write_manifest(store, key_prefix, upload_files(store, files, key_prefix, kind), **fields)
    return f"s3://{store.bucket}/{key_prefix}"


def download(storage: StorageSettings, uri: str, dest: Path, kind: str = "checkpoint") -> dict[str, Any]:
    """Download and verify what `uri`'s manifest lists into `dest` (replaced). Returns the manifest."""
    store, key_prefix = _store(storage, uri)
    return download_dir(store, key_prefix, dest, kind)


def upload_trained(storage: StorageSettings, train: dict[str, Any], uri: str, logs_uri: str, logs_dir: Path,
                   **fields: Any) -> None:
    """A trained adapter for another machine to fetch (`download_trained`): its files with the
    training result in the manifest, then its loss history and curve (copied into `logs_dir`)."""
    import shutil

    upload_dir(storage, Path(train["adapter_dir"]), uri, kind="adapter", train=train, **fields)
    shutil.rmtree(logs_dir, ignore_errors=True)
    logs_dir.mkdir(parents=True)
    for key in ("history_path", "loss_curve_path"):
        if train.get(key) and Path(train[key]).is_file():
            shutil.copy2(train[key], logs_dir / Path(train[key]).name)
    upload_dir(storage, logs_dir, logs_uri, kind="logs",
               **{k: v for k, v in fields.items() if k == "adapter_name"})


def download_trained(storage: StorageSettings, uri: str, logs_uri: str, dest: Path, logs_dest: Path
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trained adapter staged by another machine (sha256-verified into `dest`) and its logs: its
    manifest, and the training result recorded with it with the log paths pointing into `logs_dest`
    (None where that file did not come)."""
    manifest = download(storage, uri, dest, kind="adapter")
    download(storage, logs_uri, logs_dest, kind="logs")
    info = dict(manifest.get("train") or {})
    for key in ("history_path", "loss_curve_path"):
        if info.get(key):
            local = logs_dest / Path(info[key]).name
            info[key] = str(local) if local.is_file() else None
    return manifest, info


def latest_checkpoint(storage: StorageSettings, run_key: str) -> StoredCheckpoint | None:
    """The highest-step checkpoint whose manifest was written (i.e. whose upload completed)."""
    store, key_prefix = _store(storage, run_prefix(storage, run_key))
    pattern = re.compile(re.escape(key_prefix) + r"checkpoint-([0-9]+)/" + re.escape(MANIFEST))
    steps = [int(m.group(1)) for obj in store.list(key_prefix) if (m := pattern.fullmatch(obj["Key"]))]
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


def checkpoint_upload_callback(storage: StorageSettings, run_key: str, adapter_name: str | None = None):
    """A transformers `TrainerCallback` whose `on_save` uploads `checkpoint-<step>` of the run,
    recording `adapter_name` (settings.registry.adapter_name) in each checkpoint's manifest so that
    `gc NAME` can tell whose run it is; without it, gc never removes the run by name.

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
            owner = {"adapter_name": adapter_name} if adapter_name else {}
            upload_dir(storage, local, uri, step=state.global_step, run_key=run_key, **owner)
            log.info("checkpoint step %d uploaded to %s", state.global_step, uri)
            return control

    return UploadCheckpoints()


@dataclass(frozen=True)
class AbandonedRun:
    run_key: str
    objects: int
    bytes: int
    idle_s: float  # seconds since the run last wrote anything
    # What the run's newest manifest that records one says; None: checkpointed before loraflow
    # recorded it, by a caller that did not pass it, or no upload of the run completed.
    adapter_name: str | None = None


def abandoned_runs(storage: StorageSettings, grace_seconds: float) -> tuple[list[AbandonedRun], list[AbandonedRun]]:
    """Runs under `checkpoints/` that wrote nothing for `grace_seconds`, and the runs still within
    it, each with the adapter its manifests record. A finished run's folder is deleted by the flow
    after publishing, so what stays and goes quiet belongs to a run that failed or was abandoned (a
    dead worker never resubmitted). The grace period must exceed the time between two checkpoints
    of a live run."""
    from datetime import datetime, timezone

    prefix = storage.prefix.strip("/")
    root = f"{prefix + '/' if prefix else ''}checkpoints/"
    store = Store(storage, storage.bucket)
    groups: dict[str, list[dict]] = {}
    for obj in store.list(root):
        groups.setdefault(obj["Key"][len(root):].partition("/")[0], []).append(obj)
    now = datetime.now(timezone.utc)
    stale, recent = [], []
    for run_key, objs in sorted(groups.items()):
        idle = (now - max(o["LastModified"] for o in objs)).total_seconds()
        run = AbandonedRun(run_key, len(objs), sum(o["Size"] for o in objs), idle, _recorded_adapter(store, objs))
        (recent if idle < grace_seconds else stale).append(run)
    return stale, recent


def _recorded_adapter(store: Store, objs: list[dict]) -> str | None:
    """The adapter name in the run's newest manifest that has one (final-logs/ may not)."""
    manifests = sorted((o for o in objs if o["Key"].endswith("/" + MANIFEST)), key=lambda o: o["LastModified"],
                       reverse=True)
    for obj in manifests:
        try:
            got = store.get_json(obj["Key"])
        except IntegrityError:
            continue  # a torn or foreign manifest names nobody: gc by name then leaves the run alone
        name = got[0].get("adapter_name") if got and isinstance(got[0], dict) else None
        if isinstance(name, str) and name:
            return name
    return None
