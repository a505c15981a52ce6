"""STSB grids of 12-layer models (issue 12 item 3): layers 1..12 x dims 768..48, validation and test.

Each model is encoded once per split (every layer exit pooled from one pass, every dim a prefix), in
``dtype="auto"`` (bf16 on a CPU with native bf16: grids within 0.1 of float32, docs/BENCHMARKS.md). Prints
the grids and the retention figures the issue asks for (6 of 12 layers, 1 layer, 64 of 768 dims = 8.3%,
each as a share of 12 layers x 768 dims) and writes them to ``--out``.

    python experiments/mpnet_grid.py untouched=.cache/all-mpnet-base-v2/all-mpnet-base-v2 \\
        2dmse=models/mpnet-2dmse recipe=models/mpnet-recipe --out runs/mpnet/grids.json

The models come from ``experiments/mpnet/*.yaml`` (``m2d train --config ...``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from matryoshka2d.data import data_dir
from matryoshka2d.evaluation.sts import evaluate_sts
from matryoshka2d.model import EmbeddingModel
from matryoshka2d.persistence import atomic_write

DIMS = [768, 512, 256, 128, 64, 48]


def _is_grids(path: Path) -> bool:
    """Whether ``path`` is an earlier output of this script (the only file ``--out`` may replace)."""
    try:
        return set(json.loads(path.read_text())) == {"dims", "grids"}
    except (OSError, ValueError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="NAME=PATH of each model folder")
    parser.add_argument("--splits", default="validation,test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/mpnet/grids.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = dict(item.split("=", 1) for item in args.models)
    report: dict = {"dims": DIMS, "grids": {}}
    for name, path in models.items():
        model = EmbeddingModel.load(path, dtype="auto")
        layers = list(range(1, model.num_layers + 1))
        for split in args.splits.split(","):
            start = time.perf_counter()
            grid = evaluate_sts(model, data_dir() / "stsb" / f"{split}.tsv", layers=layers, dims=DIMS)
            last, full_dim = layers[-1], DIMS[0]
            full = grid.cell(last, full_dim)
            retention = {
                "half_layers": 100 * grid.cell(last // 2, full_dim) / full,
                "one_layer": 100 * grid.cell(1, full_dim) / full,
                "dims_64": 100 * grid.cell(last, 64) / full,
                "dims_48": 100 * grid.cell(last, 48) / full,
            }
            reduced = grid.mean(max_layers=last - 1)
            report["grids"][f"{name}/{split}"] = {
                "model": path,
                "precision": model.precision,
                "spearman": grid.spearman,
                "reduced_layer_mean": reduced,
                "retention_percent": retention,
            }
            print(
                f"{name} {split} ({time.perf_counter() - start:.0f} s, {model.precision}): full {full:.2f}, "
                f"mean of the reduced-layer cells {reduced:.2f}; "
                + ", ".join(f"{k} {v:.1f}%" for k, v in retention.items()),
                flush=True,
            )
            print(grid.table())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(report, indent=1) + "\n", "grids", overwrite=True, recognize=_is_grids)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
