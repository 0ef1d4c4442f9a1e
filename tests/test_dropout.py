"""loraflow.dropout and loraflow.cpu_kernels: CPU dropout masks as a function of (seed, index), the
fused kernels against their torch reference, the attention that uses them, and a training run that
switches to them."""

from __future__ import annotations

import pytest


def test_masks_drop_p_keep_the_mean_and_follow_the_seed():
    import torch

    from loraflow.dropout import keep_mask

    torch.manual_seed(0)
    for p in (0.05, 0.1, 0.5):
        mask, scale = keep_mask((1000, 4001), p)
        assert mask.dtype == torch.bool and mask.shape == (1000, 4001)
        kept = mask.flatten().float()
        assert abs(float(1 - kept.mean()) - p) < 0.002, p
        # Neighbours (consecutive counters) and rows are independent.
        both = float(((1 - kept[:-1]) * (1 - kept[1:])).mean())
        assert abs(both - p * p) < 0.002, (p, both)
        rows = mask.float()
        assert abs(float(((1 - rows[:-1]) * (1 - rows[1:])).mean()) - p * p) < 0.002, p
        # The survivors' scale is the inverse of the exact keep probability: the mean is kept.
        assert abs(scale * round((1 - p) * 2**32) / 2**32 - 1) < 1e-12
    torch.manual_seed(3)
    a, b = keep_mask((4096,), 0.1)[0], keep_mask((4096,), 0.1)[0]
    torch.manual_seed(3)
    assert torch.equal(keep_mask((4096,), 0.1)[0], a) and not torch.equal(a, b)
    assert not keep_mask((64,), 1.0)[0].any() and keep_mask((64,), 1e-10)[0].all()


def test_fused_kernels_compute_the_torch_reference():
    """The C++ kernels (built here: a compiler is on every machine this runs on) give the masks of
    loraflow.cpu_kernels.keep bit for bit, the dropout's product bit for bit, the softmax of a
    block with its bias and mask as torch computes it, and its backward within one rounding."""
    import torch

    from loraflow import cpu_kernels, dropout

    fused = cpu_kernels.kernels()
    assert fused is not None, cpu_kernels.status()
    kept, scale = dropout.keep_level(0.1)
    seed = -0x0123456789ABCDEF  # seeds are int64 draws; the kernels read their bits as unsigned
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(37, 3001, dtype=dtype)
        mask = cpu_kernels.keep(seed, torch.arange(x.numel()), kept).view(x.shape)
        assert torch.equal(fused.dropout(x, seed, kept, scale), dropout._apply_reference(x, seed, kept, scale))
        assert abs(1 - float(mask.float().mean()) - 0.1) < 0.003
        scores = torch.randn(2, 3, 40, 70, dtype=dtype)
        bias = torch.zeros(2, 40, 70, dtype=dtype).masked_fill_(torch.rand(2, 40, 70) < 0.3, torch.finfo(dtype).min)
        place = (8, 5, 100, 90)  # a block at query 8, key 5 of a 100 x 90 square
        probs, dropped = fused.softmax_dropout_forward(scores, bias, seed, kept, *place)
        reference = torch.softmax(scores.float() + bias.float().unsqueeze(1), dim=-1)
        assert (probs.float() - reference).abs().max() <= (4e-3 if dtype == torch.bfloat16 else 1e-6)
        block = dropout._block_mask(scores.shape, seed, kept, place)
        assert torch.equal(dropped, torch.where(block, probs, 0))
        # The block's mask is the whole square's there: blocks drop what one pass would.
        whole = dropout._block_mask((2, 3, 100, 90), seed, kept, (0, 0, 100, 90))
        assert torch.equal(block, whole[:, :, 8:48, 5:75])
        grad = torch.randn_like(scores)
        g = torch.where(block, grad, 0).float()
        p = probs.float()
        expected = p * (g - (g * p).sum(dim=-1, keepdim=True))
        got = fused.softmax_dropout_backward(grad, probs, seed, kept, *place).float()
        assert (got - expected).abs().max() <= (2 ** -8 * expected.abs().max() if dtype == torch.bfloat16 else 1e-6)
    # GELU (tanh form) forward and backward against torch's, in fp32; in bf16 within one rounding
    # (torch's 1 + tanh(z) cancels to 0 below x ~ -5.5, the kernel's sigmoid form keeps the tiny value).
    x = torch.randn(64, 3072) * 3
    xg = x.clone().requires_grad_()
    torch.nn.functional.gelu(xg, approximate="tanh").backward(torch.ones_like(x))
    assert (fused.gelu(x) - torch.nn.functional.gelu(x, approximate="tanh")).abs().max() < 2e-6
    assert (fused.gelu_backward(torch.ones_like(x), x) - xg.grad).abs().max() < 1e-5
    xb = x.bfloat16()
    diff = (fused.gelu(xb).float() - torch.nn.functional.gelu(xb, approximate="tanh").float()).abs()
    assert (diff <= 2 ** -7 * xb.float().abs().clamp(min=1e-2)).all()


