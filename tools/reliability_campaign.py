"""Reliability campaign of the index service (a command-line tool, not a test): crashes, conformance, load.

Four phases, each against real ``compatembed-index serve`` processes that this tool starts on
**127.0.0.1** only, each in its own temporary data directory (model versions written to the contract
of ``docs/model_version_format.md``, without torch: ``v1`` and ``v2`` of the same dimension, ``v2``
with an affine query edge to ``v1`` and a forward edge from ``v1``, so searches route across versions
and ``materialise`` has a route):

1. **kill**: one client drives every kind of write over HTTP (add, upsert, upgrade, delete,
   materialise, snapshot, calibration, alias) while the server is SIGKILLed at random moments, each
   kill aimed at one kind of write in flight (``--kills``, default 100). Every acknowledged write
   (HTTP 2xx) is appended to a log that is flushed and ``os.fsync``'ed before the next request. After
   each restart the server's state (``POST /collections/g/points/versions``, the collection stats,
   ``/aliases``) is checked against the replayed log: every acknowledged add/upsert/upgrade present in
   its version, no acknowledged delete back, no acknowledged configuration change undone (**lost**);
   and a search that returns the whole gallery must return every id once (**duplicated**). The write
   that was in flight at the kill may or may not have happened, but all of it or none of it (**torn**
   otherwise).
2. **schemathesis**: ``schemathesis run`` against the live ``/openapi.json`` with
   ``--checks not_a_server_error`` (and the API key), bounded in examples and time. Skipped, saying
   why, when schemathesis is not installed (``pip install 'compatembed[campaign]'``).
3. **malformed**: a fixed sweep of bad requests (invalid JSON, wrong types, NaN/Infinity tokens and
   strings, non-finite and wrong-dimension vectors, huge k, unknown names, overlong names, deep
   metadata, lone surrogates, bad Content-Length, truncated bodies and broken framing over raw
   sockets). Every answer must be a 4xx with the JSON body ``{"error": ..., "message": ...}``.
4. **load**: a gallery of ``--gallery`` items (half ``v1``, half ``v2``, loaded with the
   ``compatembed-index`` CLI), then at each ``--clients`` level ``--seconds`` of N search clients (one
   keep-alive connection each, one ``v2`` query per request, k=10) plus one writer adding
   ``--write-batch`` items ``--write-rate`` times a second: p50/p99 latency of searches and writes,
   search throughput and its ratio to the single-client rate.

Results go to ``docs/results/reliability.json`` and ``.md`` (``--out``), with the command line, the
machine, the wall time of each phase and the targets: no phase failed, 0 lost, 0 duplicated, 0 torn,
0 5xx, write p99 under 1 s at 64 clients, search throughput at 64 clients at least 2x the
single-client rate (judged only when 64 clients were measured). Each phase has a deadline (a share of
``--max-minutes``); a phase that runs out stops cleanly and reports what it measured. The exit status
is 0 when every measured target is met, 1 otherwise.

Only the HTTP API and the ``compatembed-index`` CLI are used, never the service's internals. The
servers run with a random API key (passed to every writer and to schemathesis) and without access
logs; their logs, data directories and the acknowledged-write log are kept when ``--work-dir`` or
``--keep-data`` is given.

Run from the repository root::

    python -m tools.reliability_campaign                 # the full campaign (about 10-15 minutes on 2 cores)
    python -m tools.reliability_campaign --quick         # a smoke run (about a minute or two)
    python -m tools.reliability_campaign --phases kill --kills 300 --max-minutes 30
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compatembed_index.registry import write_version_dir

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "results" / "reliability"
HOST = "127.0.0.1"
PHASES = ("kill", "schemathesis", "malformed", "load")
PHASE_WEIGHTS = {"kill": 4.0, "schemathesis": 2.0, "malformed": 1.0, "load": 3.0}
"""How the remaining time is shared among the phases still to run (unused time flows to later ones)."""
WRITE_KINDS = ("add", "upsert", "upgrade", "delete", "materialise", "snapshot", "calibration", "alias")
SMALL_DIM = 16
"""Dimension of the versions of the kill, schemathesis and malformed phases (small bodies); ``--dim`` is the load's."""
COLLECTION, OTHER, ALIAS = "g", "h", "live"
MAX_K = 1000  # the server's default max_k: a search that returns the whole kill-phase gallery
LIVE_CAP = 600  # the kill phase keeps its gallery below MAX_K items so one search sees all of it

FULL_DEFAULTS: dict[str, Any] = {"kills": 100, "seconds": 10.0, "gallery": 100_000, "clients": [1, 4, 16, 64],
                                 "max_minutes": 45.0, "schemathesis_examples": 25, "schemathesis_seconds": 300.0}
QUICK_DEFAULTS: dict[str, Any] = {"kills": 5, "seconds": 2.0, "gallery": 5000, "clients": [1, 4],
                                  "max_minutes": 6.0, "schemathesis_examples": 3, "schemathesis_seconds": 45.0}
TARGETS = {"phases_failed": 0, "lost": 0, "duplicated": 0, "torn": 0, "server_errors_5xx": 0,
           "write_p99_s_at_64": 1.0, "search_throughput_ratio_at_64": 2.0}

_T0 = time.monotonic()


