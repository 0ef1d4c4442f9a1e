"""boto3 clients, `s3://` URIs and one-line storage errors. Nothing here knows which server it talks
to: AWS S3, MinIO, Ceph RGW, R2 and the local rclone server differ only in `endpoint_url`.

Credentials come from boto3's standard chain only: environment (`AWS_ACCESS_KEY_ID` ...), the
shared config/credentials files (`storage.profile` or `AWS_PROFILE`), container and instance
roles, web identity (pod roles). Settings never hold secrets, so no settings dump, flow parameter,
manifest or log line can carry one.

Retries and deadlines live here and nowhere else. Every S3 request (one API call: a GET, a PUT, a
listing page, one part of a multipart transfer) has one total deadline, `DEADLINE_S` = 30 s, for
all its attempts together: botocore's "standard" mode retries a transient failure (connection
refused or reset, timeouts, 5xx, throttling) with jittered exponential backoff, and `_deadline`
starts an attempt only if it can end within the deadline (connect `CONNECT_TIMEOUT_S` + no byte for
`READ_TIMEOUT_S`), so a request is answered or fails within 30 s whatever the server does. Measured
against a server that accepts connections and never answers: two attempts, one error line after
25 s (it was 4 x 30 s = 122 s); connections refused: 4 attempts in at most ~7 s; packets dropped:
3 attempts in at most ~22 s. A body that keeps arriving is never cut (a 670 MB download may take
longer than 30 s); one that stops for `READ_TIMEOUT_S` is. A loraflow command stops at its first
failed request, so a dead store fails any command within about 30 s. s3transfer's own
whole-download retry is switched off (see `store.transfer_config`), since it would multiply these
attempts. Prefect retries whole tasks only where a task may repeat as a whole (training, which
resumes from its checkpoint); storage tasks are not retried on top.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from loraflow.settings import StorageSettings

DEADLINE_S = 30.0       # per request, all attempts and backoffs included
TOTAL_ATTEMPTS = 4      # at most; fewer when the next one could not end within DEADLINE_S
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 12.0   # seconds without a byte; S3 answers in well under a second
_BACKOFF_BOUND_S = 1 + 2 + 4  # standard mode: random(0,1) * 2**(attempt-1), before attempts 2..4
OUTAGE_BOUND_REFUSED_S = _BACKOFF_BOUND_S + 1
OUTAGE_BOUND_UNREACHABLE_S = DEADLINE_S


class DeadlineExceeded(Exception):
    """The next attempt of a request could not have ended within its deadline. Not a botocore
    error class, so botocore's retry logic never takes it for a transient failure."""

    def __init__(self, url: str, attempts: int, elapsed: float) -> None:
        self.url = url.split("?")[0]
        super().__init__(f"did not answer within the {DEADLINE_S:g} s deadline ({attempts} attempt(s) in "
                         f"{elapsed:.1f} s)")


_request = threading.local()  # botocore calls are synchronous: one request in flight per thread


def _request_started(**_) -> None:
    _request.started, _request.attempts = time.monotonic(), 0


def _deadline(request=None, **_) -> None:
    """botocore's before-send hook, before every attempt of a request (retries included)."""
    started = getattr(_request, "started", None)
    if started is None:
        return
    elapsed = time.monotonic() - started
    if _request.attempts and elapsed + CONNECT_TIMEOUT_S + READ_TIMEOUT_S > DEADLINE_S:
        raise DeadlineExceeded(getattr(request, "url", "") or "", _request.attempts, elapsed)
    _request.attempts += 1


def _with_deadline(client):
    client.meta.events.register("before-call.s3", _request_started, unique_id="loraflow-request-started")
    client.meta.events.register("before-send.s3", _deadline, unique_id="loraflow-deadline")
    return client

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
        return _with_deadline(boto3.session.Session().client(
            "s3", endpoint_url=server.endpoint_url, region_name="us-east-1", config=config,
            aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key))
    try:
        session = boto3.session.Session(profile_name=storage.profile)
    except ProfileNotFound:
        raise ConfigError(f"storage.profile={storage.profile!r}: no such profile in the AWS config files") from None
    endpoint = None if storage.endpoint_url == "aws" else storage.endpoint_url
    return _with_deadline(session.client("s3", endpoint_url=endpoint,
                                         region_name=storage.region or session.region_name or "us-east-1",
                                         config=config))


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
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        IncompleteReadError,
        NoCredentialsError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    if isinstance(exc, DeadlineExceeded):
        from urllib.parse import urlsplit

        return StorageError(f"{what}: the storage endpoint {urlsplit(exc.url).netloc or ''} {exc}")
    if isinstance(exc, (ReadTimeoutError, ConnectTimeoutError)):
        return StorageError(f"{what}: the storage endpoint did not answer within the {DEADLINE_S:g} s "
                            "deadline (timed out)")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "?")
        return StorageError(f"{what}: {code} ({_HINTS.get(code, error.get('Message', ''))})")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{what}: cannot reach the storage endpoint {exc.kwargs.get('endpoint_url', '?')} "
                            f"(gave up after {TOTAL_ATTEMPTS} attempts)")
    if isinstance(exc, IncompleteReadError):
        # The server went away mid-body (s3transfer retried first): say so, with how far it got.
        return StorageError(f"{what}: the storage endpoint closed the connection mid-transfer "
                            f"({exc.kwargs.get('actual_bytes', '?')} of {exc.kwargs.get('expected_bytes', '?')} "
                            "bytes received)")
    if isinstance(exc, (ResponseStreamingError, ConnectionClosedError)):
        return StorageError(f"{what}: the storage endpoint closed the connection mid-transfer")
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{what}: no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                            "storage.profile, or give the machine a role")
    return StorageError(f"{what}: {type(exc).__name__}: {exc}")

