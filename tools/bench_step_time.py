"""Training-step cost of each compatibility method relative to ``independent``, measured back to back.

The methods evidence (``tools/run_cifar10_methods.py``) records each run's median step time, but those
runs take minutes each and may be reused from earlier sessions, so their ratio mixes machines and
load. This benchmark builds every method exactly as ``compatembed-train`` does
(:func:`compatembed.train.prepare_method`: frozen models, teacher-feature caches, the pseudo
classifier), takes one real training batch, and times the training loop
(:func:`compatembed.training.fit`: forward, losses, backward, optimiser step) on it for ``--steps``
steps per method, in ``--rounds`` interleaved rounds so that drifting load is shared. It reports the
median step time per method and its ratio to ``independent`` (the issue's target: at most 1.3×).

    python -m tools.bench_step_time                         # internal scenario, CPU
    python -m tools.bench_step_time --scenario external
    python -m tools.bench_step_time -- trainer.device=cuda  # overrides for every method

Needs the version directories of the methods evidence (``runs/cifar10_independent_old`` and
``runs/cifar10_independent_new``, or the external ones): train them first with
``python -m tools.run_cifar10_methods`` (or ``tools.run_cifar10_independent``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tools._runner import REPO, machine, write_json

METHODS = ("independent", "bct", "oca", "bt2", "lambda_orth", "fct")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("internal", "external"), default="internal")
    parser.add_argument("--methods", nargs="+", default=["independent", "bct", "oca", "bt2"], choices=METHODS,
                        help="lambda_orth and fct train like independent (their maps are fitted after training)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all methods")
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default docs/results/step_time_<scenario>.json; .md next to it)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every method (e.g. trainer.device=cuda)")
    args = parser.parse_args(argv)
    if "independent" not in args.methods:
        parser.error("--methods must include independent (the reference of the ratios)")
    if args.steps < 12:
        parser.error("--steps must be at least 12 (the first 10%% of steps, at most 10, are warm-up)")

    import torch
    from torch.utils.data import DataLoader

    from compatembed.cli import compose_config
    from compatembed.train import IndexedDataset, prepare_method, seed_everything
    from compatembed.training import NullLogger, TrainerConfig, fit, resolve_device
    from hydra.utils import instantiate

    prefix = "cifar10_external_" if args.scenario == "external" else "cifar10_"
    old = args.runs / ("cifar10_external_old" if args.scenario == "external" else "cifar10_independent_old")
    indep = args.runs / ("cifar10_external_independent_new" if args.scenario == "external" else "cifar10_independent_new")
    for needed in (old, indep):
        if not (needed / "manifest.json").is_file():
            parser.error(f"{needed} is not a model version directory: run python -m tools.run_cifar10_methods first")

    prepared: dict[str, tuple[Any, Any, Any]] = {}
    for name in args.methods:
        experiment = indep.name if name == "independent" else prefix + name
        extra = [] if name == "independent" else [f"method.old_version={old}"]
        if name == "bt2":
            extra.append(f"method.new_reference_version={indep}")
        cfg = compose_config("train", [f"experiment={experiment}", *extra, "trainer.progress=false", *args.overrides])
        generator = seed_everything(int(cfg.seed))
        method, train_set, _ = prepare_method(cfg)
        loader = DataLoader(IndexedDataset(train_set), batch_size=int(cfg.data.loader.batch_size), shuffle=True,
                            generator=generator, num_workers=0)
        batch = next(iter(loader))
        prepared[name] = (method, cfg, batch)
        print(f"[ready] {name}: {experiment}, batch {tuple(batch[0].shape)}", flush=True)

    times: dict[str, list[float]] = {name: [] for name in prepared}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (method, cfg, batch) in prepared.items():
                trainer = TrainerConfig(epochs=1, device=str(cfg.trainer.device), precision=str(cfg.trainer.precision),
                                        grad_clip=float(cfg.trainer.grad_clip), log_every_n_steps=10**9,
                                        checkpoint=False, resume=False, progress=False)
                summary = fit(method, [batch] * args.steps, optimizer_factory=instantiate(cfg.optim.optimizer),
                              scheduler_factory=None, config=trainer, run_dir=Path(tmp) / name, logger=NullLogger())
                times[name].append(summary["train/step_time_s"])
                print(f"[round {r + 1}/{args.rounds}] {name}: {1e3 * summary['train/step_time_s']:.1f} ms/step", flush=True)
    median = {name: float(np.median(t)) for name, t in times.items()}
    rows = [{"method": name, "step_time_s": median[name], "ratio_to_independent": median[name] / median["independent"],
             "per_round_s": times[name]} for name in prepared]
    device = str(resolve_device(str(next(iter(prepared.values()))[1].trainer.device)))
    payload = {
        "scenario": args.scenario,
        "command": "python -m tools.bench_step_time " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "device": device,
        "batch_size": int(next(iter(prepared.values()))[2][0].shape[0]),
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "methods": rows,
    }
    out = args.out or REPO / "docs" / "results" / f"step_time_{args.scenario}.json"
    write_json(out, payload)
    md = render(payload)
    out.with_suffix(".md").write_text(md)
    print(md, flush=True)
    return 0


def render(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = [
        f"# Training-step time per method ({payload['scenario']} old model)",
        "",
        f"Made by `{payload['command'].strip()}`. One real training batch of {payload['batch_size']} images per "
        f"method, {payload['steps_per_round']} timed steps of the training loop (forward, losses, backward, optimiser "
        f"step; the first steps are warm-up) per round, {payload['rounds']} interleaved rounds, median over rounds. "
        "Frozen models and cached teacher features as in training.",
        "",
        "| method | ms per step | × independent | per round (ms) |",
        "|---|---:|---:|---|",
    ]
    for r in payload["methods"]:
        rounds = ", ".join(f"{1e3 * t:.0f}" for t in r["per_round_s"])
        lines.append(f"| {r['method']} | {1e3 * r['step_time_s']:.1f} | {r['ratio_to_independent']:.2f} | {rounds} |")
    lines += ["", f"Machine: {m['cpu_count']} CPUs, torch {m['torch']} ({payload['torch_threads']} threads), "
              f"device {payload['device']}, CUDA device: {m['cuda'] or 'none'}. Target: at most 1.3× independent.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
