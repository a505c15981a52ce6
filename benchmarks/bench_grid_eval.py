"""Cost of evaluating the whole layers x dims STS grid, relative to one full-size encode.

matryoshka2d evaluates every (layers, dims) cell from one pass over the data (earlier layers are
prefixes of the same forward pass, dims are slices). The alternative, re-encoding per layer, is timed
too: sentence-transformers re-encoding after layer surgery for each layer count.

    python benchmarks/bench_grid_eval.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from common import header, median, minilm_path, timed

from matryoshka2d import EmbeddingModel
from matryoshka2d.data import data_dir, load_sts
from matryoshka2d.evaluation.sts import evaluate_sts
from matryoshka2d.truncation import find_layer_stack

DIMS = [384, 256, 128, 64, 32]


def st_grid(path, data, layers, dims) -> None:
    """The per-layer way: a sentence-transformers model per layer count, each re-encoding the data."""
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    unique = list(dict.fromkeys(data.sentence1 + data.sentence2))
    for k in layers:
        st = SentenceTransformer(str(path), device="cpu")
        parent, name = find_layer_stack(st[0].auto_model)
        setattr(parent, name, getattr(parent, name)[:k])
        emb = dict(zip(unique, st.encode(unique, batch_size=32)))
        for d in dims:
            a = torch.nn.functional.normalize(torch.tensor([emb[t][:d] for t in data.sentence1]), dim=1)
            b = torch.nn.functional.normalize(torch.tensor([emb[t][:d] for t in data.sentence2]), dim=1)
            spearmanr((a * b).sum(1), data.scores)


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
    t_encode, t_grid, t_st = [], [], []
    for _ in range(args.repeats):
        t_encode.append(timed(lambda: model.encode(unique, batch_size=32)))
        t_grid.append(timed(lambda: evaluate_sts(model, data, layers, DIMS, batch_size=32)))
        t_st.append(timed(lambda: st_grid(minilm_path(), data, layers, DIMS)))
    enc, grid, st = median(t_encode), median(t_grid), median(t_st)
    print(
        f"\nall-MiniLM-L6-v2, STSB test ({len(data)} pairs, {len(unique)} distinct sentences), batch 32, "
        f"median of {args.repeats}"
    )
    print("| what | seconds | relative to one full encode |")
    print("|---|---|---|")
    print(f"| one full-size encode (m2d) | {enc:.2f} | 1.00x |")
    print(f"| m2d grid, 6 layers x 5 dims, one pass | {grid:.2f} | {grid / enc:.2f}x |")
    print(f"| re-encode per layer (sentence-transformers surgery), 6 x 5 | {st:.2f} | {st / enc:.2f}x |")
    print(f"\none-pass grid is {st / grid:.2f}x faster than re-encoding per layer")


if __name__ == "__main__":
    main()
