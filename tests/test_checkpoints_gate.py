"""Checkpoint sync to object storage (integrity, incomplete uploads) and the promotion gate's rule."""

from __future__ import annotations

import json
import math

import pytest


def _checkpoint(tmp_path, step: int):
    d = tmp_path / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"weights" * 100 + bytes([step]))
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (d / "optimizer.pt").write_bytes(b"opt" * 50)
    (d / "training_args.bin").write_bytes(b"a full pickle")
    return d


def test_checkpoints_round_trip_skip_incomplete_uploads_and_refuse_tampering(s3_settings, s3_server, tmp_path):
    from loraflow.checkpoints import MANIFEST, download, latest_checkpoint, run_prefix, upload_dir
    from loraflow.errors import IntegrityError

    storage = s3_settings.storage
    assert latest_checkpoint(storage, "run-1") is None
    for step in (2, 4):
        upload_dir(storage, _checkpoint(tmp_path / "out", step), run_prefix(storage, "run-1") + f"checkpoint-{step}/")
    # checkpoint-6's files went up but its manifest never did (the worker died): it does not count.
    bucket_dir = s3_server.root / storage.bucket
    partial = bucket_dir / "checkpoints" / "run-1" / "checkpoint-6"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    latest = latest_checkpoint(storage, "run-1")
    assert latest.step == 4 and latest.uri.endswith("checkpoints/run-1/checkpoint-4/")

    manifest = download(storage, latest.uri, tmp_path / "restored")
    assert (tmp_path / "restored" / "optimizer.pt").read_bytes() == b"opt" * 50
    assert "training_args.bin" not in [f["name"] for f in manifest["files"]]  # a pickle Trainer never reads back stays local
    assert not (tmp_path / "restored" / "training_args.bin").exists()
    assert (bucket_dir / "checkpoints" / "run-1" / "checkpoint-4" / MANIFEST).is_file()

    stored = bucket_dir / "checkpoints" / "run-1" / "checkpoint-4" / "optimizer.pt"
    stored.write_bytes(b"tampered" + stored.read_bytes()[8:])
    with pytest.raises(IntegrityError, match="optimizer.pt"):
        download(storage, latest.uri, tmp_path / "restored-again")
    assert not (tmp_path / "restored-again" / "optimizer.pt").exists()


def test_gate_promotes_only_a_better_adapter():
    from loraflow.promotion import decide

    assert decide(10.0, 12.0).promote  # no champion yet
    assert not decide(12.0, 12.0).promote  # must beat the base model strictly
    assert not decide(math.nan, 12.0).promote
    assert decide(10.0, 12.0, champion_version="v1", champion_ppl=10.0).promote  # not worse: ties win
    worse = decide(10.5, 12.0, champion_version="v1", champion_ppl=10.0)
    assert not worse.promote and "worse than champion v1" in worse.reason
    assert decide(10.5, 12.0, champion_version="v1", champion_ppl=10.0, margin=0.1).promote
    assert not decide(10.0, 12.0, champion_version="v1", champion_ppl=None).promote  # could not be measured
