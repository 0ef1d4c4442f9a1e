"""`loraflow train` (prepare -> train -> evaluate, locally, no Prefect) and `loraflow eval`."""

from __future__ import annotations

from pathlib import Path

from loraflow.cli import add_settings_args, settings_from_args


def register(sub) -> None:
    train = sub.add_parser("train", help="prepare data, train a LoRA adapter and evaluate it, in this process",
                           description="Runs unchanged under torchrun/accelerate launch (DDP).")
    add_settings_args(train)
    train.add_argument("--output", metavar="DIR", help="output directory (default: training.output_dir)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the newest complete checkpoint of this run in the output directory "
                            "(refused if it was made with other data or settings; fresh start if there is none)")
    start.add_argument("--fresh", action="store_true",
                       help="start over: remove checkpoints of an earlier run in the output directory "
                            "(also what a run without --resume does)")
    train.set_defaults(handler=_train)

    ev = sub.add_parser("eval", help="perplexity of base vs base + adapter on the eval split")
    ev.add_argument("--adapter", metavar="DIR", required=True, help="adapter directory (PEFT format)")
    ev.add_argument("--json", action="store_true", help="also print the full result as JSON")
    add_settings_args(ev)
    ev.set_defaults(handler=_eval)


def _train(args) -> int:
    from loraflow.pipeline import run_local
    from loraflow.training import is_main_process

    from loraflow.stopping import stop_on_signals

    settings = settings_from_args(args)
    with stop_on_signals("loraflow train", "checkpoints in the output folder are kept: the same command with "
                                           "--resume continues from the newest"):
        result = run_local(settings, output_dir=args.output, resume=args.resume)
    if is_main_process():
        print(f"adapter: {result.adapter_dir}")
        print(f"metrics: {result.metrics_path}")
        print(f"history: {result.train.history_path}")
        print(f"loss curve: {result.train.loss_curve_path}")
    return 0


def _eval(args) -> int:
    import json

    from loraflow.errors import ConfigError
    from loraflow.evaluation import evaluate_adapter, format_results_table
    from loraflow.settings import load_settings

    adapter = Path(args.adapter)
    if not adapter.is_dir():
        raise ConfigError(f"--adapter {adapter}: no such directory")
    config = args.config
    snapshot = adapter / "loraflow.yaml"
    if config is None and snapshot.is_file():
        # Without --config, evaluate with the model and data the adapter was trained on.
        config = snapshot
    settings = load_settings(config, args.overrides)
    result = evaluate_adapter(settings, adapter)  # reads the adapter, writes nothing into it
    print(format_results_table(result.to_dict()))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    return 0