def log(phase: str, message: str) -> None:
    """Progress on stderr, with the seconds since the start: a long campaign shows where it is."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {phase}: {message}", file=sys.stderr, flush=True)


# -- arguments ---------------------------------------------------------------------------------------
class HostError(ValueError):
    """A host other than 127.0.0.1 was asked for: the campaign SIGKILLs and floods what it talks to."""


def check_host(host: str) -> str:
    """Accept 127.0.0.1 only: the campaign kills, floods and fuzzes its server, so it must be a local one it started."""
    if host != HOST:
        raise HostError(f"the campaign only runs against servers it starts on {HOST}, not {host!r}")
    return host


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and ``--help``)."""
    p = argparse.ArgumentParser(
        prog="python -m tools.reliability_campaign",
        description="Reliability campaign of the index service, against servers it starts on 127.0.0.1:\n"
        "  kill          SIGKILL the server during every kind of write, restart, check the acknowledged writes\n"
        "  schemathesis  property-based requests from the live /openapi.json (not_a_server_error)\n"
        "  malformed     a fixed sweep of bad requests: each must get a 4xx JSON error\n"
        "  load          searches at several client counts with a concurrent writer: latency, throughput\n"
        "Writes OUT.json and OUT.md (default docs/results/reliability.{json,md}).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults are those of the full campaign (about 10-15 minutes on 2 cores). --quick sets whatever "
        "is not given explicitly to {kills} kills, {seconds:g} s per load level, a gallery of {gallery}, clients "
        "{clients}, schemathesis {schemathesis_examples} examples per operation for at most "
        "{schemathesis_seconds:g} s, and at most {max_minutes:g} minutes.\n\nTargets: 0 lost, 0 duplicated, 0 torn, "
        "0 5xx; at 64 clients a write p99 under 1 s and at least 2x the single-client search throughput.\n"
        "Exit status: 0 when every measured target is met, 1 when one is missed, 2 for bad arguments.".format(
            **{**QUICK_DEFAULTS, "clients": " ".join(map(str, QUICK_DEFAULTS["clients"]))}),
    )
    p.add_argument("--quick", action="store_true", help="smoke run: few kills, short load levels, small gallery")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), metavar="PHASE",
                   help=f"phases to run, in this order: {' '.join(PHASES)} (default: all)")
    p.add_argument("--kills", type=int, default=None, help=f"SIGKILLs in the kill phase (default {FULL_DEFAULTS['kills']})")
    p.add_argument("--clients", type=int, nargs="+", default=None, metavar="N",
                   help=f"search client counts of the load phase (default {' '.join(map(str, FULL_DEFAULTS['clients']))})")
    p.add_argument("--seconds", type=float, default=None,
                   help=f"seconds per load level (default {FULL_DEFAULTS['seconds']:g})")
    p.add_argument("--gallery", type=int, default=None,
                   help=f"items in the load-phase gallery (default {FULL_DEFAULTS['gallery']})")
    p.add_argument("--dim", type=int, default=128, help="vector dimension of the load-phase gallery (default 128)")
    p.add_argument("--factory", default="Flat", help="FAISS factory of the load-phase collection (default Flat)")
    p.add_argument("--write-rate", type=float, default=5.0, help="writes per second during load levels (default 5)")
    p.add_argument("--write-batch", type=int, default=10, help="items per write during load levels (default 10)")
    p.add_argument("--schemathesis-examples", type=int, default=None,
                   help=f"schemathesis --max-examples per operation (default {FULL_DEFAULTS['schemathesis_examples']})")
    p.add_argument("--schemathesis-seconds", type=float, default=None,
                   help=f"schemathesis --max-time (default {FULL_DEFAULTS['schemathesis_seconds']:g}; "
                   "also bounded by the phase deadline)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help=f"wall-time bound of the whole campaign (default {FULL_DEFAULTS['max_minutes']:g}); "
                   "each phase gets a share and stops cleanly at its deadline")
    p.add_argument("--omp-threads", type=int, default=None,
                   help="OMP_NUM_THREADS of the load-phase server (default: inherited)")
    p.add_argument("--host", default=HOST, help=f"bind address of the servers; only {HOST} is accepted")
    p.add_argument("--seed", type=int, default=0, help="seed of the vectors, the operations and the kill times")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="output path without extension: writes OUT.json and OUT.md "
                   "(default docs/results/reliability)")
    p.add_argument("--work-dir", default=None,
                   help="where data directories, server logs and the acknowledged-write log go "
                   "(default: a temporary directory, removed at the end unless --keep-data)")
    p.add_argument("--keep-data", action="store_true", help="keep the work directory (data dirs, logs) afterwards")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and complete the arguments: fill unset values from the quick or full defaults, check bounds."""
    p = build_parser()
    args = p.parse_args(argv)
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    try:
        check_host(args.host)
    except HostError as exc:
        p.error(str(exc))
    for key in ("kills", "gallery", "dim", "write_batch", "schemathesis_examples"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    for key in ("seconds", "max_minutes", "write_rate", "schemathesis_seconds"):
        if not getattr(args, key) > 0:
            p.error(f"--{key.replace('_', '-')} must be positive")
    if any(c < 1 for c in args.clients):
        p.error("--clients must be positive")
    args.clients = sorted(set(args.clients))
    args.phases = [ph for ph in PHASES if ph in set(args.phases)]
    out = str(args.out)
    for ext in (".json", ".md"):
        if out.endswith(ext):
            out = out[: -len(ext)]
    args.out = out
    return args


# -- small pure helpers --------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation (numpy's default); None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    """Count, p50, p99 and max of latencies given in seconds, reported in milliseconds."""
    def ms(v: float | None) -> float | None:
        return None if v is None else round(1e3 * v, 3)

    return {"n": len(seconds), "p50_ms": ms(percentile(seconds, 50)), "p99_ms": ms(percentile(seconds, 99)),
            "max_ms": ms(max(seconds) if seconds else None)}


def count_duplicates(result_ids: Iterable[Sequence[int]]) -> int:
    """Ids that occur more than once in one result list, summed over lists (each extra occurrence counts)."""
    return sum(len(ids) - len(set(ids)) for ids in result_ids)


@dataclass
class Expected:
    """What the acknowledged writes say the server holds.

    ``items`` maps every id ever acknowledged to its version, or None once an acknowledged delete
    removed it (it must stay absent: ids are never reused). ``config`` holds the collection-level
    state that writes change: the v2|v1 calibration, whether v1 is materialised into v2, the alias.
    """

    items: dict[int, str | None] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=lambda: {"calibration": None, "materialised": False,
                                                            "alias": None})

    def live(self) -> dict[int, str]:
        """Ids that must be present, with their version."""
        return {i: v for i, v in self.items.items() if v is not None}


def apply_record(state: Expected, rec: dict[str, Any]) -> None:
    """Apply one acknowledged-log record to ``state`` (the log's replay semantics, one place)."""
    op = rec["op"]
    if op in ("add", "upsert", "upgrade"):
        for i in rec["ids"]:
            state.items[int(i)] = rec["version"]
    elif op == "delete":
        for i in rec["ids"]:
            if int(i) in state.items:
                state.items[int(i)] = None
    elif op == "materialise":
        state.config["materialised"] = True
    elif op == "calibration":
        state.config["calibration"] = list(rec["value"])
    elif op == "alias":
        state.config["alias"] = rec["collection"]
    elif op == "resolve":  # what the server was seen to hold after an uncertain write, adopted as the truth
        for i, v in zip(rec.get("ids", []), rec.get("versions", [])):
            state.items[int(i)] = v
        state.config.update(rec.get("config", {}))
    elif op in ("snapshot", "register", "create"):
        pass
    else:
        raise ValueError(f"unknown log record {rec!r}")


def replay_log(records: Iterable[dict[str, Any]]) -> Expected:
    """The expected state after the acknowledged writes of ``records``, in order."""
    state = Expected()
    for rec in records:
        apply_record(state, rec)
    return state


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of an acknowledged-write log (JSON lines); a torn last line (the tool itself died) is ignored."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


class AckLog:
    """Append-only log of acknowledged writes: each record is flushed and fsynced before the next request."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def append(self, rec: dict[str, Any]) -> None:
        """Write one record durably (the server acknowledged it, so the campaign must never forget it)."""
        self._f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        """Close the file."""
        self._f.close()


def account(expected: Expected, observed: dict[int, str | None], observed_config: dict[str, Any]) -> dict[str, Any]:
    """Compare the server's state with the acknowledged one.

    Returns counts: ``missing`` (acknowledged present, now absent), ``reverted`` (present in another
    version than the last acknowledged write put it in), ``resurrected`` (acknowledged deleted, now
    present), ``config_lost`` (an acknowledged calibration, materialisation or alias undone), their
    sum ``lost``, the number of ids ``checked`` and up to 10 ``examples``.
    """
    missing = reverted = resurrected = 0
    examples: list[str] = []
    for i, want in expected.items.items():
        got = observed.get(i)
        if want == got:
            continue
        if want is None:
            resurrected += 1
            kind = "resurrected"
        elif got is None:
            missing += 1
            kind = "missing"
        else:
            reverted += 1
            kind = "reverted"
        if len(examples) < 10:
            examples.append(f"id {i}: {kind} (acknowledged {want}, server {got})")
    config_lost = 0
    for key, want in expected.config.items():
        if observed_config.get(key) != want:
            config_lost += 1
            if len(examples) < 10:
                examples.append(f"{key}: acknowledged {want!r}, server {observed_config.get(key)!r}")
    return {"checked": len(expected.items), "missing": missing, "reverted": reverted, "resurrected": resurrected,
            "config_lost": config_lost, "lost": missing + reverted + resurrected + config_lost, "examples": examples}


def classify_pending(pre: Expected, rec: dict[str, Any], observed: dict[int, str | None],
                     observed_config: dict[str, Any]) -> str:
    """Whether an unacknowledged write (in flight at a kill, or answered 5xx) happened: all of it or none.

    ``rec`` is the log record the write would have had. Returns ``"applied"``, ``"not_applied"``,
    ``"either"`` (it changes nothing that can be observed) or ``"torn"`` (part of it happened: a write
    is not atomic).
    """
    post = Expected(dict(pre.items), dict(pre.config))
    apply_record(post, rec)
    before: dict[Any, Any]
    if "ids" in rec:  # an item write: only its ids can tell
        keys = set(rec["ids"])
        before, after = {i: pre.items.get(i) for i in keys}, {i: post.items.get(i) for i in keys}
        seen = {i: observed.get(i) for i in keys}
    else:  # a collection-level write: only the configuration can tell
        before, after = dict(pre.config), dict(post.config)
        seen = {k: observed_config.get(k) for k in pre.config}
    is_before, is_after = seen == before, seen == after
    if is_before and is_after:
        return "either"
    if is_after:
        return "applied"
    if is_before:
        return "not_applied"
    return "torn"


@dataclass(frozen=True)
class Op:
    """One HTTP write of the kill phase and the log record it gets once acknowledged."""

    kind: str
    method: str
    path: str
    body: dict[str, Any] | None
    record: dict[str, Any]


def make_op(kind: str, state: Expected, rng: random.Random, next_id: int, dim: int) -> tuple[Op, int]:
    """Build a write of ``kind`` that must succeed on a server holding ``state``; returns it and the next free id.

    Kinds that need existing items fall back to an add when there are none (an upgrade needs v1 items).
    """
    live = state.live()
    if len(live) > LIVE_CAP and kind in ("add", "upsert"):
        kind = "delete"  # keep the gallery under MAX_K so one search returns all of it

    def vectors(n: int) -> list[list[float]]:
        return [[round(rng.gauss(0, 1), 6) for _ in range(dim)] for _ in range(n)]

    if kind == "upgrade":
        v1 = sorted(i for i, v in live.items() if v == "v1")
        if v1:
            ids = rng.sample(v1, min(len(v1), rng.randint(1, 6)))
            body = {"version": "v2", "ids": ids, "vectors": vectors(len(ids))}
            return Op(kind, "POST", f"/collections/{COLLECTION}/points/upgrade", body,
                      {"op": kind, "ids": ids, "version": "v2"}), next_id
        kind = "add"
    if kind == "delete":
        if live:
            n = rng.randint(20, 60) if len(live) > LIVE_CAP else rng.randint(1, 6)
            ids = rng.sample(sorted(live), min(len(live), n))
            return Op(kind, "POST", f"/collections/{COLLECTION}/points/delete", {"ids": ids},
                      {"op": kind, "ids": ids}), next_id
        kind = "add"
    if kind in ("add", "upsert"):
        ids = list(range(next_id, next_id + rng.randint(1, 8)))
        next_id += len(ids)
        if kind == "upsert" and live:
            ids += rng.sample(sorted(live), min(len(live), rng.randint(1, 4)))
        version = rng.choice(("v1", "v2"))
        body = {"version": version, "ids": ids, "vectors": vectors(len(ids)),
                "metadata": [{"n": i, "kind": kind} for i in ids], "upsert": kind == "upsert"}
        return Op(kind, "POST", f"/collections/{COLLECTION}/points", body,
                  {"op": kind, "ids": ids, "version": version}), next_id
    if kind == "materialise":
        return Op(kind, "POST", f"/collections/{COLLECTION}/materialise", {"source": "v1", "target": "v2"},
                  {"op": kind}), next_id
    if kind == "snapshot":
        return Op(kind, "POST", f"/collections/{COLLECTION}/snapshot", None, {"op": kind}), next_id
    if kind == "calibration":
        value = [round(rng.uniform(0.5, 2.0), 6), round(rng.uniform(-0.1, 0.1), 6)]
        body = {"query_version": "v2", "segment_version": "v1", "scale": value[0], "shift": value[1]}
        return Op(kind, "PUT", f"/collections/{COLLECTION}/calibration", body, {"op": kind, "value": value}), next_id
    if kind == "alias":
        target = rng.choice((COLLECTION, OTHER))
        return Op(kind, "PUT", f"/aliases/{ALIAS}", {"collection": target},
                  {"op": kind, "collection": target}), next_id
    raise ValueError(f"unknown write kind {kind!r}")


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it is met (None: not measured in this run)."""
    phases = result.get("phases", {})
    kill = phases.get("kill", {})
    out = []
    ran = [ph for ph in PHASES if phases.get(ph, {}).get("status") not in (None, "skipped")]
    failed = [ph for ph in ran if phases[ph]["status"] == "failed"]
    out.append({"target": "phases_failed", "threshold": "== 0", "value": len(failed) if ran else None,
                "met": (not failed) if ran else None, "scope": ", ".join(failed) or ", ".join(ran) or "no phase ran"})
    for name in ("lost", "duplicated", "torn"):
        value = kill.get(name)  # also what a kill phase that failed part-way had measured
        out.append({"target": name, "threshold": "== 0", "value": value,
                    "met": None if value is None else value == 0, "scope": "kill phase"})
    five = 0
    counted = []
    for ph in PHASES:
        d = phases.get(ph, {})
        if d.get("server_errors_5xx") is not None:
            five += d["server_errors_5xx"]
            counted.append(ph)
    out.append({"target": "server_errors_5xx", "threshold": "== 0", "value": five if counted else None,
                "met": (five == 0) if counted else None, "scope": ", ".join(counted) or "no phase ran"})
    levels = [lv for lv in phases.get("load", {}).get("levels", []) if lv.get("searches")]
    at64 = next((lv for lv in levels if lv["clients"] == 64), None)
    top = max(levels, key=lambda lv: lv["clients"]) if levels else None
    for name, threshold, get, ok in (
            ("write_p99_s_at_64", "< 1.0 s", lambda lv: None if lv["write"]["p99_ms"] is None
             else round(lv["write"]["p99_ms"] / 1e3, 4), lambda v: v < 1.0),
            ("search_throughput_ratio_at_64", ">= 2.0 x single client", lambda lv: lv.get("throughput_ratio"),
             lambda v: v >= 2.0)):
        if at64 is not None:
            value = get(at64)
            out.append({"target": name, "threshold": threshold, "value": value,
                        "met": None if value is None else ok(value), "scope": "load phase, 64 clients"})
        else:  # the target is stated for 64 clients: a smaller level is shown, not judged
            value = get(top) if top is not None else None
            scope = f"64 clients not measured (at {top['clients']} clients: {value})" if top else "load phase did not run"
            out.append({"target": name, "threshold": threshold, "value": None, "met": None, "scope": scope})
    return out


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _cell(text: str) -> str:
    """Text that cannot break a markdown table row."""
    return " ".join(text.replace("|", "/").split())


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table: the header, its rule, one line per row (cells as given)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


_RENDERED_WHEN = {"kill": "kills", "schemathesis": "command", "malformed": "results", "load": "levels"}
"""The key a phase's result holds when it measured something to report (a skipped phase holds a reason only)."""


def _render_kill(kill: dict[str, Any]) -> list[str]:
    """The kill phase: kills, acknowledged writes and what the checks found, per write kind."""
    lines = ["", "## Kill (SIGKILL during writes)", "",
              f"{kill['kills']} SIGKILLs of `compatembed-index serve` (data dir on local disk), each followed by a "
              f"restart and a check of every acknowledged write against the fsynced log; then a clean stop "
              f"(SIGTERM) and a last restart check ({_fmt(kill.get('clean_restart_checked'))}).", "",
              *_table(["kills", "acknowledged writes", "ids checked", "lost", "duplicated", "torn", "5xx",
                       "unexpected 4xx"],
                      [[kill["kills"], kill["acknowledged"], kill.get("ids_checked"), kill["lost"], kill["duplicated"],
                        kill["torn"], kill["server_errors_5xx"], kill.get("unexpected_4xx", 0)]]), "",
              *_table(["write kind", "sent", "acknowledged", "in flight at a kill", "p50 ms", "p99 ms"],
                      ([kind, k.get("sent", 0), k.get("acknowledged", 0), k.get("killed_in_flight", 0),
                        _fmt(k.get("latency", {}).get("p50_ms")), _fmt(k.get("latency", {}).get("p99_ms"))]
                       for kind in WRITE_KINDS if (k := kill["by_kind"].get(kind, {})) is not None))]
    lines += ["", f"Kills between two requests: {kill.get('killed_between', 0)}. Outcome of the write in flight "
              f"at each kill: {kill.get('pending_outcomes', {})}. Restart to ready: "
              f"p50 {_fmt(kill.get('restart', {}).get('p50_ms'))} ms, max {_fmt(kill.get('restart', {}).get('max_ms'))} ms."]
    for ex in kill.get("examples", [])[:10]:
        lines.append(f"- {ex}")
    return lines


def _render_schemathesis(st: dict[str, Any]) -> list[str]:
    """The schemathesis phase: its command, counts, the statuses the server counted, failures."""
    lines = ["", "## Schemathesis (live /openapi.json)", "",
              f"`{st.get('command')}`", "",
              f"Exit code {st.get('exit_code')}; operations {_fmt(st.get('operations'))}, test cases "
              f"{_fmt(st.get('cases'))}, failures {_fmt(st.get('failures'))}, 5xx seen by the server "
              f"{st.get('server_errors_5xx')}, unhandled errors in the server log {st.get('unhandled_in_log')}."]
    classes: dict[str, int] = {}
    for route, statuses in (st.get("server_statuses_by_route") or {}).items():
        for code, n in statuses.items():
            if route != "GET /ready":  # the campaign's own readiness probes
                classes[code[:1] + "xx"] = classes.get(code[:1] + "xx", 0) + n
    if classes:
        lines += ["", "Answers counted by the server's /metrics (readiness probes aside): "
                  + ", ".join(f"{k} {v}" for k, v in sorted(classes.items())) + "."]
    if st.get("warnings"):
        lines += ["", "Schemathesis warnings: " + "; ".join(f"{k}: {len(v) if isinstance(v, list) else v}"
                                                      for k, v in st["warnings"].items()) + "."]
    for ex in st.get("failure_examples", [])[:10]:
        lines.append(f"- {ex}")
    return lines


def _render_malformed(mal: dict[str, Any]) -> list[str]:
    """The malformed-request sweep: counts, and every case not answered as it should be."""
    lines = ["", "## Malformed-request sweep", "",
              f"{mal['cases']} requests: {mal['ok']} answered 4xx with the JSON error body, 5xx {mal['server_errors_5xx']}, "
              f"non-JSON answers {mal['non_json']} (of them at the HTTP framing level, before the app: "
              f"{mal.get('non_json_protocol', 0)}), accepted (2xx) {mal.get('accepted', 0)}, no answer "
              f"{mal.get('no_answer', 0)}; gallery unchanged: {_fmt(mal.get('gallery_unchanged'))}."]
    bad = [c for c in mal.get("results", []) if not c["ok"]]
    if bad:
        lines += ["", *_table(["case", "status", "answer"],
                              ([_cell(c["name"]), c["status"], _cell(str(c.get("body", ""))[:80])] for c in bad))]
    return lines


def _render_load(load: dict[str, Any]) -> list[str]:
    """The load phase: throughput and latencies of searches and writes at each client count."""
    lines = ["", "## Load (searches with concurrent writes)", "",
              f"Gallery {load.get('gallery')} items × {load.get('dim')} dims (half v1, half v2, factory "
              f"`{load.get('factory')}`), queries of v2 (v1 reached through the affine edge), k=10, one query per "
              f"request; one writer adding {load.get('write_batch')} items {load.get('write_rate')} times a second; "
              f"{load.get('seconds')} s per level. Gallery load {_fmt(load.get('setup_s'))} s.", "",
              *_table(["clients", "searches/s", "× 1 client", "search p50 ms", "search p99 ms", "writes",
                       "write p50 ms", "write p99 ms", "5xx", "errors"],
                      ([lv["clients"], _fmt(lv.get("search_qps")), _fmt(lv.get("throughput_ratio"), 2),
                        _fmt(lv["search"]["p50_ms"]), _fmt(lv["search"]["p99_ms"]), lv["write"]["n"],
                        _fmt(lv["write"]["p50_ms"]), _fmt(lv["write"]["p99_ms"]), lv["server_errors_5xx"],
                        lv["transport_errors"]] for lv in load.get("levels", [])))]
    if load.get("skipped_levels"):
        lines.append(f"\nNot measured (deadline): {load['skipped_levels']} clients.")
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    """The report as markdown: command, machine, targets, then one section per phase (skipped ones say why)."""
    m = result.get("machine", {})
    lines = ["# Index service reliability campaign", "",
             f"Generated by `{result.get('command', '?')}` on {result.get('started_utc', '?')} "
             f"in {_fmt(result.get('wall_s'))} s.", "",
             f"Machine: {m.get('cpu_count')} CPUs, {m.get('platform')}, Python {m.get('python')}, "
             f"faiss {m.get('faiss')}, numpy {m.get('numpy')}; load average at start {m.get('load_average_at_start')} "
             "(the machine may be shared: latencies are noisy, counts are not).", ""]
    if result.get("interrupted"):
        lines += [f"**Interrupted** ({result['interrupted']}): the numbers below are what was measured until then.", ""]
    lines += ["## Targets", "", *_table(
        ["target", "threshold", "value", "met", "scope"],
        ([t["target"], t["threshold"], _fmt(t["value"], 3),
          "not measured" if t["met"] is None else ("**yes**" if t["met"] else "**NO**"), t["scope"]]
         for t in result.get("targets", [])))]
    phases = result.get("phases", {})
    lines += ["", "## Phases", "", *_table(
        ["phase", "status", "wall s", "load average after", "note"],
        ([ph, d.get("status"), _fmt(d.get("wall_s")), d.get("load_average_at_end", "–"),
          _cell(str(d.get("reason", "")))[:300]] for ph in PHASES if (d := phases.get(ph)) is not None)), ""]
    for ph in PHASES:
        d = phases.get(ph) or {}
        if (d.get("server_5xx_in_metrics") or 0) > (d.get("server_errors_5xx") or 0):
            lines.append(f"- {ph}: the server's /metrics counted {d['server_5xx_in_metrics']} 5xx where clients received "
                         f"{d.get('server_errors_5xx')} (the server counted errors its clients never "
                         "received: look at its log)")
        for ex in d.get("unhandled_examples") or []:
            lines.append(f"- {ph}: unhandled error in the server log: `{_cell(ex)[:300]}`")
    for name, render in (("kill", _render_kill), ("schemathesis", _render_schemathesis),
                         ("malformed", _render_malformed), ("load", _render_load)):
        data = phases.get(name)
        if data and _RENDERED_WHEN[name] in data:
            lines += render(data)
    return "\n".join(lines) + "\n"


# -- model versions and servers -------------------------------------------------------------------------
def _shown_command(full: Sequence[str], launcher: Sequence[str], work: Path, api_key: str) -> str:
    """``full`` as the report shows it: ``schemathesis`` for however it was launched, ``<work>`` for the
    campaign's temporary directory, ``$KEY`` for the key (no path or secret of the machine it ran on)."""
    parts = ["schemathesis", *full[len(launcher):]]
    return " ".join(shlex.quote(a.replace(str(work), "<work>").replace(api_key, "$KEY")) for a in parts)


def write_versions(root: Path, dim: int, seed: int) -> dict[str, Path]:
    """``v1`` and ``v2`` (both ``dim``), v2 with an affine query edge to v1 and a forward edge from v1.

    Written to the contract by :func:`compatembed_index.registry.write_version_dir` (manifest with the
    sha256 of each ``transforms/*.npz``).
    """
    rng = np.random.default_rng(seed)
    rot, _ = np.linalg.qr(rng.normal(size=(dim, dim)))  # v2 = v1 rotated: cross-version scores are meaningful
    arrays = {"transforms/affine_to_v1.npz": {"weight": rot.T, "bias": np.zeros(dim)},
              "transforms/forward_from_v1.npz": {"w0": rot, "b0": np.zeros(dim)}}
    edges = {"v1": [], "v2": [
        {"kind": "affine", "target": "v1", "file": "transforms/affine_to_v1.npz", "normalize_output": True},
        {"kind": "forward", "source": "v1", "file": "transforms/forward_from_v1.npz", "activation": "relu",
         "normalize_output": True}]}
    training = {"dataset": "synthetic", "method": "reliability-campaign"}
    return {vid: write_version_dir(root, vid, dim, edges[vid], {e["file"]: arrays[e["file"]] for e in edges[vid]},
                                   parent=parent, training=training, created_utc="2026-01-01T00:00:00Z",
                                   model={"_target_": "compatembed.models.EmbeddingModel"})
            for vid, parent in (("v1", None), ("v2", "v1"))}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    """A server did not start or become ready."""


STARTED: list[Server] = []
"""Every server this process created: killed at exit if one is still running (after an error or Ctrl-C)."""


class Server:
    """One ``compatembed-index serve`` subprocess on 127.0.0.1 over a data directory, restartable.

    Its stdout and stderr go to ``log_path`` (appended across restarts), where unhandled errors
    (the tracebacks behind a 500) can be found afterwards.
    """

    def __init__(self, data_dir: Path, log_path: Path, api_key: str, extra: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> None:
        self.data_dir, self.log_path, self.api_key = data_dir, log_path, api_key
        self.extra, self.env_extra = list(extra), dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0
        STARTED.append(self)

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        """Process id of the running server."""
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        """The command line (without the key, which goes through the environment)."""
        return [sys.executable, "-m", "compatembed_index.cli", "--data-dir", str(self.data_dir), "serve",
                "--host", check_host(HOST), "--port", str(self.port), "--no-access-log", *self.extra]

    def start(self, timeout: float = 120.0) -> float:
        """Start and wait for ``/ready``; returns the seconds it took."""
        import httpx

        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMPATEMBED_INDEX_")}
        env.update({"COMPATEMBED_INDEX_API_KEY": self.api_key, "COMPATEMBED_INDEX_LOG_LEVEL": "warning",
                    **self.env_extra})
        t0 = time.monotonic()
        with open(self.log_path, "ab") as logf:
            logf.write(f"--- start {self.starts} on port {self.port}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(self.command(), cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.starts += 1
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"the server exited with status {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > timeout:
                self.kill()
                raise ServerError(f"the server was not ready within {timeout:g} s: {self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the server (a crash: no shutdown, no snapshot) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self, timeout: float = 60.0) -> int | None:
        """Stop cleanly (SIGTERM: uvicorn shuts down, the service snapshots); SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def unhandled_errors(self) -> list[str]:
        """Log lines of errors the app answered 500 (``unhandled error on METHOD PATH``) or failed to load."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [ln.strip() for ln in text.splitlines()
                if "unhandled error" in ln or "failed to open the index service" in ln or "Exception in ASGI" in ln]


def _client(url: str, api_key: str | None, timeout: float = 30.0) -> Any:
    import httpx

    headers = {"X-API-Key": api_key} if api_key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=timeout)


def _check(r: Any, what: str) -> Any:
    if r.status_code >= 300:
        raise ServerError(f"{what}: HTTP {r.status_code}: {r.text[:300]}")
    return r.json()


def setup_small_gallery(http: Any, versions: dict[str, Path], n_per_version: int, seed: int) -> list[dict[str, Any]]:
    """Register v1/v2, create collections g and h, add items of both versions to g, materialise v1 → v2.

    Returns the acknowledged-log records of these writes.
    """
    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    for vid, path in versions.items():
        _check(http.post("/versions", json={"path": str(path)}), f"register {vid}")
        records.append({"op": "register", "version": vid})
    for name in (COLLECTION, OTHER):
        _check(http.post("/collections", json={"name": name, "factory": "Flat"}), f"create {name}")
        records.append({"op": "create", "collection": name})
    for k, vid in enumerate(versions):
        ids = list(range(1 + k * n_per_version, 1 + (k + 1) * n_per_version))
        body = {"version": vid, "ids": ids, "vectors": rng.normal(size=(len(ids), SMALL_DIM)).round(6).tolist(),
                "metadata": [{"n": i, "kind": "setup"} for i in ids]}
        _check(http.post(f"/collections/{COLLECTION}/points", json=body), f"add {vid}")
        records.append({"op": "add", "ids": ids, "version": vid})
    _check(http.post(f"/collections/{COLLECTION}/materialise", json={"source": "v1", "target": "v2"}), "materialise")
    records.append({"op": "materialise"})
    return records


# -- phase 1: SIGKILL during writes ---------------------------------------------------------------------
@dataclass
class _KillStats:
    kills: int = 0
    acknowledged: int = 0
    lost: int = 0
    duplicated: int = 0
    torn: int = 0
    server_errors_5xx: int = 0
    unexpected_4xx: int = 0
    ids_checked: int = 0
    killed_between: int = 0
    restart_s: list[float] = field(default_factory=list)
    pending_outcomes: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        k: {"sent": 0, "acknowledged": 0, "killed_in_flight": 0, "lat": []} for k in WRITE_KINDS})
    examples: list[str] = field(default_factory=list)

    def example(self, text: str) -> None:
        if len(self.examples) < 30:
            self.examples.append(text)


