"""Where loraflow keeps things on the local disk: one cache root, `LORAFLOW_HOME`."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The cache root (`LORAFLOW_HOME`, default `~/.cache/loraflow`), created on first use."""
    root = Path(os.environ.get("LORAFLOW_HOME") or Path.home() / ".cache" / "loraflow").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(*parts: str) -> Path:
    path = home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as an existing, writable directory (created if missing), or one ConfigError line that
    names the setting or flag it came from."""
    from loraflow.errors import ConfigError

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot create it ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: not writable")
    return path
