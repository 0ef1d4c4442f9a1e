"""The local S3 server now lives in loraflow.storage.local: interactive commands fall back to it, so
it is part of the library, not of the demo. This name stays for scripts and tests that import it
from here."""

from __future__ import annotations

from loraflow.storage.local import (
    CREDENTIALS_FILE,
    LOCAL_ROOT,
    LocalS3Server,
    embedded_server,
    find_rclone,
    free_port,
    local_credentials,
    local_root,
    parse_addr,
)

__all__ = ["CREDENTIALS_FILE", "LOCAL_ROOT", "LocalS3Server", "embedded_server", "find_rclone", "free_port",
           "local_credentials", "local_root", "parse_addr"]
