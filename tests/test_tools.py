"""Argument handling of the evidence tools (their full runs are the evidence, not tests)."""

from __future__ import annotations

import pytest

from tools.run_cifar10_methods import _slug, main


def test_variant_directory_names_are_distinct_and_safe():
    assert _slug(["method.influence_scale=10"]) == "influence_scale-10"
    assert _slug(["method.pull_weight=1", "trainer.epochs=8"]) == "pull_weight-1__epochs-8"
    assert _slug(["model.name=a/b c"]) == "name-a-b-c"  # no path separators or spaces
    assert _slug(["method.influence_scale=10"]) != _slug(["method.influence_scale=1"])


@pytest.mark.parametrize("variant", ["oca", "nope method.x=1", "oca not_an_override"])
def test_bad_variant_is_refused_before_any_training(variant, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--runs", str(tmp_path), "--variant", variant])
    assert exc.value.code == 2 and "--variant" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_index_benchmark_runs_end_to_end_at_tiny_size(tmp_path):
    """Every section runs and the report holds what the docs quote; timings themselves are not asserted."""
    import json
    import re

    from tools.bench_index import main as bench_main

    out = tmp_path / "bench.json"
    assert bench_main(["--gallery", "300", "--queries", "20", "--repeats", "3", "--concurrency", "1",
                       "--http-requests", "5", "--recall-n", "600", "--materialise-n", "2000",
                       "--images-per-second", "100", "--images-per-second-source", "a test", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    mx = res["mixed"]
    assert mx["identical_results_fraction"] == 1.0  # the service and raw FAISS return the same ids
    assert mx["rounds"] == 3 and mx["ratio_range"][0] <= mx["ratio_service_to_raw"] <= mx["ratio_range"][1]
    assert res["http"]["search"]["1"]["requests"] == 5 and res["http"]["health"]["1"]["requests"] == 5
    assert {re.match(r"[A-Z]+", row["factory"]).group() for row in res["recall"]["indexes"]} == {"IVF", "HNSW"}
    assert all(0.0 <= row["recall_at_10"] <= 1.0 for row in res["recall"]["indexes"])
    assert res["materialise"]["vectors"] == 2000
    md = out.with_suffix(".md").read_text()
    assert "median of rounds" in md and "a test" in md
