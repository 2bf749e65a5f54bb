"""What every entry point shares: one-line user errors, logging set-up."""

from __future__ import annotations

import logging
import sys
from typing import Callable, TypeVar

from compatembed.errors import CompatEmbedError

T = TypeVar("T")


def run_cli(task: Callable[[], T]) -> T:
    """Run ``task``; a :class:`CompatEmbedError` prints ``error: <message>`` on one line and exits 2.

    Other exceptions are bugs and keep their traceback.
    """
    try:
        return task()
    except CompatEmbedError as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        logging.getLogger("compatembed").debug("user error", exc_info=True)
        raise SystemExit(2) from None
