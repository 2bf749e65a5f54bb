"""``compatembed-demo``: the whole story of a compatible model upgrade, on real CIFAR-10, on a CPU.

1. trains the "old" model on classes 0-4 and deploys it: its embeddings of the test split are indexed
   in the index service (a collection behind the alias ``photos``);
2. trains a compatible "new" model on classes 0-9 (BCT by default: it trains through the old model's
   classifier, so its space is the old one; ``--method oca`` adds dimensions instead);
3. queries the deployed gallery, still all old vectors, with the NEW model through the service;
4. upgrades part of the gallery (re-embeds those items with the new model) and queries again: the
   gallery is now mixed-version, and both segments answer;
5. writes the compatibility report (matrix, criterion, mixed gallery, backfill curves, plots) with the
   deployment gate's verdict, and says where it is, and how to serve the gallery, its CIFAR-10
   thumbnails (``images/``) and the report to the index service's web page (``/ui/``).

It uses the same Hydra configs as ``compatembed-train`` (``experiment=cifar10_independent_old`` and
``experiment=cifar10_<method>``) on the whole training split with fewer epochs (4 instead of 6), so the
numbers are a little lower than the full experiments'. The report ends with a picture of a few queries
and their top-5 neighbours under the old model, the new model on the old gallery, and the new model on
the mixed gallery. ``--synthetic`` runs the same story on generated images in a minute (tests).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from compatembed_index.api import IndexService

from compatembed.cli import compose_config, run_cli
from compatembed.data import build_dataset
from compatembed.embeddings import load_or_extract
from compatembed.eval.plots import plot_neighbours
from compatembed.eval.report import build_report
from compatembed.training.run import train

_logger = logging.getLogger(__name__)


def _train_overrides(args: argparse.Namespace, out: Path) -> tuple[list[str], list[str], list[str]]:
    """(common, old, new) training overrides for the real or the synthetic story."""
    per_class = "null" if args.per_class is None else args.per_class
    common = [f"trainer.epochs={args.epochs}", f"trainer.device={args.device}", f"data.train_per_class={per_class}",
              f"trainer.progress={str(not args.no_progress).lower()}"]
    if args.data_root:
        common.append(f"paths.data_root={args.data_root}")
    old = ["version_id=demo_old", f"output_dir={out / 'old'}"]
    new = ["version_id=demo_new", f"output_dir={out / 'new'}", f"method.old_version={out / 'old'}"]
    if args.synthetic:
        common += ["data=synthetic", "model=cifar_resnet20", "logger=none"]
        old += ["data.classes=0-4", "model.embed_dim=16"]
        new += [f"method={args.method}", "model.embed_dim=20" if args.method == "oca" else "model.embed_dim=16"]
        if args.method == "oca":
            new.append("method.extra_dims=4")
    else:
        old.append("experiment=cifar10_independent_old")
        new.append(f"experiment=cifar10_{args.method}")
    return common, old, new


def _top1(
    service: Any, version: str, queries: np.ndarray, query_ids: np.ndarray, query_labels: np.ndarray
) -> tuple[float, dict[str, int]]:
    """Top-1 accuracy of a search through the service (own item skipped) and which versions answered."""
    res = service.search("photos", version, queries, k=2)
    hits, answered = 0, {}
    for i in range(len(queries)):
        best = next(h for h in res.hits(i) if h["id"] != int(query_ids[i]))
        hits += int(best["metadata"]["label"] == int(query_labels[i]))
        answered[best["version"]] = answered.get(best["version"], 0) + 1
    return hits / len(queries), answered


def _neighbours(service: Any, version: str, queries: np.ndarray, query_ids: np.ndarray, k: int = 5) -> list[list[dict[str, Any]]]:
    """The top-``k`` hits of each query through the service, its own item skipped."""
    res = service.search("photos", version, queries, k=k + 1)
    return [[h for h in res.hits(i) if h["id"] != int(query_ids[i])][:k] for i in range(len(queries))]


def _picture_queries(labels: np.ndarray, count: int) -> np.ndarray:
    """Row positions of ``count`` queries from distinct classes, alternating old (0-4) and new (5-9) classes."""
    rng = np.random.default_rng(7)
    classes = sorted(set(labels.tolist()))
    old_c, new_c = [c for c in classes if c < 5], [c for c in classes if c >= 5]
    order = [c for pair in zip(rng.permutation(old_c).tolist(), rng.permutation(new_c).tolist()) for c in pair]
    order += [c for c in classes if c not in order]
    return np.array([rng.choice(np.flatnonzero(labels == c)) for c in order[:count]], dtype=np.int64)


def _write_thumbnails(data_cfg: Any, root: Path) -> dict[int, dict[str, Any]]:
    """Each test image as ``<root>/<id>.png``, the web page's thumbnails (``serve --image-root <root>``).

    Returns each item's metadata by id: its label, class name and image file (relative to ``root``).
    """
    from PIL import Image

    images = build_dataset(data_cfg, "test")  # no transform: PIL images, the decoded array when cached
    root.mkdir(parents=True, exist_ok=True)
    meta = {}
    for pos, item_id in enumerate(images.ids):
        picture, label = images[pos]
        picture = picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture))
        picture.save(root / f"{int(item_id)}.png")
        meta[int(item_id)] = {"label": int(label), "class": images.classes[int(label)], "image": f"{int(item_id)}.png"}
    return meta


def serve_command(out: Path) -> str:
    """The command that serves the demo's gallery, thumbnails and report to the web page (``/ui/``)."""
    return shlex.join(["compatembed-index", "--data-dir", str(out / "index"), "serve", "--image-root", str(out / "images"),
                       "--report-dir", str(out / "report")])


