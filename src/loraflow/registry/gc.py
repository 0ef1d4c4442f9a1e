"""`loraflow gc NAME`: remove what failed publishes left behind. A version directory without a
manifest whose newest object is older than the grace period is garbage (its publisher died or gave
up); so are lock claims past their lease and multipart uploads abandoned before the grace period.

A multipart upload's parts are not objects: the server keeps them aside (rclone in a hidden
`.rclone_temp_multipart_<id>` file beside the key, AWS in storage it bills) until the upload is
completed or aborted. gc aborts what ListMultipartUploads shows. An upload whose *server* died
(the embedded local store dies with a killed publish) is forgotten by the restarted server and
listed nowhere, yet its temporary file stays on disk; where this process knows the directory
behind the endpoint (the local store, or a server it started) gc removes those files too, and the
report counts the bytes it freed. For any other server it cannot see them, and says nothing it did
not do.

Retention (`--keep-last N`) also deletes complete versions, oldest first, except the newest N, any
version an alias points at, and any version that held `champion` (registry.promote_alias) in the
alias's last K moves (`--keep-champions K`, registry.gc_keep_champions), so a rollback always has
somewhere to go. A version's manifest is deleted first: from that moment the version does not
exist for readers (listings, pulls by alias or version), and a pull that read the manifest just
before fails on a missing object instead of placing a partial directory. Without `--keep-last`,
complete versions are never touched."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from loraflow.errors import ConfigError
from loraflow.log import get_logger
from loraflow.registry.aliases import LEASE_S, list_aliases
from loraflow.registry.catalog import complete_versions, open_registry
from loraflow.registry.history import read_history
from loraflow.registry.layout import MANIFEST, check_name
from loraflow.storage.store import error_code

log = get_logger("registry")


@dataclass
class GcReport:
    removed_versions: list[str] = field(default_factory=list)
    removed_objects: int = 0
    kept_recent: list[str] = field(default_factory=list)  # incomplete but younger than the grace period
    removed_locks: int = 0
    removed_bytes: int = 0  # of the incomplete versions' objects
    aborted_uploads: int = 0
    aborted_bytes: int | None = 0  # parts of the aborted uploads (None: the server cannot list parts)
    removed_temp_files: int = 0  # rclone temporary files no upload owns any more
    removed_temp_bytes: int = 0
    deleted_versions: list[str] = field(default_factory=list)  # complete versions removed by retention
    retained: dict[str, str] = field(default_factory=dict)  # version -> why retention kept it

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def gc_adapter(settings, name: str, *, grace_seconds: float | None = None, dry_run: bool = False,
               keep_last: int | None = None, keep_champions: int | None = None) -> GcReport:
    if (keep_last is not None and keep_last < 0) or (keep_champions is not None and keep_champions < 0):
        raise ConfigError("--keep-last and --keep-champions must be 0 or more")
    grace = settings.registry.gc_grace_seconds if grace_seconds is None else grace_seconds
    store, layout = open_registry(settings, name)
    store.check_bucket()
    now = datetime.now(timezone.utc)
    report = GcReport()
    if keep_last is not None:
        _apply_retention(settings, store, layout, report, keep_last, keep_champions, dry_run)

    groups: dict[str, list[dict]] = {}
    for obj in store.list(layout.versions_prefix):
        version = obj["Key"][len(layout.versions_prefix):].partition("/")[0]
        groups.setdefault(version, []).append(obj)
    doomed: list[str] = []
    for version, objs in sorted(groups.items()):
        if any(o["Key"].endswith("/" + MANIFEST) for o in objs):
            continue
        age = (now - max(o["LastModified"] for o in objs)).total_seconds()
        if age < grace:
            report.kept_recent.append(version)
            continue
        report.removed_versions.append(version)
        report.removed_bytes += sum(o.get("Size", 0) for o in objs)
        doomed.extend(o["Key"] for o in objs)

    lock_root = f"{layout.root}locks/"
    now_ns = time.time_ns()
    for obj in store.list(lock_root):
        stamp = obj["Key"].rsplit("/", 1)[-1].split("-", 1)[0]
        if stamp.isdigit() and now_ns - int(stamp) > LEASE_S * 1e9:
            doomed.append(obj["Key"])
            report.removed_locks += 1
    report.removed_objects = len(doomed) - report.removed_locks
    if doomed and not dry_run:
        store.delete(doomed)
    report.aborted_uploads, report.aborted_bytes = _abort_stale_uploads(store, layout.versions_prefix, grace,
                                                                        dry_run)
    _remove_orphaned_temp_files(store, layout, grace, dry_run, report, complete=set(groups) - set(
        report.removed_versions) - set(report.kept_recent))
    for version in report.removed_versions:
        log.info("%s incomplete version %s of %s", "would remove" if dry_run else "removed", version, name)
    return report


def _apply_retention(settings, store, layout, report: GcReport, keep_last: int, keep_champions: int | None,
                     dry_run: bool) -> None:
    champions = settings.registry.gc_keep_champions if keep_champions is None else keep_champions
    champion_alias = settings.registry.promote_alias
    versions = complete_versions(store, layout)
    keep = {v: f"one of the newest {keep_last}" for v in versions[max(0, len(versions) - keep_last):]} \
        if keep_last else {}
    recent = read_history(store, layout, champion_alias, champions) if champions else []
    for event in recent:
        for version in (event.get("to"), event.get("from")):
            if version:
                keep.setdefault(version, f"held {champion_alias} in its last {champions} moves")
    aliased = list_aliases(store, layout)
    for version in versions:
        aliases = sorted(a for a, v in aliased.items() if v == version)
        if aliases:
            keep[version] = "aliased: " + ",".join(aliases)
        if version in keep:
            report.retained[version] = keep[version]
            continue
        report.deleted_versions.append(version)
        if dry_run:
            continue
        # Aliases read again right before the deletion: an alias moved onto this version since the
        # listing above wins (no version is deleted under an alias that a reader could follow).
        if _aliases_of(store, layout, version):
            report.deleted_versions.pop()
            report.retained[version] = "aliased during gc"
            continue
        store.delete([layout.manifest_key(version)])  # first: the version is gone for readers
        store.delete([o["Key"] for o in store.list(layout.version_prefix(version))])
        log.info("deleted version %s of %s", version, layout.name)


def _aliases_of(store, layout, version: str) -> list[str]:
    return sorted(a for a, v in list_aliases(store, layout).items() if v == version)


def _abort_stale_uploads(store, prefix: str, grace: float, dry_run: bool) -> tuple[int, int | None]:
    """Abort the multipart uploads under `prefix` started before the grace period; returns how many
    and the bytes their parts held (None when the server does not list parts)."""
    from botocore.exceptions import ClientError

    uploads: list[dict] = []
    kwargs: dict = {"Bucket": store.bucket, "Prefix": prefix}
    while True:
        try:
            resp = store.client.list_multipart_uploads(**kwargs)
        except ClientError as exc:
            if error_code(exc) in ("NotImplemented", "501", "NoSuchUpload"):
                break  # no resumable uploads kept (rclone answers NoSuchUpload when there are none)
            with store.errors(f"list uploads in s3://{store.bucket}/{prefix}"):
                raise
        except Exception as exc:  # noqa: BLE001 - connection errors: one line, like every storage call
            with store.errors(f"list uploads in s3://{store.bucket}/{prefix}"):
                raise exc from None
        uploads.extend(resp.get("Uploads", []))
        if not resp.get("IsTruncated"):
            break
        kwargs.update(KeyMarker=resp.get("NextKeyMarker"), UploadIdMarker=resp.get("NextUploadIdMarker"))
    now = datetime.now(timezone.utc)
    count, size = 0, 0
    for upload in uploads:
        if (now - upload["Initiated"]).total_seconds() < grace:
            continue
        count += 1
        if size is not None:
            size = _parts_size(store, upload, size)
        if dry_run:
            continue
        with store.errors(f"abort upload of s3://{store.bucket}/{upload['Key']}"):
            try:
                store.client.abort_multipart_upload(Bucket=store.bucket, Key=upload["Key"],
                                                    UploadId=upload["UploadId"])
            except ClientError as exc:
                if error_code(exc) != "NoSuchUpload":  # completed or aborted meanwhile: gone either way
                    raise
    return count, size


def _parts_size(store, upload: dict, size: int) -> int | None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        pages = store.client.get_paginator("list_parts").paginate(
            Bucket=store.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        return size + sum(part.get("Size", 0) for page in pages for part in page.get("Parts", []))
    except (ClientError, BotoCoreError):
        return None


TEMP_PREFIX = ".rclone_temp_"  # rclone serve s3's in-flight PUTs and multipart uploads


def _remove_orphaned_temp_files(store, layout, grace: float, dry_run: bool, report: GcReport,
                                complete: set[str]) -> None:
    """rclone's temporary upload files under this adapter's versions, untouched for the grace
    period: no live upload owns them (the ones ListMultipartUploads showed were aborted above, and
    rclone removed their files). Only where this process knows the served directory."""
    import os

    from loraflow.storage.local import served_root

    root = served_root(store.storage)
    if root is None:
        return
    versions_dir = root / store.bucket / layout.versions_prefix
    if not versions_dir.is_dir():
        return
    cutoff = time.time() - grace
    for path in sorted(versions_dir.rglob(TEMP_PREFIX + "*")):
        try:
            st = path.lstat()
        except OSError:
            continue
        if not path.is_file() or st.st_mtime > cutoff:
            continue
        version = path.relative_to(versions_dir).parts[0]
        if not dry_run:
            path.unlink(missing_ok=True)
        report.removed_temp_files += 1
        report.removed_temp_bytes += st.st_size
        if version not in complete and version not in report.removed_versions and version not in report.kept_recent:
            report.removed_versions.append(version)  # a version whose only trace was its upload's temp file
    if dry_run:
        return
    for folder in sorted((p for p in versions_dir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            if not any(folder.iterdir()) and folder.stat().st_mtime <= cutoff:
                os.rmdir(folder)  # an empty version folder holds nothing any reader can see
        except OSError:
            pass


@dataclass
class CheckpointGcReport:
    removed_runs: list[dict] = field(default_factory=list)  # run_key, objects, bytes, idle_s, adapter_name
    kept_recent: list[str] = field(default_factory=list)  # runs that wrote within the grace period
    # Abandoned runs whose checkpoints name no adapter (checkpointed before loraflow recorded it):
    # `gc NAME` cannot know they are NAME's, so it leaves them and says so.
    unattributed: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def gc_checkpoints(settings, name: str | None = None, *, grace_seconds: float | None = None,
                   dry_run: bool = False) -> CheckpointGcReport:
    """Remove the checkpoints of adapter `name`'s training runs that failed or were abandoned: run
    folders under `checkpoints/` whose manifests record `adapter_name == name` and with nothing
    written for `registry.gc_checkpoint_grace_seconds` (published runs remove their own). Runs of
    other adapters are not touched; abandoned runs that record no adapter are reported in
    `unattributed` and left. `name=None` means every adapter's runs, unattributed ones included.
    Never touches the registry's versions."""
    from loraflow.checkpoints import abandoned_runs, delete_run

    grace = settings.registry.gc_checkpoint_grace_seconds if grace_seconds is None else grace_seconds
    if grace < 0:
        raise ConfigError("the checkpoint grace period must be 0 or more seconds")
    if name is not None:
        check_name(name)
    stale, recent = abandoned_runs(settings.storage, grace)
    report = CheckpointGcReport(kept_recent=[r.run_key for r in recent if name is None or r.adapter_name == name])
    for run in stale:
        entry = {"run_key": run.run_key, "objects": run.objects, "bytes": run.bytes, "idle_s": round(run.idle_s),
                 "adapter_name": run.adapter_name}
        if name is not None and run.adapter_name != name:
            if run.adapter_name is None:
                report.unattributed.append(entry)
            continue
        if not dry_run:
            delete_run(settings.storage, run.run_key)
        report.removed_runs.append(entry)
        log.info("%s checkpoints of run %s (%d objects, idle %.0f s)", "would remove" if dry_run else "removed",
                 run.run_key, run.objects, run.idle_s)
    return report
