"""loraflow.lora_branch: PEFT's LoRA branch as one autograd node in CPU training, installed through
PEFT's variant slot by loraflow.dropout.use_cpu_dropout: the same function, masks and gradients as
PEFT's own expression; PEFT's expression wherever it is not training; merging unchanged."""

from __future__ import annotations

import pytest


def _graph_names(tensor) -> list[str]:
    seen, names, stack = set(), [], [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_branch_node_computes_pefts_lora(tiny_settings, precision):
    """Training mode, the recipe's LoRA dropout (0.05) from loraflow's masks: with the variant the
    loss and every LoRA gradient are PEFT's expression's (the same masks: one seed drawn per layer
    either way), within the rounding of where the scaling is applied; one node per LoRA layer."""
    import torch

    from loraflow import dropout, modeling
    from test_training import _packed_batch

    settings, batch = _packed_batch(tiny_settings, 3)
    p = modeling.Precision("cpu", precision, "bfloat16" if precision == "bf16" else "float32")
    model = modeling.apply_lora(modeling.load_base_model(settings, p), settings.lora)
    from peft.tuners.lora.layer import Linear

    line = dropout.use_cpu_dropout(model)
    lora_layers = sum(1 for m in model.modules() if isinstance(m, Linear))
    assert lora_layers == 6 and f"{lora_layers} LoRA branch(es) as one node" in line, line
    for m in model.modules():  # B starts at zero: give the branch something to carry
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    model.train()

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        with modeling.autocast(p):
            loss = model(**batch).loss
        loss.backward()
        grads = {n: t.grad.float().clone() for n, t in model.named_parameters() if t.requires_grad}
        return loss, grads

    loss, grads = run()
    assert _graph_names(loss).count("_BranchBackward") == lora_layers
    from loraflow.lora_branch import use_cpu_lora_branch

    assert use_cpu_lora_branch(model, on=False) == lora_layers
    ref_loss, ref_grads = run()
    assert "_BranchBackward" not in _graph_names(ref_loss)
    tol = 2e-2 if precision == "bf16" else 1e-5
    assert abs(float(loss) - float(ref_loss)) < tol * abs(float(ref_loss)), (float(loss), float(ref_loss))
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * lora_layers
    for name, ref in ref_grads.items():
        err = float((grads[name] - ref).norm() / ref.norm())
        assert err < (3e-2 if precision == "bf16" else 1e-5), (name, err)
    # A different seed gives other masks: the gradients follow the seed, not a fixed pattern.
    dropout.use_cpu_dropout(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(8)
    with modeling.autocast(p):
        model(**batch).loss.backward()
    other = next(t.grad.float() for n, t in model.named_parameters() if n.endswith("lora_A.default.weight"))
    first = next(g for n, g in grads.items() if n.endswith("lora_A.default.weight"))
    assert float((other - first).norm() / first.norm()) > 1e-3


def test_outside_training_the_variant_is_pefts_expression_and_merges(tiny_settings):
    """Evaluation (eval mode, no_grad) gives bit for bit what PEFT gives without the variant, and
    merging the adapter into the base with the variant installed gives the unmerged outputs."""
    import torch

    from loraflow import dropout, modeling
    from test_training import _packed_batch

    settings, batch = _packed_batch(tiny_settings, 2)
    p = modeling.Precision("cpu", "fp32", "float32")
    model = modeling.apply_lora(modeling.load_base_model(settings, p), settings.lora)
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    model.eval()
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    with torch.no_grad():
        reference = model(**inputs).logits
        dropout.use_cpu_dropout(model)
        assert torch.equal(model(**inputs).logits, reference)
        model.train()
        torch.manual_seed(1)
        dropped = model(**inputs).logits  # training mode without grad: PEFT's expression, masks applied
        assert (dropped - reference).abs().max() > 1e-3
        model.eval()
        model.merge_adapter()
        merged = model(**inputs).logits
        model.unmerge_adapter()
        unmerged = model(**inputs).logits
    # Merging adds the delta into the fp32 base weight and unmerging subtracts it: a rounding each.
    assert (merged - reference).abs().max() < 1e-4 and (unmerged - reference).abs().max() < 1e-5