class KillCampaign:
    """The kill phase: a writer thread, a killer (the caller's thread), restarts and checks after each kill."""

    def __init__(self, work: Path, api_key: str, seed: int) -> None:
        self.work, self.api_key = work, api_key
        self.rng = random.Random(seed)  # the writer's operations
        self.kill_rng = random.Random(seed + 1)  # the killer's moments (another thread)
        self.seed = seed
        self.server = Server(work / "data", work / "server.log", api_key)
        self.log_path = work / "acknowledged.jsonl"
        self.ack = AckLog(self.log_path)
        self.mirror = Expected()  # what the writer believes; checked against the log's replay after each kill
        self.next_id = 1
        self.stats = _KillStats()
        self.lock = threading.Lock()
        self.inflight: Op | None = None
        self.ewma = {k: 0.02 for k in WRITE_KINDS}

    # the acknowledged-write bookkeeping ------------------------------------------------------------
    def _acked(self, rec: dict[str, Any]) -> None:
        self.ack.append(rec)
        apply_record(self.mirror, rec)
        self.stats.acknowledged += 1

    def observe(self, http: Any, ids: Sequence[int]) -> tuple[dict[int, str | None], dict[str, Any]]:
        """The server's version of each id, and its calibration, materialisation and alias."""
        ids = sorted(set(ids))
        seen: dict[int, str | None] = {}
        for k in range(0, len(ids), 2000):
            chunk = ids[k:k + 2000]
            got = _check(http.post(f"/collections/{COLLECTION}/points/versions", json={"ids": chunk}), "versions")
            seen.update(zip(chunk, got["versions"]))
        st = _check(http.get(f"/collections/{COLLECTION}"), "stats")
        aliases = _check(http.get("/aliases"), "aliases")
        cal = st.get("calibration", {}).get("v2|v1")
        config = {"calibration": list(cal) if cal is not None else None,
                  "materialised": any(m["source"] == "v1" and m["target"] == "v2" for m in st.get("materialised", [])),
                  "alias": aliases.get(ALIAS)}
        return seen, config

    def resolve(self, http: Any, op: Op, why: str) -> None:
        """Find out whether an unacknowledged write happened (all or nothing) and log what the server holds."""
        ids = op.record.get("ids", [])
        seen, config = self.observe(http, ids)
        outcome = classify_pending(self.mirror, op.record, seen, config)
        self.stats.pending_outcomes[outcome] = self.stats.pending_outcomes.get(outcome, 0) + 1
        if outcome == "torn":
            self.stats.torn += 1
            self.stats.example(f"torn {op.kind} ({why}): ids {ids[:8]} now {[seen.get(i) for i in ids[:8]]}, "
                               f"config {config}")
        rec: dict[str, Any] = {"op": "resolve", "why": f"{why}: {op.kind} {outcome}", "ids": list(ids),
                               "versions": [seen.get(i) for i in ids]}
        if "ids" not in op.record:  # adopt only what the uncertain write could change, so a loss elsewhere still shows
            rec["config"] = {k: config[k] for k in ("calibration", "alias", "materialised") if k in config}
        self._acked_resolve(rec)

    def _acked_resolve(self, rec: dict[str, Any]) -> None:
        self.ack.append(rec)
        apply_record(self.mirror, rec)

    # one round ----------------------------------------------------------------------------------------
    def _writer(self, http: Any, stop: threading.Event, target: str, target_started: threading.Event,
                out: dict[str, Any]) -> None:
        import httpx

        weights = {"add": 3, "upsert": 2, "upgrade": 2, "delete": 2, "materialise": 0.5, "snapshot": 1,
                   "calibration": 1, "alias": 1}
        kinds, w = list(weights), list(weights.values())
        while not stop.is_set():
            kind = target if self.rng.random() < 0.5 else self.rng.choices(kinds, w)[0]
            op, self.next_id = make_op(kind, self.mirror, self.rng, self.next_id, SMALL_DIM)
            content = None if op.body is None else json.dumps(op.body).encode()
            headers = {"content-type": "application/json"} if content is not None else {}
            with self.lock:
                self.inflight = op
            if op.kind == target:
                target_started.set()
            self.stats.by_kind[op.kind]["sent"] += 1
            t0 = time.perf_counter()
            try:
                r = http.request(op.method, op.path, content=content, headers=headers)
            except httpx.HTTPError as exc:
                out["pending"], out["error"] = op, type(exc).__name__
                return
            finally:
                with self.lock:
                    self.inflight = None
            dt = time.perf_counter() - t0
            if 200 <= r.status_code < 300:
                self._acked(op.record)
                k = self.stats.by_kind[op.kind]
                k["acknowledged"] += 1
                k["lat"].append(dt)
                self.ewma[op.kind] = 0.8 * self.ewma[op.kind] + 0.2 * dt
            elif r.status_code >= 500:
                self.stats.server_errors_5xx += 1
                self.stats.example(f"HTTP {r.status_code} on {op.kind} {op.method} {op.path}: {r.text[:200]}")
                try:
                    self.resolve(http, op, f"HTTP {r.status_code}")
                except Exception as exc:  # the server is in trouble: let the round end and restart it
                    out["pending"], out["error"] = op, f"resolve after 5xx failed: {exc}"
                    return
            else:
                self.stats.unexpected_4xx += 1
                self.stats.example(f"unexpected HTTP {r.status_code} on {op.kind} {op.method} {op.path}: {r.text[:200]}")

    def round(self, target: str) -> None:
        """Writes until a SIGKILL aimed at a ``target`` write in flight; the writer stops on the broken connection."""
        stop, started = threading.Event(), threading.Event()
        out: dict[str, Any] = {}
        with _client(self.server.url, self.api_key) as http:
            t = threading.Thread(target=self._writer, args=(http, stop, target, started, out), daemon=True)
            t.start()
            if self.kill_rng.random() < 0.25:  # a share of kills at a moment that ignores the kind
                time.sleep(self.kill_rng.uniform(0.05, 0.6))
            else:  # aim: a random moment of a target write; a few tries when it finished before the kill
                for _ in range(8):
                    if not started.wait(3.0):
                        break  # no write of that kind came (an upgrade with no v1 item left is an add)
                    started.clear()
                    time.sleep(self.kill_rng.uniform(0.0, 0.9 * self.ewma[target]))
                    with self.lock:
                        if self.inflight is not None and self.inflight.kind == target:
                            break
            with self.lock:
                inflight = self.inflight
                self.server.kill()  # under the lock: the writer cannot start another request in between
            stop.set()
            t.join(60)
        self.stats.kills += 1
        if inflight is None:
            self.stats.killed_between += 1
        else:
            self.stats.by_kind[inflight.kind]["killed_in_flight"] += 1
        self._pending = out.get("pending")

    def check(self, http: Any) -> dict[str, Any]:
        """Compare the restarted server with the replayed log; count lost and duplicated items, adopt what was lost."""
        expected = replay_log(read_log(self.log_path))
        if expected.items != self.mirror.items or expected.config != self.mirror.config:
            self.stats.example("the replayed log and the writer's mirror disagree (a bug of this tool)")
        seen, config = self.observe(http, list(expected.items))
        acc = account(expected, seen, config)
        self.stats.ids_checked += acc["checked"]
        self.stats.lost += acc["lost"]
        for ex in acc["examples"]:
            self.stats.example(f"after kill {self.stats.kills}: {ex}")
        dup = self.index_check(http, expected)
        self.stats.duplicated += dup
        if acc["lost"]:  # counted once: adopt the server's state so later rounds do not count it again
            ids = list(expected.items)
            self._acked_resolve({"op": "resolve", "why": "adopt the state after a loss", "ids": ids,
                                 "versions": [seen.get(i) for i in ids], "config": config})
        return {"lost": acc["lost"], "duplicated": dup}

    def index_check(self, http: Any, expected: Expected) -> int:
        """Searches that return the whole gallery: every id once, and exactly the live ids; sizes in the stats.

        Returns the number of duplicated ids (repeats within one result list, plus vectors in the
        segments beyond the number of items). Ids the index misses, or serves though deleted, count as
        lost (at each check that sees them: the index is not adopted, it must heal at the next restart).
        """
        live = expected.live()
        st = _check(http.get(f"/collections/{COLLECTION}"), "stats")
        seg_total = sum(s["ntotal"] for s in st["segments"].values())
        n_v1 = sum(1 for v in live.values() if v == "v1")
        dup = max(0, seg_total - st["items"])
        copies = [m["ntotal"] for m in st.get("materialised", []) if m["source"] == "v1" and m["target"] == "v2"]
        if copies and copies[0] > n_v1:
            dup += copies[0] - n_v1
        if seg_total != st["items"] or (copies and copies[0] != n_v1) or st["items"] != len(live):
            self.stats.example(f"after kill {self.stats.kills}: stats items {st['items']}, segments {seg_total}, "
                               f"copy {copies}, acknowledged live {len(live)} (v1 {n_v1})")
            self.stats.lost += max(0, len(live) - st["items"])
        if not live:
            return dup
        q = np.random.default_rng(self.stats.kills).normal(size=(1, SMALL_DIM)).tolist()
        checks = [("v2", False, set(live)), ("v1", True, {i for i, v in live.items() if v == "v1"})]
        for version, partial, want in checks:
            k = min(MAX_K, max(1, len(live)))
            res = _check(http.post(f"/collections/{COLLECTION}/search",
                                   json={"version": version, "vectors": q, "k": k, "allow_partial": partial,
                                         "include_metadata": False}), f"search {version}")
            got = [h["id"] for h in res["results"][0]]
            dup += count_duplicates([got])
            if len(want) <= k and set(got) != want:
                extra, missing = set(got) - want, want - set(got)
                self.stats.lost += len(extra) + len(missing)
                self.stats.example(f"after kill {self.stats.kills}: search from {version} returned {len(extra)} ids "
                                   f"not acknowledged live (e.g. {sorted(extra)[:5]}) and missed {len(missing)} "
                                   f"(e.g. {sorted(missing)[:5]})")
        return dup

    def run(self, kills: int, deadline: float) -> dict[str, Any]:
        """Setup, ``kills`` rounds (or until ``deadline``), a clean stop and a last check; returns the phase result."""
        try:
            return self._run(kills, deadline)
        finally:
            self.server.kill()  # only if still running after an error
            self.ack.close()

    def _run(self, kills: int, deadline: float) -> dict[str, Any]:
        versions = write_versions(self.work / "versions", SMALL_DIM, self.seed)
        self.server.start()
        with _client(self.server.url, self.api_key) as http:
            for rec in setup_small_gallery(http, versions, 100, self.seed):
                self._acked(rec)
            self.next_id = 1 + 2 * 100
        status, reason = "ok", ""
        self._pending: Op | None = None
        while self.stats.kills < kills:
            if time.monotonic() > deadline - 15:
                status, reason = "deadline", f"phase deadline reached after {self.stats.kills} of {kills} kills"
                break
            target = WRITE_KINDS[self.stats.kills % len(WRITE_KINDS)]
            self.round(target)
            try:
                self.stats.restart_s.append(self.server.start())
            except ServerError as exc:
                status, reason = "failed", f"restart after kill {self.stats.kills} failed: {exc}"
                self.stats.example(reason)
                break
            with _client(self.server.url, self.api_key) as http:
                if self._pending is not None:
                    self.resolve(http, self._pending, "in flight at a kill")
                    self._pending = None
                got = self.check(http)
            if self.stats.kills % 10 == 0 or got["lost"] or got["duplicated"] or self.stats.kills == kills:
                log("kill", f"{self.stats.kills}/{kills} kills, {self.stats.acknowledged} acknowledged, "
                    f"lost {self.stats.lost}, duplicated {self.stats.duplicated}, torn {self.stats.torn}, "
                    f"5xx {self.stats.server_errors_5xx}")
        clean = False
        if status != "failed" and self.server.proc is not None and self.server.proc.poll() is None:
            code = self.server.stop()  # SIGTERM: snapshot at shutdown, then restart from it
            try:
                self.stats.restart_s.append(self.server.start())
                with _client(self.server.url, self.api_key) as http:
                    self.check(http)
                clean = True
            except ServerError as exc:
                self.stats.example(f"restart after a clean stop (exit {code}) failed: {exc}")
                status, reason = "failed", "restart after the clean stop failed"
        self.server.stop()
        unhandled = self.server.unhandled_errors()
        s = self.stats
        return {"status": status, "reason": reason, "kills": s.kills, "acknowledged": s.acknowledged,
                "lost": s.lost, "duplicated": s.duplicated, "torn": s.torn, "server_errors_5xx": s.server_errors_5xx,
                "unexpected_4xx": s.unexpected_4xx, "ids_checked": s.ids_checked, "killed_between": s.killed_between,
                "pending_outcomes": s.pending_outcomes, "clean_restart_checked": clean,
                "restart": latency_summary(s.restart_s), "server_starts": self.server.starts,
                "by_kind": {k: {"sent": v["sent"], "acknowledged": v["acknowledged"],
                                "killed_in_flight": v["killed_in_flight"], "latency": latency_summary(v["lat"])}
                            for k, v in s.by_kind.items()},
                "unhandled_in_log": len(unhandled), "unhandled_examples": unhandled[:5], "examples": s.examples}