def test_dropout_backward_applies_the_forward_mask_and_eval_is_identity():
    import torch

    from loraflow.dropout import CpuDropout

    x = torch.randn(64, 128, requires_grad=True)
    layer = CpuDropout(0.3).train()
    y = layer(x)
    y.backward(torch.ones_like(y))
    kept = y != 0
    scale = 2**32 / round(0.7 * 2**32)
    assert 0.25 < 1 - float(kept.float().mean()) < 0.35
    assert torch.allclose(y[kept], x[kept] * scale)
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], scale)) and not x.grad[~kept].any()
    layer.eval()
    assert torch.equal(layer(x), x)


def _all_dropout(model, p: float) -> None:
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    config = model.get_base_model().config
    for name in ("attn_pdrop", "attention_dropout"):
        if hasattr(config, name):
            setattr(config, name, p)
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = p  # Llama reads its module attribute


@pytest.mark.parametrize("arch,block", [("gpt2", None), ("gpt2", 8), ("llama", 8)])
def test_attention_with_dropout_computes_what_sdpa_computes(tiny_settings, tmp_path, monkeypatch, arch, block):
    """In training mode with a drop probability below 2^-33 (every mask element kept, scale 1) the
    model through loraflow's attention (math with the mask, bf16-style products, GQA by repeat) gives
    the logits SDPA gives without dropout, on packed rows (two documents a row, padding): the
    block mask, the causal mask and grouped KV heads are handled as SDPA handles them. With blocks
    of 8 queries, the blocks skip keys their queries may not see (the causal and document cuts)."""
    import torch

    from loraflow import dropout, modeling
    from test_serve_multi import tiny_llama_dir
    from test_training import _packed_batch

    if block:
        monkeypatch.setattr(dropout, "QUERY_BLOCK", block)
    settings, batch = _packed_batch(tiny_settings, 3)
    if arch == "llama":
        settings = tiny_settings(f"model.name_or_path={tiny_llama_dir(tmp_path / 'llama')}",
                                 "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]")
    p = modeling.Precision("cpu", "fp32", "float32")
    model = modeling.apply_lora(modeling.load_base_model(settings, p), settings.lora)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    model.eval()
    with torch.no_grad():
        reference = model(**inputs).logits
    _all_dropout(model, 1e-10)
    line = dropout.use_cpu_dropout(model)
    assert line and "attention dropout" in line, line
    assert model.get_base_model().config._attn_implementation == dropout.ATTENTION
    assert all(type(m).__name__ != "Dropout" for m in model.modules())
    model.train()
    with torch.no_grad():
        ours = model(**inputs).logits
    assert (ours - reference).abs().max() < 1e-4, float((ours - reference).abs().max())
    blocks = dropout._last[3]
    seq = batch["input_ids"].shape[1]
    assert blocks[0][:2] == (0, min(dropout.QUERY_BLOCK, seq)) and blocks[-1][1] == seq
    if block:
        # Keys after a block's last query are never computed; every row starts its second
        # document mid-row, so no late block needs all keys (the union over rows still cuts some).
        assert all(k1 <= q1 for q0, q1, k0, k1, _ in blocks), blocks
        assert sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1, _ in blocks) < 0.6 * seq * seq, blocks
    # With a real probability the attention weights are dropped: the output changes, and the seed
    # reproduces it.
    _all_dropout(model, 0.5)
    with torch.no_grad():
        torch.manual_seed(5)
        a = model(**inputs).logits
        torch.manual_seed(5)
        b = model(**inputs).logits
    assert torch.equal(a, b) and (a - reference).abs().max() > 1e-2


