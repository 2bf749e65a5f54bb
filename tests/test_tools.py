"""Argument handling of the evidence tools (their full runs are the evidence, not tests)."""

from __future__ import annotations

from pathlib import Path

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


def _seed_row(seed, new_old_top1, compatible, gain):
    pair = {"top1": new_old_top1, "top5": 0.9, "mAP": 0.3, "mAP@R": 0.2}
    return {"seed": seed, "route": "prefix", "old/old": pair, "new/new": pair, "new/old": pair,
            "compatible": {"top1": compatible, "mAP": True}, "update_gain": {"top1": gain, "mAP": None},
            "new_new_minus_baseline": {"top1": -0.01, "mAP": 0.0}, "step_time_vs_baseline": 1.1,
            "wall_s": 60.0 * seed, "images_per_s": 900.0}


def test_methods_table_reports_mean_spread_and_how_many_seeds_pass():
    from tools.run_cifar10_methods import _mean_spread, aggregate

    agg = aggregate("oca", "normalized", [_seed_row(1, 0.40, True, 0.5), _seed_row(2, 0.44, False, 0.7)])
    assert agg["seeds"] == [1, 2] and agg["baseline"] == "normalized"
    assert agg["new/old"]["top1"] == {"mean": pytest.approx(0.42), "min": 0.40, "max": 0.44}
    assert agg["compatible"] == {"top1": 1, "mAP": 2}
    assert agg["update_gain"]["top1"]["mean"] == pytest.approx(0.6) and agg["update_gain"]["mAP"]["mean"] is None
    assert _mean_spread(agg["new/old"]["top1"]) == "42.0 ±2.0"
    assert _mean_spread(agg["update_gain"]["mAP"]) == "—"
    assert _mean_spread(agg["wall_s"], 1 / 60) == "1.5 ±0.5"


def test_merge_replaces_only_the_rows_measured_now_and_keeps_the_rest(tmp_path):
    from tools.run_cifar10_methods import Rows, aggregate, merged, render

    earlier = {
        "command": "python -m tools.run_cifar10_methods --seeds 1 2",
        "methods": [aggregate("oca", "normalized", [_seed_row(1, 0.40, True, 0.5)]),
                    aggregate("bct", "raw", [_seed_row(2, 0.30, True, 0.2)])],
        "per_seed": {"oca": [_seed_row(1, 0.40, True, 0.5), _seed_row(2, 0.44, True, 0.7)],
                     "bct": [_seed_row(2, 0.30, True, 0.2)]},
        "failed": {"bct seed 1": "exit status 1", "oca seed 3": "exit status 1"},
    }
    now = Rows()
    now.add("bct", "raw", _seed_row(1, 0.35, True, 0.3))
    now.add("bt2", "normalized", _seed_row(1, 0.33, False, 0.1))
    rows, failed, commands = merged(earlier, now, {})
    assert list(rows.seeds) == ["oca", "bct", "bt2"]  # the earlier order, new methods after
    assert [r["seed"] for r in rows.seeds["bct"]] == [1, 2]
    assert rows.seeds["bct"][0]["new/old"]["top1"] == 0.35 and rows.seeds["bct"][1]["new/old"]["top1"] == 0.30
    assert rows.seeds["oca"] == earlier["per_seed"]["oca"] and rows.baseline_of["oca"] == "normalized"
    assert failed == {"oca seed 3": "exit status 1"}  # bct seed 1 succeeded now: its failure is gone
    assert commands == [earlier["command"]]
    assert merged(None, now, {"x": "y"}) == (now, {"x": "y"}, [])
    payload = {"scenario": "internal", "protocol": "p", "command": "b", "commands": ["a", "b"],
               "machine": {"cpu_count": 2, "torch": "t", "cuda": None}, "old_version": "old", "old_wall_s": 60.0,
               "methods": [aggregate(k, rows.baseline_of[k], v) for k, v in rows.seeds.items()], "failed": failed}
    assert "made by `a`, then `b`." in render(payload)


def test_merge_refuses_a_results_file_of_another_scenario_before_any_training(tmp_path, capsys):
    import json

    out, runs = tmp_path / "out", tmp_path / "runs"
    out.mkdir()
    (out / "cifar10_methods.json").write_text(json.dumps({"scenario": "external", "per_seed": {}}))
    with pytest.raises(SystemExit) as exc:
        main(["--runs", str(runs), "--out", str(out), "--merge", "--methods", "oca", "--seeds", "1"])
    assert "external" in str(exc.value)
    assert not runs.exists()


