"""The reliability campaign's pure helpers: arguments, the acknowledged-log accounting, percentiles, the report.

The campaign itself (``python -m tools.reliability_campaign``) starts servers and runs for minutes; its
runs are the evidence, not tests. Nothing here starts a server.
"""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest

from tools.reliability_campaign import (
    LIVE_CAP,
    PHASES,
    QUICK_DEFAULTS,
    AckLog,
    Expected,
    HostError,
    account,
    check_host,
    classify_pending,
    count_5xx,
    count_duplicates,
    evaluate_targets,
    judge_answer,
    latency_summary,
    make_op,
    malformed_cases,
    parse_args,
    parse_schemathesis_output,
    percentile,
    phase_deadline,
    read_log,
    render_markdown,
    replay_log,
    requests_by_route,
    summarise_schemathesis_report,
    write_versions,
)


# -- arguments -----------------------------------------------------------------------------------------
def test_defaults_are_the_full_campaign():
    a = parse_args([])
    assert (a.kills, a.gallery, a.clients, a.seconds, a.dim) == (100, 100_000, [1, 4, 16, 64], 10.0, 128)
    assert a.phases == list(PHASES) and a.host == "127.0.0.1"
    assert a.out.endswith("docs/results/reliability")


def test_quick_shrinks_what_was_not_given_explicitly():
    a = parse_args(["--quick", "--kills", "7"])
    assert a.kills == 7  # explicit wins
    assert (a.gallery, a.clients, a.seconds) == (QUICK_DEFAULTS["gallery"], QUICK_DEFAULTS["clients"],
                                                 QUICK_DEFAULTS["seconds"])
    assert a.max_minutes == QUICK_DEFAULTS["max_minutes"]


def test_phases_run_in_campaign_order_and_out_loses_its_extension():
    a = parse_args(["--phases", "load", "kill", "--out", "x/y.json", "--clients", "16", "1", "16"])
    assert a.phases == ["kill", "load"]
    assert a.out == "x/y" and a.clients == [1, 16]


@pytest.mark.parametrize("argv", [["--host", "0.0.0.0"], ["--host", "localhost"], ["--host", "10.0.0.1"],
                                  ["--kills", "0"], ["--seconds", "0"], ["--clients", "0"], ["--phases", "nope"],
                                  ["--max-minutes", "-1"]])
def test_bad_arguments_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


def test_only_loopback_127_0_0_1_is_accepted():
    assert check_host("127.0.0.1") == "127.0.0.1"
    for host in ("0.0.0.0", "::1", "localhost", "192.168.1.2", ""):
        with pytest.raises(HostError):
            check_host(host)


# -- percentiles -----------------------------------------------------------------------------------------
def test_percentile_matches_numpy_linear_interpolation():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1001):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None


def test_latency_summary_in_milliseconds():
    s = latency_summary([0.001, 0.002, 0.003])
    assert s == {"n": 3, "p50_ms": 2.0, "p99_ms": pytest.approx(2.98), "max_ms": 3.0}
    assert latency_summary([]) == {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}


def test_count_duplicates_counts_each_extra_occurrence_per_list():
    assert count_duplicates([[1, 2, 3], [4]]) == 0
    assert count_duplicates([[1, 2, 1, 1], [5, 5]]) == 3
    assert count_duplicates([[1], [1]]) == 0  # the same id in two result lists is not a duplicate


# -- the acknowledged log --------------------------------------------------------------------------------
LOG = [
    {"op": "register", "version": "v1"},
    {"op": "add", "ids": [1, 2, 3], "version": "v1"},
    {"op": "add", "ids": [4], "version": "v2"},
    {"op": "upgrade", "ids": [2], "version": "v2"},
    {"op": "delete", "ids": [3, 99]},  # 99 was never added: nothing to track
    {"op": "upsert", "ids": [1, 5], "version": "v2"},
    {"op": "materialise"},
    {"op": "snapshot"},
    {"op": "calibration", "value": [1.5, 0.1]},
    {"op": "alias", "collection": "h"},
]


