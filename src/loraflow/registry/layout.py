"""Where things live in the bucket, and which names are allowed there.

    <prefix>/adapters/<name>/versions/<version>/{adapter_config.json, adapter_model.safetensors,
                                                 README.md, metrics.json, manifest.json}
    <prefix>/adapters/<name>/aliases/<alias>.json
    <prefix>/adapters/<name>/locks/<alias>/<claim>.json   (only on servers without conditional writes)

Every name is checked against one pattern before it becomes part of a key, so nothing can
escape the prefix (`..`, `/`, control characters, empty names are refused).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from loraflow.errors import ConfigError
from loraflow.storage.transfer import MANIFEST, check_relpath

# Always used with fullmatch: `$` also matches before a final newline, so `match` would let
# "champ\n" through as a name whose key no reader can reach. Explicit ASCII classes ([0-9], not \d,
# which matches any Unicode digit).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)
VERSION_RE = re.compile(r"[0-9]{8}T[0-9]{6}\.[0-9]{3}Z-[0-9a-f]{6}", re.ASCII)

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_name(value: str, what: str = "adapter name") -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or ".." in value:
        raise ConfigError(f"invalid {what} {value!r}: use 1-128 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit, without '..'")
    return value


def check_version(value: str) -> str:
    if not isinstance(value, str) or not VERSION_RE.fullmatch(value):
        raise ConfigError(f"invalid version {value!r}: expected e.g. 20261129T013000.123Z-a1b2c3")
    return value


def check_file_name(value: str) -> str:
    """A file inside a version: a plain name (no directories), allowed in an adapter directory."""
    if "/" in str(value):
        raise ConfigError(f"{value!r}: a version holds plain file names, no directories")
    return check_relpath(value, "adapter")


def new_version(now: datetime | None = None) -> str:
    """Unique and sorting by creation time: UTC to the millisecond, then 24 random bits so two
    publishers in the same millisecond still get different versions."""
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Layout:
    """Object keys for one adapter name under a storage prefix."""

    bucket: str
    prefix: str
    name: str

    def __post_init__(self) -> None:
        prefix = self.prefix.strip("/")
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise ConfigError(f"storage.prefix {self.prefix!r}: empty, '.' or '..' path segments")
        object.__setattr__(self, "prefix", prefix)
        check_name(self.name)

    @classmethod
    def for_name(cls, storage, name: str) -> Layout:
        return cls(storage.bucket, storage.prefix, name)

    @property
    def root(self) -> str:
        head = f"{self.prefix}/" if self.prefix else ""
        return f"{head}adapters/{self.name}/"

    @property
    def versions_prefix(self) -> str:
        return f"{self.root}versions/"

    def version_prefix(self, version: str) -> str:
        return f"{self.versions_prefix}{check_version(version)}/"

    def file_key(self, version: str, file_name: str) -> str:
        return self.version_prefix(version) + check_file_name(file_name)

    def manifest_key(self, version: str) -> str:
        return self.version_prefix(version) + MANIFEST

    @property
    def aliases_prefix(self) -> str:
        return f"{self.root}aliases/"

    def alias_key(self, alias: str) -> str:
        return f"{self.aliases_prefix}{check_name(alias, 'alias')}.json"

    def lock_prefix(self, alias: str) -> str:
        return f"{self.root}locks/{check_name(alias, 'alias')}/"

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key or self.root}"


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`NAME`, `NAME@ALIAS` or `NAME==VERSION` -> (name, alias, version); plain NAME means @latest."""
    if not isinstance(ref, str) or not ref:
        raise ConfigError("empty adapter reference; use NAME, NAME@ALIAS or NAME==VERSION")
    if "==" in ref:
        name, _, version = ref.partition("==")
        return check_name(name), None, check_version(version)
    if "@" in ref:
        name, _, alias = ref.partition("@")
        return check_name(name), check_name(alias, "alias"), None
    return check_name(ref), "latest", None
