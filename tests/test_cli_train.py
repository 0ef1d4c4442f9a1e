"""`loraflow train` / `loraflow eval`, in-process and under torchrun (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def test_train_then_resume_then_eval(cli, tiny_overrides, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = cli("train", *_sets([*tiny_overrides, "training.max_steps=3", "training.save_steps=3"]),
                               "--output", str(out))
    assert code == 0, stderr
    assert f"adapter: {out / 'adapter'}" in stdout and f"metrics: {out / 'adapter' / 'metrics.json'}" in stdout
    assert "adapter perplexity" in stdout and "train tokens" in stdout  # the results table
    metrics = json.loads((out / "adapter" / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["adapter_ppl"] > 0

    # --resume with a longer schedule continues from checkpoint-3 instead of starting over.
    code, stdout, stderr = cli("train", *_sets([*tiny_overrides, "training.max_steps=5", "training.save_steps=3"]),
                               "--output", str(out), "--resume")
    assert code == 0, stderr
    metrics = json.loads((out / "adapter" / "metrics.json").read_text())
    assert metrics["global_step"] == 5 and "resuming from" in stderr and "checkpoint-3" in stderr

    # eval without --config takes the model and data the adapter was trained on, and writes nothing.
    before = {p.name: p.read_bytes() for p in (out / "adapter").iterdir()}
    code, stdout, stderr = cli("eval", "--adapter", str(out / "adapter"))
    assert code == 0, stderr
    assert "base perplexity" in stdout and "adapter perplexity" in stdout
    assert {p.name: p.read_bytes() for p in (out / "adapter").iterdir()} == before


def test_eval_of_a_missing_adapter_exits_2(cli, tmp_path):
    code, _, stderr = cli("eval", "--adapter", str(tmp_path / "nope"))
    assert code == 2 and "--adapter" in stderr and "no such directory" in stderr


def test_unknown_lora_targets_exit_1_naming_layers(cli, tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setattr("loraflow.modeling.ARCH_DEFAULT_TARGETS", {})
    monkeypatch.setattr("peft.utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING", {})
    code, _, stderr = cli("train", *_sets([*tiny_overrides, "lora.target_modules=[q_proj]"]),
                          "--output", str(tmp_path / "run"))
    assert code == 1 and "lora.target_modules=['q_proj']" in stderr and "c_attn" in stderr
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_two_cpu_processes_write_one_adapter(tiny_overrides, tiny_model_dir, tmp_path, train_home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "loraflow.cli", "train",
           *_sets([*tiny_overrides, "training.max_steps=2", "training.save_steps=2", "data.max_eval_samples=4",
                   "training.gradient_accumulation_steps=1"]),
           "--output", str(out)]
    env = {**os.environ, "LORAFLOW_HOME": str(train_home), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("adapter: ") == 1  # only rank 0 reports
    assert "world size 2" in proc.stderr or "x 2" in proc.stderr  # effective batch names both ranks
    adapters = [p for p in out.rglob("adapter_config.json") if "checkpoint-" not in str(p)]
    assert adapters == [out / "adapter" / "adapter_config.json"]
    metrics = json.loads((out / "adapter" / "metrics.json").read_text())
    assert metrics["global_step"] == 2
    # Both ranks' label tokens are counted: 2 steps x 2 ranks x 4 rows of up to 64 tokens.
    assert metrics["train_tokens"] > 2 * 2 * 4 * 40
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out / "adapter"))
    lora_b = [v for k, v in model.state_dict().items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # trained (B starts at zero) and loaded
