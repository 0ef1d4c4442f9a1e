"""Output a person can read: one log format, lines said once, no progress bars off a terminal,
progress during evaluation, rounded numbers, settings errors that name their source, `-v` after
the subcommand, and a help line for every argument."""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_YAML = ROOT / "src" / "loraflow" / "demo" / "demo.yaml"
# HH:MM:SS.mmm | LEVEL   | logger - message: Prefect's console layout, used by the CLI too.
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| (DEBUG|INFO|WARNING|ERROR|CRITICAL) *\| [\w.]+ - \S")


# ------------------------------------------------------------------------------ the CLI itself


def _parsers():
    from loraflow.cli import build_parser, subparsers

    parser = build_parser()
    return [parser, *subparsers(parser)]


def test_every_argument_of_every_command_has_a_help_line():
    missing = []
    for parser in _parsers():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{parser.prog} {choice.dest}" for choice in action._choices_actions if not choice.help]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    assert len(_parsers()) > 10  # the walk reached the subcommands
    assert not missing, "arguments without help: " + ", ".join(missing)


def test_verbose_works_before_and_after_the_subcommand(cli):
    from loraflow.errors import ConfigError

    level = logging.getLogger("loraflow").level
    try:
        _verbose_checks(cli, ConfigError)
    finally:
        logging.getLogger("loraflow").setLevel(level)  # -v set DEBUG for this whole test process


def _verbose_checks(cli, ConfigError) -> None:
    # -v turns a one-line error into the traceback, wherever it is given.
    with pytest.raises(ConfigError):
        cli("config", "validate", "--set", "lora.r=0", "-v")
    with pytest.raises(ConfigError):
        cli("-v", "config", "validate", "--set", "lora.r=0")
    # Without -v after the subcommand, the top-level one still holds (and the default is off).
    code, _, err = cli("config", "validate", "--set", "lora.r=0")
    assert code == 2 and err.startswith("error: invalid settings")
    code, _, _ = cli("config", "show", "--format", "json", "-v")
    assert code == 0
    for parser in _parsers()[1:]:
        assert "-v" in parser._option_string_actions, parser.prog


# ------------------------------------------------------------------------------ where a bad value came from


def test_config_validate_names_the_set_override_not_the_file(cli):
    code, _, err = cli("config", "validate", "--config", str(DEMO_YAML), "--set", "lora.r=0")
    assert code == 2
    assert "lora.r: Input should be greater than 0 (from --set lora.r=0)" in err
    assert "demo.yaml" not in err


def test_config_validate_names_the_environment_variable(cli, monkeypatch):
    monkeypatch.setenv("LORAFLOW_LORA__R", "0")
    code, _, err = cli("config", "validate", "--config", str(DEMO_YAML))
    assert code == 2 and "lora.r: Input should be greater than 0 (from environment variable LORAFLOW_LORA__R)" in err

    monkeypatch.delenv("LORAFLOW_LORA__R")
    monkeypatch.setenv("LORAFLOW_TRAINING", '{"max_steps": "many"}')  # a whole section as JSON
    code, _, err = cli("config", "validate")
    assert code == 2 and "training.max_steps" in err and "(from environment variable LORAFLOW_TRAINING)" in err


def test_config_validate_names_the_file_for_its_own_values(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"lora": {"r": 0, "bogus": 1}, "training": {"max_steps": 5}}))
    code, _, err = cli("config", "validate", "--config", str(bad), "--set", "lora.lora_alpha=0")
    lines = err.splitlines()
    assert code == 2
    assert f"  lora.r: Input should be greater than 0 (from {bad})" in lines
    assert f"  lora.bogus: unknown setting (from {bad})" in lines
    assert "  lora.lora_alpha: Input should be greater than 0 (from --set lora.lora_alpha=0)" in lines


# ------------------------------------------------------------------------------ one format, said once


def test_the_cli_log_format_is_prefects_console_format():
    import prefect

    from loraflow.log import DATE_FORMAT, LINE_FORMAT, console_formatter

    config = yaml.safe_load((Path(prefect.__file__).parent / "logging" / "logging.yml").read_text())
    standard = config["formatters"]["standard"]
    assert (LINE_FORMAT, DATE_FORMAT) == (standard["format"], standard["datefmt"])
    record = logging.LogRecord("loraflow.eval", logging.INFO, __file__, 1, "eval: %d/%d", (3, 9), None)
    assert LOG_LINE.match(console_formatter().format(record))


def test_repeated_lines_of_one_run_are_said_once(tiny_settings, caplog):
    """The tasks of one flow run each resolve precision and find the prepared data: within one run
    (loraflow.log.one_run, entered by the CLI and by every flow) the user reads each line once;
    outside a run every call still logs."""
    from loraflow import modeling
    from loraflow.data import prepare_dataset
    from loraflow.log import one_run

    settings = tiny_settings()  # the seed's fp16 / bfloat16 on a CPU: the precision warning
    tokenizer = modeling.load_tokenizer(settings)
    prepare_dataset(settings, tokenizer)  # fills the cache

    def said(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == level]

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="loraflow"):
        with one_run():
            for _ in range(3):
                modeling.resolve_precision(settings.training, settings.model, device="cpu", bf16_supported=False)
                prepare_dataset(settings, tokenizer)
    assert len([m for m in said(logging.WARNING) if m.startswith("precision:")]) == 1
    assert len([m for m in said(logging.INFO) if "prepared data from cache" in m]) == 1
    assert len([m for m in said(logging.INFO) if m.startswith("eval split:")]) == 1
    assert len([m for m in said(logging.DEBUG) if "prepared data from cache" in m]) == 2

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="loraflow"):
        for _ in range(2):
            modeling.resolve_precision(settings.training, settings.model, device="cpu", bf16_supported=False)
    assert len([m for m in said(logging.WARNING) if m.startswith("precision:")]) == 2


