"""A real S3 server for the tests: `rclone serve s3` on a free loopback port over a temporary
directory (buckets are folders in `s3_server.root`, objects are files)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Session-wide local S3 server: .endpoint_url, .access_key, .secret_key, .root."""
    from loraflow.demo.s3server import LocalS3Server

    root = tmp_path_factory.mktemp("s3-root")
    server = LocalS3Server(root, "127.0.0.1:0", access_key=os.environ["AWS_ACCESS_KEY_ID"],
                           secret_key=os.environ["AWS_SECRET_ACCESS_KEY"], log_file=root.parent / "rclone-s3.log")
    with server:
        yield server


from loraflow.demo.tiny_models import make_random_adapter_dir  # noqa: E402,F401 - re-exported for tests


def s3_settings_for(server, bucket: str, **sections):
    from loraflow.settings import load_settings

    return load_settings(storage=server.storage_overrides(bucket), **sections)


def create_bucket(server, prefix: str = "t-") -> str:
    """A fresh, empty bucket, made through the server (rclone caches its directory listings, so a
    folder made on disk can stay invisible for a moment)."""
    from loraflow.storage.client import make_client

    bucket = prefix + secrets.token_hex(6)
    make_client(s3_settings_for(server, bucket).storage).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the session server."""
    return create_bucket(s3_server)


@pytest.fixture
def s3_settings(s3_server, s3_bucket):
    """Settings whose `storage` points at the local server with a fresh bucket."""
    return s3_settings_for(s3_server, s3_bucket)


def make_adapter_dir(dest: Path, base_model_dir: Path, *, r: int = 4, seed: int = 0) -> Path:
    """A real PEFT LoRA adapter (safetensors) on the tiny GPT-2, as `save_pretrained` writes it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["c_attn", "c_proj"],
                                            task_type="CAUSAL_LM", init_lora_weights=False))
    model.save_pretrained(dest)
    return Path(dest)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter (r=4, c_attn/c_proj, non-zero B so it changes the logits) on `tiny_model_dir`."""
    return make_adapter_dir(tmp_path_factory.mktemp("tiny-adapter"), tiny_model_dir)


def registry_env(server, bucket: str, **extra: str) -> dict:
    """Environment for a subprocess that uses the registry on `server`/`bucket` (settings through
    LORAFLOW_* / AWS_* variables, as a deployment would)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAFLOW_", "AWS_"))}
    env.update({"LORAFLOW_STORAGE__ENDPOINT_URL": server.endpoint_url, "LORAFLOW_STORAGE__BUCKET": bucket,
                "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
                "AWS_REGION": "us-east-1",
                # Shorter lock timing for the local loopback server (the bounds still hold there).
                "LORAFLOW_REGISTRY_LOCK_WRITE_BOUND_S": "0.2", "LORAFLOW_REGISTRY_LOCK_SETTLE_S": "0.3"})
    if os.environ.get("LORAFLOW_HOME"):
        env["LORAFLOW_HOME"] = os.environ["LORAFLOW_HOME"]
    env.update(extra)
    return env
