"""The GPU path, as far as a CPU can check it: step statistics read only at log/save/stop steps
(no host sync per micro-batch) yet every token counted and a NaN still stopping the run before any
write; the CUDA-only data path arguments; the attention choice and the flattened varlen batches
FlashAttention-2 gets, equal to documents run alone; bench/gpu_check.sh's checks, run on the CPU,
and its one-line refusal without CUDA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _token_counts_seen(into: list[int]):
    from transformers import TrainerCallback

    class Seen(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            into.append(state.num_input_tokens_seen)
            return control

    return Seen()


def test_tokens_are_read_at_log_steps_only_and_all_counted(tiny_settings, tmp_path):
    from loraflow.training import train_adapter

    every, sparse = [], []
    a = train_adapter(tiny_settings("training.max_steps=5"), output_dir=tmp_path / "a",
                      callbacks=[_token_counts_seen(every)])
    b = train_adapter(tiny_settings("training.max_steps=5", "training.logging_steps=3"), output_dir=tmp_path / "b",
                      callbacks=[_token_counts_seen(sparse)])
    # At step k's end the count holds what was read after earlier steps: every step when logging
    # every step; only after step 3 when logging every 3 (the device kept the rest).
    assert len(set(every)) == 5
    assert sparse[:3] == [0, 0, 0] and sparse[3] == sparse[4] == every[3] > 0
    assert b.train_tokens == a.train_tokens > sparse[4]  # the last step is read too


def test_nan_found_at_a_later_save_step_names_its_step_and_writes_nothing(tiny_settings, tmp_path):
    from transformers import TrainerCallback

    from loraflow.errors import TrainingError
    from loraflow.training import train_adapter

    class PoisonStep3(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def poison(module, inputs, output):
                if state.global_step < 2:
                    return output
                return (output[0] * float("nan"), *output[1:]) if isinstance(output, tuple) else output * float("nan")

            model.get_base_model().transformer.h[0].register_forward_hook(poison)
            return control

    out = tmp_path / "nan"
    # No log step before 10: the statistics are first read when step 4 is about to be saved.
    with pytest.raises(TrainingError, match=r"non-finite training loss \(nan\) at step 3"):
        train_adapter(tiny_settings("training.max_steps=6", "training.logging_steps=10", "training.save_steps=4"),
                      output_dir=out, callbacks=[PoisonStep3()])
    assert not (out / "checkpoint-4").exists() and not (out / "adapter").exists()


def test_data_path_is_pinned_and_non_blocking_on_cuda_only(tiny_settings, tmp_path):
    from transformers import TrainingArguments

    from loraflow.modeling import Precision
    from loraflow.training import build_training_arguments, data_path_arguments

    assert data_path_arguments(2, "cpu") == {"dataloader_num_workers": 2}
    cpu = build_training_arguments(tiny_settings(), tmp_path, Precision("cpu", "fp32", "float32"))
    assert (cpu.dataloader_pin_memory, cpu.accelerator_config.non_blocking, cpu.logging_nan_inf_filter) == \
        (False, False, False)
    cuda = TrainingArguments(output_dir=str(tmp_path), **data_path_arguments(2, "cuda"))
    assert (cuda.dataloader_pin_memory, cuda.accelerator_config.non_blocking, cuda.dataloader_persistent_workers,
            cuda.dataloader_num_workers) == (True, True, True, 2)


def test_attention_choice_per_device(monkeypatch):
    import importlib.util

    from loraflow.modeling import Precision, attention_implementation

    assert attention_implementation(Precision("cpu", "fp32", "float32")) is None  # the tested CPU path
    assert attention_implementation(Precision("cuda", "fp32", "float32")) == "sdpa"  # no fp32 flash kernel
    has_flash = importlib.util.find_spec("flash_attn") is not None
    bf16 = Precision("cuda", "bf16", "bfloat16")
    assert attention_implementation(bf16) == ("flash_attention_2" if has_flash else "sdpa")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert attention_implementation(bf16) == "flash_attention_2"


@pytest.fixture
def packed_rows(tiny_settings):
    from transformers import AutoTokenizer

    from loraflow.data import prepare_dataset

    settings = tiny_settings()
    tok = AutoTokenizer.from_pretrained(settings.model.name_or_path)
    train = prepare_dataset(settings, tok).train
    rows = [r for r in train if r["position_ids"].count(0) >= 2][:2]
    rows.append(min(train, key=lambda r: len(r["input_ids"])))  # a short row: padding in the plain batch
    assert len(rows) == 3
    return rows, tok.eos_token_id


def test_flattened_varlen_batch_equals_documents_run_alone(packed_rows, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from loraflow.data import IGNORE_INDEX, PackedCollator

    rows, eos = packed_rows
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    flat = PackedCollator(eos, flatten=True)(rows)
    plain = PackedCollator(eos)(rows)
    n_real = sum(len(r["input_ids"]) for r in rows)
    assert flat["input_ids"].shape == (1, n_real)  # no padding at all
    starts = [i for i, p in enumerate(flat["position_ids"][0].tolist()) if p == 0]
    assert flat["cu_seq_lens_q"].tolist() == starts + [n_real] and flat["cu_seq_lens_q"].dtype == torch.int32
    assert flat["max_length_q"] == max(b - a for a, b in zip(starts, starts[1:] + [n_real]))
    assert isinstance(flat["max_length_k"], int)  # a Python int: no device read in the kernel call
    with torch.no_grad():
        flat_out = model(**flat, use_cache=False)
        plain_out = model(**plain, use_cache=False)
        for a, b in zip(starts, starts[1:] + [n_real]):
            alone = model(input_ids=flat["input_ids"][:, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(flat_out.logits[0, a:b], alone, atol=1e-4, rtol=1e-4)
    # Same targets, same mean loss as the padded batch the CPU trains on.
    assert (flat["labels"] != IGNORE_INDEX).sum() == (plain["labels"] != IGNORE_INDEX).sum()
    assert flat_out.loss.item() == pytest.approx(plain_out.loss.item(), rel=1e-5)


def test_trainer_flattens_batches_only_for_flash_attention(tiny_settings, tmp_path):
    from loraflow import modeling
    from loraflow.data import PackedCollator
    from loraflow.training import _trainer_class, build_training_arguments

    settings = tiny_settings()
    precision = modeling.resolve_precision(settings.training, settings.model)
    args = build_training_arguments(settings, tmp_path, precision)
    model = modeling.apply_lora(modeling.load_base_model(settings, precision), settings.lora)
    sdpa = _trainer_class()(model=model, args=args, train_dataset=[], data_collator=PackedCollator(0))
    assert sdpa.data_collator.flatten is False
    model.config._attn_implementation = "flash_attention_2"  # what load_base_model picks on a CUDA box with flash_attn
    flash = _trainer_class()(model=model, args=args, train_dataset=[], data_collator=PackedCollator(0))
    assert flash.data_collator.flatten is True


def test_gpu_check_without_cuda_says_so_in_one_line():
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                            "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 3
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "needs a GPU" in lines[0]


def test_gpu_check_logic_on_the_cpu(asset_wheels, tmp_path):
    """Everything gpu_check.sh checks, on the tiny GPT-2 in fp32 (bf16 for the half-precision eval):
    the same code the CUDA run executes, minus the device."""
    keep = tmp_path / "keep"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--arch", "tiny", "--steps", "6",
         "--max-length", "64", "--learning-rate", "2e-3", "--min-drop", "0.01", "--keep", str(keep)],
        capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert "all 5 checks passed" in proc.stdout
    for check in ("loss finite", "loss falls", "adapter reloads", "bfloat16 vs fp32 eval loss", "packed == per-document"):
        assert any(check in line and line.endswith("PASS") for line in proc.stdout.splitlines()), tail
    assert (keep / "adapter" / "adapter_model.safetensors").is_file()
