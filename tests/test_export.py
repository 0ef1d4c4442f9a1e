"""`loraflow export NAME@ALIAS --merged DIR`: an ordinary transformers model (safetensors, tokenizer,
model card naming the version) whose logits equal base + adapter."""

from __future__ import annotations

import json


def test_export_merged_equals_base_plus_adapter(cli, s3_settings, tiny_model_dir, tiny_adapter_dir, tmp_path,
                                                monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import loraflow
    from loraflow.registry import publish_adapter

    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAFLOW_STORAGE__ENDPOINT_URL", s3_settings.storage.endpoint_url)
    monkeypatch.setenv("LORAFLOW_STORAGE__BUCKET", s3_settings.storage.bucket)
    version = publish_adapter(s3_settings, tiny_adapter_dir, name="ex", aliases=["champion"]).version

    out = tmp_path / "merged"
    code, stdout, stderr = cli("export", "ex@champion", "--merged", str(out))
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert f"ex=={version}" in (out / "README.md").read_text()
    assert json.loads((out / "loraflow-export.json").read_text())["version"] == version
    # One mode for every file, the umask's (safetensors alone would write model.safetensors 0600).
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    assert {n: oct(p.stat().st_mode & 0o777) for n, p in ((p.name, p) for p in out.iterdir())} == \
        {n: oct(0o666 & ~mask) for n in names}

    merged = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    reference = loraflow.load_adapter(f"ex=={version}", settings=s3_settings)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(out)
    x = tok("The film was a quiet triumph of acting over budget.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, expected, plain = merged(x).logits, reference(x).logits, base(x).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert (got - plain).abs().max().item() > 1e-3  # the adapter really changed something

    # A second export replaces the first atomically; a directory holding other things is refused.
    code, _, _ = cli("export", f"ex=={version}", "--merged", str(out))
    assert code == 0
    other = tmp_path / "someones-work"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    code, _, stderr = cli("export", "ex@champion", "--merged", str(other))
    assert code == 2 and "not empty" in stderr and len(stderr.strip().splitlines()) == 1
    assert (other / "notes.txt").read_text() == "keep me"



def test_a_destination_under_a_file_is_refused_before_anything_is_pulled(tmp_path):
    import pytest

    from loraflow import loads
    from loraflow.errors import ConfigError
    from loraflow.export import export_merged

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    before = loads.snapshot()
    with pytest.raises(ConfigError, match="a-file is a file, not a folder"):
        export_merged("nosuch@champion", blocker / "out" / "merged")
    assert loads.since(before) == {}