def test_merge_refuses_rows_measured_against_other_old_weights():
    from tools.run_cifar10_methods import _same_old_model

    manifest = {"version_id": "cifar10_independent_old", "files": {"model.safetensors": "ab" * 32}}
    _same_old_model({"old_weights_sha256": "ab" * 32}, manifest, Path("x.json"))  # the same weights: fine
    for earlier in ({"old_weights_sha256": "cd" * 32}, {}):  # retrained old model, or a file that does not say
        with pytest.raises(SystemExit, match="would not compare"):
            _same_old_model(earlier, manifest, Path("x.json"))


def _sweep_run(run: Path, method: dict, epochs: int, new_old: float, new_new: float = 0.6, optim: dict | None = None) -> None:
    """A finished sweep run as collect_sweep reads it: its config and its validation report (old/old 0.3)."""
    import json

    from omegaconf import OmegaConf

    (run / "validation").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"method": method, "trainer": {"epochs": epochs}, "optim": optim or {},
                                     "data": {"validation": {"fraction": 0.1, "seed": 0}}}), run / "config.yaml")
    pair = lambda q, g, v: {"query": q, "gallery": g, "top1": v, "mAP": v}  # noqa: E731
    report = {"query_version": f"new_{run.name}", "gallery_version": "old", "split": "val",
              "pairs": [pair("old", "old", 0.3), pair("new", "new", new_new), pair("new", "old", new_old)],
              "compatible": {"top1": new_old > 0.3, "mAP": new_old > 0.3}}
    (run / "validation" / "report.json").write_text(json.dumps(report))


def test_collect_sweep_ranks_runs_by_the_validation_metric(tmp_path):
    from tools.collect_sweep import collect, render

    for scale, m in ((1.0, 0.31), (10.0, 0.35)):
        _sweep_run(tmp_path / f"run_{scale}", {"influence_scale": scale}, 6, m)
    payload = collect("oca_influence", tmp_path)
    assert [r["params"]["method.influence_scale"] for r in payload["runs"]] == [10.0, 1.0]
    assert payload["runs"][0]["metric"] == 0.35 and "new/old on the validation split" in payload["metric"]
    assert "| 10.0 | 35.0 |" in render(payload)
    with pytest.raises(SystemExit, match="no sweep config"):
        collect("nope", tmp_path)


def test_collect_sweep_reads_list_valued_parameters(tmp_path):
    import json

    from tools.collect_sweep import collect, render

    for hidden, loss, m in (([], "mse", 0.33), ([1024, 1024], "cosine", 0.36)):
        _sweep_run(tmp_path / f"run_{len(hidden)}", {"hidden_dims": hidden, "loss": loss}, 0, m)
    payload = collect("fct_map", tmp_path)
    assert [r["params"]["method.hidden_dims"] for r in payload["runs"]] == [[1024, 1024], []]
    json.dumps(payload)  # what write_json does: plain values only
    assert "| [1024, 1024] | cosine | 36.0 |" in render(payload)


def test_collect_sweep_ranks_by_the_configured_pair_and_names_swept_groups(tmp_path):
    from tools.collect_sweep import collect, render

    # the better new/new run has the worse (chance-level) new/old: independent_schedule ranks by new/new
    _sweep_run(tmp_path / "a", {}, 6, new_old=0.12, new_new=0.55, optim={"name": "adam", "optimizer": {"lr": 1e-3}})
    _sweep_run(tmp_path / "b", {}, 6, new_old=0.08, new_new=0.61, optim={"name": "adam_one_cycle", "optimizer": {"lr": 1e-3}})
    payload = collect("independent_schedule", tmp_path)
    assert [r["params"]["optim"] for r in payload["runs"]] == ["adam_one_cycle", "adam"]
    assert payload["runs"][0]["metric"] == 0.61 and "mAP of new/new" in payload["metric"]
    assert "| adam_one_cycle | 61.0 |" in render(payload)
    _sweep_run(tmp_path / "c", {}, 6, new_old=0.1, optim={"optimizer": {"lr": 1e-3}})  # a group option without a name
    with pytest.raises(SystemExit, match="'name' key"):
        collect("independent_schedule", tmp_path)


