"""The one place boto3 clients are made and `s3://` URIs are parsed, shared by dataset fetch,
base-model mirrors and the adapter registry. Nothing here knows which server it talks to:
AWS S3, MinIO, Ceph RGW, R2 and the local rclone server differ only in `endpoint_url`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from loraflow.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from loraflow.settings import StorageSettings


def is_s3_uri(value: str | Path) -> bool:
    return isinstance(value, str) and value.startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ('bucket', 'some/key')."""
    if not is_s3_uri(uri):
        raise ConfigError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ConfigError(f"s3 URI has no bucket: {uri!r}")
    return bucket, key


def make_client(storage: StorageSettings, *, max_attempts: int = 5, connect_timeout: float = 5.0):
    """A boto3 S3 client from the storage settings. Credentials come from the settings (which fall
    back to the standard AWS variables) or boto3's own chain; they are never logged."""
    import boto3
    from botocore.config import Config

    def secret(value):
        return value.get_secret_value() if value is not None else None

    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},  # backoff on transient errors
        connect_timeout=connect_timeout,
        read_timeout=60,
        s3={"addressing_style": "path"},  # path style works on every S3-compatible server
        signature_version="s3v4",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=storage.endpoint_url,
        region_name=storage.region or "us-east-1",
        aws_access_key_id=secret(storage.aws_access_key_id),
        aws_secret_access_key=secret(storage.aws_secret_access_key),
        aws_session_token=secret(storage.aws_session_token),
        config=config,
    )


def describe_client_error(exc: Exception, what: str) -> StorageError:
    """One clear line for a boto/botocore failure; never includes credentials."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "?")
        hints = {
            "SignatureDoesNotMatch": "the secret access key is wrong",
            "InvalidAccessKeyId": "the access key id is unknown to the server",
            "AccessDenied": "access denied",
            "NoSuchBucket": "the bucket does not exist",
            "NoSuchKey": "no such object",
            "404": "not found",
            "403": "forbidden (check credentials)",
        }
        return StorageError(f"{what}: {code} ({hints.get(code, exc.response.get('Error', {}).get('Message', ''))})")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{what}: cannot reach the storage endpoint ({exc.kwargs.get('endpoint_url', '?')})")
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{what}: no credentials (set storage.aws_access_key_id/secret or AWS_ACCESS_KEY_ID)")
    return StorageError(f"{what}: {type(exc).__name__}: {exc}")


def download_prefix(storage: StorageSettings, uri: str, dest: Path, *,
                    allowed_suffixes: tuple[str, ...] | None = None) -> Path:
    """Mirror every object under an `s3://bucket/prefix/` into `dest` (skipping files already there
    with the same size). `allowed_suffixes` refuses anything else, e.g. pickled weights."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    client = make_client(storage)
    dest.mkdir(parents=True, exist_ok=True)
    found = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if not rel or rel.endswith("/"):
                    continue
                if ".." in Path(rel).parts:
                    raise StorageError(f"{uri}: refusing object key that escapes the prefix: {obj['Key']!r}")
                if allowed_suffixes is not None and not rel.endswith(allowed_suffixes):
                    raise StorageError(f"{uri}: refusing {rel!r}: only {', '.join(allowed_suffixes)} files are accepted")
                found += 1
                target = dest / rel
                if target.is_file() and target.stat().st_size == obj["Size"]:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".part")
                client.download_file(bucket, obj["Key"], str(tmp))
                tmp.replace(target)
    except (ClientError, BotoCoreError) as exc:
        raise describe_client_error(exc, f"download {uri}") from None
    if not found:
        raise StorageError(f"{uri}: no objects under this prefix")
    return dest
