"""Cost of evaluating the whole layers x dims STS grid, relative to one full-size encode.

matryoshka2d evaluates every (layers, dims) cell from one pass over the data (earlier layers are
prefixes of the same forward pass, dims are slices). The alternative, re-encoding per layer, is timed
too, both with our own ``encode(layers=k)`` per layer count (the saving of the one pass alone) and with
sentence-transformers re-encoding after layer surgery (its six truncated models loaded before timing).
Each round runs the four jobs in a new random order.

    python benchmarks/bench_grid_eval.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch
from common import header, median, minilm_path, timed

from matryoshka2d import EmbeddingModel
from matryoshka2d.data import data_dir, load_sts
from matryoshka2d.evaluation.sts import evaluate_sts
from matryoshka2d.truncation import find_layer_stack

DIMS = [384, 256, 128, 64, 32]


def load_st_models(path, layers) -> dict:
    """The per-layer way's models: one sentence-transformers model per layer count (loaded before timing)."""
    from sentence_transformers import SentenceTransformer

    models = {}
    for k in layers:
        st = SentenceTransformer(str(path), device="cpu")
        parent, name = find_layer_stack(st[0].auto_model)
        setattr(parent, name, getattr(parent, name)[:k])
        models[k] = st
    return models


def score_cells(embeddings: np.ndarray, unique: list[str], data, dims) -> None:
    """STS Spearman of every dim prefix of one layer count's embeddings (the same arithmetic for all)."""
    from scipy.stats import spearmanr

    row = {t: i for i, t in enumerate(unique)}
    a_rows, b_rows = [row[t] for t in data.sentence1], [row[t] for t in data.sentence2]
    for d in dims:
        e = embeddings[:, :d] / np.linalg.norm(embeddings[:, :d], axis=1, keepdims=True)
        spearmanr((e[a_rows] * e[b_rows]).sum(1), data.scores)


def st_grid(models: dict, data, dims) -> None:
    """Re-encoding per layer count with sentence-transformers (its models truncated beforehand)."""
    unique = list(dict.fromkeys(data.sentence1 + data.sentence2))
    for st in models.values():
        score_cells(st.encode(unique, batch_size=32), unique, data, dims)


def m2d_per_layer(model, data, layers, dims) -> None:
    """Re-encoding per layer count with our own encode(layers=k): the one-pass grid's saving alone."""
    unique = list(dict.fromkeys(data.sentence1 + data.sentence2))
    for k in layers:
        score_cells(model.encode(unique, layers=k, batch_size=32, normalize=False), unique, data, dims)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header("Grid evaluation cost (6 layers x 5 dims) vs one full-size encode")
    data = load_sts(data_dir() / "stsb" / "test.tsv")
    unique = list(dict.fromkeys(data.sentence1 + data.sentence2))
    model = EmbeddingModel.load(minilm_path())
    layers = list(range(1, model.num_layers + 1))
    model.encode(unique[:64])  # warm-up
    st_models = load_st_models(minilm_path(), layers)  # loading is not part of any timing
    for st in st_models.values():
        st.encode(unique[:64])  # warm-up
    jobs = {
        "encode": lambda: model.encode(unique, batch_size=32),
        "grid": lambda: evaluate_sts(model, data, layers, DIMS, batch_size=32),
        "m2d per layer": lambda: m2d_per_layer(model, data, layers, DIMS),
        "st per layer": lambda: st_grid(st_models, data, DIMS),
    }
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for r in range(args.repeats):
        for name in random.Random(r).sample(list(jobs), len(jobs)):  # a new order each round
            times[name].append(timed(jobs[name]))
    enc, grid, own, st = (median(times[name]) for name in jobs)
    print(
        f"\nall-MiniLM-L6-v2, STSB test ({len(data)} pairs, {len(unique)} distinct sentences), batch 32, "
        f"median of {args.repeats}"
    )
    print("| what | seconds | relative to one full encode |")
    print("|---|---|---|")
    print(f"| one full-size encode (m2d) | {enc:.2f} | 1.00x |")
    print(f"| m2d grid, 6 layers x 5 dims, one pass | {grid:.2f} | {grid / enc:.2f}x |")
    print(f"| re-encode per layer with m2d encode(layers=k), 6 x 5 | {own:.2f} | {own / enc:.2f}x |")
    print(f"| re-encode per layer (sentence-transformers surgery), 6 x 5 | {st:.2f} | {st / enc:.2f}x |")
    print(
        f"\none-pass grid: {own / grid:.2f}x faster than re-encoding per layer with the same library, "
        f"{st / grid:.2f}x faster than sentence-transformers re-encoding per layer (models loaded beforehand)"
    )


if __name__ == "__main__":
    main()