def _progress_bars_enabled(stderr) -> str:
    code = ("import transformers.utils.logging as tl; from loraflow.log import quiet_progress_bars; "
            "quiet_progress_bars(); import datasets; "
            "print(datasets.is_progress_bar_enabled(), tl.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if "PROGRESS_BARS" not in k}
    return subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=stderr, env=env,
                          text=True, timeout=120, check=True).stdout.split()


def test_progress_bars_only_on_a_terminal():
    """transformers is imported first on purpose: it read the environment before loraflow could
    set it, so the bar has to be switched off where it lives."""
    assert _progress_bars_enabled(subprocess.PIPE) == ["False", "False"]
    primary, replica = os.openpty()
    try:
        assert _progress_bars_enabled(replica) == ["True", "True"]
    finally:
        os.close(primary)
        os.close(replica)


def test_results_table_rounds_time_and_throughput_for_people():
    from loraflow.evaluation import format_results_table

    table = format_results_table({"base_ppl": 45.8123, "adapter_ppl": 37.9, "eval_tokens": 11590,
                                  "train_time_s": 645.4981, "tokens_per_s": 173.2851})
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines() if "|" in line}
    assert rows["train time (s)"] == "645.5" and rows["train tokens/s"] == "173"
    assert rows["eval tokens (predicted)"] == "11,590"


def test_peft_deprecation_warning_is_silenced_even_after_filters_reset(tiny_model_dir):
    """pytest (like anything that resets warning filters) drops loraflow.modeling's process-wide
    filter; the peft calls themselves stay quiet."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraflow import modeling
    from loraflow.settings import LoraSettings

    def deprecations(caught) -> list[str]:
        return [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    assert deprecations(caught), "peft no longer triggers it: modeling.peft_quietly can go"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        modeling.apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            LoraSettings(r=2, target_modules=["c_attn"]))
    assert not deprecations(caught)


# ------------------------------------------------------------------------------ a real run's terminal output


def test_a_training_run_reads_well_off_a_terminal(tiny_overrides, tmp_path, monkeypatch):
    """`loraflow train` with stderr captured (not a TTY), as a worker or `make demo > log` has it:
    every line in one format, no carriage returns or bars, one precision warning, a line before
    each model load, the effective batch in words, evaluation progress with an ETA, one eval token
    count that matches the prepared data's, and no warning a user cannot act on."""
    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / "home"))  # fresh: datasets' map runs for real
    env = {k: v for k, v in os.environ.items() if "PROGRESS_BARS" not in k}
    sets = [arg for item in [*tiny_overrides, "training.max_steps=2"] for arg in ("--set", item)]
    proc = subprocess.run([sys.executable, "-m", "loraflow.cli", "train", *sets, "--output", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    lines = err.splitlines()

    assert "\r" not in err and "it/s]" not in err and "Loading weights" not in err and "Map" not in err
    assert [line for line in lines if not LOG_LINE.match(line)] == []
    assert len([line for line in lines if "| loraflow.model - precision:" in line]) == 1
    assert "is_gradient_checkpointing" not in err and "loss_type" not in err and "FutureWarning" not in err

    def index(fragment: str) -> int:
        return next(i for i, line in enumerate(lines) if fragment in line)

    # One load (loraflow.recipe): training and evaluation share the base model.
    loads = [i for i, line in enumerate(lines) if "loading base model" in line]
    assert len(loads) == 1 and loads[0] < index("trainable params") < index("eval: scoring")
    assert "each optimizer step learns from 8 rows of up to 64 tokens (4 per batch x 2 batches accumulated x " \
           "1 process)" in err

    progress = [line for line in lines if re.search(r"eval: \d+/\d+ (documents|chunks) scored .*eta \d+ s", line)]
    assert len(progress) >= 2  # the first batch, and the last
    done, total = re.search(r"(\d+)/(\d+)", progress[-1]).groups()
    assert done == total

    prepared = re.search(r"eval (\d+) docs / ([\d,]+) tokens", err).groups()
    evaluated = re.search(r"on (\d+) documents / ([\d,]+) tokens \(([\d,]+) of them predicted\)", err).groups()
    assert evaluated[:2] == prepared
    table = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in proc.stdout.splitlines() if "|" in line}
    assert table["eval tokens (predicted)"] == evaluated[2]


def test_a_flow_run_is_one_run_for_repeated_lines():
    """Every flow enters library_logs_in_prefect; a subflow (train-adapter inside retrain) joins
    the outer run rather than starting a fresh one."""
    from loraflow.flows._common import library_logs_in_prefect
    from loraflow.log import get_logger, log_once

    log = get_logger("test.once")
    seen: list[int] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.levelno)  # type: ignore[method-assign]
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        with library_logs_in_prefect():
            log_once(log, logging.WARNING, "said once per run: %s", "x")
            with library_logs_in_prefect():
                log_once(log, logging.WARNING, "said once per run: %s", "x")
        with library_logs_in_prefect():
            log_once(log, logging.WARNING, "said once per run: %s", "x")
    finally:
        log.removeHandler(handler)
    assert seen == [logging.WARNING, logging.DEBUG, logging.WARNING]