def _write_neighbours(out: Path, data_cfg: Any, searches: dict[str, list[list[dict[str, Any]]]], query_ids: np.ndarray,
                      query_labels: np.ndarray) -> Path:
    """The picture of what compatibility means: each query's top-5 under every search, right ones in green."""
    images = build_dataset(data_cfg, "test")  # no transform: PIL images, the decoded array when cached
    position = {int(i): p for p, i in enumerate(images.ids)}
    names = images.classes

    def picture(item_id: int) -> np.ndarray:
        return np.asarray(images[position[int(item_id)]][0])

    queries = []
    for row, (item_id, label) in enumerate(zip(query_ids, query_labels)):
        results = {name: [{"image": picture(h["id"]), "label": names[int(h["metadata"]["label"])], "version": h["version"]}
                          for h in hits[row]] for name, hits in searches.items()}
        queries.append({"image": picture(item_id), "label": names[int(label)], "results": results})
    return plot_neighbours(queries, list(searches), out / "neighbours.png",
                           title="Top-5 neighbours of test queries (green: same class); caption: the version that stored the hit")


def run(args: argparse.Namespace) -> Path:
    """Run the story; returns the path of ``report.md``."""
    out = Path(args.out)
    started = time.perf_counter()
    progress = not args.no_progress
    common, old_o, new_o = _train_overrides(args, out)
    eval_o = ["data=synthetic"] if args.synthetic else []
    if args.data_root:
        eval_o.append(f"paths.data_root={args.data_root}")
    data_cfg = compose_config("eval", eval_o + ["query=unused", "gallery=unused"]).data
    extract = dict(device=args.device, progress=progress)

    # The story starts from scratch every time: a rerun (other settings, or after a cut-short run) must not
    # resume against versions or an index left by the previous one.
    for part in ("old", "new", "index", "report", "images"):
        shutil.rmtree(out / part, ignore_errors=True)
    per_class = "all" if args.per_class is None else args.per_class
    print(f"[1/5] training the old model on classes 0-4 ({per_class} images per class, {args.epochs} epochs) and deploying it")
    old_dir = train(compose_config("train", common + old_o))
    old = load_or_extract(old_dir, data_cfg, "test", **extract)
    meta = _write_thumbnails(data_cfg, out / "images")
    items = [meta[int(i)] for i in old.ids]
    service = IndexService(out / "index", max_k=10)
    try:
        service.register_version(old_dir)
        for name in ("gallery", "gallery_old"):  # gallery_old stays as deployed: the web page's side-by-side view
            service.create_collection(name, factory="Flat")
            service.add(name, "demo_old", old.ids, old.embeddings, items)
        service.set_alias("photos", "gallery")
        q = np.random.default_rng(0).choice(len(old), size=min(len(old), args.queries), replace=False)
        base, _ = _top1(service, "demo_old", old.embeddings[q], old.ids[q], old.labels[q])
        pq = _picture_queries(old.labels, args.picture_queries)  # a few queries to look at, from old and new classes
        searches = {"old model,\nold gallery": _neighbours(service, "demo_old", old.embeddings[pq], old.ids[pq])}
        print(f"      deployed: {len(old)} test images indexed as 'photos' ({old.embeddings.shape[1]}-d); "
              f"old queries top-1 {100 * base:.1f}%")

        print(f"[2/5] training a compatible new model ({args.method.upper()}) on classes 0-9")
        new_dir = train(compose_config("train", common + new_o))
        new = load_or_extract(new_dir, data_cfg, "test", **extract)
        service.register_version(new_dir)
        route = service.route("demo_new", "demo_old")
        print(f"      registered demo_new ({new.embeddings.shape[1]}-d); "
              f"route to the old gallery: {' > '.join(route) if route else 'none'}")

        print("[3/5] querying the deployed (all old) gallery with the NEW model, no backfill")
        order = np.argsort(new.ids)[np.searchsorted(np.sort(new.ids), old.ids)]  # new rows in the old rows' item order
        new_emb = new.embeddings[order]
        cross, _ = _top1(service, "demo_new", new_emb[q], old.ids[q], old.labels[q])
        searches["new model,\nold gallery"] = _neighbours(service, "demo_new", new_emb[pq], old.ids[pq])
        print(f"      new queries on the old gallery: top-1 {100 * cross:.1f}% (old queries: {100 * base:.1f}%)")

        n_up = int(round(args.upgrade * len(old)))
        print(f"[4/5] upgrading {100 * args.upgrade:.0f}% of the gallery ({n_up} items re-embedded with demo_new)")
        up = np.random.default_rng(1).permutation(len(old))[:n_up]
        service.upgrade("gallery", "demo_new", old.ids[up], new_emb[up])
        service.create_collection("gallery_new", factory="Flat")  # a full backfill, for the web page
        service.add("gallery_new", "demo_new", old.ids, new_emb, items)
        mixed, answered = _top1(service, "demo_new", new_emb[q], old.ids[q], old.labels[q])
        searches["new model,\nmixed gallery"] = _neighbours(service, "demo_new", new_emb[pq], old.ids[pq])
        print(f"      mixed gallery: top-1 {100 * mixed:.1f}%; top hits came from {answered}")
    finally:
        service.close()

    print("[5/5] writing the compatibility report (matrix, mixed gallery, backfill curves, plots, gate)")
    report_o = eval_o + [f"versions=[{old_dir},{new_dir}]", f"out={out / 'report'}", "gate.enabled=true",
                         f"gate.metric={args.gate_metric}", f"device={args.device}", f"progress={str(progress).lower()}",
                         f"mixed.max_queries={args.report_queries}", "backfill.seeds=[0,1]",
                         "title='compatembed-demo: old model on classes 0-4 and a compatible new model on 0-9'"]
    report = build_report(compose_config("report", report_o))
    picture = _write_neighbours(out / "report", data_cfg, searches, old.ids[pq], old.labels[pq])
    with open(out / "report" / "report.md", "a") as handle:  # the report's own sections come first
        handle.write(
            "\n## What compatibility looks like\n\n"
            f"{len(pq)} test queries (from old and new classes) and their top-5 neighbours: the old model searching the "
            "deployed old gallery; the new model searching that same gallery, no item re-embedded; the new model "
            f"searching the gallery after {100 * args.upgrade:.0f}% of it was upgraded. Green: same class as the query. "
            "Each hit's caption names the model version that stored it.\n\n"
            f"![query neighbours]({picture.name})\n"
        )
    minutes = (time.perf_counter() - started) / 60
    gate = report["gate"]
    print()
    print(f"Done in {minutes:.1f} min.")
    print(f"  model versions: {old_dir}, {new_dir}; index data: {out / 'index'} (alias 'photos')")
    print(f"  deployment gate: {'PASS' if gate['passed'] else 'FAIL'}: {gate['reason']}")
    print(f"  report: {out / 'report' / 'report.md'} (plots: {out / 'report' / 'matrix_heatmap.png'}, "
          f"{out / 'report' / 'backfill.png'}, {picture})")
    print(f"  look at it in a browser: {serve_command(out)}")
    print("    then open http://127.0.0.1:8080/ui/ (gallery: mixed; gallery_old: as deployed; gallery_new: fully backfilled)")
    return out / "report" / "report.md"


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``compatembed-demo``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo",
                        help="where the model versions, the index and the report go (default: runs/demo)")
    parser.add_argument("--data-root", default=None,
                        help="folder holding cifar10-jpeg/{train,test}.tar (default: ../shared/data or $COMPATEMBED_DATA_ROOT)")
    parser.add_argument("--per-class", type=int, default=None, help="training images per class (default: all 5,000)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per model (default: 4)")
    parser.add_argument("--method", choices=("oca", "bct"), default="bct",
                        help="compatible training method (default: bct; oca failed the gate narrowly at 4 epochs)")
    parser.add_argument("--upgrade", type=float, default=0.3, help="fraction of the gallery re-embedded in step 4 (default: 0.3)")
    parser.add_argument("--queries", type=int, default=500, help="queries sent to the service in steps 1-4 (default: 500)")
    parser.add_argument("--report-queries", type=int, default=1000,
                        help="queries of the mixed-gallery and backfill evaluations, each ranking the whole gallery "
                             "(default: 1000)")
    parser.add_argument("--gate-metric", default="top1", help="metric of the deployment gate (default: top1)")
    parser.add_argument("--picture-queries", type=int, default=4,
                        help="queries shown with their top-5 neighbours in the report's picture (default: 4)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--synthetic", action="store_true", help="generated images and a tiny model (a one-minute check)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not 0.0 <= args.upgrade <= 1.0:
        parser.error("--upgrade must be a fraction in [0, 1]")
    if args.picture_queries < 1 or (args.per_class is not None and args.per_class < 1) or args.epochs < 1:
        parser.error("--picture-queries, --per-class and --epochs must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_cli(lambda: run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
