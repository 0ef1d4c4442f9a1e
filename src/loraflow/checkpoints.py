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

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.errors import IntegrityError, StorageError
from loraflow.log import get_logger
from loraflow.s3 import describe_client_error, make_client, parse_s3_uri

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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def upload_dir(storage: StorageSettings, local_dir: Path, uri: str, *, extra: dict[str, Any] | None = None,
               allowed_suffixes: tuple[str, ...] = CHECKPOINT_SUFFIXES) -> str:
    """Upload the files of `local_dir` under `uri`, then `MANIFEST.json` with their sha256s."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key_prefix = parse_s3_uri(uri if uri.endswith("/") else uri + "/")
    client = make_client(storage)
    files: dict[str, dict[str, Any]] = {}
    try:
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            if path.name in SKIPPED_FILES or rel == MANIFEST or not rel.endswith(allowed_suffixes):
                continue
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
            client.upload_file(str(path), bucket, key_prefix + rel)
        manifest = {**(extra or {}), "files": files}
        client.put_object(Bucket=bucket, Key=key_prefix + MANIFEST,
                          Body=json.dumps(manifest, indent=2, sort_keys=True).encode())
    except (ClientError, BotoCoreError) as exc:
        raise describe_client_error(exc, f"upload {local_dir} to {uri}") from None
    return f"s3://{bucket}/{key_prefix}"


def download_dir(storage: StorageSettings, uri: str, dest: Path, *,
                 allowed_suffixes: tuple[str, ...] = CHECKPOINT_SUFFIXES) -> dict[str, Any]:
    """Download what `uri/MANIFEST.json` lists into `dest`, verifying every sha256 before the
    file is moved into place. Returns the manifest."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key_prefix = parse_s3_uri(uri if uri.endswith("/") else uri + "/")
    client = make_client(storage)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        manifest = json.loads(client.get_object(Bucket=bucket, Key=key_prefix + MANIFEST)["Body"].read())
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
            client.download_file(bucket, key_prefix + rel, str(tmp))
            got = sha256_file(tmp)
            if got != meta["sha256"]:
                tmp.unlink(missing_ok=True)
                raise IntegrityError(f"{uri}{rel}: sha256 {got} does not match the manifest ({meta['sha256']})")
            tmp.replace(target)
    except (ClientError, BotoCoreError) as exc:
        raise describe_client_error(exc, f"download {uri}") from None
    return manifest


def latest_checkpoint(storage: StorageSettings, run_key: str) -> StoredCheckpoint | None:
    """The highest-step checkpoint whose manifest was written (i.e. whose upload completed)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key_prefix = parse_s3_uri(run_prefix(storage, run_key))
    client = make_client(storage)
    best: StoredCheckpoint | None = None
    pattern = re.compile(re.escape(key_prefix) + r"checkpoint-(\d+)/" + re.escape(MANIFEST) + "$")
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
            for obj in page.get("Contents", []):
                m = pattern.match(obj["Key"])
                if m and (best is None or int(m.group(1)) > best.step):
                    step = int(m.group(1))
                    best = StoredCheckpoint(step, f"s3://{bucket}/{key_prefix}checkpoint-{step}/")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchBucket", "404"):
            return None
        raise describe_client_error(exc, f"list {run_prefix(storage, run_key)}") from None
    except BotoCoreError as exc:
        raise describe_client_error(exc, f"list {run_prefix(storage, run_key)}") from None
    return best


def delete_run(storage: StorageSettings, run_key: str) -> int:
    """Remove a run's checkpoints and staged adapter (after it was published). Returns objects deleted."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key_prefix = parse_s3_uri(run_prefix(storage, run_key))
    client = make_client(storage)
    deleted = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
                deleted += len(keys)
    except (ClientError, BotoCoreError) as exc:
        raise describe_client_error(exc, f"delete {run_prefix(storage, run_key)}") from None
    return deleted


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
