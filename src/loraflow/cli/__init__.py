"""`loraflow` console script: one CLI, a module per command group. Each module's `register`
only declares arguments; handlers import torch/boto3 lazily so `loraflow config show` is instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from loraflow.errors import LoraflowError

# Command-group modules under loraflow.cli, each with register(subparsers).
COMMAND_MODULES = ["config", "assets", "registry", "storage", "train", "run", "serve", "emit"]


def add_settings_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML settings file")
    parser.add_argument("--set", dest="overrides", metavar="K=V", action="append", default=[],
                        help="override one setting, e.g. --set training.max_steps=7 (repeatable)")


def settings_from_args(args: argparse.Namespace):
    from loraflow.settings import load_settings

    return load_settings(args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraflow",
        description="Scheduled LoRA retraining of causal LMs, adapters published to S3-compatible storage.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"loraflow.cli.{name}").register(sub)
    _accept_verbose_everywhere(parser)
    return parser


def subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every subcommand parser under `parser`, depth first (aliases counted once)."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *subparsers(child)]
    return found


def _accept_verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """`loraflow pull x -v` as well as `loraflow -v pull x`. SUPPRESS as the default: a subcommand
    that was not given -v must not overwrite the top-level flag with False."""
    for child in subparsers(parser):
        if "-v" not in child._option_string_actions:
            child.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                               help="debug logs and tracebacks")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from loraflow.log import one_run, setup_console

    setup_console(logging.DEBUG if args.verbose else logging.INFO)
    try:
        with one_run():
            return int(args.handler(args) or 0)
    except LoraflowError as exc:
        if args.verbose or os.environ.get("LORAFLOW_TRACEBACK"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `loraflow config show | head`: the reader went away; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
