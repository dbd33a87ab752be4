"""The one package logger; modules call ``get_logger(__name__)`` to get a child of it."""

from __future__ import annotations

import logging

LOGGER_NAME = "optuna_guard"

_root = logging.getLogger(LOGGER_NAME)
_root.addHandler(logging.NullHandler())


def get_logger(name: str | None = None) -> logging.Logger:
    """Return the package logger, or a child of it for a module name under ``optuna_guard``."""
    if not name or name == LOGGER_NAME:
        return _root
    if name.startswith(LOGGER_NAME + "."):
        return logging.getLogger(name)
    return _root.getChild(name)
