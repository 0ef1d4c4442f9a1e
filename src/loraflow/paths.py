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
