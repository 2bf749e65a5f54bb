"""Check the GPU paths on a CUDA host: a real training step with bf16 autocast, evaluation ranking on
the GPU, and whether faiss-gpu is usable. Prints one JSON object (the card is named in it).

    python -m tools.gpu_check [--out gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tools._runner import machine


def check_training_step(work: Path) -> dict[str, Any]:
    """Train the synthetic smoke config on CUDA with bf16 autocast and reload the exported version."""
    import torch

    from compatembed.cli import compose_config
    from compatembed.models.version import load_model_version
    from compatembed.training.run import train

    cfg = compose_config("train", ["data=synthetic", "model=resnet18_cifar", "trainer=gpu", "trainer.epochs=2",
                                   "trainer.progress=false", "version_id=gpu_check", f"output_dir={work / 'gpu_check'}"])
    started = time.perf_counter()
    out = train(cfg)
    loaded = load_model_version(out, map_location="cuda")
    with torch.no_grad():
        emb = loaded.model.embed(torch.randn(4, 3, 32, 32, device="cuda"))
    summary = loaded.manifest["training"]["summary"]
    return {"ok": bool(torch.isfinite(emb).all()), "wall_s": time.perf_counter() - started,
            "step_time_s": summary.get("train/step_time_s"), "loss_last_epoch": summary.get("train/loss_epoch"),
            "embedding_device": str(emb.device)}


def check_torch_ranking() -> dict[str, Any]:
    from compatembed.eval import retrieval_metrics

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 64)).astype(np.float32)
    labels = rng.integers(0, 10, 4000)
    a = retrieval_metrics(x, labels, x, labels, leave_one_out=True, backend="torch")
    b = retrieval_metrics(x, labels, x, labels, leave_one_out=True, backend="numpy")
    return {"ok": all(abs(a[k] - b[k]) < 1e-6 for k in ("top1", "top5", "mAP", "mAP@R")), "torch": a["mAP"], "numpy": b["mAP"]}


def check_faiss_gpu() -> dict[str, Any]:
    try:
        import faiss
    except ImportError:
        return {"ok": False, "reason": "faiss is not installed on this host"}
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not gpus:
        return {"ok": False, "reason": f"faiss {faiss.__version__} has no GPU support here (faiss-cpu build)"}
    rng = np.random.default_rng(0)
    base = rng.normal(size=(100_000, 128)).astype(np.float32)
    cpu = faiss.IndexFlatIP(128)
    cpu.add(base)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    _, i_cpu = cpu.search(base[:100], 10)
    _, i_gpu = gpu.search(base[:100], 10)
    return {"ok": bool((i_cpu[:, 0] == i_gpu[:, 0]).all()), "num_gpus": gpus}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory() as work:
        for name, check in (("training_step_cuda_bf16", lambda: check_training_step(Path(work))),
                            ("ranking_torch_backend", check_torch_ranking), ("faiss_gpu", check_faiss_gpu)):
            try:
                result[name] = check()
            except Exception as exc:  # report every check, whatever fails
                result[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result["training_step_cuda_bf16"].get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
