"""Hydra configs composed from ``conf/`` for tests, usable outside fixtures and at any fixture scope."""

from __future__ import annotations

from compatembed.cli import compose_config

__all__ = ["compose_config"]
