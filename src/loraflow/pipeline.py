"""prepare -> train -> evaluate -> release directory, in this process: what `loraflow train` runs,
through the same recipe (loraflow.recipe) as a flow run's training side."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.log import get_logger

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from loraflow.evaluation import EvalResult
    from loraflow.settings import Settings
    from loraflow.training import TrainResult

log = get_logger("pipeline")


@dataclass
class PipelineResult:
    fingerprint: str
    data_stats: dict[str, Any]
    train: TrainResult
    eval: EvalResult | None  # None on non-main DDP ranks: only rank 0 evaluates
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def adapter_dir(self) -> Path:
        return self.train.adapter_dir

    @property
    def metrics_path(self) -> Path:
        return self.train.adapter_dir / "metrics.json"

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "data_stats": self.data_stats,
            "train": self.train.to_dict(),
            "eval": self.eval.to_dict() if self.eval is not None else None,
            "timings": self.timings,
        }


def run_local(settings: Settings, *, output_dir: str | Path | None = None, resume: bool = False,
              callbacks: list[TrainerCallback] | None = None, evaluate: bool = True,
              print_table: bool = True) -> PipelineResult:
    """Prepare the data (from cache when unchanged), train the adapter, evaluate it against the
    base model, print a results table. Under torchrun every rank trains; rank 0 evaluates."""
    from loraflow.evaluation import format_results_table
    from loraflow.recipe import Recipe
    from loraflow.release import write_release
    from loraflow.training import is_main_process

    from loraflow.paths import check_dir_usable
    from loraflow.training import resolve_output_dir

    # Cheap before expensive: a bad output folder is refused before data is prepared.
    check_dir_usable(resolve_output_dir(settings, output_dir), "--output" if output_dir is not None
                     else "training.output_dir")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    recipe = Recipe(settings)  # tokenizer, config and prepared data, once (the base model when training)
    prepared = recipe.prepared
    timings["prepare_s"] = round(time.perf_counter() - t, 3)
    log.info("phase prepare: %.1fs (%s, fingerprint %s)", timings["prepare_s"],
             "from cache" if prepared.from_cache else "prepared", prepared.fingerprint)

    t = time.perf_counter()
    train = recipe.train(output_dir, resume=resume, callbacks=callbacks)
    timings["train_s"] = round(time.perf_counter() - t, 3)
    log.info("phase train: %.1fs (%d steps)", timings["train_s"], train.global_step)

    result_eval = None
    if evaluate and is_main_process():
        t = time.perf_counter()
        result_eval, _ = recipe.score(train.adapter_dir)  # on the base model training loaded
        timings["eval_s"] = round(time.perf_counter() - t, 3)
        log.info("phase eval: %.1fs", timings["eval_s"])
    result = PipelineResult(prepared.fingerprint, prepared.stats, train, result_eval, timings)
    if is_main_process():
        # The adapter directory becomes a release (metrics, settings, card), written once, here.
        write_release(train.adapter_dir, settings=settings, train=train.to_dict(),
                      evaluation=result_eval.to_dict() if result_eval else None)
        if print_table:
            metrics = {**train.to_dict(), **(result_eval.to_dict() if result_eval else {})}
            print(format_results_table(metrics), flush=True)
    return result
