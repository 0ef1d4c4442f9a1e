"""Training on the tiny GPT-2: precision, LoRA targets, the adapter the seed snippet loads,
resume equivalence and the NaN stop."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
import logging
import warnings

import pytest


# ------------------------------------------------------------------------------ precision


def test_precision_resolves_per_device(caplog):
    from loraflow.modeling import resolve_precision
    from loraflow.settings import load_settings

    seed = load_settings()  # the seed: fp16=True, model dtype bfloat16
    with caplog.at_level(logging.WARNING, logger="loraflow"):
        cpu = resolve_precision(seed.training, seed.model, device="cpu", bf16_supported=False)
    assert (cpu.name, cpu.model_dtype) == ("fp32", "float32")
    warned = [r.getMessage() for r in caplog.records if "precision" in r.getMessage()]
    assert len(warned) == 1 and "training.fp16=true" in warned[0] and "model.dtype=bfloat16" in warned[0]

    ampere = resolve_precision(seed.training, seed.model, device="cuda", bf16_supported=True)
    assert (ampere.name, ampere.model_dtype, ampere.bf16, ampere.fp16) == ("bf16", "bfloat16", True, False)
    volta = resolve_precision(seed.training, seed.model, device="cuda", bf16_supported=False)
    assert (volta.name, volta.model_dtype, volta.fp16) == ("fp16", "float16", True)

    plain = load_settings(overrides=["training.fp16=false", "model.dtype=auto"])
    assert resolve_precision(plain.training, plain.model, device="cuda", bf16_supported=False).name == "fp32"
    forced = load_settings(overrides=["training.precision=fp32"])
    p = resolve_precision(forced.training, forced.model, device="cuda", bf16_supported=True)
    assert (p.name, p.model_dtype) == ("fp32", "float32")  # no half weights without autocast


# ------------------------------------------------------------------------------ LoRA targets


def test_lora_on_gpt2_conv1d_without_warnings(tiny_settings, caplog):
    from loraflow import modeling

    settings = tiny_settings()
    model = modeling.load_base_model(settings)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="loraflow"):
        warnings.simplefilter("always")
        peft_model = modeling.apply_lora(model, settings.lora)
    fan_warnings = [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert fan_warnings == []
    config = peft_model.peft_config["default"]
    assert config.fan_in_fan_out is True and set(config.target_modules) == {"c_attn", "c_proj"}
    trainable, total = peft_model.get_nb_trainable_parameters()
    # r=16 on c_attn (64->192) and attn/mlp c_proj (64->64, 256->64) in 2 layers.
    assert trainable == 2 * 16 * ((64 + 192) + (64 + 64) + (256 + 64))
    assert any("trainable params: 22,528 || all params:" in r.getMessage() for r in caplog.records)


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_seed_targets_on_llama_resolve_to_its_attention_projections(caplog):
    from loraflow.modeling import apply_lora
    from loraflow.settings import LoraSettings

    with caplog.at_level(logging.WARNING, logger="loraflow"):
        model = apply_lora(_tiny_llama(), LoraSettings())  # the seed's c_attn/c_proj
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert model.peft_config["default"].fan_in_fan_out is False
    assert model.get_nb_trainable_parameters()[0] > 0
    assert any("c_attn" in r.getMessage() and "q_proj" in r.getMessage() for r in caplog.records)


def test_unknown_targets_on_unknown_architecture_fail_listing_layers():
    from loraflow.errors import ModelError
    from loraflow.modeling import apply_lora
    from loraflow.settings import LoraSettings

    model = _tiny_llama()
    model.config.model_type = "mystery"  # no architecture default to fall back to
    with pytest.raises(ModelError) as err:
        apply_lora(model, LoraSettings(target_modules=["c_attn"]))
    msg = str(err.value)
    assert "lora.target_modules=['c_attn']" in msg and "q_proj" in msg and "down_proj" in msg
    assert "lm_head" not in msg


# ------------------------------------------------------------------------------ training runs


def _adapter_tensors(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_train_writes_adapter_the_seed_snippet_loads(tiny_settings, tiny_model_dir, tmp_path, caplog):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraflow.training import train_adapter

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="loraflow"):
        result = train_adapter(tiny_settings("training.max_steps=4"), output_dir=out, resume=True)
    assert any("holds no complete checkpoint" in r.getMessage() for r in caplog.records)  # resume on empty dir
    assert result.global_step == 4 and result.adapter_dir == out / "adapter"
    assert result.train_tokens > 4 * 8 * 30  # 4 steps x 8 rows of up to 64 tokens, packed full
    assert result.tokens_per_s > 0 and result.final_loss == result.final_loss  # finite
    progress = [r.getMessage() for r in caplog.records if r.name == "loraflow.train" and r.getMessage().startswith("step ")]
    assert len(progress) >= 4 and "step 4/4" in progress[-1] and "eta" in progress[-1]

    # Training writes the PEFT files only; metrics and card come once, at the end (loraflow.release).
    files = {p.name for p in result.adapter_dir.iterdir()}
    assert files == {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["r"] == 16
    assert config["base_model_name_or_path"] == str(tiny_model_dir)  # the id as configured
    assert result.base_model_identity["weights"]["model.safetensors"] == \
        hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()

    history = [json.loads(line) for line in result.history_path.read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert {"loss", "learning_rate", "tokens_per_s", "eta_s", "elapsed_s"} <= set(history[0])
    assert result.loss_curve_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The seed notebook's own loading snippet.
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model = PeftModel.from_pretrained(base, str(result.adapter_dir))
    saved = _adapter_tensors(result.adapter_dir)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(loaded) == 2 * 3 * 2  # 2 layers x 3 targets x (A, B)
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it has been trained
    x = torch.tensor([[464, 3807, 373]])
    with torch.no_grad():
        adapted = model(x).logits
        with model.disable_adapter():
            plain = model(x).logits
    assert not torch.allclose(adapted, plain)


def test_resume_gives_the_same_adapter_as_a_straight_run(tiny_settings, tmp_path):
    """3 steps, "crash", resume for 3 more == 6 straight steps (LoRA dropout on, so the restored
    RNG state matters, and so do the optimizer and the linear schedule)."""
    import torch
    from transformers import TrainerCallback

    from loraflow.training import train_adapter

    settings = tiny_settings("training.max_steps=6", "training.save_steps=3", "training.lr_scheduler_type=linear",
                             "lora.lora_dropout=0.1")
    straight = train_adapter(settings, output_dir=tmp_path / "straight")

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True
            return control

    first = train_adapter(settings, output_dir=tmp_path / "resumed", callbacks=[Crash()])
    assert first.global_step == 3 and (tmp_path / "resumed" / "checkpoint-3").is_dir()
    resumed = train_adapter(settings, output_dir=tmp_path / "resumed", resume=True)
    assert resumed.resumed_from and resumed.resumed_from.endswith("checkpoint-3")
    assert resumed.global_step == 6
    assert resumed.train_tokens == straight.train_tokens  # same batches, counted across the resume

    a, b = _adapter_tensors(straight.adapter_dir), _adapter_tensors(resumed.adapter_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    first3 = _adapter_tensors(tmp_path / "straight" / "checkpoint-3")
    assert any(not torch.allclose(first3[k], a[k]) for k in a)  # steps 4-6 did change the weights
    steps = [json.loads(line)["step"] for line in resumed.history_path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_non_finite_loss_stops_without_an_adapter(tiny_settings, tmp_path):
    import torch
    from transformers import TrainerCallback

    from loraflow.errors import TrainingError
    from loraflow.training import train_adapter

    class PoisonStep3(TrainerCallback):
        """From step 3 on, the first layer's output becomes NaN (a forward hook)."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def poison(module, inputs, output):
                if state.global_step < 2:
                    return output
                if isinstance(output, tuple):
                    return (output[0] * float("nan"), *output[1:])
                return output * float("nan")

            model.get_base_model().transformer.h[0].register_forward_hook(poison)
            return control

    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"non-finite training loss \(nan\) at step 3"):
        train_adapter(tiny_settings("training.max_steps=5"), output_dir=out, callbacks=[PoisonStep3()])
    assert not (out / "adapter").exists()
    assert not (out / ".adapter.partial").exists()


