"""Fixtures for the model tests: the shared third-party CIFAR ResNet checkpoints and CIFAR-10 test split."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers.models import TinyBackbone


def shared_data_root() -> Path:
    """``$COMPATEMBED_DATA_ROOT`` or ``<repo>/../shared/data``."""
    env = os.environ.get("COMPATEMBED_DATA_ROOT")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def shared_file_or_skip(relative: str) -> Path:
    path = shared_data_root() / relative
    if not path.is_file():
        pytest.skip(f"shared file {relative} not found under {shared_data_root()} (set COMPATEMBED_DATA_ROOT)")
    return path


@pytest.fixture(scope="session")
def resnet20_checkpoint() -> Path:
    return shared_file_or_skip("cifar10-resnet/resnet20-12fca82f.th")


@pytest.fixture(scope="session")
def resnet32_checkpoint() -> Path:
    return shared_file_or_skip("cifar10-resnet/resnet32-d509ac18.th")


@pytest.fixture(scope="session")
def cifar_test_tar() -> Path:
    return shared_file_or_skip("cifar10-jpeg/test.tar")


@pytest.fixture
def tiny_backbone() -> TinyBackbone:
    """A seeded 6-feature :class:`helpers.models.TinyBackbone`."""
    torch.manual_seed(0)
    return TinyBackbone()