@pytest.mark.parametrize("block,fused", [(8, True), (1 << 20, True), (8, False)])
def test_attention_gradients_are_sdpas(monkeypatch, block, fused):
    """The blocked attention's own backward (fp32, every element kept) gives SDPA's gradients for
    q, k and v on a batch of two packed rows with different document cuts, and SDPA's output;
    with the fused kernels and with their torch fallback (where no compiler is)."""
    import torch

    from loraflow import cpu_kernels, dropout

    monkeypatch.setattr(dropout, "QUERY_BLOCK", block)
    if not fused:
        monkeypatch.setattr(cpu_kernels, "_state", {"module": None, "error": "switched off by the test"})
    torch.manual_seed(0)
    b, h, s, d = 2, 3, 40, 16
    doc = torch.tensor([[0] * 13 + [1] * 27, [0] * 30 + [1] * 10])
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    mask = (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    weights = torch.randn(b, s, h, d)

    class Layer:
        is_causal = True

    ours, _ = dropout.attention(Layer(), q, k, v, mask, dropout=1e-10)
    (ours * weights).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    (reference * weights).sum().backward()
    assert (ours - reference).abs().max() < 1e-5
    for mine, theirs in zip(grads, (q.grad, k.grad, v.grad)):
        assert (mine - theirs).abs().max() < 1e-5 * max(1.0, float(theirs.abs().max()))
    if block == 8:
        assert len(dropout._last[3]) == 5 and dropout._last[3][-1][2] > 0  # the last block skips keys


def test_a_cpu_training_run_uses_the_masks_and_says_so(train_on_and_off):
    """A run on the CPU says what it switched (the tiny GPT-2's dropout modules and its attention
    dropout), trains to a finite, falling loss, and writes the same adapter files as before (a
    dropout holds no state); training.cpu_dropout=false keeps torch's dropout."""
    from safetensors.torch import load_file

    runs = train_on_and_off("training.cpu_dropout", 4)
    for on, (_, messages) in runs.items():
        assert any(m.startswith("activation: gelu_new as a one-kernel tanh GELU in 2 layer") for m in messages)
        lines = [m for m in messages if m.startswith("dropout on cpu")]
        assert len(lines) == (1 if on == "true" else 0), lines
        if on == "true":
            assert "attention dropout 0.1" in lines[0] and "fused cpu dropout kernels" in lines[0], lines[0]
            assert "6 LoRA branch(es) as one node" in lines[0], lines[0]  # 2 layers x c_attn, c_proj x 2
    results = {on: result for on, (result, _) in runs.items()}
    for r in results.values():
        history = [h["loss"] for h in _history(r.history_path)]
        assert all(h == h for h in history) and history[-1] < history[0], history
    files = {on: sorted(p.name for p in r.adapter_dir.iterdir()) for on, r in results.items()}
    assert files["true"] == files["false"]
    a = load_file(results["true"].adapter_dir / "adapter_model.safetensors")
    b = load_file(results["false"].adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype == b[k].float().dtype for k in a)


def _history(path):
    from loraflow.training import read_history

    return [h for h in read_history(path) if "loss" in h]
