"""`loraflow gc NAME`: remove what failed publishes left behind. A version directory without a
manifest whose newest object is older than the grace period is garbage (its publisher died or gave
up); so are lock claims past their lease and multipart uploads abandoned before the grace period.
Complete versions are never touched: aliases and pinned consumers may point at any of them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from loraflow.log import get_logger
from loraflow.registry.aliases import LEASE_S
from loraflow.registry.catalog import open_registry
from loraflow.registry.layout import MANIFEST
from loraflow.storage.store import error_code

log = get_logger("registry")


@dataclass
class GcReport:
    removed_versions: list[str] = field(default_factory=list)
    removed_objects: int = 0
    kept_recent: list[str] = field(default_factory=list)  # incomplete but younger than the grace period
    removed_locks: int = 0
    aborted_uploads: int = 0

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def gc_adapter(settings, name: str, *, grace_seconds: float | None = None, dry_run: bool = False) -> GcReport:
    grace = settings.registry.gc_grace_seconds if grace_seconds is None else grace_seconds
    store, layout = open_registry(settings, name)
    store.check_bucket()
    now = datetime.now(timezone.utc)
    report = GcReport()

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
    report.aborted_uploads = _abort_stale_uploads(store, layout.versions_prefix, grace, dry_run)
    for version in report.removed_versions:
        log.info("%s incomplete version %s of %s", "would remove" if dry_run else "removed", version, name)
    return report


def _abort_stale_uploads(store, prefix: str, grace: float, dry_run: bool) -> int:
    from botocore.exceptions import ClientError

    try:
        resp = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=prefix)
    except ClientError as exc:
        if error_code(exc) in ("NotImplemented", "501", "NoSuchUpload"):
            return 0  # no resumable uploads kept (rclone answers NoSuchUpload when there are none)
        with store.errors(f"list uploads in s3://{store.bucket}/{prefix}"):
            raise
    now = datetime.now(timezone.utc)
    count = 0
    for upload in resp.get("Uploads", []):
        if (now - upload["Initiated"]).total_seconds() >= grace:
            count += 1
            if not dry_run:
                with store.errors(f"abort upload of s3://{store.bucket}/{upload['Key']}"):
                    store.client.abort_multipart_upload(Bucket=store.bucket, Key=upload["Key"],
                                                        UploadId=upload["UploadId"])
    return count
