"""Each row of a batch through its own adapter, in two matrix products per LoRA layer.

Why not PEFT's mixed-adapter batch alone: `adapter_names=[...]` runs every LoRA layer once per
adapter in the batch (gather that adapter's rows, two small products, scale, scatter back), so a
decode step of GPT-2 small with 4 adapters is ~700 small ops, half of the step's time on a CPU
(py-spy on `loraflow serve` under bench/serve_load.py's 4 clients). Here the batch's adapters sit
side by side: h = x @ [A_1; ...; A_k]^T, each row's columns of the other adapters zeroed, then
delta = h @ [B_1 ... B_k]^T times the row's own scaling: PEFT's arithmetic, in its order and under
the same autocast (the zeroed columns add exact zeros), in 5 ops per layer whatever k is.

The model still runs through PEFT (`adapter_names=["__base__"] * rows`, PEFT's own name for "no
adapter on this row"), and a forward hook on each `peft.tuners.lora.Linear` adds the rows' deltas.
Whatever this does not cover (LoRA variants such as DoRA, a LoRA bias, LoRA on a layer other than
a Linear/Conv1D, a merged adapter) goes through PEFT's per-adapter path unchanged.
"""

from __future__ import annotations

import weakref

_by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forward(model, adapter_names: list[str], inputs: dict):
    """`model(**inputs)` with row i through adapter `adapter_names[i]`; None when some adapter in
    it needs PEFT's own path (the caller then passes `adapter_names` to PEFT)."""
    rows = _by_model.get(model)
    if rows is None:
        rows = _by_model[model] = _RowAdapters(model)
    return rows(adapter_names, inputs)


class _RowAdapters:
    def __init__(self, model) -> None:
        self._model = weakref.ref(model)
        self._adapters: frozenset | None = None  # the adapter names the checks below were made for
        self._plain: dict[str, bool] = {}
        self._hooked: weakref.WeakSet = weakref.WeakSet()
        self._rows: list[str] | None = None
        self._masks: dict = {}

    def __call__(self, adapter_names: list[str], inputs: dict):
        model = self._model()
        self._refresh(model)
        if not all(name == "__base__" or self._plain.get(name, False) for name in adapter_names):
            return None
        self._rows, self._masks = list(adapter_names), {}
        try:
            return model(adapter_names=["__base__"] * len(adapter_names), **inputs)
        finally:
            self._rows, self._masks = None, {}

    def _refresh(self, model) -> None:
        """Hook every LoRA Linear and note which adapters this path covers; again whenever the
        loaded adapters change (loading one may wrap layers no earlier adapter targeted)."""
        names = frozenset(getattr(model, "peft_config", {}))
        if names == self._adapters:
            return
        from peft.tuners.lora import Linear, LoraLayer

        plain = dict.fromkeys(names, True)
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            held = {n for attr in module.adapter_layer_names for n in getattr(module, attr, {})}
            for name in held & names:
                if not (isinstance(module, Linear) and not module.merged and name not in module.lora_variant
                        and not module.use_dora.get(name, False) and module.lora_B[name].bias is None):
                    plain[name] = False
            if isinstance(module, Linear) and module not in self._hooked:
                module.register_forward_hook(self._add)
                self._hooked.add(module)
        self._plain, self._adapters = plain, names

    def _row_masks(self, layer, adapters: list[str], x):
        """Per row: 1 on its adapter's columns of h, 0 elsewhere (all 0 where its adapter skips this
        layer); and its adapter's scaling. Equal for every layer with the same adapters, ranks and
        scalings, so made once a forward."""
        import torch

        ranks = tuple((layer.lora_A[a].weight.shape[0], layer.scaling[a]) for a in adapters)
        dtype = layer.lora_A[adapters[0]].weight.dtype
        key = (tuple(adapters), ranks, x.dim(), dtype, x.device)
        if key not in self._masks:
            columns, span = {}, 0
            for a, (r, _) in zip(adapters, ranks):
                columns[a], span = slice(span, span + r), span + r
            n = len(self._rows)
            mask = torch.zeros((n, span), dtype=dtype, device=x.device)
            scale = torch.zeros((n,), dtype=dtype, device=x.device)
            for i, a in enumerate(self._rows):
                if a in columns:
                    mask[i, columns[a]] = 1
                    scale[i] = layer.scaling[a]
            middle = (1,) * (x.dim() - 2)
            self._masks[key] = (mask.view(n, *middle, span), scale.view(n, *middle, 1))
        return self._masks[key]

    def _add(self, layer, args, output):
        if self._rows is None:  # a forward not started here (PEFT's own paths, training)
            return None
        import torch
        from torch.nn.functional import linear

        adapters = [a for a in dict.fromkeys(self._rows) if a in layer.lora_A]
        if not adapters:
            return None
        if len(adapters) == 1:
            a, b = layer.lora_A[adapters[0]].weight, layer.lora_B[adapters[0]].weight
        else:
            a = torch.cat([layer.lora_A[n].weight for n in adapters])
            b = torch.cat([layer.lora_B[n].weight for n in adapters], 1)
        mask, scale = self._row_masks(layer, adapters, args[0])
        h = linear(args[0].to(a.dtype), a)  # PEFT casts the input to the LoRA weights' dtype the same way
        delta = linear(h * mask, b) * scale
        return output + delta.to(output.dtype)