# -- phase 2: schemathesis ------------------------------------------------------------------------------
def schemathesis_command() -> list[str] | None:
    """How to run the schemathesis CLI of this interpreter's environment; None when it is not installed."""
    import importlib.util

    if importlib.util.find_spec("schemathesis") is None:
        return None
    script = Path(sys.executable).parent / "schemathesis"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())"]


def summarise_schemathesis_report(report: dict[str, Any]) -> dict[str, Any]:
    """Operations, test cases, failures and warnings from schemathesis's JSON run report (``--report json``)."""
    ops = report.get("operations") or {}
    cases = report.get("test_cases") or {}
    warnings = report.get("warnings") or {}
    return {"operations": ops.get("selected", ops.get("total")), "operations_tested": ops.get("tested"),
            "cases": cases.get("generated"), "cases_with_failures": cases.get("with_failures"),
            "failures": cases.get("unique_failures", len(report.get("failures") or [])),
            "errors": len(report.get("errors") or []), "stop_reason": report.get("stop_reason"),
            "schemathesis_version": report.get("schemathesis_version"),
            "warnings": {k: v for k, v in warnings.items() if v}}


def parse_schemathesis_output(text: str) -> dict[str, Any]:
    """Operations, test cases and failures from the summary schemathesis prints (when its JSON report is missing)."""
    out: dict[str, Any] = {}
    m = re.search(r"Selected:\s*(\d+)/(\d+)", text)
    if m:
        out["operations"] = int(m.group(1))
    m = re.search(r"Tested:\s*(\d+)", text)
    if m:
        out["operations_tested"] = int(m.group(1))
    m = re.search(r"(\d+) generated", text)
    if m:
        out["cases"] = int(m.group(1))
    m = re.search(r"(\d+) unique failures?", text)
    if m:
        out["failures"] = int(m.group(1))
    elif (m := re.search(r"(\d+) generated, (\d+) passed", text)) and m.group(1) == m.group(2):
        out["failures"] = 0
    return out


