"""STSB grids of 12-layer models (issue 12 item 3): layers 1..12 x dims 768..48, validation and test.

Each model is encoded once per split (every layer exit pooled from one pass, every dim a prefix), in
``dtype="auto"`` (bf16 on a CPU with native bf16: grids within 0.1 of float32, docs/BENCHMARKS.md). Prints
the grids and the retention figures the issue asks for (6 of 12 layers, 1 layer, 64 of 768 dims = 8.3%,
each as a share of 12 layers x 768 dims) and writes them to ``--out``.

A model named ``NAME@SEED`` is one seed of ``NAME``: the figures of every name trained with several seeds
are also given as the mean over its seeds (``seed_means``), and ``--compare A,B`` compares the
(seed-mean) grids of A and B cell by cell over the reduced-layer rows (``comparisons``: how many cells A
wins, the smallest, mean and largest difference), and so are A@SEED and B@SEED for every seed of both.

    python experiments/mpnet_grid.py untouched=.cache/all-mpnet-base-v2/all-mpnet-base-v2 \\
        plain@42=models/mpnet-plain plain@43=models/mpnet-plain-s43 \\
        2dmse@42=models/mpnet-2dmse 2dmse@43=models/mpnet-2dmse-s43 \\
        recipe@42=models/mpnet-recipe recipe@43=models/mpnet-recipe-s43 \\
        recipe-v6@42=models/mpnet-recipe-v6 recipe-v6@43=models/mpnet-recipe-v6-s43 \\
        --compare recipe-v6,2dmse --compare recipe-v6,plain --compare recipe-v6,recipe \\
        --compare recipe,2dmse --compare recipe,plain --compare 2dmse,plain \\
        --out experiments/results/mpnet_grids.json

The models come from ``experiments/mpnet/*.yaml`` (``m2d train --config ...``, the second seed with
``--seed 43 --output-dir models/mpnet-NAME-s43``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from matryoshka2d.data import data_dir
from matryoshka2d.evaluation.grid import GridResult
from matryoshka2d.evaluation.sts import evaluate_sts
from matryoshka2d.model import EmbeddingModel
from matryoshka2d.persistence import atomic_write

DIMS = [768, 512, 256, 128, 64, 48]


SUMMARIES = ("seed_means", "comparisons")


def _is_grids(path: Path) -> bool:
    """Whether ``path`` is an earlier output of this script (the only file ``--out`` may replace)."""
    try:
        return {"dims", "grids"} <= set(json.loads(path.read_text())) <= {"dims", "grids", *SUMMARIES}
    except (OSError, ValueError):
        return False


def summarize(grid: GridResult) -> dict:
    """Full size (all layers x the largest dim), the mean of the reduced-layer rows and the retention
    figures (each a share of full size) of one grid."""
    last, full_dim = grid.layers[-1], grid.dims[0]
    full = grid.cell(last, full_dim)
    return {
        "full": full,
        "reduced_layer_mean": grid.mean(max_layers=last - 1),
        "retention_percent": {
            "half_layers": 100 * grid.cell(last // 2, full_dim) / full,
            "one_layer": 100 * grid.cell(1, full_dim) / full,
            "dims_64": 100 * grid.cell(last, 64) / full,
            "dims_48": 100 * grid.cell(last, 48) / full,
        },
    }


def describe(name: str, summary: dict) -> str:
    """One printed line of :func:`summarize`'s figures."""
    retention = ", ".join(f"{k} {v:.1f}%" for k, v in summary["retention_percent"].items())
    full, reduced = summary["full"], summary["reduced_layer_mean"]
    return f"{name}: full {full:.2f}, reduced-layer mean {reduced:.2f}; {retention}"


