"""Evaluation: token-weighted perplexity of base vs adapter, on the real reviews."""

from __future__ import annotations

import json
import math

import pytest
import yaml


def test_token_loss_is_the_models_own_token_weighted_loss(tiny_settings):
    """Our sum/count over the collator's shifted labels equals the model's mean loss on one batch,
    and the count excludes padding and each document's first token."""
    import torch

    from loraflow import modeling
    from loraflow.data import PackedCollator, prepare_dataset
    from loraflow.evaluation import token_loss

    settings = tiny_settings()
    tokenizer = modeling.load_tokenizer(settings)
    prepared = prepare_dataset(settings, tokenizer)
    model = modeling.load_base_model(settings)
    collator = PackedCollator(modeling.pad_token_id(tokenizer))
    rows = prepared.eval.select(range(3))
    loss, count = token_loss(model, rows, collator, batch_size=3, device="cpu")
    batch = collator([rows[i] for i in range(3)])
    with torch.no_grad():
        expected = model(**batch, use_cache=False).loss.item()
    assert loss == pytest.approx(expected, rel=1e-5)
    starts = sum(sum(1 for p in rows[i]["position_ids"] if p == 0) for i in range(3))
    assert count == sum(len(rows[i]["input_ids"]) for i in range(3)) - starts


def test_perplexity_drops_after_training_on_reviews(tiny_settings, tiny_model_dir, tmp_path):
    from loraflow.evaluation import EVAL_PROMPTS, evaluate_adapter
    from loraflow.release import write_release
    from loraflow.training import train_adapter

    settings = tiny_settings("training.max_steps=16", "training.learning_rate=1e-2", "training.logging_steps=8")
    train = train_adapter(settings, output_dir=tmp_path / "run")
    result = evaluate_adapter(settings, train.adapter_dir)

    assert math.isfinite(result.base_ppl) and math.isfinite(result.adapter_ppl)
    assert result.adapter_ppl < 0.93 * result.base_ppl, (result.base_ppl, result.adapter_ppl)
    assert result.eval_loss == pytest.approx(math.log(result.adapter_ppl))
    assert result.eval_documents == 12 and result.eval_tokens > 1000
    assert [g["prompt"] for g in result.generations] == list(EVAL_PROMPTS)
    assert all(g["text"] and g["base_text"] for g in result.generations)

    # Evaluation writes nothing into the adapter it read; the release writer does, once.
    assert {p.name for p in train.adapter_dir.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    release = write_release(train.adapter_dir, tmp_path / "release", settings=settings, train=train.to_dict(),
                            evaluation=result.to_dict(), name="imdb-tiny")
    metrics = json.loads((release / "metrics.json").read_text())
    for key in ("base_ppl", "adapter_ppl", "eval_loss", "eval_tokens", "train_tokens", "train_time_s",
                "global_step", "dataset_fingerprint", "eval_fingerprint"):
        assert key in metrics, key
    assert metrics["train_tokens"] == train.train_tokens and metrics["global_step"] == 16
    card = (release / "README.md").read_text()
    assert "adapter_ppl" in card and EVAL_PROMPTS[0] in card and str(tiny_model_dir) in card
    # The Hub's PEFT card header: library_name, base_model, datasets, and the results as a model-index.
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "peft" and header["base_model"] == str(tiny_model_dir)
    assert header["datasets"] == [settings.data.source]
    [entry] = header["model-index"][0]["results"]
    assert {m["name"]: m["value"] for m in entry["metrics"]}["adapter perplexity"] == round(result.adapter_ppl, 4)
    assert yaml.safe_load((release / "loraflow.yaml").read_text())["lora"]["r"] == settings.lora.r

    # Greedy generations are reproducible: a second evaluation gives the same texts and numbers.
    again = evaluate_adapter(settings, train.adapter_dir)
    assert again.generations == result.generations
    assert again.adapter_ppl == pytest.approx(result.adapter_ppl, rel=1e-6)


def test_results_table_lists_the_numbers():
    from loraflow.evaluation import format_results_table

    table = format_results_table({"base_ppl": 52.5, "adapter_ppl": 31.25, "eval_tokens": 12345, "train_tokens": 999})
    lines = table.splitlines()
    assert any("base perplexity" in line and "52.500" in line for line in lines)
    assert any("adapter perplexity" in line and "31.250" in line for line in lines)
    assert any("eval tokens" in line and "12,345" in line for line in lines)
    assert len({len(line) for line in lines}) == 1  # aligned


def test_evaluating_a_directory_without_adapter_fails_clearly(tiny_settings, tmp_path):
    from loraflow.errors import ModelError
    from loraflow.evaluation import evaluate_adapter

    with pytest.raises(ModelError, match="no adapter_config.json"):
        evaluate_adapter(tiny_settings(), tmp_path)
