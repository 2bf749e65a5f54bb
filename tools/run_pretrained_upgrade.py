"""Evidence of a real backbone upgrade between pretrained models: EfficientNet-Lite0 (deployed) → EfficientNet-Lite2.

The deployed old version is EfficientNet-Lite0 with its ImageNet weights, as is: its 1280-d pooled feature is the
embedding, nothing was trained (``experiment=pretrained_upgrade_old``). The new backbone is EfficientNet-Lite2 with
its ImageNet weights. Every row is trained or fitted with the CLIs (``experiment=pretrained_upgrade_<row>``) and
evaluated against the old version with ``compatembed-eval`` on the test split (query set = gallery set,
leave-one-out):

* ``independent``: Lite2 as is (new/new, and the raw new/old cross-test, expected near chance);
* ``independent_finetuned``: Lite2's last stage, head conv and a projection trained with cross-entropy only, like the
  compatible rows but with no relation to the old model: their like-for-like reference for the update gain and the
  new/new they give up;
* post-hoc maps that adopt it and fit only a map on the training subset's features: ``procrustes`` (orthogonal,
  closed form), ``lambda_orth`` (λ = 1), ``least_squares`` (free affine, closed form), ``fct`` (forward map
  old → new that upgrades the stored gallery without images);
* compatible training of the new model, ``bct``, ``oca``, ``bt2``: only Lite2's last stage, its head conv and a
  projection train, on the frozen prefix's output cached once (no data augmentation).

Frozen-prefix versions are embedded from the cached prefix output (``compatembed-eval prefix_cache=true``): the
expensive part of Lite2's forward pass runs once per split for all of them. The tool also measures, in the run,
how fast each model embeds images from scratch (the real cost of re-embedding a gallery) and multiplies the new
model's rate by the gallery size, the cost a compatible upgrade avoids, next to each row's own wall time. It runs
``compatembed-report`` (matrix, mixed-version gallery, backfill curves and their plots) for every row that has a
route to the old version, and writes ``docs/results/pretrained_upgrade.{json,md}`` and
``docs/results/pretrained_upgrade/<row>/``.

    python -m tools.run_pretrained_upgrade                                   # every row, CIFAR-10 (shared copy)
    python -m tools.run_pretrained_upgrade --rows independent bct -- trainer.device=cuda
    python -m tools.run_pretrained_upgrade -- data=imagefolder data.train.root=/my/train data.test.root=/my/test \\
        data.num_classes=37 data.pipeline=stream                            # any ImageFolder

Version directories that exist are reused (``--no-reuse`` retrains); results are rewritten after every row, so
a run that is stopped keeps what it measured. Run from anywhere: paths are relative to the checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools._runner import (
    REPO,
    compatibility_pairs,
    defined_gain,
    describe_machine,
    evaluate,
    machine,
    pair,
    train,
    write_json,
)

PREFIX = "pretrained_upgrade_"


@dataclass(frozen=True)
class Row:
    """One row: the experiment it runs (``pretrained_upgrade_<name>``) and what kind of upgrade it is."""

    name: str
    label: str
    kind: str  # independent | post-hoc map | compatible training


ROWS: dict[str, Row] = {r.name: r for r in (
    Row("independent", "independent Lite2 (ImageNet, as is)", "independent"),
    Row("independent_finetuned", "independent Lite2, last stage + head trained (cross-entropy only)", "independent"),
    Row("procrustes", "Procrustes (orthogonal map new → old)", "post-hoc map"),
    Row("lambda_orth", "λ-orthogonal map (λ = 1)", "post-hoc map"),
    Row("least_squares", "least squares (free affine map)", "post-hoc map"),
    Row("fct", "FCT forward map (old gallery → new space)", "post-hoc map"),
    Row("bct", "BCT (last stage + head)", "compatible training"),
    Row("oca", "OCA (last stage + head)", "compatible training"),
    Row("bt2", "BT² (last stage + head)", "compatible training"),
)}
EXPERIMENT = {"independent": "independent_new"}


def _rel(path: str | Path) -> str:
    """``path`` relative to the checkout when it lies inside it (results name portable paths)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


REFERENCES = {"as_is": "independent", "finetuned": "independent_finetuned"}
"""The independent new models each row is measured against: Lite2 as is, and Lite2 trained like the compatible rows."""


