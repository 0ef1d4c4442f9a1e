"""boto3 clients, `s3://` URIs and one-line storage errors. Nothing here knows which server it talks
to: AWS S3, MinIO, Ceph RGW, R2 and the local rclone server differ only in `endpoint_url`.

Credentials come from boto3's standard chain only: environment (`AWS_ACCESS_KEY_ID` ...), the
shared config/credentials files (`storage.profile` or `AWS_PROFILE`), container and instance
roles, web identity (pod roles). Settings never hold secrets, so no settings dump, flow parameter,
manifest or log line can carry one.

Retries live here and nowhere else: botocore's "standard" mode retries a transient failure
(connection refused or reset, timeouts, 5xx, throttling) with jittered exponential backoff, up to
`TOTAL_ATTEMPTS` attempts per request. So a stopped server surfaces as one error line after at
most ~`OUTAGE_BOUND_REFUSED_S` seconds (connections refused: backoffs of at most 1 + 2 + 4 s), an
unreachable one after ~`OUTAGE_BOUND_UNREACHABLE_S` (4 connect timeouts plus the backoffs).
s3transfer's own whole-download retry is switched off (see `store.transfer_config`), since it
would multiply these attempts. Prefect retries whole tasks only where a task may repeat as a whole
(training, which resumes from its checkpoint); storage tasks are not retried on top.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from loraflow.settings import StorageSettings

TOTAL_ATTEMPTS = 4
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
_BACKOFF_BOUND_S = 1 + 2 + 4  # standard mode: random(0,1) * 2**(attempt-1), before attempts 2..4
OUTAGE_BOUND_REFUSED_S = _BACKOFF_BOUND_S + 1
OUTAGE_BOUND_UNREACHABLE_S = TOTAL_ATTEMPTS * CONNECT_TIMEOUT_S + _BACKOFF_BOUND_S

# Environment that changes which endpoint or identity boto3 resolves; part of the client cache key.
_CHAIN_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ENDPOINT_URL",
                    "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def is_s3_uri(value: str | Path) -> bool:
    return isinstance(value, str) and value.startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ('bucket', 'some/key')."""
    if not is_s3_uri(uri):
        raise ConfigError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ConfigError(f"s3 URI has no bucket: {uri!r}")
    if any(part in (".", "..") for part in key.split("/")):
        raise ConfigError(f"s3 URI has '.' or '..' path segments: {uri!r}")
    return bucket, key


# Where credentials for AWS S3 could come from without asking the network (no instance-metadata
# probe: a machine whose only identity is an instance role says `storage.endpoint_url: aws`).
_AWS_IDENTITY_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                           "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def uses_local_store(storage: StorageSettings) -> bool:
    """`storage.endpoint_url: local`, or no endpoint and nothing that points at AWS: the embedded
    local store under LORAFLOW_HOME (as Prefect falls back to its ephemeral API), so commands work
    after `make demo` with nothing to export. `aws` forces AWS S3."""
    if storage.endpoint_url == "local":
        return True
    if storage.endpoint_url:
        return False
    if storage.profile or any(os.environ.get(v) for v in _AWS_IDENTITY_VARIABLES + ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")):
        return False
    aws_dir = Path(os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config").expanduser().parent
    shared = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE"), os.environ.get("AWS_CONFIG_FILE"),
              aws_dir / "credentials", aws_dir / "config"]
    return not any(path and Path(path).expanduser().is_file() for path in shared)


def make_client(storage: StorageSettings):
    """A boto3 S3 client for the storage settings, credentials from boto3's standard chain (the
    local store's own generated key when it is the local store)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ProfileNotFound

    config = Config(
        retries={"total_max_attempts": TOTAL_ATTEMPTS, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        s3={"addressing_style": "path"},  # path style works on every S3-compatible server
        signature_version="s3v4",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    if uses_local_store(storage):
        from loraflow.storage.local import embedded_server

        server = embedded_server(storage.bucket)
        return boto3.session.Session().client(
            "s3", endpoint_url=server.endpoint_url, region_name="us-east-1", config=config,
            aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key)
    try:
        session = boto3.session.Session(profile_name=storage.profile)
    except ProfileNotFound:
        raise ConfigError(f"storage.profile={storage.profile!r}: no such profile in the AWS config files") from None
    endpoint = None if storage.endpoint_url == "aws" else storage.endpoint_url
    return session.client("s3", endpoint_url=endpoint,
                          region_name=storage.region or session.region_name or "us-east-1", config=config)


_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def cached_client(storage: StorageSettings):
    """One client per endpoint and identity, per process: making one parses botocore's service
    model (hundreds of ms), which would dominate a cached pull. Clients are thread-safe. The key
    holds a digest of the credential variables, never their values."""
    chain = "\0".join(os.environ.get(v, "") for v in _CHAIN_VARIABLES + ("LORAFLOW_HOME",))
    key = (storage.endpoint_url, storage.region, storage.profile, hashlib.sha256(chain.encode()).hexdigest())
    with _clients_lock:
        if key not in _clients:
            _clients[key] = make_client(storage)
        return _clients[key]


def endpoint_of(client) -> str:
    return getattr(client.meta, "endpoint_url", None) or "AWS S3"


_HINTS = {
    "SignatureDoesNotMatch": "the secret access key is wrong",
    "InvalidAccessKeyId": "the access key id is unknown to the server",
    "AccessDenied": "access denied",
    "NoSuchBucket": "the bucket does not exist",
    "NoSuchKey": "no such object",
    "404": "not found",
    "403": "forbidden (check credentials)",
}


def describe_client_error(exc: Exception, what: str) -> StorageError:
    """One clear line for a boto/botocore failure; never includes credentials."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "?")
        return StorageError(f"{what}: {code} ({_HINTS.get(code, error.get('Message', ''))})")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{what}: cannot reach the storage endpoint {exc.kwargs.get('endpoint_url', '?')} "
                            f"(gave up after {TOTAL_ATTEMPTS} attempts)")
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{what}: no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                            "storage.profile, or give the machine a role")
    return StorageError(f"{what}: {type(exc).__name__}: {exc}")
