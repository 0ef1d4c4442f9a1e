"""The `loraflow` logger. The library logs through it and never imports Prefect; Prefect shows the
same lines in its UI when `PREFECT_LOGGING_EXTRA_LOGGERS=loraflow` (the flows set it).

One line format everywhere: the CLI's console handler uses Prefect's own layout
(`HH:MM:SS.mmm | LEVEL   | logger - message`), so when a flow runs inside the CLI the library's
lines and Prefect's interleave as one log, and a worker (where Prefect's console handler prints
the library's lines) shows the same thing."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import threading
from collections.abc import Iterator

LOGGER_NAME = "loraflow"
# Prefect's "standard" console format (prefect/logging/logging.yml), minus its colours.
LINE_FORMAT = "%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s"
DATE_FORMAT = "%H:%M:%S"


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


# The lines already said in the current run (a CLI command, a flow run): see log_once.
_said: contextvars.ContextVar[set[tuple] | None] = contextvars.ContextVar("loraflow_said", default=None)
_said_lock = threading.Lock()


@contextlib.contextmanager
def one_run() -> Iterator[None]:
    """Scope of `log_once`: one CLI command or one flow run. Prefect copies the context into its
    task threads, so the tasks of a flow run share it. Nested scopes join the outer one."""
    if _said.get() is not None:
        yield
        return
    token = _said.set(set())
    try:
        yield
    finally:
        _said.reset(token)


def log_once(logger: logging.Logger, level: int, msg: str, *args) -> None:
    """Log a line the first time the current run would say it; exact repeats go to DEBUG. One flow
    run resolves precision and finds the prepared data in its train, eval and gate tasks alike:
    the user needs to read that once. Outside a run (a library call) every call logs."""
    said = _said.get()
    key = (logger.name, level, msg, repr(args))
    with _said_lock:
        first = said is None or key not in said
        if said is not None:
            said.add(key)
    logger.log(level if first else logging.DEBUG, msg, *args)


def quiet_progress_bars() -> None:
    """No tqdm bars when stderr is not a terminal (a log file, a worker's captured output, Prefect's
    run logs): there each redraw is one more carriage-return line (datasets' Map/Filter,
    transformers' "Loading weights", the hub's downloads). loraflow's own progress lines say what
    matters. The environment variables cover libraries imported later; the calls cover those
    already imported, which read the variables once at import. An explicit `...=0` is respected."""
    if sys.stderr is None or sys.stderr.isatty():
        return
    quiet = {}
    for var in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(var, "1")
        quiet[var] = os.environ[var].strip().upper() in {"1", "ON", "YES", "TRUE"}
    if quiet["HF_DATASETS_DISABLE_PROGRESS_BARS"] and "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    if quiet["HF_HUB_DISABLE_PROGRESS_BARS"]:
        if "huggingface_hub" in sys.modules:
            import huggingface_hub.utils

            huggingface_hub.utils.disable_progress_bars()
        if "transformers" in sys.modules:
            import transformers.utils.logging

            transformers.utils.logging.disable_progress_bar()


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is logged, not the one at set-up: a CLI
    called in-process (tests, notebooks) may have its stderr replaced between calls."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def console_formatter() -> logging.Formatter:
    return logging.Formatter(LINE_FORMAT, DATE_FORMAT)


def setup_console(level: int = logging.INFO) -> None:
    """Terminal output for the CLI: one handler on the package logger, idempotent."""
    quiet_progress_bars()
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if not any(getattr(h, "_loraflow", False) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(console_formatter())
        handler._loraflow = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