SCHEMATHESIS_CONFIG = """\
# Written by tools/reliability_campaign.py. Random names only ever meet 404: the version fields draw
# registered versions most of the time, the routes of one collection use the live collection g (its drop
# uses the spare collection h) and the alias routes one alias name, so generated requests reach the
# service's own checks.
[dictionaries.versions]
values = ["v1", "v2"]

[parameters]
"body.version" = { dictionary = "versions", probability = 0.8 }
"body.query_version" = { dictionary = "versions", probability = 0.8 }
"body.segment_version" = { dictionary = "versions", probability = 0.8 }
"body.source" = { dictionary = "versions", probability = 0.8 }
"body.target" = { dictionary = "versions", probability = 0.8 }

[[operations]]
include-path-regex = "^/collections/\\\\{name\\\\}/"
parameters = { "path.name" = "g" }

[[operations]]  # (filters of one entry are alternatives: an operation is named by its method and path)
include-name = "GET /collections/{name}"
parameters = { "path.name" = "g" }

[[operations]]  # dropping g would leave nothing to test: drop h (once; 404 afterwards)
include-name = "DELETE /collections/{name}"
parameters = { "path.name" = "h" }

[[operations]]
include-path = "/aliases/{alias}"
parameters = { "path.alias" = "live" }
"""


def requests_by_route(metrics: str) -> dict[str, dict[str, int]]:
    """``{"METHOD /route": {"status": count}}`` from the server's /metrics text: what the server itself answered."""
    out: dict[str, dict[str, int]] = {}
    for ln in metrics.splitlines():
        m = re.match(r'compatembed_index_requests_total\{(.*)\} ([0-9.e+]+)$', ln)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        key = f"{labels.get('method', '?')} {labels.get('route', '?')}"
        out.setdefault(key, {})[labels.get("status", "?")] = int(float(m.group(2)))
    return out


def count_5xx(by_route: dict[str, dict[str, int]]) -> int:
    """5xx answers in a :func:`requests_by_route` table, except /ready's 503 while loading (its documented answer)."""
    return sum(n for route, statuses in by_route.items() for code, n in statuses.items()
               if code.startswith("5") and not (route == "GET /ready" and code == "503"))


def server_5xx(url: str) -> int | None:
    """5xx the server counted itself (/metrics); None when /metrics cannot be read.

    Next to the 5xx the clients received: a request the server never answered because the client went
    away is counted as 499, not 5xx; one whose broken framing uvicorn answered itself is not counted.
    """
    import httpx

    try:
        return count_5xx(requests_by_route(httpx.get(url + "/metrics", timeout=30).text))
    except httpx.HTTPError:
        return None


