"""Logging setup: structlog with bound context, JSON lines to a file per run.

Daemons bind `host`, `role` and `job_id`; the console shows them only with --verbose,
so the progress display and `--json` output stay clean.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO

import structlog

_open_file: TextIO | None = None


def configure(log_file: Path | None = None, verbose: bool = False) -> None:
    global _open_file
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        if _open_file:
            _open_file.close()
        _open_file = log_file.open("a", encoding="utf-8")
        renderer, factory = structlog.processors.JSONRenderer(), structlog.WriteLoggerFactory(file=_open_file)
    elif verbose:
        renderer, factory = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()), structlog.PrintLoggerFactory(sys.stderr)
    else:
        renderer, factory = structlog.processors.JSONRenderer(), structlog.PrintLoggerFactory(sys.stderr)
    level = logging.DEBUG if verbose else logging.INFO
    if log_file is None and not verbose:
        level = logging.WARNING
    structlog.configure(
        processors=[*processors, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    logging.getLogger("transitions").setLevel(logging.ERROR)
