"""Shared fixtures: offline environment, the shared real data, composed Hydra configs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
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
    """compose(config_name, overrides) → a DictConfig from conf/ (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def _compose(config_name: str, overrides: list[str] | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=False)

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run in a temporary directory (outputs of relative paths land there)."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
