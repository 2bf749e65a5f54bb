"""Compare post-hoc maps between an independently trained new model and a deployed old model.

A λ-orthogonal map is worth its training only where it beats both of its cheap closed-form ends on the
same features. This tool measures that: given an old and an independent new model version directory
and a data config, it extracts (or reuses) their train and test embeddings, fits on the training
features

* Procrustes (orthogonal W, the λ = 0 end) and least squares (free affine, the λ = ∞ end),
* λ-orthogonal maps (start from Procrustes, Adam on 1 − cos + squared hinge beyond λ) for each λ,
* a linear forward map old → new (new queries search the upgraded old gallery, FCT-style),

each without and with a bias, and evaluates new/old on the test split (query set = gallery set,
leave-one-out) with ``compatembed.eval.retrieval_metrics``, next to old/old, new/new and raw new/old.
It writes ``<out>.json`` and ``<out>.md``.

Examples:
    python -m tools.compare_maps --old runs/cifar10_independent_old --new runs/cifar10_independent_new
    python -m tools.compare_maps --old runs/old --new runs/new --data synthetic --steps 50 --out /tmp/maps
    python -m tools.compare_maps --old ... --new ... --lambdas 0 0.5 1 2 inf --deviation spectral

Embeddings are cached inside each version directory (as ``compatembed-eval`` does), so a second run
only refits the maps.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METRICS = ("top1", "top5", "mAP", "mAP@R")
DEFAULT_LAMBDAS = ("0", "0.25", "1", "3", "inf")


def _parse_lambda(text: str) -> float:
    """A λ from the command line: a number >= 0 or ``inf``."""
    value = math.inf if text.strip().lower() in ("inf", "infinity", "null", "none") else float(text)
    if value < 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"λ must be >= 0 or inf, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.compare_maps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--old", required=True, type=Path, help="the deployed old model version directory")
    parser.add_argument("--new", required=True, type=Path, help="the independently trained new model version directory")
    parser.add_argument("--data", default="cifar10", help="data config name under conf/data (default: cifar10)")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE",
        help="extra Hydra override of the eval config, e.g. data.loader.num_workers=0 (repeatable)",
    )
    parser.add_argument(
        "--lambdas", nargs="+", type=_parse_lambda, default=[_parse_lambda(v) for v in DEFAULT_LAMBDAS], metavar="λ",
        help="tolerances of the λ-orthogonal maps, numbers >= 0 or inf (default: 0 0.25 1 3 inf)",
    )
    parser.add_argument("--penalty-weight", type=float, default=10.0, help="μ, weight of the squared hinge (default: 10)")
    parser.add_argument("--deviation", choices=("gram", "spectral"), default="gram", help="deviation measure (default: gram)")
    parser.add_argument("--orthogonal-map", choices=("matrix_exp", "cayley", "householder"), default="matrix_exp",
                        help="parametrisation of W at λ = 0 (default: matrix_exp)")
    parser.add_argument("--steps", type=int, default=2000, help="Adam steps per λ-orthogonal fit (default: 2000)")
    parser.add_argument("--batch-size", type=int, default=1024, help="features per fit step (default: 1024)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the fits (default: 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="batch order of the fits (default: 0)")
    parser.add_argument("--device", default="auto", help="device for extraction and fits: auto, cpu, cuda (default: auto)")
    parser.add_argument("--backend", choices=("faiss", "numpy"), default="faiss", help="ranking backend of the metrics")
    parser.add_argument("--no-progress", action="store_true", help="hide extraction progress bars")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default; 1 is faster on a busy shared CPU)")
    parser.add_argument(
        "--out", type=Path, default=REPO / "docs" / "results" / "cifar10_maps",
        help="output path without suffix: writes <out>.json and <out>.md (default: docs/results/cifar10_maps)",
    )
    return parser


def _compose_data(name: str, overrides: list[str]) -> Any:
    """conf/eval.yaml composed with ``data=<name>`` and the overrides."""
    from compatembed.cli import compose_config

    return compose_config("eval", [f"data={name}", "query=-", "gallery=-", *overrides])


def _aligned(a: Any, b: Any, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of two embedding sets of the same items, matched by item id: (a, b, labels, ids)."""
    from compatembed.errors import EvalError

    common, ia, ib = np.intersect1d(a.ids, b.ids, return_indices=True)
    if len(common) < max(len(a.ids), len(b.ids)):
        raise EvalError(f"{what}: the two versions' embeddings cover different items ({len(a.ids)} vs {len(b.ids)})")
    if not np.array_equal(a.labels[ia], b.labels[ib]):
        raise EvalError(f"{what}: the two versions' embeddings disagree on labels")
    return a.embeddings[ia], b.embeddings[ib], a.labels[ia], common


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1)).astype(np.float32)