def test_replay_gives_the_acknowledged_state():
    st = replay_log(LOG)
    assert st.items == {1: "v2", 2: "v2", 3: None, 4: "v2", 5: "v2"}
    assert st.live() == {1: "v2", 2: "v2", 4: "v2", 5: "v2"}
    assert st.config == {"calibration": [1.5, 0.1], "materialised": True, "alias": "h"}
    resolved = replay_log([*LOG, {"op": "resolve", "ids": [6, 4], "versions": [None, "v1"], "config": {"alias": "g"}}])
    assert resolved.items[6] is None and resolved.items[4] == "v1" and resolved.config["alias"] == "g"
    with pytest.raises(ValueError):
        replay_log([{"op": "frobnicate"}])


def test_account_is_zero_when_the_server_holds_every_acknowledged_write():
    st = replay_log(LOG)
    acc = account(st, {1: "v2", 2: "v2", 3: None, 4: "v2", 5: "v2"}, dict(st.config))
    assert acc["lost"] == 0 and acc["checked"] == 5 and acc["examples"] == []


def test_account_counts_missing_reverted_resurrected_and_undone_config():
    st = replay_log(LOG)
    observed = {1: None, 2: "v1", 3: "v1", 4: "v2"}  # 1 and 5 missing, 2 reverted to v1, 3 deleted but back
    config = {"calibration": None, "materialised": True, "alias": "h"}
    acc = account(st, observed, config)
    assert (acc["missing"], acc["reverted"], acc["resurrected"], acc["config_lost"]) == (2, 1, 1, 1)
    assert acc["lost"] == 5
    assert any("resurrected" in e for e in acc["examples"]) and any("calibration" in e for e in acc["examples"])


def test_a_write_in_flight_at_a_kill_happened_all_or_nothing():
    pre = replay_log(LOG)
    add = {"op": "add", "ids": [10, 11], "version": "v1"}
    assert classify_pending(pre, add, {10: "v1", 11: "v1"}, pre.config) == "applied"
    assert classify_pending(pre, add, {}, pre.config) == "not_applied"
    assert classify_pending(pre, add, {10: "v1"}, pre.config) == "torn"
    upgrade = {"op": "upgrade", "ids": [4, 5], "version": "v1"}
    assert classify_pending(pre, upgrade, {4: "v2", 5: "v1"}, pre.config) == "torn"
    delete = {"op": "delete", "ids": [1, 2]}
    assert classify_pending(pre, delete, {1: None, 2: None}, pre.config) == "applied"
    assert classify_pending(pre, delete, {1: "v2", 2: "v2"}, pre.config) == "not_applied"
    # collection-level writes are told apart by the configuration alone
    alias = {"op": "alias", "collection": "g"}
    assert classify_pending(pre, alias, {}, {**pre.config, "alias": "g"}) == "applied"
    assert classify_pending(pre, alias, {}, pre.config) == "not_applied"
    assert classify_pending(pre, {"op": "snapshot"}, {}, pre.config) == "either"
    # an item write is not blamed for a configuration that changed elsewhere
    assert classify_pending(pre, add, {10: "v1", 11: "v1"}, {**pre.config, "alias": None}) == "applied"


def test_ack_log_is_durable_json_lines_and_a_torn_tail_is_ignored(tmp_path):
    path = tmp_path / "ack.jsonl"
    log = AckLog(path)
    for rec in LOG[:3]:
        log.append(rec)
    log.close()
    with open(path, "a") as f:
        f.write('{"op": "add", "ids": [7')  # the tool itself died mid-line
    assert read_log(path) == LOG[:3]


