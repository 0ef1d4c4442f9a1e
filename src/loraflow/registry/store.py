"""The registry's object-storage operations: boto3 underneath, every failure turned into one clear
`StorageError` line (never with credentials), uploads verified against what the server stored.

Transient errors (connection resets, 5xx, throttling) are retried with exponential backoff by
botocore's "standard" retry mode (see `loraflow.s3.make_client`); s3transfer retries interrupted
transfers. `retry_transient` adds one more layer around whole-file uploads/downloads, because a
multipart transfer that lost its connection mid-way is cheaper to redo than to report.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from loraflow.errors import IntegrityError, StorageError
from loraflow.hashing import sha256_file
from loraflow.log import get_logger
from loraflow.s3 import describe_client_error, make_client

log = get_logger("registry")

T = TypeVar("T")

MB = 1024 * 1024
# 8 MiB parts, 10 in flight: s3transfer's defaults, spelled out because the ETag check below
# needs the part size.
PART_SIZE = 8 * MB
MAX_CONCURRENCY = 10
_READ_CHUNK = 4 * MB


def transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                          max_concurrency=MAX_CONCURRENCY, use_threads=True)


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str
    md5: str | None  # whole-file hex for single-part uploads (their ETag on most servers), else None


def digest_file(path: Path) -> FileDigest:
    # md5 runs at a quarter of sha256's speed here and only a single-part ETag can be checked
    # against it without knowing the server's multipart ETag scheme, so large files skip it.
    with_md5 = path.stat().st_size < PART_SIZE
    sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            sha.update(chunk)
            if with_md5:
                md5.update(chunk)
            size += len(chunk)
    return FileDigest(size, sha.hexdigest(), md5.hexdigest() if with_md5 else None)


def _is_transient(exc: Exception) -> bool:
    from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError, ResponseStreamingError

    if isinstance(exc, (ConnectionClosedError, ReadTimeoutError, ResponseStreamingError)):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or exc.response.get("Error", {}).get("Code") in ("SlowDown", "RequestTimeout")
    return False


def retry_transient(fn: Callable[[], T], what: str, attempts: int = 3, base_delay: float = 0.5) -> T:
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified right below
            if attempt == attempts or not _is_transient(exc):
                raise
            delay = base_delay * 2 ** (attempt - 1)
            log.warning("%s: %s, retrying in %.1fs (%d/%d)", what, type(exc).__name__, delay, attempt, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")


def error_code(exc: Exception) -> str | None:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code"))
    return None


def _is_missing(exc: Exception) -> bool:
    return error_code(exc) in ("NoSuchKey", "404", "NotFound")


_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def cached_client(storage):
    """One boto3 client per endpoint and credentials, per process: making a client parses
    botocore's service model (hundreds of ms), which would dominate a cached pull. Clients are
    thread-safe. The key holds a digest of the secret, never the secret itself."""
    def reveal(value) -> str:
        return value.get_secret_value() if value is not None else ""

    ident = "\0".join(reveal(getattr(storage, f)) for f in
                      ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"))
    key = (storage.endpoint_url, storage.region, hashlib.sha256(ident.encode()).hexdigest())
    with _clients_lock:
        if key not in _clients:
            _clients[key] = make_client(storage)
        return _clients[key]


class Store:
    """One bucket on one S3-compatible endpoint."""

    def __init__(self, storage, client=None) -> None:
        self.storage = storage
        self.bucket = storage.bucket
        self.client = client or cached_client(storage)

    @contextmanager
    def errors(self, what: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            if error_code(exc) == "NoSuchBucket":
                raise StorageError(f"{what}: bucket {self.bucket!r} does not exist on "
                                   f"{self.storage.endpoint_url or 'AWS S3'}") from None
            raise describe_client_error(exc, what) from None

    def check_bucket(self) -> None:
        with self.errors(f"s3://{self.bucket}"):
            try:
                # A one-key listing rather than HeadBucket: HEAD answers carry no error body, so a
                # wrong secret would only say "403" instead of SignatureDoesNotMatch.
                self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
            except Exception as exc:
                if error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                    raise StorageError(f"bucket {self.bucket!r} does not exist on "
                                       f"{self.storage.endpoint_url or 'AWS S3'}") from None
                raise

    # --- small objects -------------------------------------------------------------------------
    def get_bytes(self, key: str) -> tuple[bytes, str] | None:
        """(body, etag), or None when the object does not exist."""
        with self.errors(f"read s3://{self.bucket}/{key}"):
            def attempt() -> tuple[bytes, str]:
                resp = self.client.get_object(Bucket=self.bucket, Key=key)
                return resp["Body"].read(), resp.get("ETag", "")

            try:
                return retry_transient(attempt, f"read {key}")
            except Exception as exc:
                if _is_missing(exc):
                    return None
                raise

    def get_json(self, key: str, attempts: int = 5) -> tuple[Any, str] | None:
        # Servers that write objects in place (rclone on a local directory truncates, then writes)
        # can serve a half-written small object for a moment; read again before calling it corrupt.
        for attempt in range(attempts):
            got = self.get_bytes(key)
            if got is None:
                return None
            body, etag = got
            try:
                return json.loads(body), etag
            except ValueError:
                time.sleep(0.02 * (attempt + 1))
        raise IntegrityError(f"s3://{self.bucket}/{key}: not valid JSON")

    def put_bytes(self, key: str, body: bytes, *, content_type: str = "application/json",
                  **conditions: str) -> str:
        """Write a small object and check the server's ETag against the body's md5."""
        with self.errors(f"write s3://{self.bucket}/{key}"):
            resp = self.client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                          ContentType=content_type, **conditions)
        etag = resp.get("ETag", "").strip('"')
        if etag and len(etag) == 32 and etag != hashlib.md5(body, usedforsecurity=False).hexdigest():
            head = self.head(key)
            if head is None or head["ContentLength"] != len(body):
                raise IntegrityError(f"s3://{self.bucket}/{key}: the server stored something else "
                                     "than was sent")
        return resp.get("ETag", "")

    def put_json(self, key: str, data: Any, **conditions: str) -> str:
        return self.put_bytes(key, json.dumps(data, indent=2, sort_keys=True).encode(), **conditions)

    def head(self, key: str) -> dict | None:
        with self.errors(f"stat s3://{self.bucket}/{key}"):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=key)
            except Exception as exc:
                if _is_missing(exc):
                    return None
                raise

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def list(self, prefix: str) -> Iterator[dict]:
        """Every object under `prefix` (Key, Size, LastModified, ETag)."""
        with self.errors(f"list s3://{self.bucket}/{prefix}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                yield from page.get("Contents", [])

    def list_dirs(self, prefix: str) -> list[str]:
        """The next path level under `prefix` (common prefixes without the trailing '/')."""
        out = []
        with self.errors(f"list s3://{self.bucket}/{prefix}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                out.extend(p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))
        return out

    def delete(self, keys: list[str]) -> None:
        with self.errors(f"delete in s3://{self.bucket}"):
            for start in range(0, len(keys), 1000):
                batch = keys[start:start + 1000]
                resp = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
                if resp.get("Errors"):
                    first = resp["Errors"][0]
                    raise StorageError(f"delete s3://{self.bucket}/{first.get('Key')}: {first.get('Code')}")

    # --- files ---------------------------------------------------------------------------------
    def upload_file(self, path: Path, key: str) -> None:
        """Upload, multipart and parallel above PART_SIZE; `verify_uploads` checks the result."""
        def attempt() -> None:
            self.client.upload_file(str(path), self.bucket, key, Config=transfer_config())

        with self.errors(f"upload {path.name} to s3://{self.bucket}/{key}"):
            retry_transient(attempt, f"upload {path.name}")

    def verify_uploads(self, prefix: str, expected: dict[str, tuple[Path, FileDigest]]) -> None:
        """Check what the server holds under `prefix` with one listing: every file's size; small
        files also by content through the ETag, the md5 the server computed (a server whose ETag
        is not an md5, e.g. SSE-KMS, gets the object read back and hashed). Large files are checked
        by size only: hashing them a second way costs more than their upload on a fast link, and
        every pull verifies their sha256 anyway."""
        listed = {obj["Key"][len(prefix):]: obj for obj in self.list(prefix)}
        for name, (path, digest) in expected.items():
            uri = f"s3://{self.bucket}/{prefix}{name}"
            obj = listed.get(name)
            if obj is None or obj["Size"] != digest.size:
                got = "nothing" if obj is None else f"{obj['Size']} bytes"
                raise IntegrityError(f"{uri}: upload did not verify (server has {got}, sent {digest.size} bytes)")
            etag = obj.get("ETag", "").strip('"')
            if digest.md5 is None or etag == digest.md5:
                continue
            log.debug("%s: ETag %s is not the md5; reading the object back to verify", uri, etag)
            tmp = path.with_name(f".{path.name}.verify")
            try:
                self.download_file(prefix + name, tmp)
                if sha256_file(tmp) != digest.sha256:
                    raise IntegrityError(f"{uri}: upload did not verify (sha256 differs from {path})")
            finally:
                tmp.unlink(missing_ok=True)

    def download_file(self, key: str, path: Path) -> None:
        def attempt() -> None:
            self.client.download_file(self.bucket, key, str(path), Config=transfer_config())

        with self.errors(f"download s3://{self.bucket}/{key}"):
            try:
                retry_transient(attempt, f"download {key}")
            except Exception as exc:
                if _is_missing(exc):
                    raise StorageError(f"s3://{self.bucket}/{key}: object is missing") from None
                raise
