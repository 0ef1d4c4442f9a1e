"""The `loraflow` logger. The library logs through it and never imports Prefect; Prefect shows the
same lines in its UI when `PREFECT_LOGGING_EXTRA_LOGGERS=loraflow` (the flows set it)."""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "loraflow"


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is logged, not the one at set-up: a CLI
    called in-process (tests, notebooks) may have its stderr replaced between calls."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_console(level: int = logging.INFO) -> None:
    """Terminal output for the CLI: one handler on the package logger, idempotent. When stderr is
    not a terminal (a log file, a Prefect worker), datasets' per-map progress bars would only add
    hundreds of carriage-return lines; loraflow's own progress lines say what matters."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if not any(getattr(h, "_loraflow", False) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._loraflow = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