# ------------------------------------------------------------------------------ base model sources


def test_base_model_from_an_s3_mirror(s3_settings, tiny_model_dir, train_home, monkeypatch):
    """A base model mirrored into object storage loads like a local one; pickled weights in the
    mirror are refused instead of downloaded."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraflow import modeling
    from loraflow.errors import ModelError
    from loraflow.storage.client import make_client

    monkeypatch.setenv("LORAFLOW_HOME", str(train_home))
    client = make_client(s3_settings.storage)
    bucket = s3_settings.storage.bucket
    for path in tiny_model_dir.iterdir():
        client.upload_file(str(path), bucket, f"mirrors/tiny-gpt2/{path.name}")
    settings = s3_settings.model_copy(deep=True)
    settings.model.name_or_path = f"s3://{bucket}/mirrors/tiny-gpt2"

    tokenizer = modeling.load_tokenizer(settings)
    model = modeling.load_base_model(settings)
    assert tokenizer.eos_token_id == 50256
    from loraflow.data.prepare import model_context_length

    assert model_context_length(modeling.load_config(settings)) == 1024
    local = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    for (name, a), (_, b) in zip(model.state_dict().items(), local.state_dict().items()):
        assert torch.equal(a, b), name
    assert str(train_home / "models" / "s3" / bucket) in modeling.resolve_model_source(settings.model, settings.storage)

    # Pickled weights beside the safetensors (as on many hub repos) are skipped, never downloaded.
    client.put_object(Bucket=bucket, Key="mirrors/tiny-gpt2/pytorch_model.bin", Body=b"not unpickled")
    local_dir = Path(modeling.resolve_model_source(settings.model, settings.storage))
    assert not (local_dir / "pytorch_model.bin").exists() and (local_dir / "model.safetensors").is_file()

    # Fresh: an object replaced in place with the same size is fetched again (ETag, not size).
    client.put_object(Bucket=bucket, Key="mirrors/tiny-gpt2/notes.txt", Body=b"version one")
    modeling.resolve_model_source(settings.model, settings.storage)
    client.put_object(Bucket=bucket, Key="mirrors/tiny-gpt2/notes.txt", Body=b"version two")
    modeling.resolve_model_source(settings.model, settings.storage)
    assert (local_dir / "notes.txt").read_bytes() == b"version two"
    # ... and one removed from the bucket is removed from the mirror.
    client.delete_object(Bucket=bucket, Key="mirrors/tiny-gpt2/notes.txt")
    modeling.resolve_model_source(settings.model, settings.storage)
    assert not (local_dir / "notes.txt").exists()

    settings.model.name_or_path = "./no/such/model-dir"
    with pytest.raises(ModelError, match="no such model directory"):
        modeling.load_base_model(settings)


def test_resume_refuses_a_checkpoint_made_on_other_base_weights(tiny_settings, tiny_model_dir, tmp_path):
    """Same path, `model.safetensors` swapped: the resume identity holds the base weights' sha256,
    so --resume refuses in one line naming the file, instead of continuing on other weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from loraflow.errors import ConfigError
    from loraflow.training import train_adapter

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    settings = tiny_settings(f"model.name_or_path={base}", "training.max_steps=2", "training.save_steps=2")
    train_adapter(settings, output_dir=tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint-2" / "loraflow-run.json").is_file()

    tensors = load_file(str(base / "model.safetensors"))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    longer = tiny_settings(f"model.name_or_path={base}", "training.max_steps=4", "training.save_steps=2")
    with pytest.raises(ConfigError) as info:
        train_adapter(longer, output_dir=tmp_path / "run", resume=True)
    message = str(info.value)
    assert "base_model.weights[model.safetensors]" in message and "\n" not in message


def test_resume_skips_a_checkpoint_damaged_after_saving_and_says_why(tiny_settings, tmp_path, caplog):
    """A complete checkpoint (marker present) whose optimizer.pt was cut short later: resume takes
    the one before it, naming the file and what is wrong, instead of a traceback from torch.load."""
    from loraflow.training import train_adapter

    out = tmp_path / "run"
    settings = tiny_settings("training.max_steps=4", "training.save_steps=2", "training.save_total_limit=null")
    train_adapter(settings, output_dir=out)
    optimizer = out / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    with caplog.at_level(logging.INFO, logger="loraflow"):
        result = train_adapter(tiny_settings("training.max_steps=6", "training.save_steps=2",
                                             "training.save_total_limit=null"), output_dir=out, resume=True)
    messages = [r.getMessage() for r in caplog.records]
    assert any("checkpoint-4: optimizer.pt is" in m and "when it was saved" in m for m in messages), messages
    assert result.resumed_from.endswith("checkpoint-2") and result.global_step == 6


def test_a_bad_output_folder_is_refused_before_anything_is_prepared(tiny_settings, tmp_path):
    from loraflow import loads
    from loraflow.errors import ConfigError
    from loraflow.pipeline import run_local

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    before = loads.snapshot()
    with pytest.raises(ConfigError, match="a-file is a file, not a folder"):
        run_local(tiny_settings(), output_dir=blocker / "run")
    assert loads.since(before) == {}  # nothing read, tokenised or loaded


# ------------------------------------------------------------------------------ the fused loss


def _packed_batch(tiny_settings, rows: int):
    from transformers import AutoTokenizer

    from loraflow import modeling
    from loraflow.data import PackedCollator, prepare_dataset

    settings = tiny_settings()
    tokenizer = AutoTokenizer.from_pretrained(settings.model.name_or_path)
    prepared = prepare_dataset(settings, tokenizer)
    collator = PackedCollator(modeling.pad_token_id(tokenizer))
    # Rows of unequal length (padding), each holding two documents (position ids restart mid-row).
    packed = []
    for i in range(rows):
        ids = prepared.train[i]["input_ids"][:len(prepared.train[i]["input_ids"]) - 5 * i]
        cut = len(ids) // 3
        packed.append({"input_ids": ids, "position_ids": [*range(cut), *range(len(ids) - cut)]})
    return settings, collator(packed)


@pytest.mark.parametrize("precision,kernels", [("fp32", True), ("bf16", True), ("fp32", False)])
def test_fused_loss_equals_the_models_own_loss_and_gradients(tiny_settings, monkeypatch, precision, kernels):
    """lm_loss on packed rows (several documents per row, padding) against transformers' own
    ForCausalLM loss with the Trainer's normalisation (num_items_in_batch): the same value and the
    same LoRA gradients, in fp32 tightly, in bf16 (bf16 base under autocast) within bf16 rounding;
    through loraflow.cpu_kernels' cross-entropy kernel and through its torch fallback."""
    import torch

    from loraflow import cpu_kernels, lm_loss, modeling
    from loraflow.training import _body_and_head, fused_loss_applies

    if kernels:
        assert cpu_kernels.kernels() is not None, cpu_kernels.status()
    else:
        monkeypatch.setattr(cpu_kernels, "_state", {"module": None, "error": "switched off by the test"})

    settings, batch = _packed_batch(tiny_settings, 3)
    assert int((batch["labels"] == -100).sum()) >= 3 * 2 + 5 + 10  # two document starts a row, padding
    p = modeling.Precision("cpu", precision, "float32" if precision == "fp32" else "bfloat16")
    model = modeling.apply_lora(modeling.load_base_model(settings, p), settings.lora)
    model.eval()  # no dropout: the two passes see the same network
    assert fused_loss_applies(model, p) is None
    n = (batch["labels"][:, 1:] != -100).sum()
    body, head = _body_and_head(model)

    def run(fused: bool):
        model.zero_grad(set_to_none=True)
        with modeling.autocast(p):
            if fused:
                hidden = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
                loss = lm_loss.summed_loss(hidden, head.weight, batch["labels"], chunk=16) / n  # many chunks
            else:
                loss = model(**batch, num_items_in_batch=n).loss
        loss.backward()
        return float(loss), {k: v.grad.clone() for k, v in model.named_parameters() if v.requires_grad}

    (ref, ref_grads), (ours, our_grads) = run(False), run(True)
    tol = 1e-5 if precision == "fp32" else 1e-2
    assert abs(ours - ref) <= tol * abs(ref), (ours, ref)
    flat = lambda g: torch.cat([g[k].flatten().float() for k in sorted(g)])  # noqa: E731
    rel = float((flat(our_grads) - flat(ref_grads)).norm() / flat(ref_grads).norm())
    assert rel <= (1e-4 if precision == "fp32" else 2e-2), rel


def test_fused_loss_trains_the_same_adapter(train_on_and_off):
    """training.fused_loss on and off: the same steps give the same losses and the same adapter
    files, keys, dtypes and (to fp32 rounding) values."""
    import torch

    runs = train_on_and_off("training.fused_loss", 3)
    for _, lines in runs.values():
        assert not any("training.fused_loss" in line for line in lines)  # no fallback on GPT-2
    (on, _), (off, _) = runs["true"], runs["false"]
    assert {p.name for p in on.adapter_dir.iterdir()} == {p.name for p in off.adapter_dir.iterdir()}
    assert json.loads((on.adapter_dir / "adapter_config.json").read_text()) == \
        json.loads((off.adapter_dir / "adapter_config.json").read_text())
    a, b = _adapter_tensors(on.adapter_dir), _adapter_tensors(off.adapter_dir)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype == torch.float32 for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)
    assert on.train_tokens == off.train_tokens
    assert abs(on.final_loss - off.final_loss) <= 1e-4 * off.final_loss, (on.final_loss, off.final_loss)


