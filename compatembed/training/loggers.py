"""Metric sinks. Every run keeps a local CSV; wandb (offline unless asked) is a copy, imported lazily."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)


class MetricLogger:
    """Interface: ``log(metrics, step)``, ``log_summary(metrics)``, ``finish()``."""

    def start(self, run_dir: Path, config: dict[str, Any]) -> None:
        """Called once by the trainer with the run directory and the resolved config."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_summary(self, metrics: dict[str, Any]) -> None:
        """Final values (evaluation results)."""

    def finish(self) -> None:
        """Flush and close; always called, also after an error."""


class NullLogger(MetricLogger):
    """Logs nothing (the run still writes its manifest and final metrics)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        return None


class CSVLogger(MetricLogger):
    """Appends rows ``step, key1, key2, ...`` to ``<run_dir>/<filename>``; columns grow as keys appear.

    A call appends one line. Only a key the file has no column for makes it rewrite the file (atomically,
    with the wider header; earlier rows get empty cells), so logging costs the same late in a long run as
    early. A resumed run keeps the rows already in the file.
    """

    def __init__(self, filename: str = "metrics.csv") -> None:
        self.filename = filename
        self.path: Path | None = None
        self._columns: list[str] = ["step"]

    def start(self, run_dir: Path, config: dict[str, Any]) -> None:
        self.path = Path(run_dir) / self.filename
        if self.path.is_file():  # resumed run: keep earlier rows, and their columns
            with open(self.path, newline="") as handle:
                self._columns = list(csv.DictReader(handle).fieldnames or ["step"])

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, **metrics}
        new = [key for key in row if key not in self._columns]
        self._columns += new
        if self.path is None:
            return
        if new or not self.path.is_file():
            self._rewrite(row)
            return
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self._columns).writerow(row)

    def _rewrite(self, row: dict[str, Any]) -> None:
        """The file with the current columns: its earlier rows, then ``row``."""
        assert self.path is not None
        rows: list[dict[str, Any]] = []
        if self.path.is_file():
            with open(self.path, newline="") as handle:
                rows = list(csv.DictReader(handle))
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._columns)
            writer.writeheader()
            writer.writerows([*rows, row])
        os.replace(tmp, self.path)


class WandbLogger(CSVLogger):
    """CSV locally plus a wandb run (``mode="offline"`` by default: nothing leaves the machine)."""

    def __init__(self, project: str = "compatembed", mode: str = "offline", name: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.project, self.mode, self.name, self.kwargs = project, mode, name, kwargs
        self._run: Any = None

    def start(self, run_dir: Path, config: dict[str, Any]) -> None:
        super().start(run_dir, config)
        try:
            import wandb
        except ImportError as exc:  # pragma: no cover - depends on the environment
            from compatembed.errors import ConfigError

            raise ConfigError("logger=wandb needs wandb: pip install 'compatembed[wandb]'") from exc
        self._run = wandb.init(
            project=self.project, mode=self.mode, name=self.name, dir=str(run_dir), config=config, **self.kwargs
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        super().log(metrics, step)
        if self._run is not None:
            self._run.log(metrics, step=step)

    def log_summary(self, metrics: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.summary.update(metrics)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
