"""The promotion gate on real adapters: a 2-layer GPT-2 trained on real IMDB reviews, scored per
document, compared by paired bootstrap; generation health and the forgetting check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def _variant(src: Path, dest: Path, *, scale: float = 1.0, noise: float = 0.0, seed: int = 0) -> Path:
    """A copy of adapter `src` with its LoRA B weights scaled and/or nudged by relative noise:
    scale 0.25 pulls it most of the way back to the base model; noise 1e-3 changes it by far less
    than the document-to-document spread of the eval loss."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True)
    shutil.copy(src / "adapter_config.json", dest / "adapter_config.json")
    weights = load_file(src / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for key, tensor in weights.items():
        if "lora_B" in key:
            tensor = tensor * scale
            weights[key] = tensor + noise * tensor.std() * torch.randn(tensor.shape, generator=gen)
    save_file(weights, dest / "adapter_model.safetensors")
    return dest


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, imdb_data_dir):
    """(settings, adapter dir, prepared data, tokenizer, its evaluation): 8 steps on the reviews, built once."""
    from fixtures_training import TINY_TRAINING

    from loraflow import modeling
    from loraflow.data import prepare_dataset
    from loraflow.settings import load_settings
    from loraflow.evaluation import evaluate_adapter
    from loraflow.training import train_adapter

    home = tmp_path_factory.mktemp("gate-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("LORAFLOW_HOME", str(home))
    settings = load_settings(overrides=[f"model.name_or_path={tiny_model_dir}", f"data.source={imdb_data_dir}",
                                        *TINY_TRAINING, "training.max_steps=8",
                                        "training.learning_rate=1e-2", "training.logging_steps=12",
                                        "eval.max_new_tokens=16"])
    adapter = train_adapter(settings, output_dir=home / "run").adapter_dir
    tokenizer = modeling.load_tokenizer(settings)
    prepared = prepare_dataset(settings, tokenizer)
    evaluation = evaluate_adapter(settings, adapter, prepared=prepared, tokenizer=tokenizer).to_dict()
    yield settings, adapter, prepared, tokenizer, evaluation
    mp.undo()


def test_gate_promotes_a_clearly_better_adapter_and_refuses_one_within_noise(trained, tmp_path):
    from loraflow.evaluation import evaluate_adapter
    from loraflow.promotion import decide

    settings, adapter, prepared, tokenizer, candidate = trained

    def evaluate(path, **kw):
        return evaluate_adapter(settings, path, prepared=prepared, tokenizer=tokenizer, **kw).to_dict()

    assert len(candidate["document_losses"]) == len(candidate["document_tokens"]) >= 12
    assert sum(candidate["document_tokens"]) == candidate["eval_tokens"]
    # Per-document losses are the eval loss, split: their token-weighted mean is the eval loss.
    weighted = sum(x * n for x, n in zip(candidate["document_losses"], candidate["document_tokens"]))
    assert weighted / candidate["eval_tokens"] == pytest.approx(candidate["eval_loss"], rel=1e-6)

    first = decide(candidate)  # no champion yet: it must beat the base model with confidence
    assert first.promote, first.reason
    assert first.vs_base["high"] < 0 and first.to_dict()["documents"] == len(candidate["document_tokens"])

    weak = evaluate(_variant(adapter, tmp_path / "weak", scale=0.25), with_base=False)
    assert weak["document_tokens"] == candidate["document_tokens"] and math.isnan(weak["base_ppl"])
    over_weak = decide(candidate, weak, champion_version="v-weak")
    assert over_weak.promote, over_weak.reason
    assert over_weak.vs_champion["high"] < 0

    nudged = evaluate(_variant(adapter, tmp_path / "nudged", noise=1e-3, seed=1), with_base=False)
    assert nudged["adapter_ppl"] != candidate["adapter_ppl"]  # a different adapter ...
    assert abs(nudged["adapter_ppl"] / candidate["adapter_ppl"] - 1) < 1e-3  # ... that no one could tell apart
    tie = decide(candidate, nudged, champion_version="v-same")
    assert not tie.promote and "not better than champion v-same" in tie.reason
    assert tie.vs_champion["high"] > 0

    # Scored as if it were the base model itself: no difference at all, so nothing to promote.
    as_base = {**candidate, "document_losses": candidate["base_document_losses"], "adapter_ppl": candidate["base_ppl"]}
    refused = decide(as_base)
    assert not refused.promote and "does not beat the base model" in refused.reason


def test_generation_health_and_forgetting_check(trained, tmp_path):
    from loraflow.evaluation import EVAL_PROMPTS, evaluate_adapter, generation_health
    from loraflow.release import write_release

    settings, adapter, prepared, tokenizer, evaluation = trained
    eos = tokenizer.eos_token_id
    health = generation_health([{"ids": [5, 6, 7, 8, 5, 6, 7, 8, eos], "ended": True},
                                {"ids": [1, 2, 3, 4, 5, 6], "ended": False}])
    # 1 of 2 ended; distinct-2: (4/7 + 5/5) / 2; 4-grams: 5 + 3, one repeats (5,6,7,8).
    assert health == {"eos_rate": 0.5, "distinct_2": round((4 / 7 + 1) / 2, 4), "repeated_4gram_rate": 0.125}

    general = tmp_path / "general"
    general.mkdir()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    paragraphs = [p for p in readme.split("\n\n") if len(p) > 200][:6]
    (general / "test.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    assert evaluation["general_adapter_ppl"] is None and evaluation["general_source"] is None  # off by default

    checked = settings.model_copy(update={"eval": settings.eval.model_copy(update={"general_source": str(general)})})
    result = evaluate_adapter(checked, adapter, prepared=prepared, tokenizer=tokenizer)
    assert result.general_source == str(general) and result.general_tokens > 300
    assert math.isfinite(result.general_base_ppl) and math.isfinite(result.general_adapter_ppl)
    assert result.general_adapter_ppl != result.general_base_ppl
    gh = result.generation_health
    assert gh["prompts"] == len(EVAL_PROMPTS) and gh["max_new_tokens"] == 16
    for who in ("adapter", "base"):
        assert 0 <= gh[who]["eos_rate"] <= 1 and 0 < gh[who]["distinct_2"] <= 1
        assert 0 <= gh[who]["repeated_4gram_rate"] <= 1

    # Health and the forgetting check reach metrics.json and the model card; per-document losses do not.
    release = write_release(adapter, tmp_path / "release", settings=checked, train={"global_step": 8},
                            evaluation=result.to_dict(), name="imdb-tiny")
    metrics = json.loads((release / "metrics.json").read_text())
    assert metrics["generation_health"] == gh and metrics["general_adapter_ppl"] == result.general_adapter_ppl
    assert "document_losses" not in metrics
    card = (release / "README.md").read_text()
    assert "## Generation health (greedy, 6 fixed prompts, 16 new tokens at most)" in card
    assert "| eos_rate | " in card and "| distinct_2 | " in card
    assert f"Forgetting check on `{general}`" in card