def test_generated_writes_fit_the_state_they_were_made_for():
    rng = random.Random(0)
    st = Expected()
    op, nxt = make_op("upgrade", st, rng, 1, 4)  # nothing to upgrade or delete yet: an add instead
    assert op.kind == "add" and op.record["ids"] == list(range(1, nxt))
    assert len(op.body["vectors"]) == len(op.body["ids"]) and all(len(r) == 4 for r in op.body["vectors"])
    st = replay_log([{"op": "add", "ids": [1, 2, 3], "version": "v1"}, {"op": "add", "ids": [4], "version": "v2"}])
    for _ in range(50):
        op, nxt = make_op("upgrade", st, rng, 100, 4)
        assert op.kind == "upgrade" and set(op.record["ids"]) <= {1, 2, 3} and op.record["version"] == "v2"
        op, _ = make_op("delete", st, rng, 100, 4)
        assert set(op.body["ids"]) <= {1, 2, 3, 4}
        op, _ = make_op("upsert", st, rng, 100, 4)
        assert op.body["upsert"] is True and len(set(op.body["ids"])) == len(op.body["ids"])
    for kind, method in (("materialise", "POST"), ("snapshot", "POST"), ("calibration", "PUT"), ("alias", "PUT")):
        op, _ = make_op(kind, st, rng, 100, 4)
        assert op.kind == kind and op.method == method and "ids" not in op.record
    big = replay_log([{"op": "add", "ids": list(range(LIVE_CAP + 1)), "version": "v1"}])
    op, _ = make_op("add", big, rng, 10_000, 4)
    assert op.kind == "delete"  # the gallery stays small enough for one search to return all of it


# -- answers, schemathesis, the report ---------------------------------------------------------------------
def test_judge_answer_wants_a_4xx_with_exactly_error_and_message():
    good = json.dumps({"error": "InvalidInputError", "message": "k must be positive"}).encode()
    assert judge_answer(400, "application/json", good)["ok"]
    assert not judge_answer(500, "application/json", json.dumps({"error": "InternalError", "message": "x"}).encode())["ok"]
    assert not judge_answer(200, "application/json", good)["ok"]
    assert not judge_answer(400, "text/plain", b"Invalid HTTP request received.")["ok"]
    assert not judge_answer(422, "application/json", b'{"detail": []}')["ok"]
    assert not judge_answer(None, "", b"")["ok"]


def test_the_malformed_sweep_is_a_fixed_list_of_distinct_cases():
    cases = malformed_cases(16, 1 << 20)
    names = [c.name for c in cases]
    assert len(names) == len(set(names)) and len(cases) > 100
    assert sum(c.raw is not None for c in cases) >= 10  # framing cases go over raw sockets
    assert all(c.path.startswith("/") for c in cases)


def test_schemathesis_numbers_come_from_its_json_report_or_its_summary():
    report = {"schemathesis_version": "4.0", "stop_reason": "max_time",
              "operations": {"total": 21, "selected": 21, "tested": 20},
              "test_cases": {"generated": 5000, "with_failures": 2, "unique_failures": 1},
              "failures": [{}], "errors": [], "warnings": {"missing_test_data": ["POST /x"], "missing_auth": []}}
    s = summarise_schemathesis_report(report)
    assert (s["operations"], s["operations_tested"], s["cases"], s["failures"]) == (21, 20, 5000, 1)
    assert s["warnings"] == {"missing_test_data": ["POST /x"]}
    text = "API Operations:\n  Selected: 21/21\n  Tested: 21\n\nTest cases:\n  5838 generated, 5838 passed\n"
    assert parse_schemathesis_output(text) == {"operations": 21, "operations_tested": 21, "cases": 5838, "failures": 0}


