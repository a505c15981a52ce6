"""Why the ONNX backend pools with numpy: the same encoder pooling with numpy and with torch, side by side.

One process, one ``OnnxEncoder`` (all-MiniLM-L6-v2, float32 or ``--int8``). Round-robin over ``--repeats``
rounds, each layer count is encoded twice: with the backend's numpy pooling (``pool_numpy``) and with
torch's ``pool`` swapped in (what the backend did before). torch's OpenMP threads keep spinning for a
while after each torch operation and competed with ONNX Runtime's next run; the script prints
sentences/s of both and the ratio numpy / torch per layer count, and each variant's 3-of-6 speed-up.

    python benchmarks/bench_onnx_pooling.py [--repeats 5] [--int8]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import header, median, minilm_path, stsb_sentences, timed

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
    print("| layers | numpy pooling sent/s | torch pooling sent/s | numpy / torch |")
    print("|---|---|---|---|")
    for k in layers:
        fast, slow = rate[("numpy", k)], rate[("torch", k)]
        print(f"| {k} | {fast:.0f} | {slow:.0f} | {fast / slow:.3f} |")
    for name in poolers:
        print(f"{name} pooling: 3 of 6 layers {rate[(name, 3)] / rate[(name, 6)]:.2f}x its 6 layers")


if __name__ == "__main__":
    main()
