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


def check_dir_usable(path: str | os.PathLike, what: str) -> Path:
    """What `ensure_dir` would refuse, found without creating anything: run first, before the
    expensive steps (preparing data, loading a model), so a typo costs nothing."""
    from loraflow.errors import ConfigError

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path}: is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: cannot create it ({existing} is a file, not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: " + ("not writable" if existing == path
                                                 else f"cannot create it ({existing} is not writable)"))
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
