"""What exit rotations cost at inference: the same model with and without rotated exits, side by side.

One process loads all-MiniLM-L6-v2 twice: as it is, and with exits 1-5 rotated (fitted on SNLI training
sentences; the rotation values do not matter for speed). Both encode the STSB test sentences at each layer
count, round-robin over ``--repeats`` rounds (the two models alternate, so a passing slowdown of the
machine hits both), and the script prints sentences/s and the ratio rotated / plain per layer count.

    python benchmarks/bench_exit_rotations.py [--repeats 5] [--dtype auto] [--dim 64]
"""

from __future__ import annotations

import argparse

from common import header, median, minilm_path, stsb_sentences, timed

from matryoshka2d import EmbeddingModel
from matryoshka2d.data import data_dir, read_texts
from matryoshka2d.exit_rotations import fit_exit_rotations, sample_texts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="auto", help="what the layers run in (default: auto)")
    parser.add_argument("--dim", type=int, default=64, help="embedding size encoded (default 64)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    header("exit rotations: encode speed with and without rotated exits")

    plain = EmbeddingModel.load(minilm_path(), dtype=args.dtype)
    rotated = EmbeddingModel.load(minilm_path(), dtype=args.dtype)
    train = sample_texts(read_texts(data_dir() / "snli" / "triplet-validation.tsv", "anchor"), 2000)
    rotated.set_exit_rotations(fit_exit_rotations(rotated, train))
    texts = stsb_sentences("test")
    layers = list(range(1, plain.num_layers + 1))
    models = {"plain": plain, "rotated": rotated}
    for model in models.values():
        model.encode(texts[:64], dim=args.dim, batch_size=args.batch_size)  # warm up
    times: dict[tuple[str, int], list[float]] = {(name, k): [] for name in models for k in layers}
    for _ in range(args.repeats):
        for k in layers:
            for name, model in models.items():
                seconds = timed(
                    lambda m=model, k=k: m.encode(texts, layers=k, dim=args.dim, batch_size=args.batch_size)
                )
                times[(name, k)].append(seconds)
    print(
        f"\n{len(texts)} STSB test sentences, batch {args.batch_size}, dim {args.dim}, {plain.precision}, "
        f"median of {args.repeats} (rotated exits: {sorted(rotated.exit_rotations)})\n"
    )
    print("| layers | plain sent/s | rotated sent/s | rotated / plain |")
    print("|---|---|---|---|")
    for k in layers:
        fast = len(texts) / median(times[("plain", k)])
        rot = len(texts) / median(times[("rotated", k)])
        print(f"| {k} | {fast:.0f} | {rot:.0f} | {rot / fast:.3f} |")


if __name__ == "__main__":
    main()
