"""Training and extraction throughput: the project's full step, data included, against a plain loop.

For each method (built exactly as ``compatembed-train`` builds it, :func:`compatembed.training.run.prepare_method`:
frozen models, cached teacher features, the pseudo classifier) this times the project's training loop
(:func:`compatembed.training.fit`) fed by the loader training uses (:func:`compatembed.data.loaders.training_loader`:
on CIFAR the decoded-array cache with batched augmentation), so images/s include the data path. Next to
it, in the same rounds, a plain loop: the same model (same config) with a bias-free linear classifier,
cross-entropy and the same optimiser, on batches that are already decoded float tensors in memory, with
and without ``channels_last``. Rounds are interleaved so drifting load on a shared machine is shared.
Extraction images/s (the test split, eval transform, no gradients) are measured for the decoded-array
path and for the per-image path (PIL decode + torchvision transform in a DataLoader).

    python -m tools.bench_throughput                          # CPU, internal scenario
    python -m tools.bench_throughput --steps 40 --rounds 3
    python -m tools.bench_throughput -- trainer.device=cuda   # overrides for every method

Needs ``runs/cifar10_independent_old`` and an independent new model (``runs/cifar10_independent_new_s1``,
the methods evidence: ``python -m tools.run_cifar10_methods``). Writes ``docs/results/throughput.{json,md}``.
Targets (the training issue): project step ≥ 0.95× the plain loop, each method ≤ 1.3× independent's step time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from compatembed.methods import list_methods
from tools._runner import REPO, machine, write_json

METHODS = ("independent", "bct", "oca", "bt2")
"""The methods timed by default (``--methods`` takes any registered one)."""


def _plain_loop(model: Any, batches: list[tuple[Any, Any]], *, steps: int, lr: float, channels_last: bool,
                device: Any) -> float:
    """Images/s of a bare training loop on in-memory float batches (the reference)."""
    import torch
    import torch.nn.functional as F

    classifier = torch.nn.Linear(model.embed_dim, 10, bias=False).to(device)
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = list(model.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    fed = [(x.to(device).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format),
            y.to(device)) for x, y in batches]
    images = 0
    started = time.perf_counter()
    for i in range(steps):
        x, y = fed[i % len(fed)]
        loss = F.cross_entropy(classifier(model(x)), y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    model.to(memory_format=torch.contiguous_format)
    return images / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list_methods(),
                        help=f"methods to time (default: {' '.join(METHODS)})")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per method and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the plain loops and all methods")
    parser.add_argument("--extract-images", type=int, default=5000, help="test-split images per extraction measurement")
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    parser.add_argument("--new", type=Path, default=None,
                        help="independent new model version (BT²'s reference); "
                             "default runs/cifar10_independent_new_normalized_s1")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "throughput.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every method (e.g. trainer.device=cuda)")
    args = parser.parse_args(argv)
    if "independent" not in args.methods:
        parser.error("--methods must include independent (the reference of the method ratios)")
    if args.steps < 5 or args.rounds < 1 or args.extract_images < 1:
        parser.error("--steps must be at least 5, --rounds and --extract-images at least 1")
    old = args.runs / "cifar10_independent_old"
    new = args.new or args.runs / "cifar10_independent_new_normalized_s1"
    for needed in (old, new):
        if not (needed / "manifest.json").is_file():
            parser.error(f"{needed} is not a model version directory: run python -m tools.run_cifar10_methods first")

    import torch
    from hydra.utils import instantiate
    from torch.utils.data import Subset

    from compatembed.cli import compose_config
    from compatembed.data import build_dataset, build_transform
    from compatembed.data.loaders import training_loader
    from compatembed.embeddings import embed_dataset
    from compatembed.hardware import set_torch_threads
    from compatembed.training import NullLogger, TrainerConfig, fit
    from compatembed.training.run import prepare_method, seed_everything

    prepared: dict[str, tuple[Any, Any, Any]] = {}
    for name in args.methods:
        experiment = "cifar10_independent_new" if name == "independent" else f"cifar10_{name}"
        extra = [f"method.old_version={old}"]
        if name == "bt2":
            extra.append(f"method.new_reference_version={new}")
        cfg = compose_config("train", [f"experiment={experiment}", *extra, "trainer.progress=false", *args.overrides])
        seed_everything(int(cfg.seed))
        set_torch_threads(cfg.trainer.num_threads)
        method, train_set, ctx = prepare_method(cfg)
        loader = training_loader(train_set, batch_size=int(cfg.data.loader.batch_size), seed=int(cfg.seed),
                                 device=ctx.device, num_workers=0)
        prepared[name] = (method, cfg, loader)
        print(f"[ready] {name}: {experiment}, {type(loader).__name__}", flush=True)

    cfg = prepared["independent"][1]
    device = prepared["independent"][2].device if hasattr(prepared["independent"][2], "device") else torch.device("cpu")
    batch_size = int(cfg.data.loader.batch_size)
    reference_loader = prepared["independent"][2]
    batches = []  # decoded, augmented float batches held in memory: the plain loop pays no data cost
    for i, (x, y, _) in enumerate(reference_loader):
        batches.append((x.contiguous().cpu(), y.cpu()))
        if i + 1 >= 8:
            break
    lr = float(cfg.optim.optimizer.lr)

    seed_everything(0)
    plain_models = {True: instantiate(cfg.model), False: instantiate(cfg.model)}  # kept across rounds, as the methods' are

    def plain(channels_last: bool) -> float:
        return _plain_loop(plain_models[channels_last], batches, steps=args.steps, lr=lr, channels_last=channels_last,
                           device=device)

    def project(name: str) -> float:
        method, mcfg, loader = prepared[name]
        trainer = TrainerConfig(epochs=1, device=str(mcfg.trainer.device), precision=str(mcfg.trainer.precision),
                                log_every_n_steps=10**9, max_steps_per_epoch=args.steps, checkpoint=False, resume=False,
                                progress=False, num_threads=mcfg.trainer.num_threads,
                                channels_last=bool(mcfg.trainer.channels_last))
        with tempfile.TemporaryDirectory() as tmp:
            summary = fit(method, loader, optimizer_factory=instantiate(mcfg.optim.optimizer), scheduler_factory=None,
                          config=trainer, run_dir=Path(tmp), logger=NullLogger())
        return float(summary["train/images_per_s"])

    measures: dict[str, list[float]] = {"plain": [], "plain_channels_last": [], **{m: [] for m in prepared}}
    plain(True)  # warm-up: allocator, kernel selection, page cache
    plain(False)
    for name in prepared:
        project(name)
    for r in range(args.rounds):
        measures["plain"].append(plain(False))
        measures["plain_channels_last"].append(plain(True))
        for name in prepared:
            measures[name].append(project(name))
        print(f"[round {r + 1}/{args.rounds}] " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in measures.items()), flush=True)

    # extraction: the test split under the independent model's eval transform, array path vs per-image path
    model = prepared["independent"][0].model
    pre = model.preprocessing
    array_set = build_dataset(cfg.data, "test", transform=build_transform(pre, train=False))
    stream_cfg = compose_config("train", ["experiment=cifar10_independent_new", "data.pipeline=stream", *args.overrides])
    stream_set = build_dataset(stream_cfg.data, "test", transform=build_transform(pre, train=False))
    n = min(args.extract_images, len(array_set))
    extraction: dict[str, list[float]] = {"array": [], "stream": []}
    for _ in range(args.rounds):
        for key, ds in (("array", array_set), ("stream", stream_set)):
            subset = Subset(ds, range(n))  # the decoded-array path sees through a Subset
            started = time.perf_counter()
            embed_dataset(model, subset, batch_size=int(cfg.data.loader.eval_batch_size), device=device,
                          num_workers=0, progress=False)
            extraction[key].append(n / (time.perf_counter() - started))

    median = {k: float(np.median(v)) for k, v in measures.items()}
    best_plain = max(median["plain"], median["plain_channels_last"])
    rows = [{"method": name, "images_per_s": median[name], "per_round": measures[name],
             "vs_plain_best": median[name] / best_plain, "vs_plain_contiguous": median[name] / median["plain"],
             "step_time_vs_independent": median["independent"] / median[name]} for name in prepared]
    payload = {
        "command": "python -m tools.bench_throughput " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "loader": type(reference_loader).__name__,
        "plain": {"contiguous": {"images_per_s": median["plain"], "per_round": measures["plain"]},
                  "channels_last": {"images_per_s": median["plain_channels_last"], "per_round": measures["plain_channels_last"]}},
        "methods": rows,
        "extraction": {k: {"images_per_s": float(np.median(v)), "per_round": v, "images": n} for k, v in extraction.items()},
    }
    write_json(args.out, payload)
    md = render(payload)
    args.out.with_suffix(".md").write_text(md)
    print(md, flush=True)
    return 0


def render(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    plain = payload["plain"]
    lines = [
        "# Training and extraction throughput",
        "",
        f"Made by `{payload['command'].strip()}`. Batch {payload['batch_size']}, {payload['steps_per_round']} steps per "
        f"measurement, {payload['rounds']} interleaved rounds, median over rounds. The project's step is the training "
        f"loop fed by its own loader ({payload['loader']}: batches drawn and augmented in the training process), so "
        "its images/s include the data path; the plain loop trains the same model with a linear classifier on "
        "float batches already in memory.",
        "",
        f"Plain loop: {plain['contiguous']['images_per_s']:.0f} img/s (NCHW), "
        f"{plain['channels_last']['images_per_s']:.0f} img/s (channels_last).",
        "",
        "| method | img/s (data included) | × best plain loop | × plain NCHW | step time × independent | per round (img/s) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in payload["methods"]:
        rounds = ", ".join(f"{v:.0f}" for v in r["per_round"])
        lines.append(f"| {r['method']} | {r['images_per_s']:.0f} | {r['vs_plain_best']:.2f} | {r['vs_plain_contiguous']:.2f} | "
                     f"{r['step_time_vs_independent']:.2f} | {rounds} |")
    ex = payload["extraction"]
    lines += [
        "",
        f"Extraction ({ex['array']['images']} test images, eval transform, no gradients): decoded-array path "
        f"{ex['array']['images_per_s']:.0f} img/s, per-image path (PIL decode + transform) "
        f"{ex['stream']['images_per_s']:.0f} img/s.",
        "",
        f"Machine: {m['cpu_count']} CPUs, torch {m['torch']} ({payload['torch_threads']} threads), device "
        f"{payload['device']}, CUDA device: {m['cuda'] or 'none'}. Targets: ≥ 0.95× the plain loop; each method's step "
        "≤ 1.3× independent's.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
