"""Why the ONNX backend pools with numpy: the same encoder pooling with numpy and with torch, side by side.

One process, one ``OnnxEncoder`` (all-MiniLM-L6-v2, float32 or ``--int8``). Round-robin over ``--repeats``
rounds, each layer count is encoded twice: with the backend's numpy pooling (``pool_numpy``) and with
torch's ``pool`` swapped in (what the backend did before). torch's OpenMP threads keep spinning for a
while after each torch operation and competed with ONNX Runtime's next run; the script prints
sentences/s of both (medians), the ratio numpy / torch per layer count (median and range of the ratios
taken within each round) and each variant's 3-of-6 speed-up, and writes them as JSON to ``--out``.

    python benchmarks/bench_onnx_pooling.py [--repeats 5] [--int8] [--out results.json]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import header, machine, median, minilm_path, save_results, stsb_sentences, timed

import matryoshka2d.backends.onnx as onnx_backend
from matryoshka2d.pooling import pool, pool_numpy


def torch_pool(hidden, mask, mode):
    return pool(torch.from_numpy(hidden), torch.from_numpy(mask), mode).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--int8", action="store_true", help="the int8 graphs instead of float32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args()
    header("ONNX backend: numpy pooling vs torch pooling")
    layers = [1, 2, 3, 6]
    with tempfile.TemporaryDirectory() as cache:
        encoder = onnx_backend.OnnxEncoder(
            minilm_path(), quantize="int8" if args.int8 else None, cache_dir=cache
        )
        encoder.warm_up(layers)
        texts = stsb_sentences("test")
        poolers = {"numpy": pool_numpy, "torch": torch_pool}
        times: dict[tuple[str, int], list[float]] = {(name, k): [] for name in poolers for k in layers}
        for _ in range(args.repeats):
            for k in layers:
                for name, pooler in poolers.items():
                    onnx_backend.pool_numpy = pooler  # what OnnxEncoder.forward calls
                    times[(name, k)].append(
                        timed(lambda k=k: encoder.encode(texts, layers=k, batch_size=args.batch_size))
                    )
        onnx_backend.pool_numpy = pool_numpy
    rate = {key: len(texts) / median(value) for key, value in times.items()}
    setup = f"batch {args.batch_size}, {encoder.backend}, median of {args.repeats}"
    print(f"\n{len(texts)} STSB test sentences, {setup}\n")
    print("| layers | numpy pooling sent/s | torch pooling sent/s | numpy / torch, within rounds (range) |")
    print("|---|---|---|---|")
    rows = []
    for k in layers:
        fast, slow = rate[("numpy", k)], rate[("torch", k)]
        ratios = [t / n for n, t in zip(times[("numpy", k)], times[("torch", k)], strict=True)]
        print(
            f"| {k} | {fast:.0f} | {slow:.0f} | {median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |"
        )
        rows.append(
            {
                "layers": k,
                "numpy_sentences_per_s": fast,
                "torch_sentences_per_s": slow,
                "numpy_over_torch": median(ratios),
                "numpy_over_torch_per_round": ratios,
            }
        )
    speedups = {name: rate[(name, 3)] / rate[(name, 6)] for name in poolers}
    for name, value in speedups.items():
        print(f"{name} pooling: 3 of 6 layers {value:.2f}x its 6 layers")
    if args.out:
        report = {"machine": machine(), "setup": setup, "texts": len(texts), "rows": rows}
        save_results(args.out, {**report, "three_of_six_layers": speedups})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
