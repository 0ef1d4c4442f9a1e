"""Parity: what is served (the service's multi-adapter model) and what is exported (a merged model)
generates, greedily, the same tokens as plain PEFT on the same files; a serving path or a merge
that changed the adapter's effect is refused in one line naming the prompt and the token."""

from __future__ import annotations

import json

import pytest

from fixtures_s3 import make_adapter_dir

pytestmark = pytest.mark.slow


def lora_layers(model, slot: str):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and slot in m.scaling]


def test_canary_checks_the_serving_path_against_plain_peft(s3_settings, tiny_model_dir, tiny_adapter_dir, tmp_path):
    import torch

    from loraflow.parity import NEW_TOKENS, PROMPTS
    from loraflow.registry import publish_adapter
    from loraflow.registry.pull import pull_adapter
    from loraflow.serving.canary import DEFAULT_DOCUMENTS, run_canary
    from loraflow.serving.model import ModelHolder
    from loraflow.storage.transfer import MANIFEST

    cache = tmp_path / "adapters"
    second = make_adapter_dir(tmp_path / "second", tiny_model_dir, seed=1)
    v1 = publish_adapter(s3_settings, tiny_adapter_dir, name="par", aliases=["champion"]).version
    v2 = publish_adapter(s3_settings, second, name="par").version

    def pulled(version):
        path = pull_adapter(f"par=={version}", settings=s3_settings, dest=cache)
        return path, json.loads((path / MANIFEST).read_text())

    holder = ModelHolder()
    first = holder.load_first(f"par=={v1}", *pulled(v1), settings=s3_settings, dest=cache)
    canary = run_canary(holder, first, list(DEFAULT_DOCUMENTS))
    assert canary.ok, canary.reason
    assert canary.parity["ok"] and canary.parity["prompts"] == len(PROMPTS)
    assert canary.parity["tokens_compared"] == len(PROMPTS) * NEW_TOKENS

    # The new version as the service runs it: beside the serving one, in the same PEFT model.
    new = holder.add(*pulled(v2))
    canary = run_canary(holder, new, list(DEFAULT_DOCUMENTS))
    assert canary.ok, canary.reason
    assert canary.parity["tokens_compared"] == len(PROMPTS) * NEW_TOKENS
    assert canary.parity["max_abs_logit_diff"] < 1e-4

    # The serving path applies the new adapter at 4x its trained scale (PEFT's own set_scale): what
    # is loaded no longer matches the files, and the version is refused naming prompt and token.
    layers = lora_layers(holder.model, new.slot)
    assert layers
    for layer in layers:
        layer.set_scale(new.slot, 4.0)
    canary = run_canary(holder, new, list(DEFAULT_DOCUMENTS))
    assert not canary.ok
    assert canary.reason.startswith(f"parity: the serving path of version {v2} differs from plain PEFT on prompt ")
    assert "\n" not in canary.reason
    mismatch = canary.parity["mismatch"]
    assert mismatch["prompt"] in PROMPTS and f"at generated token {mismatch['position']}:" in canary.reason
    assert mismatch["expected"]["id"] != mismatch["got"]["id"]
    assert canary.ppl is None  # refused before the perplexity step

    # Loaded weights that differ from the file (one lora_B nudged) are refused the same way.
    for layer in layers:
        layer.set_scale(new.slot, 1.0)
    assert run_canary(holder, new, list(DEFAULT_DOCUMENTS)).ok
    with torch.no_grad():
        for layer in layers:
            layer.lora_B[new.slot].weight.mul_(3.0)
    refused = run_canary(holder, new, list(DEFAULT_DOCUMENTS))
    assert not refused.ok and refused.reason.startswith("parity: ")
    # The serving version itself was never touched.
    assert run_canary(holder, first, list(DEFAULT_DOCUMENTS)).ok


def test_export_records_parity_and_a_tampered_merge_fails(cli, s3_settings, tiny_adapter_dir, tmp_path, monkeypatch):
    import torch
    from peft.tuners.lora import LoraModel

    from loraflow.parity import NEW_TOKENS, PROMPTS
    from loraflow.registry import publish_adapter

    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAFLOW_STORAGE__ENDPOINT_URL", s3_settings.storage.endpoint_url)
    monkeypatch.setenv("LORAFLOW_STORAGE__BUCKET", s3_settings.storage.bucket)
    version = publish_adapter(s3_settings, tiny_adapter_dir, name="exp", aliases=["champion"]).version

    out = tmp_path / "merged"
    code, _, stderr = cli("export", "exp@champion", "--merged", str(out))
    assert code == 0, stderr
    recorded = json.loads((out / "loraflow-export.json").read_text())["parity"]
    assert recorded["ok"] and recorded["mismatch"] is None
    assert recorded["tokens_compared"] == len(PROMPTS) * NEW_TOKENS
    assert 0 <= recorded["max_abs_logit_diff"] < 1e-4
    assert recorded["reference"] == "PeftModel.from_pretrained(base, adapter_dir)"
    before = (out / "model.safetensors").read_bytes()

    # A merge that folds the LoRA delta in at the wrong scale: the export is refused in one line
    # and the previous export stays in place.
    real_merge = LoraModel.merge_and_unload

    def merge_twice_over(self, *args, **kwargs):
        with torch.no_grad():
            for layer in lora_layers(self, "default"):
                layer.set_scale("default", 3.0)
        return real_merge(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "merge_and_unload", merge_twice_over)
    code, stdout, stderr = cli("export", f"exp=={version}", "--merged", str(out))
    assert code == 1 and stdout == ""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.strip().endswith(errors[0]), stderr
    line = errors[0]
    assert line.startswith(f"error: export of exp=={version} refused: parity: the merged model differs from plain "
                           "PEFT on prompt "), line
    assert " at generated token " in line
    assert (out / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".merged.partial*"))
