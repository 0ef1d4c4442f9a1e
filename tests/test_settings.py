import json
import subprocess
import sys

import pytest

from loraflow.errors import ConfigError
from loraflow.settings import load_settings

SEED = {
    "model.name_or_path": "microsoft/DialoGPT-medium", "model.dtype": "bfloat16", "model.device_map": "auto",
    "model.trust_remote_code": False, "data.source": "imdb", "data.text_column": "text",
    "lora.r": 16, "lora.lora_alpha": 32, "lora.lora_dropout": 0.05, "lora.bias": "none",
    "lora.task_type": "CAUSAL_LM", "lora.target_modules": ["c_attn", "c_proj"],
    "training.output_dir": "./lora-dialogpt", "training.num_train_epochs": 1,
    "training.per_device_train_batch_size": 4, "training.gradient_accumulation_steps": 4,
    "training.warmup_steps": 100, "training.max_steps": 1000, "training.learning_rate": 2e-4,
    "training.fp16": True, "training.logging_steps": 25, "training.save_strategy": "steps",
    "training.save_steps": 500,
}


def _get(data, path):
    for part in path.split("."):
        data = data[part]
    return data


def test_config_show_json_has_every_seed_value(cli, monkeypatch):
    for var in list(__import__("os").environ):
        if var.startswith("LORAFLOW_"):
            monkeypatch.delenv(var)
    code, out, _ = cli("config", "show", "--format", "json")
    assert code == 0
    data = json.loads(out)
    for path, value in SEED.items():
        assert _get(data, path) == value, path


def test_bad_yaml_value_exits_2_naming_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: {r: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "loraflow.cli", "config", "validate", "--config", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "lora.r" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("overrides, field", [
    (["lora.lora_dropout=1.0"], "lora.lora_dropout"),
    (["training.learning_rate=-1"], "training.learning_rate"),
    (["lora.nope=3"], "lora.nope"),
    (["training.max_steps=0"], "training.max_steps"),
    (["registry.adapter_name=../evil"], "registry.adapter_name"),
])
def test_out_of_range_and_unknown_keys_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=overrides)
    assert field in str(info.value)


def test_precedence_defaults_yaml_env_set(tmp_path, monkeypatch, cli):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training: {max_steps: 5, logging_steps: 3}\n")
    assert load_settings(cfg).training.max_steps == 5
    monkeypatch.setenv("LORAFLOW_TRAINING__MAX_STEPS", "7")
    s = load_settings(cfg)
    assert (s.training.max_steps, s.training.logging_steps) == (7, 3)  # env beats YAML, YAML kept
    code, out, _ = cli("config", "show", "--format", "json")
    assert json.loads(out)["training"]["max_steps"] == 7
    code, out, _ = cli("config", "show", "--format", "json", "--set", "training.max_steps=9")
    assert json.loads(out)["training"]["max_steps"] == 9  # --set beats the environment


def test_list_override_and_settings_hold_no_secrets(monkeypatch, cli):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-very-secret")
    s = load_settings(overrides=["lora.target_modules=[q_proj,v_proj]"])
    assert s.lora.target_modules == ["q_proj", "v_proj"]
    assert set(s.storage.model_dump()) == {"endpoint_url", "bucket", "prefix", "region", "profile"}
    code, out, err = cli("config", "show")
    assert code == 0 and "hunter2" not in out + err
    # A credential is not a setting: trying to set one is an error naming the field.
    with pytest.raises(ConfigError, match="storage.aws_secret_access_key: unknown setting"):
        load_settings(overrides=["storage.aws_secret_access_key=x"])


def test_missing_config_file_is_a_clear_error(cli, tmp_path):
    code, _, err = cli("config", "validate", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml" in err


def test_path_settings_expand_loraflow_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path))
    s = load_settings(overrides=["model.name_or_path=${LORAFLOW_HOME}/models/m", "data.source=imdb"])
    assert s.model.name_or_path == f"{tmp_path}/models/m"
    assert s.data.source == "imdb"  # hub ids pass through untouched


def test_yaml_11_no_is_the_word_not_false(tmp_path):
    assert load_settings(overrides=["training.save_strategy=no"]).training.save_strategy == "no"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training: {save_strategy: no}\n")
    assert load_settings(cfg).training.save_strategy == "no"
    assert load_settings(overrides=["data.packing=false"]).data.packing is False