def test_server_side_5xx_come_from_metrics_except_ready_while_loading():
    metrics = "\n".join([
        "# HELP compatembed_index_requests_total HTTP requests",
        'compatembed_index_requests_total{method="GET",route="/ready",status="503"} 3.0',
        'compatembed_index_requests_total{method="GET",route="/ready",status="200"} 9.0',
        'compatembed_index_requests_total{method="POST",route="/collections/{name}/search",status="500"} 2.0',
        'compatembed_index_requests_total{method="POST",route="/collections/{name}/points",status="503"} 1.0',
        'compatembed_index_requests_total{method="POST",route="/collections/{name}/points",status="200"} 4.0',
        'compatembed_index_requests_created{method="GET",route="/ready",status="503"} 1.7e+09',
    ])
    table = requests_by_route(metrics)
    assert table["GET /ready"] == {"503": 3, "200": 9}
    assert table["POST /collections/{name}/points"] == {"503": 1, "200": 4}
    assert count_5xx(table) == 3  # a 503 of a write is counted; /ready's while loading is its documented answer


def _result(**phases):
    return {"command": "python -m tools.reliability_campaign --quick", "started_utc": "2026-01-01T00:00:00Z",
            "wall_s": 100.0, "machine": {"cpu_count": 2, "platform": "Linux", "python": "3.11", "faiss": "1.8",
                                         "numpy": "2", "load_average_at_start": [1.0, 1.0, 1.0]},
            "phases": phases}


KILL = {"status": "ok", "kills": 5, "acknowledged": 80, "lost": 0, "duplicated": 0, "torn": 0, "server_errors_5xx": 0,
        "unexpected_4xx": 0, "ids_checked": 900, "by_kind": {"add": {"sent": 3, "acknowledged": 3, "killed_in_flight": 1,
                                                                     "latency": latency_summary([0.004])}}}


def _level(clients, qps, write_p99_ms):
    return {"clients": clients, "searches": int(qps * 10), "search_qps": qps, "search": latency_summary([0.01]),
            "write": {"n": 50, "p50_ms": 5.0, "p99_ms": write_p99_ms, "max_ms": write_p99_ms},
            "server_errors_5xx": 0, "transport_errors": 0}


def test_targets_are_met_not_met_or_not_measured():
    levels = [_level(1, 100.0, 20.0), _level(64, 250.0, 400.0)]
    for lv in levels:
        lv["throughput_ratio"] = lv["search_qps"] / 100.0
    t = {x["target"]: x for x in evaluate_targets(_result(kill=KILL, load={"status": "ok", "levels": levels,
                                                                         "server_errors_5xx": 0}))}
    assert t["lost"]["met"] and t["duplicated"]["met"] and t["server_errors_5xx"]["met"]
    assert t["write_p99_s_at_64"]["value"] == 0.4 and t["write_p99_s_at_64"]["met"]
    assert t["search_throughput_ratio_at_64"]["value"] == 2.5 and t["search_throughput_ratio_at_64"]["met"]
    bad = {**KILL, "lost": 2, "server_errors_5xx": 1}
    t = {x["target"]: x for x in evaluate_targets(_result(kill=bad, schemathesis={"status": "skipped",
                                                                                  "server_errors_5xx": None}))}
    assert t["lost"]["met"] is False and t["server_errors_5xx"]["met"] is False and t["server_errors_5xx"]["value"] == 1
    assert t["write_p99_s_at_64"]["met"] is None  # no load phase: not measured, not failed
    assert t["phases_failed"]["value"] == 0  # a skipped phase did not fail
    t = {x["target"]: x for x in evaluate_targets(_result(kill={**KILL, "status": "failed", "reason": "restart failed"}))}
    assert t["phases_failed"]["met"] is False and t["phases_failed"]["scope"] == "kill"
    assert t["lost"]["value"] == 0  # what it measured before it failed still counts
    assert {x["met"] for x in evaluate_targets(_result())} == {None}
    t = {x["target"]: x for x in evaluate_targets(_result(load={"status": "ok", "levels": [_level(1, 100.0, 10.0), {
        **_level(4, 150.0, 1500.0), "throughput_ratio": 1.5}], "server_errors_5xx": 0}))}
    # the targets are stated for 64 clients: a smaller top level is shown, not judged
    assert t["write_p99_s_at_64"]["met"] is None and "at 4 clients: 1.5" in t["write_p99_s_at_64"]["scope"]
    assert t["search_throughput_ratio_at_64"]["met"] is None
    t = {x["target"]: x for x in evaluate_targets(_result(load={"status": "ok", "levels": [_level(1, 100.0, 10.0), {
        **_level(64, 150.0, 1500.0), "throughput_ratio": 1.5}], "server_errors_5xx": 0}))}
    assert t["write_p99_s_at_64"]["met"] is False and t["search_throughput_ratio_at_64"]["met"] is False


