"""Fused encoder layers against transformers' layers: the same model, side by side in one process.

One process loads all-MiniLM-L6-v2 twice in the same dtype: as it is, and with
``EmbeddingModel.fuse_layers()`` (each layer one native call of torch's fused encoder layer). Both encode
the STSB test sentences at 6, 3 and 1 layers, alternating within each of ``--repeats`` rounds (a passing
slowdown of the machine hits both), and the script prints sentences/s, the ratio fused / plain within
rounds (median and range) and each model's 3 / 6 layer ratio.

    python benchmarks/bench_fused_layers.py [--repeats 7] [--dtype bfloat16] [--workers 1]
"""

from __future__ import annotations

import argparse

import numpy as np
from common import header, median, minilm_path, stsb_sentences, timed

from matryoshka2d import EmbeddingModel


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="bfloat16", help="what the layers run in (default: bfloat16)")
    parser.add_argument("--workers", type=int, default=1, help="encode(workers=) (default 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    header("fused encoder layers: encode speed with and without")

    plain = EmbeddingModel.load(minilm_path(), dtype=args.dtype)
    fused = EmbeddingModel.load(minilm_path(), dtype=args.dtype).fuse_layers()
    texts = stsb_sentences("test")
    models = {"plain": plain, "fused": fused}
    layers = [6, 3, 1]
    for model in models.values():
        model.encode(texts[:256], batch_size=args.batch_size, workers=args.workers)  # warm up
    check = {name: m.encode(texts[:256], layers=3) for name, m in models.items()}
    cosine = float((check["plain"] * check["fused"]).sum(axis=1).min())
    times: dict[tuple[str, int], list[float]] = {(name, k): [] for name in models for k in layers}
    for round_ in range(args.repeats):
        order = list(models.items()) if round_ % 2 == 0 else list(models.items())[::-1]
        for k in layers:
            for name, model in order:
                seconds = timed(
                    lambda m=model, k=k: m.encode(
                        texts, layers=k, batch_size=args.batch_size, workers=args.workers
                    )
                )
                times[(name, k)].append(seconds)

    def within(a: tuple[str, int], b: tuple[str, int]) -> str:
        ratios = np.array(times[b]) / np.array(times[a])  # speed of a / speed of b, round by round
        return f"{np.median(ratios):.3f} ({ratios.min():.2f}-{ratios.max():.2f})"

    print(
        f"\n{len(texts)} STSB test sentences, batch {args.batch_size}, {plain.precision}, workers "
        f"{args.workers}, {args.repeats} rounds; min cosine fused vs plain at 3 layers: {cosine:.6f}\n"
    )
    print("| layers | plain sent/s | fused sent/s | fused / plain, within rounds |")
    print("|---|---|---|---|")
    for k in layers:
        rates = {name: len(texts) / median(times[(name, k)]) for name in models}
        print(f"| {k} | {rates['plain']:.0f} | {rates['fused']:.0f} | {within(('fused', k), ('plain', k))} |")
    for name in models:
        print(f"{name}: 3 / 6 layers within rounds {within((name, 3), (name, 6))}")


if __name__ == "__main__":
    main()
