"""Shared fixtures: offline environment, the shared real data, composed Hydra configs."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # the default (prepend) import mode puts it there already; ``helpers`` lives here
    sys.path.insert(0, str(TESTS))

REPO = TESTS.parent
SHARED_DATA = Path(os.environ.get("COMPATEMBED_DATA_ROOT", REPO.parent / "shared" / "data")).resolve()
# configs default to a path relative to the working directory; tests run from temporary ones
os.environ["COMPATEMBED_DATA_ROOT"] = str(SHARED_DATA)


def shared_data_or_skip() -> Path:
    """The shared real data folder, or skip the test with the reason."""
    if not (SHARED_DATA / "cifar10-jpeg" / "test.tar").is_file():
        pytest.skip(f"shared CIFAR-10 data not found at {SHARED_DATA} (set COMPATEMBED_DATA_ROOT)")
    return SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    return shared_data_or_skip()


@pytest.fixture
def compose():
    """compose(config_name, overrides) → a DictConfig from conf/ (Hydra's compose API; Hydra's global
    state cleared around each call): ``helpers.configs.compose_config``, which fixtures of any scope can import."""
    from helpers.configs import compose_config

    return compose_config


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run in a temporary directory (outputs of relative paths land there)."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """Undo the root-logger handlers a test installs (Hydra's job logging, ``logging.basicConfig``).

    Left in place they write to streams that pytest has closed since, and a later test that reads
    stderr (the CLIs' one-line errors) would see a logging traceback instead.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
