"""Production shape: adapters that load on another host, one storage layer with bounded retries.

The training host publishes with one LORAFLOW_HOME (base model trained from its s3:// URI); that
home is deleted; a second host with an empty LORAFLOW_HOME loads NAME@champion with nothing but
the bucket, and gets the same logits."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from loraflow.errors import IntegrityError, StorageError


@pytest.fixture
def s3_base_model(s3_settings, tiny_model_dir) -> str:
    """The tiny GPT-2 uploaded into the bucket through the storage layer (with its manifest)."""
    from loraflow.storage.store import Store
    from loraflow.storage.transfer import upload_dir

    upload_dir(Store(s3_settings.storage), tiny_model_dir, "models/tiny-gpt2", "model")
    return f"s3://{s3_settings.storage.bucket}/models/tiny-gpt2"


def test_adapter_loads_on_another_host_from_the_bucket_alone(s3_settings, s3_base_model, imdb_data_dir,
                                                             tmp_path, monkeypatch):
    import torch

    import loraflow
    from loraflow.evaluation import evaluate_adapter
    from loraflow.registry import publish_adapter, set_alias
    from loraflow.training import train_adapter

    trainer_home = tmp_path / "trainer-home"
    monkeypatch.setenv("LORAFLOW_HOME", str(trainer_home))
    settings = s3_settings.model_copy(deep=True)
    settings.model.name_or_path = s3_base_model
    settings.data.source = str(imdb_data_dir)
    settings.data.max_length = 64
    settings.data.max_eval_samples = 4
    settings.lora.r = 4
    settings.training.max_steps = 2
    settings.training.per_device_train_batch_size = 2
    settings.training.gradient_accumulation_steps = 1
    settings.training.learning_rate = 1e-2
    settings.training.save_strategy = "no"
    train = train_adapter(settings, output_dir=tmp_path / "run")
    evaluation = evaluate_adapter(settings, train.adapter_dir)
    pv = publish_adapter(settings, train.adapter_dir, name="portable", train=train.to_dict(),
                         evaluation=evaluation.to_dict())
    set_alias(settings, "portable", "champion", pv.version)

    # What was published names the base model by its logical id, never the local mirror.
    config = json.loads((train.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == s3_base_model
    assert pv.manifest["base_model"]["id"] == s3_base_model
    weights = pv.manifest["base_model"]["weights"]
    assert list(weights) == ["model.safetensors"] and len(weights["model.safetensors"]) == 64
    assert str(trainer_home) not in json.dumps(pv.manifest)

    x = torch.tensor([[464, 3807, 373, 257, 1310]])
    trained = loraflow.load_adapter("portable@champion", settings=settings)
    with torch.no_grad():
        expected = trained(x).logits
    shutil.rmtree(trainer_home)
    shutil.rmtree(tmp_path / "run")

    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / "other-host"))
    model = loraflow.load_adapter("portable@champion", settings=settings)
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "other-host" / "models" / "s3").is_dir()  # the base came from the bucket

    # The bucket's base model is re-exported with other weights: the adapter is refused, in one line.
    from safetensors.torch import load_file, save_file

    from loraflow.storage.store import Store
    from loraflow.storage.transfer import upload_dir

    changed = tmp_path / "changed-base"
    shutil.copytree(tmp_path / "other-host" / "models" / "s3" / settings.storage.bucket / "models" / "tiny-gpt2",
                    changed, ignore=shutil.ignore_patterns(".*", "manifest.json"))
    tensors = load_file(str(changed / "model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1.0
    save_file(tensors, str(changed / "model.safetensors"), metadata={"format": "pt"})
    upload_dir(Store(settings.storage), changed, "models/tiny-gpt2", "model")
    with pytest.raises(IntegrityError, match=r"base model s3://.*model\.safetensors .*refusing to load") as info:
        loraflow.load_adapter("portable@champion", settings=settings)
    assert "\n" not in str(info.value)


def test_stopped_server_surfaces_within_the_stated_bound(tmp_path, tiny_adapter_dir):
    """botocore's retries are the only layer: a stopped server is one error line after at most
    OUTAGE_BOUND_REFUSED_S seconds, not a minute of stacked retries."""
    import os

    from loraflow.demo.s3server import LocalS3Server
    from loraflow.registry import list_versions, publish_adapter, pull_adapter
    from loraflow.settings import load_settings
    from loraflow.storage.client import OUTAGE_BOUND_REFUSED_S, TOTAL_ATTEMPTS

    server = LocalS3Server(tmp_path / "root", "127.0.0.1:0", access_key=os.environ["AWS_ACCESS_KEY_ID"],
                           secret_key=os.environ["AWS_SECRET_ACCESS_KEY"], buckets=("outage",))
    with server:
        settings = load_settings(storage=server.storage_overrides("outage"))
        pv = publish_adapter(settings, tiny_adapter_dir, name="m")
    for call in (lambda: list_versions(settings, "m"),
                 lambda: pull_adapter(f"m=={pv.version}", settings=settings, dest=tmp_path / "cache"),
                 lambda: publish_adapter(settings, tiny_adapter_dir, name="m")):
        started = time.monotonic()
        with pytest.raises(StorageError, match=f"cannot reach the storage endpoint .*after {TOTAL_ATTEMPTS} attempts"):
            call()
        assert time.monotonic() - started < OUTAGE_BOUND_REFUSED_S + 2
