"""The CSV metric log: one appended line per call; the file is rewritten only when a new column appears."""

from __future__ import annotations

import csv

from compatembed.training.loggers import CSVLogger


def read(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_rows_are_appended_and_the_file_rewritten_only_for_a_new_column(tmp_path):
    logger = CSVLogger()
    logger.start(tmp_path, {})
    path = tmp_path / "metrics.csv"
    logger.log({"train/loss": 2.0}, step=1)
    first = path.stat().st_ino
    logger.log({"train/loss": 1.5}, step=2)
    assert path.stat().st_ino == first  # appended in place, not replaced
    assert read(path) == [["step", "train/loss"], ["1", "2.0"], ["2", "1.5"]]

    logger.log({"train/loss": 1.0, "train/lr": 0.1}, step=3)  # a new column: the header widens
    assert path.stat().st_ino != first
    assert read(path) == [["step", "train/loss", "train/lr"], ["1", "2.0", ""], ["2", "1.5", ""], ["3", "1.0", "0.1"]]
    widened = path.stat().st_ino
    logger.log({"train/lr": 0.05}, step=4)  # known columns, one missing: appended with an empty cell
    assert path.stat().st_ino == widened
    assert read(path)[-1] == ["4", "", "0.05"]
    assert not (tmp_path / "metrics.tmp").exists()


def test_a_resumed_run_keeps_the_earlier_rows_and_columns(tmp_path):
    before = CSVLogger()
    before.start(tmp_path, {})
    before.log({"a": 1, "b": 2}, step=1)
    before.finish()

    after = CSVLogger()
    after.start(tmp_path, {})
    after.log({"b": 3}, step=2)
    assert read(tmp_path / "metrics.csv") == [["step", "a", "b"], ["1", "1", "2"], ["2", "", "3"]]