def test_collect_sweep_with_required_compatibility_ranks_passing_runs_first(tmp_path):
    from tools.collect_sweep import collect, render

    # bt2_tradeoff ranks by new/new among the runs meeting the criterion (new/old > old/old = 0.3 here)
    _sweep_run(tmp_path / "a", {"scale": 4.0, "new_alignment_weight": 5}, 6, new_old=0.29, new_new=0.62)  # best, fails
    _sweep_run(tmp_path / "b", {"scale": 1.0, "new_alignment_weight": 1}, 6, new_old=0.34, new_new=0.55)
    _sweep_run(tmp_path / "c", {"scale": 2.0, "new_alignment_weight": 5}, 6, new_old=0.31, new_new=0.58)
    payload = collect("bt2_tradeoff", tmp_path)
    assert [r["run"] for r in payload["runs"]] == ["c", "b", "a"]
    assert [r["passes"] for r in payload["runs"]] == [True, True, False]
    assert payload["require_compatible"] and payload["metric"] == "mAP of new/new on the validation split"
    assert "| 2.0 | 5 | 58.0 |" in render(payload) and "miss the compatibility criterion there" in render(payload)


def test_tools_take_method_names_from_the_registry(capsys):
    from compatembed.methods import list_methods
    from tools import bench_throughput, run_cifar10_chain, run_cifar10_methods

    compatible = [m for m in list_methods() if m != "independent"]
    assert set(compatible) <= set(run_cifar10_methods.entries())
    assert set(run_cifar10_methods.DEFAULT_ROWS) <= set(run_cifar10_methods.entries())
    assert [m for m in compatible if run_cifar10_methods.post_hoc(m)] == ["fct", "lambda_orth"]
    assert not run_cifar10_methods.post_hoc("independent_new")  # a baseline's experiment names no method
    for tool_main, argv in ((run_cifar10_chain.main, ["--method", "nope"]), (bench_throughput.main, ["--methods", "nope"])):
        with pytest.raises(SystemExit):
            tool_main(argv)
        err = capsys.readouterr().err
        assert all(m in err for m in compatible), err


@pytest.mark.parametrize(("argv", "message"), [
    (["--method", "bct", "--method-arg", "trainer.epochs=1", "--tag", "x"], "method.<key>=<value>"),
    (["--method", "bct", "--method-arg", "method.variant=prototypes"], "give --tag too"),
    (["--seeds", "1", "1"], "distinct")])
def test_the_chain_tool_refuses_bad_arguments_before_training(argv, message, capsys, tmp_path):
    from tools import run_cifar10_chain

    with pytest.raises(SystemExit):
        run_cifar10_chain.main([*argv, "--runs", str(tmp_path)])
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing trained


def test_methods_results_name_no_absolute_path_of_the_checkout():
    from tools._runner import REPO
    from tools.run_cifar10_methods import _relative

    payload = {"failed": {"oca seed 1": f"exit status 1 of: train output_dir={REPO}/runs/x"}, "n": 1.5}
    assert _relative(payload) == {"failed": {"oca seed 1": "exit status 1 of: train output_dir=runs/x"}, "n": 1.5}


def test_training_time_of_a_reused_version_comes_from_what_its_run_recorded(tmp_path):
    import json

    from tools._runner import recorded_wall_s

    assert recorded_wall_s(tmp_path) is None  # nothing recorded
    log = "[2026-01-02 10:00:00,250][x][INFO] - start\nstep\n[2026-01-02 10:06:30,750][x][INFO] - written\n"
    (tmp_path / "train.log").write_text(log)
    assert recorded_wall_s(tmp_path) == pytest.approx(390.5)  # the log's span
    (tmp_path / "train.log").write_text(log + "[2026-01-03 09:00:00,000][x][INFO] - resumed from last.ckpt at epoch 3\n")
    assert recorded_wall_s(tmp_path) is None  # a resumed run's span includes the pause: not a training time
    (tmp_path / "wall_time.json").write_text(json.dumps({"wall_s": 42.0}))
    assert recorded_wall_s(tmp_path) == 42.0  # measured by the tool that trained it