def run_schemathesis(work: Path, api_key: str, examples: int, max_seconds: float, deadline: float,
                     seed: int) -> dict[str, Any]:
    """schemathesis against a live server's /openapi.json: not_a_server_error, bounded in examples and time."""
    cmd = schemathesis_command()
    if cmd is None:
        return {"status": "skipped", "reason": "schemathesis is not installed (pip install 'compatembed[campaign]')",
                "server_errors_5xx": None}
    budget = min(max_seconds, deadline - time.monotonic() - 30)
    if budget < 5:
        return {"status": "skipped", "reason": "no time left before the phase deadline", "server_errors_5xx": None}
    server = Server(work / "data", work / "server.log", api_key)
    server.start()
    try:
        with _client(server.url, api_key) as http:
            setup_small_gallery(http, write_versions(work / "versions", SMALL_DIM, seed), 50, seed)
        report_path = work / "schemathesis.json"
        config = work / "schemathesis.toml"
        config.write_text(SCHEMATHESIS_CONFIG)
        full = [*cmd, "--config-file", str(config), "--no-color", "run", f"{server.url}/openapi.json",
                "--checks", "not_a_server_error", "--max-examples", str(examples),
                "--max-time", str(max(1, int(budget))), "--seed", str(seed),
                "--header", f"X-API-Key: {api_key}", "--request-timeout", "30", "--workers", "1",
                "--report", "json", "--report-json-path", str(report_path)]
        shown = _shown_command(full, cmd, work, api_key)
        log("schemathesis", f"running for at most {budget:.0f} s: {shown}")
        env = {**os.environ, "NO_COLOR": "1"}
        t0 = time.monotonic()
        try:
            proc = subprocess.run(full, cwd=work, env=env, capture_output=True, text=True,
                                  timeout=max(10.0, deadline - time.monotonic()))
            output, code, status, reason = proc.stdout + proc.stderr, proc.returncode, "ok", ""
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            code, status, reason = None, "deadline", "schemathesis was stopped at the phase deadline"
        (work / "schemathesis.out").write_text(output)
        summary = parse_schemathesis_output(output)
        try:
            summary.update(summarise_schemathesis_report(json.loads(report_path.read_text())))
        except (OSError, json.JSONDecodeError, AttributeError):
            summary["report"] = "no JSON report: numbers parsed from the console output"
        with _client(server.url, api_key) as http:
            metrics = http.get("/metrics").text
        by_route = requests_by_route(metrics)
        five = count_5xx(by_route)
        fails = [ln.strip() for ln in output.splitlines() if re.match(r"\s*_+ (GET|POST|PUT|DELETE|PATCH) ", ln)]
        return {"status": status, "reason": reason, "command": shown, "exit_code": code,
                "seconds": round(time.monotonic() - t0, 1), **summary, "server_errors_5xx": five,
                "server_5xx_in_metrics": five,
                "server_statuses_by_route": by_route,
                "unhandled_in_log": len(server.unhandled_errors()), "unhandled_examples": server.unhandled_errors()[:5],
                "failure_examples": fails[:10], "output_tail": output[-3000:]}
    finally:
        server.stop()


# -- phase 3: malformed requests ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Bad:
    """One malformed request: sent through httpx (``body``) or verbatim over a socket (``raw``, ``{path}`` etc.)."""

    name: str
    method: str = "POST"
    path: str = "/collections/g/search"
    body: bytes | None = None
    headers: dict[str, str] | None = None
    raw: bytes | None = None
    protocol: bool = False  # framing broken below the app: uvicorn may answer (plain text) or close instead
    key: bool = True


