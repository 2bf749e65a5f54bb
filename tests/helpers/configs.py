"""Hydra configs composed from ``conf/`` for tests, usable outside fixtures and at any fixture scope."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_config(config_name: str, overrides: Sequence[str] | None = None) -> DictConfig:
    """``config_name`` (``train``, ``eval``, …) from ``conf/`` with ``overrides``, via Hydra's compose API.

    Hydra's global state is cleared before and after, so calls never see each other's initialisation.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=False)
    finally:
        GlobalHydra.instance().clear()