def summarise(row: Row, trained: dict[str, Any], report: dict[str, Any], references: dict[str, dict[str, Any]],
              eval_wall_s: float) -> dict[str, Any]:
    """One row: its three pairs, the criterion, the update gain and Δ new/new against each independent reference, the cost.

    Args:
        references: ``{"as_is" | "finetuned": new/new metrics of that independent model}`` (those evaluated so far).
    """
    pairs = compatibility_pairs(report)
    old_old, new_new, new_old = pairs["old/old"], pairs["new/new"], pairs["new/old"]
    gain: dict[str, dict[str, float | None]] = {}
    delta: dict[str, dict[str, float]] = {}
    for ref, ref_self in references.items():
        if row.kind == "independent":  # a reference has no gain of its own
            continue
        gain[ref] = {m: defined_gain(new_old[m], old_old[m], ref_self[m]) for m in ("top1", "mAP")}
        delta[ref] = {m: new_new[m] - ref_self[m] for m in ("top1", "mAP")}
    training = trained["manifest"]["training"]
    prefix = training.get("frozen_prefix") or {}
    return {
        "row": row.name,
        "label": row.label,
        "kind": row.kind,
        "version_id": report["query_version"],
        "version_dir": _rel(trained["version_dir"]),
        **pairs,
        "update_gain": gain,
        "new_new_minus_independent": delta,
        "embedding_dim": trained["manifest"]["embedding"]["dim"],
        "epochs": training.get("epochs"),
        "trainable_parameters": prefix.get("trainable_parameters") if training.get("epochs") else 0,
        "augmentation": prefix.get("augmentation") if training.get("epochs") else None,
        "train_wall_s": trained["wall_s"],
        "train_images_per_s": training.get("summary", {}).get("train/images_per_s"),
        "eval_wall_s": eval_wall_s,
    }


def measure_extraction(version_dir: str, data_cfg: Any, *, images: int, batch_size: int, device: str) -> dict[str, Any]:
    """Images/s of embedding the test split from images with a version's full model (what re-embedding costs).

    The first batch warms up (allocations, kernel selection) and is not timed; then ``images`` test images
    are embedded through the same function ``compatembed-extract`` uses, without any feature cache.
    """
    import torch
    from torch.utils.data import Subset

    from compatembed.data import Preprocessing, build_dataset, build_transform
    from compatembed.embeddings import embed_dataset
    from compatembed.hardware import resolve_device
    from compatembed.models.version import load_model_version

    loaded = load_model_version(version_dir)
    torch_device = resolve_device(device)
    model = loaded.model.to(torch_device).eval()
    dataset = build_dataset(data_cfg, "test",
                            transform=build_transform(Preprocessing.from_dict(loaded.manifest["preprocessing"]), train=False))
    n = min(images, len(dataset))
    warm = min(batch_size, len(dataset))
    embed_dataset(model, Subset(dataset, list(range(warm))), batch_size=batch_size, device=torch_device, progress=False)
    sample = Subset(dataset, list(range(len(dataset) - n, len(dataset))))  # not the warm-up items
    started = time.perf_counter()
    embed_dataset(model, sample, batch_size=batch_size, device=torch_device, progress=False)
    seconds = time.perf_counter() - started
    return {"version_id": loaded.version_id, "input_size": loaded.manifest["preprocessing"]["input_size"], "images": n,
            "seconds": seconds, "images_per_s": n / seconds, "split_size": len(dataset), "torch_threads": torch.get_num_threads()}


def measure_forward_upgrade(fct_dir: str, old_dir: str, data_cfg: Any) -> dict[str, Any] | None:
    """Seconds to upgrade the stored old gallery into FCT's new space (its forward map, no images), or None."""
    from compatembed.embeddings import load_or_extract
    from compatembed.eval.pairs import version_registry

    old = load_or_extract(old_dir, data_cfg, "test", progress=False)
    registry = version_registry([fct_dir, old_dir])
    new_id = json.loads((Path(fct_dir) / "manifest.json").read_text())["version_id"]
    route = registry.forward_route(str(old.meta["version_id"]), new_id)
    if route is None:
        return None
    started = time.perf_counter()
    route.apply(old.embeddings)
    seconds = time.perf_counter() - started
    return {"vectors": len(old), "seconds": seconds, "vectors_per_s": len(old) / max(seconds, 1e-9)}