def test_a_version_is_reused_only_when_it_was_trained_with_the_asked_settings(tmp_path, monkeypatch):
    """A directory trained under an experiment's earlier defaults is refused by name, before any training."""
    import json
    import subprocess

    from omegaconf import OmegaConf

    from compatembed.cli import compose_config
    from tools._runner import StaleVersionError, train

    def no_training(*args, **kwargs):
        raise AssertionError(f"trained: {args}")

    monkeypatch.setattr(subprocess, "run", no_training)
    version = tmp_path / "cifar10_bt2_s1"
    version.mkdir()
    (tmp_path / "old").mkdir()
    (tmp_path / "linked_old").symlink_to(tmp_path / "old")
    trained_with = ["seed=1", "method.scale=2.0", "method.new_alignment_weight=1.0", "optim.optimizer.lr=1.0e-3",
                    f"method.old_version={tmp_path / 'old'}"]
    cfg = compose_config("train", ["experiment=cifar10_bt2", f"output_dir={version}", *trained_with])
    (version / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (version / "manifest.json").write_text(json.dumps({"version_id": "cifar10_bt2_s1"}))

    # Same settings; where files live and how the run executes may differ: reused.
    how = ["trainer.progress=false", "trainer.device=cpu", "paths.cache_dir=/elsewhere", "data.loader.num_workers=0"]
    # The old version named through a link to the same directory is the same old version.
    how += [f"method.old_version={tmp_path / 'linked_old'}"]
    reused = train("cifar10_bt2", runs=tmp_path, name=version.name, overrides=trained_with + how)
    assert reused["manifest"] == {"version_id": "cifar10_bt2_s1"}

    # Today's defaults of the experiment (other C, alignment weight and lr): refused, each difference named.
    with pytest.raises(StaleVersionError) as refused:
        train("cifar10_bt2", runs=tmp_path, name=version.name, overrides=["seed=1", f"method.old_version={tmp_path / 'old'}"])
    message = str(refused.value)
    assert str(version) in message and "--no-reuse" in message
    for line in ("method.scale: trained 2.0, asked 4.0", "method.new_alignment_weight: trained 1.0, asked 5.0",
                 "optim.optimizer.lr: trained 0.001, asked 0.003"):
        assert line in message
    assert "seed" not in message and "progress" not in message


def test_the_methods_table_names_every_stale_version_before_any_training(tmp_path, monkeypatch):
    import json
    import subprocess

    from omegaconf import OmegaConf

    from compatembed.cli import compose_config
    from tools._runner import StaleVersionError

    def no_training(*args, **kwargs):
        raise AssertionError(f"trained: {args}")

    monkeypatch.setattr(subprocess, "run", no_training)
    for seed in (1, 2):  # BCT trained under the code bases' lr 1e-3, before the experiment's default became 3e-3
        version = tmp_path / f"cifar10_bct_s{seed}"
        version.mkdir()
        cfg = compose_config("train", ["experiment=cifar10_bct", f"seed={seed}", f"version_id={version.name}",
                                       f"output_dir={version}", f"method.old_version={tmp_path / 'cifar10_independent_old'}",
                                       "optim.optimizer.lr=1.0e-3"])
        (version / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (version / "manifest.json").write_text(json.dumps({"version_id": version.name}))
    with pytest.raises(StaleVersionError) as refused:  # a SystemExit: the tool stops with the message
        main(["--runs", str(tmp_path), "--out", str(tmp_path / "out"), "--methods", "bct", "--seeds", "1", "2"])
    assert not (tmp_path / "out").exists()
    for seed in (1, 2):
        assert f"cifar10_bct_s{seed}: optim.optimizer.lr: trained 0.001, asked 0.003" in str(refused.value)


def test_milvus_benchmark_runs_end_to_end_at_tiny_size(tmp_path):
    """Both backends answer the same mixed-version queries; exact search is the oracle of the recall column."""
    import json

    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    from tools.bench_milvus import main as bench_main

    out = tmp_path / "milvus.json"
    assert bench_main(["--gallery", "400", "--queries", "8", "--single", "3", "--factories", "Flat",
                       "--milvus", "lite", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["backend"] for r in res["rows"]] == ["faiss", "milvus-lite (embedded)"]
    for r in res["rows"]:  # Flat is exact on both: every exact neighbour found, the same ids on both
        assert r["recall_at_k"] == pytest.approx(1.0) and r["same_ids_as_faiss"] == 1.0
        assert r["routes"] == {"v1": "query:v3>v2>v1", "v2": "query:v3>v2", "v3": "direct"}
    assert "same ids as FAISS" in out.with_suffix(".md").read_text()


def _report(old: float, new: float, cross: float) -> dict:
    def entry(query: str, gallery: str, v: float) -> dict:
        return {"query": query, "gallery": gallery, "top1": v, "top5": v + 0.1, "mAP": v - 0.1, "mAP@R": v - 0.2,
                "route": "query: prefix" if query != gallery else "same version"}

    return {"query_version": "cifar10_oca_s1", "pairs": [entry("old", "old", old), entry("new", "new", new),
                                                         entry("new", "old", cross)],
            "compatible": {"top1": cross > old, "mAP": cross > old}}


def test_a_seed_row_is_measured_against_the_old_model_and_its_baseline():
    from tools.run_cifar10_methods import summarise

    row = summarise(1, _report(0.40, 0.60, 0.50), {"top1": 0.65, "mAP": 0.55}, 1.1, 300.0, 900.0)
    assert row["new/old"] == {"top1": 0.50, "top5": 0.60, "mAP": 0.40, "mAP@R": 0.30}
    assert row["route"] == "query: prefix" and row["compatible"] == {"top1": True, "mAP": True}
    # (new/old − old/old) / (baseline − old/old), on each metric's own numbers
    assert row["update_gain"]["top1"] == pytest.approx(0.10 / 0.25)
    assert row["update_gain"]["mAP"] == pytest.approx(0.10 / 0.25)
    assert row["new_new_minus_baseline"]["top1"] == pytest.approx(-0.05)
    assert summarise(1, _report(0.40, 0.60, 0.50), {"top1": 0.30, "mAP": 0.30}, None, None, None)[
        "update_gain"] == {"top1": None, "mAP": None}  # a baseline below the old model leaves no gain to share


def test_a_report_without_the_asked_pair_names_it():
    from tools._runner import pair

    with pytest.raises(KeyError, match="new/old"):
        pair({"pairs": []}, "new", "old")


def test_the_chain_tool_reuses_a_report_only_while_its_versions_are_unchanged(tmp_path):
    import json
    import os

    from tools.run_cifar10_chain import _current_report

    versions = []
    for name in ("v1", "v2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
        versions.append(str(tmp_path / name))
    out = tmp_path / "report"
    assert _current_report(versions, out) is None  # none written yet
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"versions": [{"dir": v} for v in versions], "summary": {}}))
    made = (out / "report.json").stat().st_mtime
    for v in versions:
        os.utime(Path(v) / "manifest.json", (made - 10, made - 10))
    assert _current_report(versions, out)["summary"] == {}
    assert _current_report(versions[::-1], out) is None  # other versions
    os.utime(Path(versions[1]) / "manifest.json", (made + 10, made + 10))  # v2 retrained after the report
    assert _current_report(versions, out) is None


def test_the_chain_summary_names_the_invocation_and_the_seeds_still_to_come(tmp_path):
    import argparse
    import json

    from tools.run_cifar10_chain import _write_summary

    command = "python -m tools.run_cifar10_chain --method bct --runs runs/x --seeds 1 2 -- trainer.progress=false"
    args = argparse.Namespace(method="bct", tag="bct", method_arg=[], seeds=[1, 2], out=tmp_path, command=command)
    chains = {c: {"top1": {"AC": 1.0, "AM": 0.4}, "mAP": {"AC": 2 / 3, "AM": 0.3}} for c in ("compatible", "independent")}
    seed = {**chains, "independent_report": str(tmp_path / "s1" / "independent" / "report.md"),
            "train_wall_s": {"v2": 60.0, "v3": 120.0, "i2": 60.0, "i3": None}}
    _write_summary(args, {"wall_s": 30.0}, {1: seed}, 600.0, ["trainer.progress=false"])
    md = (tmp_path / "summary.md").read_text()
    assert f"Made by `{command}` (seed 2 not done yet)." in md
    assert "| compatible | mAP | 67% | 30.0 | 30.0 |" in md and "independent v2 1.0, v3 ?" in md
    assert json.loads((tmp_path / "summary.json").read_text())["command"] == command
    _write_summary(args, {"wall_s": 30.0}, {1: seed, 2: seed}, 900.0, ["trainer.progress=false"])
    assert f"Made by `{command}`." in (tmp_path / "summary.md").read_text()