def test_fused_loss_falls_back_where_the_head_is_not_plain(tiny_settings):
    """A head that is trained, or logits that are not the head applied to the last hidden state
    (here: a scaling hook, as some architectures scale or soft-cap logits), keep the model's loss."""
    from loraflow import modeling
    from loraflow.training import _body_and_head, fused_loss_applies

    settings = tiny_settings()
    p = modeling.Precision("cpu", "fp32", "float32")
    model = modeling.apply_lora(modeling.load_base_model(settings, p), settings.lora)
    _, head = _body_and_head(model)
    handle = head.register_forward_hook(lambda module, inputs, output: output * 0.5)
    assert "not its output head" in fused_loss_applies(model, p)
    handle.remove()
    assert fused_loss_applies(model, p) is None
    head.weight.requires_grad_(True)
    assert fused_loss_applies(model, p) == "the output head is trained"


def test_fused_gelu_is_gpt2s_activation(tiny_settings):
    """loraflow.activations swaps GPT-2's written-out gelu_new for torch's one-kernel tanh GELU in
    every layer: the same logits (fp32 rounding) and the same LoRA gradients."""
    import torch
    from transformers.activations import GELUTanh, NewGELUActivation

    from loraflow import modeling
    from loraflow.activations import use_fused_gelu

    settings, batch = _packed_batch(tiny_settings, 2)
    p = modeling.Precision("cpu", "fp32", "float32")
    model = modeling.apply_lora(modeling.load_base_model(settings, p), settings.lora)
    model.eval()
    layers = model.get_base_model().config.n_layer

    def run():
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        return out.logits.detach(), {k: v.grad.clone() for k, v in model.named_parameters() if v.requires_grad}

    ref_logits, ref_grads = run()
    assert use_fused_gelu(model) == layers
    assert sum(isinstance(m, GELUTanh) for m in model.modules()) == layers
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    logits, grads = run()
    assert (logits - ref_logits).abs().max() < 1e-4
    assert all(torch.allclose(grads[k], ref_grads[k], rtol=1e-4, atol=1e-7) for k in grads)
    assert use_fused_gelu(model) == 0  # nothing left to swap
