"""Checkpoint sync to object storage (integrity, incomplete uploads) and the promotion gate's rule
(paired bootstrap on per-document losses, generation health)."""

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


def _scores(losses, base, tokens, eos=0.5, distinct=0.8) -> dict:
    return {"document_losses": losses, "base_document_losses": base, "document_tokens": tokens,
            "adapter_ppl": math.exp(sum(x * n for x, n in zip(losses, tokens)) / sum(tokens)),
            "base_ppl": math.exp(sum(x * n for x, n in zip(base, tokens)) / sum(tokens)),
            "generation_health": {"adapter": {"eos_rate": eos, "distinct_2": distinct}}}


def test_gate_rule_on_paired_document_losses():
    """The decision rule on known numbers: 60 documents whose losses vary a lot between documents
    (what an unpaired comparison would drown in) and little within a document between models."""
    import numpy as np

    from loraflow.promotion import decide, paired_bootstrap

    rng = np.random.default_rng(3)
    tokens = rng.integers(20, 400, size=60).tolist()
    base = rng.normal(4.0, 0.8, size=60)
    better = (base - 0.10 + rng.normal(0, 0.02, size=60)).tolist()
    noise = (base + rng.normal(0, 0.02, size=60)).tolist()  # no real change
    base = base.tolist()

    interval = paired_bootstrap(better, base, tokens)
    assert interval.high < 0 and interval.low < interval.mean < interval.high
    assert interval.mean == pytest.approx(sum((b - a) * n for a, b, n in zip(base, better, tokens)) / sum(tokens))
    assert paired_bootstrap(better, base, tokens) == interval  # seeded: same numbers, same interval

    first = decide(_scores(better, base, tokens))
    assert first.promote and "no champion yet" in first.reason
    record = first.to_dict()
    assert record["verdict"] == "promote" and record["documents"] == 60 and record["tokens"] == sum(tokens)
    assert record["vs_base"]["high"] < 0 and record["vs_base"]["ppl_ratio"][2] < 1

    within_noise = decide(_scores(noise, base, tokens))
    assert not within_noise.promote and "does not beat the base model" in within_noise.reason
    assert not decide(_scores(base, base, tokens)).promote  # identical to the base: interval [0, 0]

    champion = _scores(better, base, tokens)
    same = decide(_scores(noise_on(better, rng), base, tokens), champion, champion_version="v1")
    assert not same.promote and "not better than champion v1" in same.reason
    # A margin lets a candidate within noise of the champion through.
    assert decide(_scores(noise_on(better, rng), base, tokens), champion, champion_version="v1", margin=0.05).promote
    clearly = decide(_scores([x - 0.1 for x in better], base, tokens), champion, champion_version="v1")
    assert clearly.promote and clearly.vs_champion["high"] < 0

    # Health: better losses, but it stopped ending its generations.
    rambling = _scores([x - 0.1 for x in better], base, tokens, eos=0.0)
    refused = decide(rambling, champion, champion_version="v1", eos_tolerance=0.25)
    assert not refused.promote and "ending with EOS 0.000 vs 0.500" in refused.reason
    repetitive = _scores([x - 0.1 for x in better], base, tokens, distinct=0.5)
    assert "distinct-2" in decide(repetitive, champion, champion_version="v1").reason

    assert not decide(_scores(better, base, tokens), None, champion_version="v1").promote  # unmeasurable champion
    assert not decide(_scores(better, base, tokens), _scores(better[:-1], base[:-1], tokens[:-1]),
                      champion_version="v1").promote  # scored on other documents
    assert not decide(_scores([math.nan] * 60, base, tokens)).promote


def noise_on(losses, rng) -> list[float]:
    return [x + d for x, d in zip(losses, rng.normal(0, 0.02, size=len(losses)))]
