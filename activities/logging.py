"""structlog set-up: JSON lines in services, readable lines on a terminal."""

from __future__ import annotations

import logging
import os
import sys

import structlog

from activities.terminal_text import escape_log_values


def configure_logging(level: str | None = None, *, json: bool | None = None) -> None:
    """`json=None` picks JSON unless stderr is a terminal (RLM_LOG_JSON overrides)."""
    level = (level or os.environ.get("RLM_LOG_LEVEL", "info")).upper()
    if json is None:
        env = os.environ.get("RLM_LOG_JSON")
        json = env.lower() in ("1", "true", "yes") if env else not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            *([] if json else [escape_log_values]),  # the JSON renderer escapes by itself
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
