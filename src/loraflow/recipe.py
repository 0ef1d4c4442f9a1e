"""The worker's side of a run, as one recipe: set up once, train, score, stage.

In the spirit of torchtune's single-device recipe and nanoGPT's train.py: everything a run needs on
the machine with the accelerator is set up once, here, and reused by every stage:

    recipe = Recipe(settings)            # base source (an s3:// mirror synced once), config,
                                         # tokenizer, prepared data (read and hashed once)
    result = recipe.train(output_dir)    # the base model loaded once, LoRA on top, Trainer
    scores = recipe.score(adapter_dir, champion=champion_dir)
                                         # base, candidate and champion on the same loaded base:
                                         # PEFT holds several adapters and disables them for the base

`loraflow train` (loraflow.pipeline) and the flows' train-adapter side (loraflow.tasks.train) both
run it. Under torchrun each rank builds its own recipe to train; the launching process scores
with one of its own (one base-model load there).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.errors import ModelError
from loraflow.log import get_logger

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from loraflow.data import PreparedDataset
    from loraflow.evaluation import EvalResult
    from loraflow.modeling import BaseSource, Precision
    from loraflow.settings import Settings
    from loraflow.training import TrainResult

log = get_logger("run")


class Recipe:
    def __init__(self, settings: Settings, *, prepared: PreparedDataset | None = None, tokenizer=None) -> None:
        from loraflow import modeling
        from loraflow.data import prepare_dataset
        from loraflow.data.prepare import model_context_length
        from loraflow.training import main_process_first

        from loraflow.stopping import at

        at("setup (base model files, tokenizer, data preparation)")
        self.settings = settings
        self.precision: Precision = modeling.resolve_precision(settings.training, settings.model)
        self.base: BaseSource = modeling.resolve_base(settings)
        self.config = modeling.load_config(settings, source=self.base.path)
        self.tokenizer = tokenizer if tokenizer is not None else modeling.load_tokenizer(settings, source=self.base.path)
        if prepared is None:
            with main_process_first():  # under torchrun rank 0 fills the cache, the others read it
                prepared = prepare_dataset(settings, self.tokenizer,
                                           model_max_positions=model_context_length(self.config))
        self.prepared: PreparedDataset = prepared
        self._identity: dict[str, Any] | None = None
        self._model = None  # the base model, then the PeftModel that wraps it
        self._scored = 0

    @property
    def base_identity(self) -> dict[str, Any]:
        """{id, revision, weights: {file: sha256}} of the base model, computed once."""
        if self._identity is None:
            from loraflow import modeling

            self._identity = modeling.base_model_identity(self.settings, self.base)
        return self._identity

    def base_model(self):
        """The base model, loaded once per recipe. Adapters a failed training attempt (or scoring)
        put on it are taken off first (PEFT's `unload`: the frozen base weights were never changed),
        so a retry in this process starts from the same base without loading it again."""
        from loraflow import modeling

        if self._model is None:
            self._model = modeling.load_base_model(self.settings, self.precision, source=self.base.path)
        elif _is_peft(self._model):
            log.info("taking the adapters off the loaded base model")
            with modeling.peft_quietly():
                self._model = self._model.unload()
        return self._model

    def train(self, output_dir: str | Path | None = None, *, resume: bool = False,
              callbacks: list[TrainerCallback] | None = None) -> TrainResult:
        from loraflow.training import train_adapter

        return train_adapter(self.settings, output_dir=output_dir, resume=resume, callbacks=callbacks, recipe=self)

    def adopt(self, peft_model) -> None:
        """Keep the trained PeftModel: scoring puts the adapters to compare on the same loaded base."""
        self._model = peft_model

    def score(self, candidate: str | Path, *, champion: str | Path | None = None,
              with_base: bool = True) -> tuple[EvalResult, EvalResult | None]:
        """(candidate's EvalResult, champion's or None): each adapter and the base model (once) on
        the eval split, on one loaded base. Base numbers go into both results."""
        from loraflow.evaluation import score_adapters

        paths = {"candidate": Path(candidate), **({"champion": Path(champion)} if champion is not None else {})}
        for path in paths.values():
            if not (path / "adapter_config.json").is_file():
                raise ModelError(f"{path}: not an adapter directory (no adapter_config.json)")
        model, names = self._with_adapters(paths)
        results = score_adapters(self.settings, model, names, prepared=self.prepared, tokenizer=self.tokenizer,
                                 device=self.precision.device, with_base=with_base)
        return results[names["candidate"]], results.get(names.get("champion", ""))

    def _with_adapters(self, paths: dict[str, Path]) -> tuple[Any, dict[str, str]]:
        """The PeftModel holding each adapter of `paths` under a name of its own (this recipe's
        n-th scored adapter), loaded next to whatever it holds already (the trained one)."""
        from peft import PeftModel

        from loraflow import modeling

        names: dict[str, str] = {}
        model = self._model if self._model is not None else self.base_model()
        for role, path in paths.items():
            self._scored += 1
            name = f"{role}-{self._scored}"
            log.info("eval: loading adapter %s (%s)", path, role)
            try:
                with modeling.peft_quietly():
                    if _is_peft(model):
                        model.load_adapter(str(path), adapter_name=name)
                    else:
                        model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
            except (OSError, ValueError, RuntimeError, KeyError) as exc:
                raise ModelError(f"{path}: cannot load the adapter onto {self.settings.model.name_or_path!r}: "
                                 f"{exc}") from None
            names[role] = name
        model.to(self.precision.device)
        self._model = model
        return model, names


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def finite_or_raise(result: dict[str, Any], what: str) -> dict[str, Any]:
    """A broken evaluation must stop the flow before anything is published."""
    from loraflow.errors import TrainingError

    for key in ("base_ppl", "adapter_ppl"):
        value = result.get(key)
        if value is None or not math.isfinite(float(value)):
            raise TrainingError(f"evaluation of {what} gave {key}={value}; nothing is published")
    return result