def _j(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def malformed_cases(dim: int, body_limit: int) -> list[Bad]:
    """The fixed sweep: every request here is wrong, and each must get a 4xx JSON error (none is a 5xx)."""
    v = [[0.1] * dim]
    row = ", ".join(["0.1"] * (dim - 1))
    s = "/collections/g/search"
    pts = "/collections/g/points"

    def nested(depth: int) -> Any:
        obj: Any = {"leaf": 1}
        for _ in range(depth):
            obj = {"a": obj}
        return obj

    cases = [
        Bad("invalid JSON", body=b"{not json"), Bad("empty body", body=b""), Bad("JSON array body", body=b"[]"),
        Bad("JSON null body", body=b"null"), Bad("JSON string body", body=b'"search"'),
        Bad("non-UTF-8 body", body=b'{"version": "v2\xff\xfe", "vectors": [[0.1]]}'),
        Bad("NaN token", body=f'{{"version": "v2", "vectors": [[NaN, {row}]]}}'.encode()),
        Bad("Infinity token", body=f'{{"version": "v2", "vectors": [[Infinity, {row}]]}}'.encode()),
        Bad("-Infinity token", body=f'{{"version": "v2", "vectors": [[-Infinity, {row}]]}}'.encode()),
        Bad("1e400 literal", body=f'{{"version": "v2", "vectors": [[1e400, {row}]]}}'.encode()),
        Bad("NaN as string", body=_j({"version": "v2", "vectors": [["NaN"] * dim]})),
        Bad("Infinity as string", body=_j({"version": "v2", "vectors": [["Infinity"] * dim]})),
        Bad("number as string", body=_j({"version": "v2", "vectors": [["0.5"] * dim]})),
        Bad("beyond float32", body=_j({"version": "v2", "vectors": [[1e39] * dim]})),
        Bad("zero vector", body=_j({"version": "v2", "vectors": [[0.0] * dim]})),
        Bad("wrong dimension", body=_j({"version": "v2", "vectors": [[0.1] * (dim + 1)]})),
        Bad("ragged vectors", body=_j({"version": "v2", "vectors": [[0.1] * dim, [0.1] * 3]})),
        Bad("flat vector", body=_j({"version": "v2", "vectors": [0.1] * dim})),
        Bad("empty vectors", body=_j({"version": "v2", "vectors": []})),
        Bad("empty row", body=_j({"version": "v2", "vectors": [[]]})),
        Bad("vectors a string", body=_j({"version": "v2", "vectors": "abc"})),
        Bad("booleans as numbers", body=_j({"version": "v2", "vectors": [[True] * dim]})),
        Bad("nested vectors", body=_j({"version": "v2", "vectors": [[[0.1]] * dim]})),
        Bad("deeply nested arrays", body=b'{"version": "v2", "vectors": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        Bad("k = 0", body=_j({"version": "v2", "vectors": v, "k": 0})),
        Bad("k negative", body=_j({"version": "v2", "vectors": v, "k": -3})),
        Bad("k huge", body=_j({"version": "v2", "vectors": v, "k": 10**9})),
        Bad("k 2**63", body=_j({"version": "v2", "vectors": v, "k": 2**63})),
        Bad("k 10**40", body=_j({"version": "v2", "vectors": v, "k": 10**40})),
        Bad("k as string", body=_j({"version": "v2", "vectors": v, "k": "10"})),
        Bad("k NaN string", body=_j({"version": "v2", "vectors": v, "k": "NaN"})),
        Bad("k float", body=_j({"version": "v2", "vectors": v, "k": 2.5})),
        Bad("k null", body=_j({"version": "v2", "vectors": v, "k": None})),
        Bad("queries x k above the limit", body=_j({"version": "v2", "vectors": v * 200, "k": 1000})),
        Bad("unknown field", body=_j({"version": "v2", "vectors": v, "colour": "red"})),
        Bad("missing version", body=_j({"vectors": v})),
        Bad("version not a string", body=_j({"version": 2, "vectors": v})),
        Bad("unknown version", body=_j({"version": "v9", "vectors": v})),
        Bad("overlong version", body=_j({"version": "v" * 5000, "vectors": v})),
        Bad("version with NUL", body=_j({"version": "v2\u0000", "vectors": v})),
        Bad("lone surrogate version", body=b'{"version": "\\ud800", "vectors": [[0.1]]}'),
        Bad("unknown collection", path="/collections/nope/search", body=_j({"version": "v2", "vectors": v})),
        Bad("overlong collection in path", path="/collections/" + "a" * 5000 + "/search",
            body=_j({"version": "v2", "vectors": v})),
        Bad("encoded surrogate in path", path="/collections/%ED%A0%80/search", body=_j({"version": "v2", "vectors": v})),
        Bad("traversal in path", path="/collections/..%2F..%2Fetc/search", body=_j({"version": "v2", "vectors": v})),
        Bad("unknown path", method="GET", path="/nowhere"),
        Bad("wrong method", method="GET", path=s),
        Bad("wrong content type", body=_j({"version": "v2", "vectors": v}), headers={"content-type": "text/plain"}),
        Bad("form content type", body=b"version=v2", headers={"content-type": "application/x-www-form-urlencoded"}),
        Bad("body over the limit", body=b"[" * (body_limit + 1)),
        # writes
        Bad("add without key", path=pts, body=_j({"version": "v1", "ids": [900_001], "vectors": v}), key=False),
        Bad("add with a wrong key", path=pts, body=_j({"version": "v1", "ids": [900_001], "vectors": v}),
            headers={"X-API-Key": "wrong"}),
        Bad("add with a wrong bearer", path=pts, body=_j({"version": "v1", "ids": [900_001], "vectors": v}),
            headers={"Authorization": "Bearer wrong"}, key=False),
        Bad("duplicate ids in a batch", path=pts, body=_j({"version": "v1", "ids": [900_002] * 2, "vectors": v * 2})),
        Bad("id already present", path=pts, body=_j({"version": "v1", "ids": [1], "vectors": v})),
        Bad("negative id", path=pts, body=_j({"version": "v1", "ids": [-1], "vectors": v})),
        Bad("id 2**63", path=pts, body=_j({"version": "v1", "ids": [2**63], "vectors": v})),
        Bad("id 2**64", path=pts, body=_j({"version": "v1", "ids": [2**64], "vectors": v})),
        Bad("float id", path=pts, body=_j({"version": "v1", "ids": [1.5], "vectors": v})),
        Bad("string id", path=pts, body=_j({"version": "v1", "ids": ["1"], "vectors": v})),
        Bad("bool id", path=pts, body=_j({"version": "v1", "ids": [True], "vectors": v})),
        Bad("ids and vectors differ", path=pts, body=_j({"version": "v1", "ids": [900_003, 900_004], "vectors": v})),
        Bad("empty batch", path=pts, body=_j({"version": "v1", "ids": [], "vectors": []})),
        Bad("batch above max_batch", path="/collections/g/points/versions", body=_j({"ids": list(range(10_001))})),
        Bad("unknown version on add", path=pts, body=_j({"version": "v9", "ids": [900_005], "vectors": v})),
        Bad("NaN in an added vector", path=pts,
            body=f'{{"version": "v1", "ids": [900_006], "vectors": [[NaN, {row}]]}}'.encode()),
        Bad("metadata not an object", path=pts, body=_j({"version": "v1", "ids": [900_007], "vectors": v, "metadata": [1]})),
        Bad("metadata count differs", path=pts, body=_j({"version": "v1", "ids": [900_008], "vectors": v, "metadata": []})),
        Bad("metadata nested 40 deep", path=pts,
            body=_j({"version": "v1", "ids": [900_009], "vectors": v, "metadata": [nested(40)]})),
        Bad("metadata nested 5000 deep", path=pts,
            body=b'{"version": "v1", "ids": [900010], "vectors": ' + _j(v) + b', "metadata": ['
            + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"]}"),
        Bad("metadata above 64 KiB", path=pts,
            body=_j({"version": "v1", "ids": [900_011], "vectors": v, "metadata": [{"x": "a" * 70_000}]})),
        Bad("lone surrogate in metadata", path=pts,
            body=b'{"version": "v1", "ids": [900012], "vectors": ' + _j(v) + b', "metadata": [{"s": "\\udc80"}]}'),
        Bad("lone surrogate metadata key", path=pts,
            body=b'{"version": "v1", "ids": [900013], "vectors": ' + _j(v) + b', "metadata": [{"\\ud800": 1}]}'),
        Bad("NaN in metadata", path=pts,
            body=b'{"version": "v1", "ids": [900014], "vectors": ' + _j(v) + b', "metadata": [{"x": NaN}]}'),
        Bad("upsert not a bool", path=pts, body=_j({"version": "v1", "ids": [900_015], "vectors": v, "upsert": "yes"})),
        Bad("upgrade of an unknown id", path="/collections/g/points/upgrade",
            body=_j({"version": "v2", "ids": [777_777], "vectors": v})),
        Bad("delete ids not a list", path="/collections/g/points/delete", body=_j({"ids": "all"})),
        Bad("versions of duplicate ids", path="/collections/g/points/versions", body=_j({"ids": [3, 3]})),
        Bad("materialise into itself", path="/collections/g/materialise", body=_j({"source": "v1", "target": "v1"})),
        Bad("materialise without a route", path="/collections/g/materialise", body=_j({"source": "v2", "target": "v1"})),
        Bad("materialise unknown version", path="/collections/g/materialise", body=_j({"source": "v9", "target": "v2"})),
        Bad("calibration scale negative", method="PUT", path="/collections/g/calibration",
            body=_j({"query_version": "v2", "segment_version": "v1", "scale": -1, "shift": 0})),
        Bad("calibration scale NaN token", method="PUT", path="/collections/g/calibration",
            body=b'{"query_version": "v2", "segment_version": "v1", "scale": NaN, "shift": 0}'),
        Bad("calibration shift Infinity", method="PUT", path="/collections/g/calibration",
            body=b'{"query_version": "v2", "segment_version": "v1", "scale": 1, "shift": Infinity}'),
        Bad("calibration scale as string", method="PUT", path="/collections/g/calibration",
            body=_j({"query_version": "v2", "segment_version": "v1", "scale": "NaN", "shift": 0})),
        Bad("calibration of one version", method="PUT", path="/collections/g/calibration",
            body=_j({"query_version": "v2", "segment_version": "v2", "scale": 1, "shift": 0})),
        Bad("calibrate with huge k", path="/collections/g/calibrate",
            body=_j({"query_version": "v2", "segment_version": "v1", "vectors": v, "k": 10**6})),
        Bad("collection name taken", path="/collections", body=_j({"name": "g"})),
        Bad("collection name traversal", path="/collections", body=_j({"name": "../x"})),
        Bad("collection name with newline", path="/collections", body=_j({"name": "ab\n"})),
        Bad("collection name 65 chars", path="/collections", body=_j({"name": "a" * 65})),
        Bad("collection name 100k chars", path="/collections", body=_j({"name": "a" * 100_000})),
        Bad("collection name non-ASCII", path="/collections", body=_j({"name": "ñame"})),
        Bad("collection name lone surrogate", path="/collections", body=b'{"name": "x\\ud800"}'),
        Bad("factory nonsense", path="/collections", body=_j({"name": "x1", "factory": "IVF,nonsense"})),
        Bad("factory HNSW1", path="/collections", body=_j({"name": "x2", "factory": "HNSW1"})),
        Bad("factory huge IVF", path="/collections", body=_j({"name": "x3", "factory": "IVF100000000,Flat"})),
        Bad("search param 0", path="/collections", body=_j({"name": "x4", "factory": "IVF4,Flat", "search_params": "nprobe=0"})),
        Bad("search param huge", path="/collections",
            body=_j({"name": "x5", "factory": "HNSW16", "search_params": "efSearch=1000000000"})),
        Bad("train_size too small", path="/collections", body=_j({"name": "x6", "factory": "IVF16,Flat", "train_size": 8})),
        Bad("device unknown", path="/collections", body=_j({"name": "x7", "device": "tpu"})),
        Bad("register a missing path", path="/versions", body=_j({"path": "/nonexistent/version"})),
        Bad("register a path with NUL", path="/versions", body=_j({"path": "/tmp/\u0000x"})),
        Bad("register an overlong path", path="/versions", body=_j({"path": "/x" * 3000})),
        Bad("register a lone surrogate path", path="/versions", body=b'{"path": "/tmp/\\udcff"}'),
        Bad("register a non-version dir", path="/versions", body=_j({"path": "/"})),
        Bad("alias to a missing collection", method="PUT", path="/aliases/a1", body=_j({"collection": "missing"})),
        Bad("alias shadowing a collection", method="PUT", path="/aliases/g", body=_j({"collection": "g"})),
        Bad("alias name 300 chars", method="PUT", path="/aliases/" + "a" * 300, body=_j({"collection": "g"})),
        Bad("drop a missing collection", method="DELETE", path="/collections/missing"),
        Bad("stats of a missing collection", method="GET", path="/collections/missing"),
        Bad("remove a missing alias", method="DELETE", path="/aliases/missing"),
    ]
    good = f'{{"version": "v2", "vectors": [[0.5, {row}]]}}'.encode()
    req = "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    cases += [
        Bad("Content-Length not a number", raw=(req + "Content-Length: abc\r\n\r\n").encode() + good, protocol=True),
        Bad("Content-Length negative", raw=(req + "Content-Length: -5\r\n\r\n").encode() + good, protocol=True),
        Bad("Content-Length 1e3", raw=(req + "Content-Length: 1e3\r\n\r\n").encode() + good, protocol=True),
        Bad("Content-Length twice, different", raw=(req + f"Content-Length: {len(good)}\r\nContent-Length: 3\r\n\r\n")
            .encode() + good, protocol=True),
        Bad("Content-Length 10**20", raw=(req + "Content-Length: 100000000000000000000\r\n\r\n").encode(), protocol=True),
        Bad("Content-Length above the limit", raw=(req + f"Content-Length: {body_limit + 1}\r\n\r\n").encode()),
        Bad("truncated body (client stalls)", raw=(req + f"Content-Length: {len(good) + 100}\r\n\r\n").encode() + good),
        Bad("Content-Length shorter than the body", raw=(req + "Content-Length: 20\r\nConnection: close\r\n\r\n")
            .encode() + good),
        Bad("chunked and Content-Length", raw=(req + f"Content-Length: {len(good)}\r\nTransfer-Encoding: chunked\r\n\r\n")
            .encode() + b"zz\r\n" + good, protocol=True),
        Bad("broken chunk size", raw=(req + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"zz\r\nabc\r\n0\r\n\r\n",
            protocol=True),
        Bad("chunked body over the limit", raw=(req + "Transfer-Encoding: chunked\r\n\r\n").encode()
            + b"".join(f"{20000:x}\r\n".encode() + b"[" * 20000 + b"\r\n" for _ in range(body_limit // 20000 + 2))
            + b"0\r\n\r\n"),
        Bad("garbage request line", raw=b"GARBAGE\r\n\r\n", protocol=True),
        Bad("header without a colon", raw=(req + "NoColonHere\r\nContent-Length: 2\r\n\r\n{}").encode(), protocol=True),
        Bad("non-ASCII bytes in the path", raw=b"GET /collections/\xff\xfe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            protocol=True),
    ]
    return cases


def raw_exchange(port: int, data: bytes, timeout: float) -> tuple[int | None, dict[str, str], bytes]:
    """Send ``data`` verbatim and read one HTTP response: (status or None when none came, headers, body)."""
    buf = b""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server may answer and close before reading everything (413)
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in buf and time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
        if b"\r\n\r\n" not in buf:
            return None, {}, buf
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            return None, {}, buf
        headers = {ln.split(":", 1)[0].strip().lower(): ln.split(":", 1)[1].strip() for ln in lines[1:] if ":" in ln}
        want = int(headers.get("content-length", "-1") or -1)
        while (want < 0 or len(body) < want) and time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            body += chunk
        return status, headers, body[:want] if want >= 0 else body


def judge_answer(status: int | None, content_type: str, body: bytes) -> dict[str, Any]:
    """Whether an answer to a malformed request is right: a 4xx whose body is exactly ``{"error", "message"}``."""
    is_json = False
    name = None
    try:
        payload = json.loads(body)
        is_json = isinstance(payload, dict) and set(payload) == {"error", "message"} and bool(payload.get("message"))
        name = payload.get("error") if isinstance(payload, dict) else None
    except (ValueError, UnicodeDecodeError):
        pass
    return {"status": status, "json_error_body": is_json, "error": name,
            "ok": status is not None and 400 <= status < 500 and is_json and "json" in content_type.lower()}


def run_malformed(work: Path, api_key: str, deadline: float, seed: int) -> dict[str, Any]:
    """The sweep against a fresh server (body limit 1 MiB, body timeout 2 s so a stalled body gets its 408 soon)."""
    import httpx

    body_limit = 1 << 20
    server = Server(work / "data", work / "server.log", api_key,
                    extra=["--max-body-bytes", str(body_limit), "--body-timeout", "2"])
    server.start()
    results: list[dict[str, Any]] = []
    status, reason = "ok", ""
    try:
        with _client(server.url, api_key) as http:
            setup_small_gallery(http, write_versions(work / "versions", SMALL_DIM, seed), 50, seed)
            before = _check(http.get(f"/collections/{COLLECTION}"), "stats")["items"]
        cases = malformed_cases(SMALL_DIM, body_limit)
        with httpx.Client(base_url=server.url, timeout=15) as http:
            for case in cases:
                if time.monotonic() > deadline:
                    status, reason = "deadline", f"phase deadline reached after {len(results)} of {len(cases)} cases"
                    break
                try:
                    if case.raw is not None:
                        raw = case.raw.replace(b"{path}", case.path.encode())
                        code, headers, body = raw_exchange(server.port, raw, timeout=15)
                        ctype = headers.get("content-type", "")
                    else:
                        hdrs = {"content-type": "application/json"}
                        if case.key:
                            hdrs["X-API-Key"] = api_key
                        hdrs.update(case.headers or {})
                        r = http.request(case.method, case.path, content=case.body, headers=hdrs)
                        code, ctype, body = r.status_code, r.headers.get("content-type", ""), r.content
                except (httpx.HTTPError, OSError) as exc:
                    code, ctype, body = None, "", f"{type(exc).__name__}: {exc}".encode()
                verdict = judge_answer(code, ctype, body)
                if case.protocol and code is None:
                    verdict["ok"] = True  # the connection was closed on broken framing: no answer is a fine one
                results.append({"name": case.name, "protocol": case.protocol, **verdict,
                                "body": body[:200].decode("utf-8", errors="replace")})
        with _client(server.url, api_key) as http:
            after = _check(http.get(f"/collections/{COLLECTION}"), "stats")["items"]
        counted = server_5xx(server.url)
    finally:
        server.stop()
    five = [r for r in results if r["status"] is not None and r["status"] >= 500]
    answered = [r for r in results if r["status"] is not None]
    non_json = [r for r in answered if not r["json_error_body"]]
    return {"status": status, "reason": reason, "cases": len(results), "ok": sum(r["ok"] for r in results),
            "server_errors_5xx": len(five), "server_5xx_in_metrics": counted,
            "non_json": len(non_json),
            "non_json_protocol": sum(r["protocol"] for r in non_json),
            "accepted": sum(1 for r in answered if 200 <= r["status"] < 300),
            "no_answer": len(results) - len(answered), "gallery_unchanged": before == after,
            "unhandled_in_log": len(server.unhandled_errors()), "unhandled_examples": server.unhandled_errors()[:5],
            "results": results}


# -- phase 4: load ---------------------------------------------------------------------------------------
def _cli(args: list[str], data_dir: Path, timeout: float) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPATEMBED_INDEX_")}
    proc = subprocess.run([sys.executable, "-m", "compatembed_index.cli", "--data-dir", str(data_dir), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ServerError(f"compatembed-index {' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr[-1000:]}")
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def _load_level(url: str, api_key: str, clients: int, seconds: float, queries: list[bytes], write_rate: float,
                write_batch: int, dim: int, first_id: int, seed: int) -> tuple[dict[str, Any], int]:
    """One level: ``clients`` search threads and one writer for ``seconds``; returns the level and the next free id."""
    import httpx

    barrier = threading.Barrier(clients + 2)
    go = threading.Event()
    lock = threading.Lock()
    search_lat: list[float] = []
    write_lat: list[float] = []
    counts = {"5xx": 0, "4xx": 0, "errors": 0}
    examples: list[str] = []
    window: dict[str, float] = {}
    hdr = {"content-type": "application/json"}

    def note(code: int | None, text: str) -> None:
        with lock:
            if code is None:
                counts["errors"] += 1
            elif code >= 500:
                counts["5xx"] += 1
            elif code >= 400:
                counts["4xx"] += 1
            if len(examples) < 5:
                examples.append(text[:300])

    def timed_post(c: Any, path: str, content: bytes, lat: list[float], what: str) -> None:
        """POST once; its latency joins ``lat`` when answered 200, anything else is noted."""
        t0 = time.perf_counter()
        try:
            r = c.post(path, content=content)
        except httpx.HTTPError as exc:
            note(None, f"{what}: {type(exc).__name__}: {exc}")
            return
        if r.status_code == 200:
            lat.append(time.perf_counter() - t0)
        else:
            note(r.status_code, f"{what} HTTP {r.status_code}: {r.text}")

    def searcher(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        lat: list[float] = []
        with httpx.Client(base_url=url, timeout=30, headers=hdr) as c:
            try:
                c.post(f"/collections/{COLLECTION}/search", content=queries[0])  # connect
            except httpx.HTTPError:
                pass
            barrier.wait()
            go.wait()
            end = window["end"]
            while time.perf_counter() < end:
                timed_post(c, f"/collections/{COLLECTION}/search", rng.choice(queries), lat, "search")
        with lock:
            search_lat.extend(lat)

    next_id = [first_id]

    def writer() -> None:
        rng = np.random.default_rng(seed + clients)
        with httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": api_key, **hdr}) as c:
            barrier.wait()
            go.wait()
            end, step = window["end"], 1.0 / write_rate
            due = time.perf_counter()
            while True:
                now = time.perf_counter()
                if now >= end:
                    break
                if now < due:
                    time.sleep(min(due - now, end - now))
                    continue
                due += step
                ids = list(range(next_id[0], next_id[0] + write_batch))
                next_id[0] += write_batch
                body = json.dumps({"version": "v2", "ids": ids,
                                   "vectors": rng.normal(size=(write_batch, dim)).round(5).tolist()}).encode()
                timed_post(c, f"/collections/{COLLECTION}/points", body, write_lat, "write")

    threads = [threading.Thread(target=searcher, args=(n,), daemon=True) for n in range(clients)]
    threads.append(threading.Thread(target=writer, daemon=True))
    for t in threads:
        t.start()
    barrier.wait()  # every search client has connected once (not measured)
    start = time.perf_counter()
    window["end"] = start + seconds
    go.set()
    for t in threads:
        t.join(seconds + 120)
    wall = time.perf_counter() - start
    level = {"clients": clients, "seconds": round(wall, 3), "searches": len(search_lat),
             "search_qps": round(len(search_lat) / wall, 2) if wall > 0 else None,
             "search": latency_summary(search_lat), "write": latency_summary(write_lat),
             "server_errors_5xx": counts["5xx"], "client_errors_4xx": counts["4xx"], "transport_errors": counts["errors"],
             "examples": examples}
    return level, next_id[0]


def run_load(work: Path, api_key: str, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """Load a gallery with the CLI, serve it, and measure each concurrency level until the deadline."""
    t0 = time.monotonic()
    dim, n = args.dim, args.gallery
    versions = write_versions(work / "versions", dim, args.seed)
    rng = np.random.default_rng(args.seed)
    data = work / "data"
    half = n // 2
    arrays = work / "arrays"
    arrays.mkdir(parents=True, exist_ok=True)

    def remaining() -> float:
        return max(30.0, deadline - time.monotonic())

    _cli(["register", str(versions["v1"]), str(versions["v2"])], data, remaining())
    _cli(["create", COLLECTION, "--factory", args.factory], data, remaining())
    for vid, ids in (("v1", np.arange(half)), ("v2", np.arange(half, n))):
        if len(ids) == 0:
            continue
        np.save(arrays / f"{vid}_ids.npy", ids.astype(np.int64))
        np.save(arrays / f"{vid}.npy", rng.normal(size=(len(ids), dim)).astype(np.float32))
        _cli(["add", COLLECTION, "--version", vid, "--vectors", str(arrays / f"{vid}.npy"), "--ids",
              str(arrays / f"{vid}_ids.npy")], data, remaining())
        log("load", f"gallery: {len(ids)} {vid} items loaded ({time.monotonic() - t0:.0f} s)")
    _cli(["snapshot", COLLECTION], data, remaining())
    shutil.rmtree(arrays, ignore_errors=True)
    env = {"OMP_NUM_THREADS": str(args.omp_threads)} if args.omp_threads else {}
    server = Server(data, work / "server.log", api_key, env=env)
    server.start(timeout=remaining())
    setup_s = time.monotonic() - t0
    queries = [json.dumps({"version": "v2", "vectors": rng.normal(size=(1, dim)).round(5).tolist(), "k": 10}).encode()
               for _ in range(256)]
    levels: list[dict[str, Any]] = []
    skipped: list[int] = []
    status, reason = "ok", ""
    next_id = 10**9
    try:
        with _client(server.url, api_key) as http:  # warm-up, and a check that a query routes across versions
            routes = _check(http.post(f"/collections/{COLLECTION}/search", content=queries[0],
                                      headers={"content-type": "application/json"}), "warm-up search")["routes"]
        for clients in args.clients:
            if time.monotonic() + args.seconds + 10 > deadline:
                skipped.append(clients)
                continue
            level, next_id = _load_level(server.url, api_key, clients, args.seconds, queries, args.write_rate,
                                         args.write_batch, dim, next_id, args.seed)
            levels.append(level)
            log("load", f"{clients} clients: {level['search_qps']} searches/s, search p50/p99 "
                f"{level['search']['p50_ms']}/{level['search']['p99_ms']} ms, writes {level['write']['n']} p99 "
                f"{level['write']['p99_ms']} ms, 5xx {level['server_errors_5xx']}, errors {level['transport_errors']}")
        counted = server_5xx(server.url)
    finally:
        server.stop()
    if skipped:
        status, reason = "deadline", f"levels {skipped} not measured before the phase deadline"
    single = next((lv["search_qps"] for lv in levels if lv["clients"] == 1), None)
    for lv in levels:
        lv["throughput_ratio"] = round(lv["search_qps"] / single, 3) if single and lv["search_qps"] is not None else None
    return {"status": status, "reason": reason, "gallery": n, "dim": dim, "factory": args.factory,
            "write_rate": args.write_rate, "write_batch": args.write_batch, "seconds": args.seconds,
            "omp_threads": args.omp_threads, "routes": routes, "setup_s": round(setup_s, 1), "levels": levels,
            "skipped_levels": skipped, "server_5xx_in_metrics": counted,
            "server_errors_5xx": sum(lv["server_errors_5xx"] for lv in levels),
            "unhandled_in_log": len(server.unhandled_errors()), "unhandled_examples": server.unhandled_errors()[:5]}


# -- the campaign ----------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """Where the numbers come from (recorded next to them)."""
    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:  # pragma: no cover - the service needs it anyway
        faiss_version = None
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "faiss": faiss_version, "numpy": np.__version__,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def phase_deadline(now: float, end: float, phase: str, remaining_phases: Sequence[str]) -> float:
    """This phase's share of the time left: its weight over the weights of the phases still to run."""
    total = sum(PHASE_WEIGHTS[p] for p in remaining_phases) or 1.0
    return now + max(0.0, end - now) * PHASE_WEIGHTS[phase] / total


def write_outputs(result: dict[str, Any], out: str) -> tuple[Path, Path]:
    """Write OUT.json and OUT.md; returns their paths."""
    base = Path(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    jpath, mpath = base.with_name(base.name + ".json"), base.with_name(base.name + ".md")
    jpath.write_text(json.dumps(result, indent=1, default=str) + "\n")
    mpath.write_text(render_markdown(result))
    return jpath, mpath


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected phases, write the reports, and return 0 when every measured target is met."""
    args = parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    api_key = secrets.token_urlsafe(24)
    start = time.monotonic()
    end = start + 60 * args.max_minutes
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": "python -m tools.reliability_campaign " + shlex.join(argv_list),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
        "settings": {k: getattr(args, k) for k in ("phases", "kills", "clients", "seconds", "gallery", "dim", "factory",
                                                   "write_rate", "write_batch", "schemathesis_examples",
                                                   "schemathesis_seconds", "max_minutes", "seed", "quick")},
        "targets_spec": TARGETS, "phases": {}, "interrupted": None}
    log("campaign", f"phases {args.phases}, work dir {work}, at most {args.max_minutes:g} min")
    try:
        for idx, phase in enumerate(args.phases):
            t0 = time.monotonic()
            deadline = phase_deadline(t0, end, phase, args.phases[idx:])
            pdir = work / phase
            pdir.mkdir(parents=True, exist_ok=True)
            log(phase, f"start (deadline in {deadline - t0:.0f} s)")
            try:
                if phase == "kill":
                    res = KillCampaign(pdir, api_key, args.seed).run(args.kills, deadline)
                elif phase == "schemathesis":
                    res = run_schemathesis(pdir, api_key, args.schemathesis_examples, args.schemathesis_seconds,
                                           deadline, args.seed)
                elif phase == "malformed":
                    res = run_malformed(pdir, api_key, deadline, args.seed)
                else:
                    res = run_load(pdir, api_key, args, deadline)
            except Exception as exc:  # a phase that breaks must not cost the others (nor the report)
                import traceback

                res = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:2000], "server_errors_5xx": None,
                       "traceback": traceback.format_exc()[-3000:]}
                for srv in STARTED:
                    srv.kill()
            res["wall_s"] = round(time.monotonic() - t0, 1)
            res["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
            result["phases"][phase] = res
            log(phase, f"{res['status']} in {res['wall_s']} s {res.get('reason') or ''}".rstrip())
    except KeyboardInterrupt:
        result["interrupted"] = "KeyboardInterrupt"
        log("campaign", "interrupted: writing what was measured")
    finally:
        for srv in STARTED:
            srv.kill()
        result["wall_s"] = round(time.monotonic() - start, 1)
        result["targets"] = evaluate_targets(result)
        jpath, mpath = write_outputs(result, args.out)
        if not args.keep_data and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep_data:
            log("campaign", f"kept {work}")
    for t in result["targets"]:
        log("target", f"{t['target']}: {t['value']} ({t['threshold']}) met={t['met']} [{t['scope']}]")
    log("campaign", f"wrote {jpath} and {mpath}")
    return 1 if any(t["met"] is False for t in result["targets"]) else 0


if __name__ == "__main__":
    sys.exit(main())