def compare_maps(args: argparse.Namespace) -> dict[str, Any]:
    """Fit every map and evaluate it; returns the JSON payload (also written to ``<out>.json``/``.md``)."""
    import torch

    from compatembed.embeddings import load_or_extract
    from compatembed.eval import retrieval_metrics
    from compatembed.hardware import resolve_device, resolve_num_workers
    from compatembed.methods.lambda_orth import LambdaOrthOptions, fit_lambda_orthogonal
    from compatembed.methods.maps import gram_deviation, least_squares_affine, mean_cosine, procrustes

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = _compose_data(args.data, list(args.override))
    kw = dict(device=str(device), batch_size=int(cfg.batch_size), num_workers=resolve_num_workers(cfg.num_workers),
              progress=not args.no_progress)
    sets = {(v, s): load_or_extract(getattr(args, v), cfg.data, s, **kw) for v in ("old", "new") for s in ("train", "test")}
    new_tr, old_tr, _, _ = _aligned(sets["new", "train"], sets["old", "train"], "train split")
    new_te, old_te, labels, ids = _aligned(sets["new", "test"], sets["old", "test"], "test split")
    new_tr, old_tr, new_te, old_te = (_normalize(x) for x in (new_tr, old_tr, new_te, old_te))
    x_new, x_old = torch.from_numpy(new_tr), torch.from_numpy(old_tr)

    def metrics(query: np.ndarray, gallery: np.ndarray) -> dict[str, float]:
        result = retrieval_metrics(
            query, labels, gallery, labels, query_ids=ids, gallery_ids=ids, leave_one_out=True, topk=(1, 5), backend=args.backend
        )
        return {m: float(result[m]) for m in METRICS}

    rows: list[dict[str, Any]] = []

    def add_row(name: str, pair: str, query: np.ndarray, gallery: np.ndarray, **facts: Any) -> None:
        rows.append({"map": name, "pair": pair, **metrics(query, gallery), **facts})
        print(f"{name:<38} {pair:<16} " + " ".join(f"{m}={100 * rows[-1][m]:.1f}" for m in METRICS), flush=True)

    add_row("none", "old/old", old_te, old_te)
    add_row("none", "new/new", new_te, new_te)
    add_row("none (raw)", "new/old", new_te, old_te, train_alignment=mean_cosine(x_new, x_old))

    def affine_row(name: str, weight: torch.Tensor, bias: torch.Tensor, *, lam: float | None, with_bias: bool, seconds: float,
                   extra: dict[str, Any] | None = None) -> None:
        w, b = weight.double(), bias.double()
        mapped = _normalize((torch.from_numpy(new_te).double() @ w.mT + b).numpy())
        facts = {
            "direction": "new→old", "lambda": None if lam is None or math.isinf(lam) else lam, "bias": with_bias,
            "gram_deviation": float(gram_deviation(w)),
            "singular_values": [float(s) for s in torch.linalg.svdvals(w)],
            "train_alignment": mean_cosine(x_new, x_old, lambda a: a.double() @ w.mT + b),
            "fit_seconds": round(seconds, 3), **(extra or {}),
        }
        facts["sv_min"], facts["sv_max"] = min(facts["singular_values"]), max(facts["singular_values"])
        add_row(name, "new/old", mapped, old_te, **facts)

    for with_bias in (False, True):
        tag = " + bias" if with_bias else ""
        started = time.perf_counter()
        w, b = procrustes(x_new, x_old, center=with_bias)
        affine_row(f"procrustes (λ=0 closed form){tag}", w, b, lam=0.0, with_bias=with_bias,
                   seconds=time.perf_counter() - started)
        started = time.perf_counter()
        w, b = least_squares_affine(x_new, x_old, bias=with_bias)
        affine_row(f"least squares (λ=∞ closed form){tag}", w, b, lam=None, with_bias=with_bias,
                   seconds=time.perf_counter() - started)
        for lam in args.lambdas:
            options = LambdaOrthOptions(
                tolerance=lam, penalty_weight=args.penalty_weight, deviation=args.deviation, bias=with_bias,
                orthogonal_map=args.orthogonal_map, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            )
            fit = fit_lambda_orthogonal(x_new, x_old, options=options, device=device)
            weight, bias = (torch.from_numpy(a) for a in fit.map.exported())
            label = "∞" if math.isinf(lam) else f"{lam:g}"
            affine_row(
                f"λ-orthogonal λ={label}{tag}", weight, bias, lam=lam, with_bias=with_bias, seconds=fit.facts["fit_seconds"],
                extra={"fit": fit.facts["fit"], "train_alignment_procrustes": fit.facts["train_alignment"]["procrustes"]},
            )
        started = time.perf_counter()
        wf, bf = least_squares_affine(x_old, x_new, bias=with_bias)
        upgraded = _normalize((torch.from_numpy(old_te).double() @ wf.mT + bf).numpy())
        add_row(
            f"linear forward map old→new{tag}", "new/upgraded old", new_te, upgraded, direction="old→new", bias=with_bias,
            train_alignment=mean_cosine(x_old, x_new, lambda a: a.double() @ wf.mT + bf),
            fit_seconds=round(time.perf_counter() - started, 3), **{"lambda": None},
        )

    payload = {
        "protocol": (
            f"data `{args.data}`: maps fitted on the train split's un-augmented embeddings of both versions, "
            "evaluated on the test split (query set = gallery set, leave-one-out, cosine after truncation to the "
            "smaller dimension); new/new is the new model untouched"
        ),
        "command": getattr(args, "command", None),
        "old_version": sets["old", "test"].meta.get("version_id"),
        "new_version": sets["new", "test"].meta.get("version_id"),
        "dims": {"old": int(old_te.shape[1]), "new": int(new_te.shape[1])},
        "num_train": int(x_new.shape[0]),
        "num_test": int(len(ids)),
        "fit": {
            "lambdas": [None if math.isinf(v) else v for v in args.lambdas], "penalty_weight": args.penalty_weight,
            "deviation": args.deviation, "orthogonal_map": args.orthogonal_map, "steps": args.steps,
            "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "objective": "cosine",
        },
        "rows": rows,
        "verdict": verdict(rows),
    }
    try:
        from tools._runner import machine

        payload["machine"] = machine()
    except ImportError:  # the tool imported from elsewhere than the repository root
        payload["machine"] = None
    write_results(payload, args.out)
    return payload


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per bias setting: the best λ-orthogonal map with 0 < λ < ∞ (by top-1, then mAP) and whether it
    beats both closed-form ends (Procrustes and least squares with the same bias setting)."""
    out: dict[str, Any] = {}
    for with_bias in (False, True):
        tag = "with_bias" if with_bias else "no_bias"
        mine = [
            r for r in rows
            if r["map"].startswith("λ-orthogonal") and r.get("bias") == with_bias and r.get("lambda") not in (None, 0, 0.0)
        ]
        ends = [r for r in rows if r["map"].startswith(("procrustes", "least squares")) and r.get("bias") == with_bias]
        if not mine or not ends:
            continue
        best = max(mine, key=lambda r: (r["top1"], r["mAP"]))
        out[tag] = {
            "best": best["map"],
            "lambda": best["lambda"],
            "top1": best["top1"],
            "mAP": best["mAP"],
            "beats_both_ends_top1": all(best["top1"] > e["top1"] for e in ends),
            "beats_both_ends_mAP": all(best["mAP"] > e["mAP"] for e in ends),
        }
    return out


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "—" if value is None else fmt.format(value)


def render_markdown(payload: dict[str, Any]) -> str:
    """The comparison as a markdown page (values in %)."""
    lines = [
        f"# Post-hoc maps between `{payload['new_version']}` (new, {payload['dims']['new']}-d) and "
        f"`{payload['old_version']}` (old, {payload['dims']['old']}-d)",
        "",
        f"{payload['protocol']}. {payload['num_train']} training items, {payload['num_test']} test items. Values in %.",
        "",
    ]
    if payload.get("command"):
        lines += [f"Made by `{payload['command']}`.", ""]
    fit = payload["fit"]
    lines += [
        f"λ-orthogonal fits: start from Procrustes, Adam ({fit['steps']} steps, batch {fit['batch_size']}, lr {fit['lr']}) on "
        f"1 − cos + {fit['penalty_weight']}·max(0, dev(W) − λ)², deviation `{fit['deviation']}`; λ = 0 keeps W orthogonal "
        f"(`{fit['orthogonal_map']}`), λ = ∞ is the least-squares closed form.",
        "",
        "| map | query/gallery | λ | bias | top-1 | top-5 | mAP | mAP@R | ‖G−I‖_F | σ min–max | train cos | fit (s) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in payload["rows"]:
        lam = r.get("lambda", None)
        lam_s = "—" if "direction" not in r or r.get("direction") != "new→old" else ("∞" if lam is None else f"{lam:g}")
        bias = "—" if "bias" not in r else ("yes" if r["bias"] else "no")
        sv = f"{r['sv_min']:.3f}–{r['sv_max']:.3f}" if "sv_min" in r else "—"
        lines.append(
            f"| {r['map']} | {r['pair']} | {lam_s} | {bias} | " + " | ".join(_pct(r[m]) for m in METRICS)
            + f" | {_num(r.get('gram_deviation'))} | {sv} | {_num(r.get('train_alignment'), '{:.4f}')} | "
            + f"{_num(r.get('fit_seconds'), '{:.1f}')} |"
        )
    lines.append("")
    for tag, v in payload["verdict"].items():
        words = "without a bias" if tag == "no_bias" else "with a bias"
        both = v["beats_both_ends_top1"] and v["beats_both_ends_mAP"]
        lines.append(
            f"- Best relaxed λ-orthogonal map (0 < λ < ∞) {words}: {v['best']} "
            f"({_pct(v['top1'])} top-1 / {_pct(v['mAP'])} mAP); it "
            + ("beats both closed-form ends on top-1 and mAP." if both else
               f"does not beat both closed-form ends (top-1: {'yes' if v['beats_both_ends_top1'] else 'no'}, "
               f"mAP: {'yes' if v['beats_both_ends_mAP'] else 'no'}).")
        )
    machine = payload.get("machine")
    if machine:
        from tools._runner import describe_machine

        lines += ["", f"Machine: {describe_machine(machine)}."]
    return "\n".join(lines) + "\n"


def write_results(payload: dict[str, Any], out: Path) -> None:
    """Write ``<out>.json`` and ``<out>.md``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(render_markdown(payload))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m tools.compare_maps --old DIR --new DIR [...]``."""
    import logging

    from compatembed.cli import run_cli

    args = build_parser().parse_args(argv)
    args.command = "python -m tools.compare_maps " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_cli(lambda: compare_maps(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
