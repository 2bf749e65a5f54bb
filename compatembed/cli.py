"""What every entry point shares: where the configs are, one-line user errors."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

from compatembed.errors import CompatEmbedError

if TYPE_CHECKING:
    from omegaconf import DictConfig

T = TypeVar("T")

# An absolute path: Hydra resolves a relative config_path against the package when the app runs
# as a console script, where ../conf is no Python module.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose_config(config_name: str, overrides: Sequence[str] = (), *, return_hydra_config: bool = False) -> DictConfig:
    """``config_name`` (``train``, ``eval``, ``report``...) from ``conf/`` with ``overrides``, outside ``@hydra.main``.

    For code that runs several configs in one process (the demo, the tools, the tests): Hydra's global
    state is cleared before and after, so calls never see each other's initialisation.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()


def user_error(exc: BaseException) -> CompatEmbedError | None:
    """The :class:`CompatEmbedError` behind ``exc`` (Hydra's ``instantiate`` wraps the ones raised in
    constructors), or None when ``exc`` is a bug."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, CompatEmbedError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def run_cli(task: Callable[[], T]) -> T:
    """Run ``task``; a user error prints ``error: <message>`` on one line and exits 2.

    Other exceptions are bugs and keep their traceback.
    """
    try:
        return task()
    except Exception as exc:
        cause = user_error(exc)
        if cause is None:
            raise
        message = " ".join(str(cause).split())
        print(f"error: {message}", file=sys.stderr)
        logging.getLogger("compatembed").debug("user error", exc_info=True)
        raise SystemExit(2) from None