def seed_means(grids: dict[str, GridResult]) -> dict[str, GridResult]:
    """``{NAME/SPLIT: grid averaged over the models NAME@SEED/SPLIT}`` (their names in ``info["seeds"]``)."""
    groups: dict[str, list[str]] = {}
    for key in grids:
        name, split = key.rsplit("/", 1)
        if "@" in name:
            groups.setdefault(f"{name.split('@', 1)[0]}/{split}", []).append(key)
    means = {}
    for group, keys in groups.items():
        first = grids[keys[0]]
        mean = np.mean([grids[key].spearman for key in keys], axis=0).tolist()
        seeds = [key.rsplit("/", 1)[0] for key in keys]
        means[group] = GridResult(group, first.layers, first.dims, {"spearman": mean}, info={"seeds": seeds})
    return means


def compare(a: GridResult, b: GridResult) -> dict:
    """Cell-by-cell difference ``a - b`` over the reduced-layer rows (all but the last)."""
    diff = (np.asarray(a.spearman) - np.asarray(b.spearman))[:-1]
    return {
        "cells": int(diff.size),
        "cells_a_above_b": int((diff > 0).sum()),
        "min": float(diff.min()),
        "mean": float(diff.mean()),
        "max": float(diff.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="NAME=PATH (or NAME@SEED=PATH) of each model folder")
    parser.add_argument("--splits", default="validation,test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare", action="append", default=[], metavar="A,B", help="two NAMEs; repeatable")
    parser.add_argument("--out", default="runs/mpnet/grids.json")
    args = parser.parse_args()
    splits = args.splits.split(",")
    models = dict(item.split("=", 1) for item in args.models)
    names = set(models) | {name.split("@", 1)[0] for name in models}
    pairs = [tuple(pair.split(",")) for pair in args.compare]
    for pair in pairs:
        if len(pair) != 2 or not set(pair) <= names:
            parser.error(f"--compare takes two of the names {sorted(names)}, got {','.join(pair)!r}")
    torch.set_num_threads(args.threads)
    report: dict = {"dims": DIMS, "grids": {}}
    grids: dict[str, GridResult] = {}
    for name, path in models.items():
        model = EmbeddingModel.load(path, dtype="auto")
        layers = list(range(1, model.num_layers + 1))
        for split in splits:
            start = time.perf_counter()
            grid = grids[f"{name}/{split}"] = evaluate_sts(
                model, data_dir() / "stsb" / f"{split}.tsv", layers=layers, dims=DIMS
            )
            summary = summarize(grid)
            report["grids"][f"{name}/{split}"] = {
                "model": path,
                "precision": model.precision,
                "spearman": grid.spearman,
                **summary,
            }
            seconds = time.perf_counter() - start
            print(describe(f"{name} {split} ({seconds:.0f} s, {model.precision})", summary), flush=True)
            print(grid.table())
    means = seed_means(grids)
    report["seed_means"] = {}
    for key, grid in means.items():
        summary = summarize(grid)
        report["seed_means"][key] = {"seeds": grid.info["seeds"], "spearman": grid.spearman, **summary}
        print(describe(f"{key}, mean of {len(grid.info['seeds'])} seeds", summary))
    grids.update(means)
    report["comparisons"] = {}
    seeds = {name.split("@", 1)[1] for name in models if "@" in name}
    for a, b in pairs:  # seed means (or single models), then each seed both were trained with
        pairs_here = [(a, b)] + [
            (f"{a}@{s}", f"{b}@{s}") for s in sorted(seeds) if {f"{a}@{s}", f"{b}@{s}"} <= set(models)
        ]
        for (x, y), split in itertools.product(pairs_here, splits):
            result = report["comparisons"][f"{x}-{y}/{split}"] = compare(
                grids[f"{x}/{split}"], grids[f"{y}/{split}"]
            )
            print(
                f"{x} - {y} ({split}): {result['cells_a_above_b']} of {result['cells']} reduced-layer cells "
                f"above; difference {result['min']:+.2f} .. {result['max']:+.2f}, mean {result['mean']:+.2f}"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(report, indent=1) + "\n", "grids", overwrite=True, recognize=_is_grids)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
