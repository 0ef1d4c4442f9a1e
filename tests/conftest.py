"""Shared fixtures. Area fixtures live in tests/fixtures_*.py, listed in pytest_plugins."""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from pathlib import Path

import pytest

# Tests never touch the network; Prefect must not phone home.
for var, value in {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
    "PIP_NO_INDEX": "1",
    # fp32 on every processor (an avx512_bf16 CPU would otherwise train and serve in bf16): the suite
    # compares logits, adapters and generations across processes. tests/test_precision.py covers bf16.
    "LORAFLOW_CPU_BF16": "0",
}.items():
    os.environ.setdefault(var, value)

# Every local S3 server of the suite accepts this one key, which boto3's standard credential chain
# finds in the environment, as on a real worker. Settings never hold credentials.
TEST_ACCESS_KEY = "loraflow-test"
TEST_SECRET_KEY = "test-secret-" + secrets.token_hex(8)
os.environ["AWS_ACCESS_KEY_ID"] = TEST_ACCESS_KEY
os.environ["AWS_SECRET_ACCESS_KEY"] = TEST_SECRET_KEY
for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(var, None)

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parents[1]

pytest_plugins: list[str] = ["fixtures_data", "fixtures_s3", "fixtures_assets", "fixtures_training", "fixtures_prefect"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weight 2-layer GPT-2 (DialoGPT architecture) with the real GPT-2 tokenizer."""
    from loraflow.demo.tiny_models import make_gpt2_model_dir

    return make_gpt2_model_dir(tmp_path_factory.mktemp("tiny-gpt2"), "tiny")


def wait_for(predicate, timeout: float = 30.0, step: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def repoint_stale_log_handlers() -> None:
    """Libraries (datasets, transformers, Prefect's console handler) bind their log handlers to the
    sys.stderr of the moment; in one pytest process that is an earlier test's closed capture. A
    real process has one stderr for its life, so point stale handlers at the current one."""
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # not setStream: it flushes the closed one
            console = getattr(handler, "console", None)  # Prefect's handler prints through rich
            if console is not None and getattr(console.file, "closed", False):
                console.file = sys.stderr


@pytest.fixture(autouse=True)
def _current_log_streams():
    repoint_stale_log_handlers()


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run the `loraflow` CLI in-process; returns (exit code, stdout, stderr)."""
    from loraflow.cli import main

    def run(*argv: str):
        repoint_stale_log_handlers()
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