def test_markdown_report_has_targets_and_every_phase_that_ran():
    levels = [{**_level(1, 100.0, 20.0), "throughput_ratio": 1.0}, {**_level(4, 180.0, 30.0), "throughput_ratio": 1.8}]
    mal = {"status": "ok", "cases": 2, "ok": 1, "server_errors_5xx": 1, "non_json": 1, "non_json_protocol": 0,
           "accepted": 0, "no_answer": 0, "gallery_unchanged": True,
           "results": [{"name": "k huge", "ok": True, "status": 413, "body": "{}"},
                       {"name": "deep | nesting", "ok": False, "status": 500, "body": "boom"}]}
    res = _result(kill=KILL, schemathesis={"status": "skipped", "reason": "schemathesis is not installed"},
                  malformed=mal, load={"status": "deadline", "reason": "levels [16] not measured", "levels": levels,
                                       "skipped_levels": [16], "gallery": 5000, "dim": 128})
    res["targets"] = evaluate_targets(res)
    md = render_markdown(res)
    assert md.startswith("# Index service reliability campaign")
    assert "`python -m tools.reliability_campaign --quick`" in md
    assert "| lost | == 0 | 0 | **yes** |" in md and "| server_errors_5xx | == 0 | 1 | **NO** |" in md
    assert "| schemathesis | skipped |" in md and "schemathesis is not installed" in md
    assert "| 4 | 180.0 | 1.80 |" in md and "Not measured (deadline): [16] clients." in md
    assert "| deep / nesting | 500 | boom |" in md  # a failing case is listed, its pipe escaped
    assert "k huge" not in md  # passing cases are only counted
    assert render_markdown(_result())  # an empty campaign still renders


def test_phase_deadlines_share_the_time_left_by_weight():
    d = phase_deadline(0.0, 100.0, "kill", ["kill", "schemathesis", "malformed", "load"])
    assert d == pytest.approx(40.0)
    assert phase_deadline(50.0, 100.0, "load", ["load"]) == pytest.approx(100.0)
    assert phase_deadline(200.0, 100.0, "load", ["load"]) == 200.0  # past the end: no time at all


def test_version_directories_follow_the_manifest_contract(tmp_path):
    dirs = write_versions(tmp_path, 8, seed=0)
    assert set(dirs) == {"v1", "v2"}
    m2 = json.loads((dirs["v2"] / "manifest.json").read_text())
    assert m2["embedding"] == {"dim": 8, "normalized": True, "dtype": "float32"}
    assert {e["kind"] for e in m2["compatibility"]} == {"affine", "forward"}
    for rel, sha in m2["files"].items():
        assert hashlib.sha256((dirs["v2"] / rel).read_bytes()).hexdigest() == sha
    w = np.load(dirs["v2"] / "transforms" / "affine_to_v1.npz")["weight"]
    assert w.shape == (8, 8) and np.allclose(w @ w.T, np.eye(8), atol=1e-5)  # a rotation


def test_shown_command_names_no_path_or_key_of_the_machine(tmp_path):
    from tools.reliability_campaign import _shown_command

    launcher = ["/opt/venv/bin/python", "-c", "import schemathesis"]
    full = [*launcher, "--config-file", str(tmp_path / "schemathesis.toml"), "run", "--header", "X-API-Key: s3cr3t"]
    shown = _shown_command(full, launcher, tmp_path, "s3cr3t")
    assert shown == "schemathesis --config-file '<work>/schemathesis.toml' run --header 'X-API-Key: $KEY'"