def measure_cache_fidelity(version_dir: str, data_cfg: Any, *, images: int, batch_size: int,
                           device: str) -> dict[str, Any]:
    """What the float16 prefix cache changes in a frozen-prefix version's embeddings.

    Its test embeddings as evaluated (from the cached prefix output, float16) against the last ``images``
    test images embedded from scratch in float32 by the same model: per-item cosine, and how often an
    item's nearest neighbour (and its 10 nearest) within the sample stay the same.
    """
    import numpy as np
    import torch
    from torch.utils.data import Subset

    from compatembed.data import Preprocessing, build_dataset, build_transform
    from compatembed.embeddings import embed_dataset, load_or_extract
    from compatembed.hardware import resolve_device
    from compatembed.models.version import load_model_version

    cached = load_or_extract(version_dir, data_cfg, "test", prefix_cache=True, progress=False, batch_size=batch_size)
    loaded = load_model_version(version_dir)
    torch_device = resolve_device(device)
    dataset = build_dataset(data_cfg, "test",
                            transform=build_transform(Preprocessing.from_dict(loaded.manifest["preprocessing"]), train=False))
    n = min(images, len(dataset))
    positions = list(range(len(dataset) - n, len(dataset)))
    fresh = embed_dataset(loaded.model.to(torch_device), Subset(dataset, positions), batch_size=batch_size,
                          device=torch_device, progress=False).embeddings
    ids = np.asarray(getattr(dataset, "ids", np.arange(len(dataset))), dtype=np.int64)[positions]
    row_of = {int(i): r for r, i in enumerate(cached.ids.tolist())}
    stored = cached.embeddings[[row_of[int(i)] for i in ids]]

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)

    a, b = unit(stored.astype(np.float64)), unit(fresh.astype(np.float64))
    cosine = (a * b).sum(1)
    neighbours = []
    for x in (a, b):
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        neighbours.append(np.argsort(-sim, axis=1, kind="stable")[:, :10])
    same_top10 = np.mean([len(set(p) & set(q)) / 10 for p, q in zip(*neighbours)])
    same_top1 = float(np.mean(neighbours[0][:, 0] == neighbours[1][:, 0]))
    return {"version_id": loaded.version_id, "images": n, "cosine_min": float(cosine.min()),
            "cosine_mean": float(cosine.mean()), "same_nearest_neighbour": same_top1,
            "same_top10_neighbours": float(same_top10), "torch_threads": torch.get_num_threads()}


