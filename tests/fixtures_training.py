"""Fixtures for the training/evaluation/CLI tests: tiny-model settings over the real reviews."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

# Small enough that a step of the 2-layer GPT-2 takes a fraction of a second on 2 cores.
TINY_TRAINING = [
    "data.max_length=64",
    "data.max_train_samples=48",
    "data.max_eval_samples=12",
    "training.per_device_train_batch_size=4",
    "training.gradient_accumulation_steps=2",
    "training.warmup_steps=0",
    "training.learning_rate=2e-3",
    "training.logging_steps=1",
    "training.save_steps=1000",
    "training.seed=7",
]


@pytest.fixture(scope="session")
def train_home(tmp_path_factory) -> Path:
    """One LORAFLOW_HOME for these tests, so the prepared-data cache is shared between them."""
    return tmp_path_factory.mktemp("loraflow-home-train")


@pytest.fixture
def tiny_overrides(tiny_model_dir, imdb_data_dir, train_home, monkeypatch) -> list[str]:
    """`--set` overrides: the tiny GPT-2 trained on the real IMDB reviews, a few steps."""
    monkeypatch.setenv("LORAFLOW_HOME", str(train_home))
    return [f"model.name_or_path={tiny_model_dir}", f"data.source={imdb_data_dir}", *TINY_TRAINING]


@pytest.fixture
def tiny_settings(tiny_overrides):
    """settings(*more_overrides) -> Settings for a tiny run."""
    from loraflow.settings import load_settings

    def make(*more: str):
        return load_settings(overrides=[*tiny_overrides, *more])

    return make


@pytest.fixture
def train_on_and_off(tiny_settings, tmp_path, caplog):
    """run(setting, steps) -> {"true": (TrainResult, log lines), "false": (...)}: the tiny run with a
    boolean setting on, then off, each in its own output directory."""
    from loraflow.training import train_adapter

    def run(setting: str, steps: int):
        runs = {}
        for value in ("true", "false"):
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="loraflow"):
                result = train_adapter(tiny_settings(f"training.max_steps={steps}", f"{setting}={value}"),
                                       output_dir=tmp_path / value)
            runs[value] = (result, [r.getMessage() for r in caplog.records])
        return runs

    return run
