"""``log_once``: facts that hold for a whole engine (which backend, which attention path), logged
once per process rather than once per layer.

``LOGGED`` keeps the keys, so that tests can read which path served a model.
"""

from __future__ import annotations

import logging

LOGGED: set[str] = set()


def log_once(logger: logging.Logger, key: str, msg: str) -> None:
    """``logger.info(msg)`` the first time ``key`` is seen in this process."""
    if key not in LOGGED:
        LOGGED.add(key)
        logger.info(msg)