def prefix_caches(cache_dir: Path) -> list[dict[str, Any]]:
    """What each prefix cache under ``cache_dir`` holds and what building it cost (read from its meta.json)."""
    found = []
    for meta_path in sorted((cache_dir / "prefix_features").glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        parts = meta.get("parts", {})
        found.append({"directory": _rel(meta_path.parent), "architecture": parts.get("architecture"),
                      "items": parts.get("data", {}).get("count"), "shape": meta.get("shape"), "dtype": parts.get("dtype"),
                      "build_s": meta.get("build_s"), "images_per_s": meta.get("images_per_s"),
                      "size_mb": round((meta_path.parent / "features.npy").stat().st_size / 1e6, 1)})
    return found


def _report(old_dir: str, row_dir: str, independent_dir: str, out: Path, title: str, overrides: list[str]) -> float:
    """``compatembed-report`` of [old, row] (matrix, mixed gallery, backfill curves, plots); returns its wall time."""
    cmd = [sys.executable, "-m", "compatembed.report", f"versions=[{old_dir},{row_dir}]", f"independent=[{independent_dir}]",
           f"out={out}", f"title='{title}'", *overrides]
    print("[report] " + " ".join(cmd[2:]), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                        help="rows to run (the old and the independent model are always there)")
    parser.add_argument("--runs", type=Path, default=Path("runs"),
                        help="where version directories go (relative: to the checkout)")
    parser.add_argument("--out", type=Path, default=Path("docs") / "results", help="results folder (relative: to the checkout)")
    parser.add_argument("--no-reuse", action="store_true", help="retrain even when a version directory exists")
    parser.add_argument("--no-reports", action="store_true", help="skip compatembed-report (matrix, backfill curves, plots)")
    parser.add_argument("--eval-backend", default="faiss", choices=("faiss", "numpy", "torch"))
    parser.add_argument("--throughput-images", type=int, default=512,
                        help="test images embedded from scratch to measure each model's extraction rate")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every training (e.g. trainer.device=cuda, data=...)")
    args = parser.parse_args(argv)
    if args.throughput_images < 1:
        parser.error("--throughput-images must be positive")
    os.chdir(REPO)  # relative run and result paths mean the same thing for this process and the CLIs it starts
    from compatembed.cli import compose_config
    from compatembed.hardware import set_torch_threads

    overrides = list(args.overrides)
    shared = [o for o in overrides if o.startswith(("data", "paths", "+data", "+paths"))]
    device = next((o.split("=", 1)[1] for o in overrides if o.startswith("trainer.device=")), "auto")
    eval_overrides = [f"backend={args.eval_backend}", "prefix_cache=true", f"device={device}", *shared]
    composed = compose_config("train", [f"experiment={PREFIX}bct", *overrides])
    cache_dir = Path(str(composed.paths.cache_dir))
    reuse = not args.no_reuse
    runs, out = args.runs, args.out
    reports_dir = runs / "reports"
    name = "pretrained_upgrade"

    payload: dict[str, Any] = {
        "scenario": "pretrained backbone upgrade: EfficientNet-Lite0 (deployed, ImageNet, as is) → EfficientNet-Lite2",
        "protocol": (
            f"data {composed.data.name}: maps are fitted and models trained on the first "
            f"{composed.data.train_per_class or 'all'} training images per class; query set = gallery set = the test "
            "split, leave-one-out; old = EfficientNet-Lite0's 1280-d ImageNet pooled feature, no head, no training; "
            "new backbone = EfficientNet-Lite2 (ImageNet), each at its own input size (timm's data config); new/old "
            "follows the manifest's compatibility route (prefix, affine map, or forward-upgraded gallery)"
        ),
        "command": "python -m tools.run_pretrained_upgrade " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "rows": [],
        "failed": {},
    }

    def write() -> None:
        write_json(out / f"{name}.json", payload)
        md = render(payload)
        (out / f"{name}.md").write_text(md)
        print(md, flush=True)

    as_is = ["trainer.epochs=0"]  # after the user's overrides: imported models and adopted ones never train
    old = train(f"{PREFIX}old", runs=runs, overrides=overrides + as_is, reuse=reuse)
    old_dir = str(old["version_dir"])
    linked = [f"method.old_version={old_dir}"]
    independent = train(f"{PREFIX}independent_new", runs=runs, overrides=overrides + linked + as_is, reuse=reuse)
    independent_dir = str(independent["version_dir"])
    payload["old"] = {"version_id": old["manifest"]["version_id"], "version_dir": _rel(old_dir), "wall_s": old["wall_s"]}

    references: dict[str, dict[str, Any]] = {}
    for row_name in ["independent", *[r for r in ROWS if r in args.rows and r != "independent"]]:
        row = ROWS[row_name]
        experiment = PREFIX + EXPERIMENT.get(row_name, row_name)
        try:
            if row_name == "independent":
                trained = independent
            else:
                extra = list(linked)
                if row.kind == "post-hoc map":
                    extra += [f"method.new_version={independent_dir}", *as_is]
                if row_name == "bt2":
                    extra.append(f"method.new_reference_version={independent_dir}")
                trained = train(experiment, runs=runs, overrides=overrides + extra, reuse=reuse)
            started = time.perf_counter()
            report = evaluate(str(trained["version_dir"]), old_dir, reports_dir / experiment, overrides=eval_overrides)
            eval_wall = time.perf_counter() - started
            for ref, ref_row in REFERENCES.items():
                if row_name == ref_row:
                    references[ref] = pair(report, "new", "new")
            summary = summarise(row, trained, report, references, eval_wall)
            if row.kind != "independent" and not args.no_reports:
                report_dir = out / name / row_name
                summary["report_wall_s"] = _report(old_dir, str(trained["version_dir"]), independent_dir, report_dir,
                                                   f"Pretrained upgrade: EfficientNet-Lite0 (deployed) → {row.label}",
                                                   [f"backend={args.eval_backend}", f"device={device}", *shared])
                summary["report"] = str((report_dir / "report.md").relative_to(out))  # relative to the results folder
        except subprocess.CalledProcessError as exc:  # report the others; say which failed
            payload["failed"][row.label] = f"exit status {exc.returncode} of: {' '.join(map(str, exc.cmd[2:]))}"
            print(f"[failed] {row.label}", flush=True)
            if row_name == "independent":
                break
            continue
        payload["rows"].append(summary)
        write()

    set_torch_threads("auto")
    batch = int(composed.data.loader.eval_batch_size)
    costs: dict[str, Any] = {"extraction": {}}
    for key, directory in (("old", old_dir), ("new", independent_dir)):
        print(f"[measure] extraction from images: {directory}", flush=True)
        costs["extraction"][key] = measure_extraction(directory, composed.data, images=args.throughput_images,
                                                      batch_size=batch, device=device)
    new_rate = costs["extraction"]["new"]
    gallery = int(new_rate["split_size"])
    costs["gallery_size"] = gallery
    costs["reembed_gallery_s"] = gallery / new_rate["images_per_s"]
    costs["reembed_per_million_h"] = 1e6 / new_rate["images_per_s"] / 3600
    fct = next((r for r in payload["rows"] if r["row"] == "fct"), None)
    if fct is not None:
        costs["fct_upgrade"] = measure_forward_upgrade(str(REPO / fct["version_dir"]), old_dir, composed.data)
    costs["prefix_caches"] = prefix_caches(cache_dir)
    frozen = next((r for r in payload["rows"] if r["kind"] == "compatible training"), None)
    if frozen is not None:
        print(f"[measure] float16 prefix cache against images: {frozen['version_dir']}", flush=True)
        costs["prefix_cache_fidelity"] = measure_cache_fidelity(str(REPO / frozen["version_dir"]), composed.data,
                                                                images=args.throughput_images, batch_size=batch,
                                                                device=device)
    payload["costs"] = costs
    write()
    return 1 if payload["failed"] else 0


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _minutes(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds / 60:.1f}"


def render(payload: dict[str, Any]) -> str:
    """The results as markdown: one table of rows, then what re-embedding the gallery would cost."""
    rows = payload["rows"]
    lines = [
        f"# {payload['scenario']}",
        "",
        f"{payload['protocol']}. Values in %; made by `{payload['command'].strip()}`.",
        "",
    ]
    if rows:
        oo = rows[0]["old/old"]
        lines += [f"Old/old (Lite0 searching its own gallery): top-1 {_pct(oo['top1'])}, top-5 {_pct(oo['top5'])}, "
                  f"mAP {_pct(oo['mAP'])}, mAP@R {_pct(oo['mAP@R'])}.", ""]
    lines += [
        "| row | kind | new/new top-1 / mAP | new/old top-1 / mAP | ECC top-1 / mAP | gain vs as-is top-1 / mAP "
        "| gain vs fine-tuned top-1 / mAP | Δ new/new vs as-is | Δ new/new vs fine-tuned | route | dim | trained params "
        "| train/fit min | eval min | report |",
        "|---|---|---|---|---|---|---|---|---|---|---:|---:|---:|---:|---|",
    ]

    def pair_of(values: dict[str, dict[str, float | None]], ref: str, fmt: str, scale: float) -> str:
        if ref not in values:
            return "—"
        return " / ".join("—" if values[ref][m] is None else fmt.format(scale * values[ref][m]) for m in ("top1", "mAP"))

    for r in rows:
        nn, no = r["new/new"], r["new/old"]
        ecc = " / ".join("yes" if r["compatible"][m] else "no" for m in ("top1", "mAP"))
        gains = [pair_of(r["update_gain"], ref, "{:.2f}", 1.0) for ref in REFERENCES]
        deltas = [pair_of(r["new_new_minus_independent"], ref, "{:+.1f}", 100.0) for ref in REFERENCES]
        params = f"{r['trainable_parameters'] / 1e6:.2f} M" if r["trainable_parameters"] else "0"
        report = f"[report]({r['report']})" if r.get("report") else "—"
        lines.append(
            f"| {r['label']} | {r['kind']} | {_pct(nn['top1'])} / {_pct(nn['mAP'])} | {_pct(no['top1'])} / {_pct(no['mAP'])} "
            f"| {ecc} | {' | '.join(gains)} | {' | '.join(deltas)} | {r['route']} | {r['embedding_dim']} | {params} "
            f"| {_minutes(r['train_wall_s'])} | {_minutes(r['eval_wall_s'])} | {report} |"
        )
    for label, reason in payload.get("failed", {}).items():
        lines.append(f"| {label} | failed: {reason} |" + " |" * 13)
    lines += [
        "",
        "ECC: the empirical compatibility criterion M(new, old) > M(old, old). Update gain: [M(new, old) − M(old, old)] / "
        "[M(ref, ref) − M(old, old)], against two independent references: Lite2 as is (ImageNet, never trained on these "
        "labels) and Lite2 fine-tuned like the compatible rows with cross-entropy only (the like-for-like reference of "
        "BCT, OCA and BT²); — where the reference does not beat the old model. Δ new/new: the row's new/new minus the "
        "reference's. Post-hoc maps adopt the as-is Lite2 unchanged (their new/new is its own); their train/fit time is "
        "the map fit (for the first of them also the training-subset features of both models). Compatible rows and the "
        "fine-tuned reference train Lite2's last stage, conv_head/bn2 and a projection on the frozen prefix's cached "
        "output: no data augmentation. Frozen-prefix versions are evaluated from the cached prefix output (float16), "
        "the old model from images; eval minutes include embedding the test split.",
    ]
    costs = payload.get("costs")
    if costs:
        new, old = costs["extraction"]["new"], costs["extraction"]["old"]
        lines += [
            "",
            "## What re-embedding the gallery costs",
            "",
            f"Measured in this run, embedding test images from scratch ({new['images']} images, after a warm-up batch, "
            f"{new['torch_threads']} torch threads): the new model (Lite2, {new['input_size'][1]} px) "
            f"{new['images_per_s']:.1f} images/s, the old one (Lite0, {old['input_size'][1]} px) "
            f"{old['images_per_s']:.1f} images/s. "
            f"Re-embedding the gallery of {costs['gallery_size']:,} images with the new model: "
            f"**{costs['reembed_gallery_s'] / 60:.1f} min** ({costs['reembed_per_million_h']:.1f} h per million images), "
            "the backfill a compatible row avoids; compare each row's train/fit minutes above.",
        ]
        if costs.get("fct_upgrade"):
            f = costs["fct_upgrade"]
            lines.append(f"FCT upgrades the {f['vectors']:,} stored old vectors without images in {f['seconds']:.2f} s.")
        if costs.get("prefix_caches"):
            lines += ["", "Frozen-prefix caches (built once, shared by every frozen-prefix version of the run):", "",
                      "| cache | items | shape | dtype | MB | build min | images/s |", "|---|---:|---|---|---:|---:|---:|"]
            for c in costs["prefix_caches"]:
                lines.append(f"| {c['architecture']} `{Path(c['directory']).name}` | {c['items']} | {c['shape'][1:]} "
                             f"| {c['dtype']} | {c['size_mb']} | {_minutes(c['build_s'])} | {c['images_per_s']} |")
        fid = costs.get("prefix_cache_fidelity")
        if fid:
            lines += ["", f"What the float16 prefix cache changes ({fid['version_id']}, the last {fid['images']} test "
                      "images embedded from scratch in float32 against its evaluated embeddings): cosine between the two "
                      f"embeddings of an image mean {fid['cosine_mean']:.6f}, min {fid['cosine_min']:.6f}; nearest "
                      f"neighbour within the sample unchanged for {100 * fid['same_nearest_neighbour']:.1f}% of the "
                      f"images, top-10 neighbours {100 * fid['same_top10_neighbours']:.1f}% the same."]
    m = payload["machine"]
    old_info = payload.get("old", {})
    lines += [
        "",
        f"The old version ({old_info.get('version_id')}) is imported, not trained"
        + (f"; importing it took {old_info['wall_s'] / 60:.1f} min" if old_info.get("wall_s") else "") + ".",
        f"Machine: {describe_machine(m)}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
