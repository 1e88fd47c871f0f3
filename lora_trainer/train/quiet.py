"""Library log lines that are noise for our runs, filtered at their source loggers (nothing else)."""

from __future__ import annotations

import logging


class _EmptyFp32Warning(logging.Filter):
    """diffusers 0.42's `ModelMixin.to(dtype)` warns "There are modules in X that should be kept in
    float32: []" on every cast, also when the list is empty (its `or []` makes the None check always
    true). Our casts are the engine's own placement of modules that keep nothing in fp32; a real,
    non-empty list still gets through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


_FILTERS = {"diffusers.models.modeling_utils": _EmptyFp32Warning()}


def quiet_known_warnings() -> None:
    """Install the filters once (idempotent)."""
    for name, flt in _FILTERS.items():
        logger = logging.getLogger(name)
        if flt not in logger.filters:
            logger.addFilter(flt)
