"""Shortlist-and-rerank in Qdrant vs our faiss SearchIndex: recall@10 vs exact search, latency, build time.

Side by side in one run, on the same vectors, with the same shortlist settings (shortlist dim, codes,
index, shortlist size S):

* ``faiss``: :class:`matryoshka2d.search.SearchIndex` (faiss shortlist + numpy rerank), 2 threads;
* ``qdrant-edge``: :class:`matryoshka2d.search.QdrantIndex` on qdrant-edge-py, Qdrant's Rust engine
  embedded in the process (prefetch on the short vector + rescore with the full vector, one Query API
  request per query, sent in batches);
* ``qdrant-local``: the same code on qdrant-client's local mode (pure Python; float flat only, because
  it ignores quantisation and HNSW), on fewer queries because it is slow.

Truth: exact full-dim search (numpy dot product over all vectors). recall@10 = mean fraction of the exact
top 10 found; "same as faiss" = fraction of queries whose top-10 id set equals the faiss SearchIndex's
(as sets: duplicate vectors score exactly alike and the engines order such ties differently).
Latency: ms per query for batches of ``--batch-size`` queries, and the median of ``--single`` one-query
calls; the engines take turns (round-robin, ``--rounds`` rounds) so that load from other processes hits
them alike. Times are each engine's best round; the ratios to faiss are taken within each round (an
engine's time over faiss's in the same round) and reported as their median and range, so a round
disturbed by other load cannot pair one engine's good round with the other's bad one.

Data: the first ``--real`` distinct sentences of ../shared/data (STS Benchmark, SNLI; see
bench_search.unique_sentences), encoded with the packaged all-MiniLM-L6-v2 (6 layers, 384 dims,
normalised; cached in .cache/bench_qdrant/). ``--queries`` of them are held out as queries; the corpus
is the rest plus SYNTHETIC vectors up to ``--size``: normalised mixtures ``a*x_i + (1-a)*x_j`` of two
random real embeddings, ``a ~ U(0.2, 0.8)`` (bench_search.make_corpus, as in docs/SEARCH.md).

Usage (heavy: run under the shared lock)::

    flock /tmp/m2d-heavy.lock .venv/bin/python benchmarks/bench_qdrant.py --size 100000
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import make_corpus, unique_sentences  # noqa: E402
from common import machine, minilm_path, save_npy  # noqa: E402

from matryoshka2d.search import QdrantIndex, SearchIndex  # noqa: E402

K = 10
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench_qdrant"
# (name, shortlist dim, index, quantization, shortlist size)
SETTINGS = {
    "float128": (128, "flat", "none", 200),
    "binary384": (384, "flat", "binary", 500),
    "int8-128": (128, "flat", "int8", 500),
    "hnsw128": (128, "hnsw", "none", 500),
}


def real_embeddings(count: int, batch_size: int) -> np.ndarray:
    """MiniLM embeddings of the first ``count`` distinct sentences (cached)."""
    path = CACHE / f"minilm-first-{count}.npy"
    if path.is_file():
        return np.load(path)
    from matryoshka2d import EmbeddingModel

    sentences = unique_sentences()[:count]
    model = EmbeddingModel.load(minilm_path())
    t = time.perf_counter()
    emb = model.encode(sentences, batch_size=batch_size, show_progress=True).astype(np.float32)
    print(f"encoded {len(sentences)} sentences in {time.perf_counter() - t:.1f}s", flush=True)
    save_npy(path, emb)
    return emb


def recall(found: list[list[str]], truth: np.ndarray) -> float:
    return float(np.mean([len({int(i) for i in f} & set(t.tolist())) / K for f, t in zip(found, truth)]))


def time_engine(search, queries: np.ndarray, batch_size: int, singles: int) -> tuple[list, float, float]:
    """(ids of all queries, ms/query in batches, median ms of single-query calls)."""
    search(queries[:batch_size])  # warm-up
    ids: list[list[str]] = []
    t = time.perf_counter()
    for start in range(0, len(queries), batch_size):
        ids.extend(search(queries[start : start + batch_size]))
    batch_ms = (time.perf_counter() - t) * 1000 / len(queries)
    times = []
    for q in queries[:singles]:
        t = time.perf_counter()
        search(q[None, :])
        times.append((time.perf_counter() - t) * 1000)
    return ids, batch_ms, statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=100_000, help="corpus vectors (real + synthetic)")
    p.add_argument("--real", type=int, default=5000, help="real sentences encoded (queries come from them)")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--local-queries", type=int, default=20, help="queries for the slow local mode")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--local-size", type=int, default=None, help="corpus for local mode (default --size)")
    p.add_argument("--no-local", action="store_true", help="skip qdrant-client local mode")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--single", type=int, default=30, help="single-query calls timed")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--encode-batch-size", type=int, default=64)
    p.add_argument("--json", help="append one JSON line per (setting, engine) to this file")
    args = p.parse_args()
    faiss.omp_set_num_threads(2)

    emb = real_embeddings(args.real, args.encode_batch_size)
    order = np.random.default_rng(0).permutation(len(emb))
    queries, pool = emb[order[: args.queries]], emb[order[args.queries :]]
    corpus, real = make_corpus(pool, args.size, seed=1)
    ids = [str(i) for i in range(len(corpus))]
    truth = np.argsort(-(queries @ corpus.T), axis=1)[:, :K]
    print(f"# bench_qdrant {date.today()} on {machine()}")
    print(
        f"corpus {len(corpus)} x {corpus.shape[1]} ({real} real MiniLM sentence embeddings, "
        f"{len(corpus) - real} synthetic mixtures); {len(queries)} held-out real queries; k={K}",
        flush=True,
    )
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench_qdrant-"))
    try:
        for name in args.settings:
            sdim, index, quant, shortlist = SETTINGS[name]
            engines: dict[str, tuple] = {}
            t = time.perf_counter()
            fi = SearchIndex.from_embeddings(corpus, ids, shortlist_dim=sdim, index=index, quantization=quant)
            engines["faiss"] = (fi, time.perf_counter() - t, queries)
            t = time.perf_counter()
            edge = QdrantIndex.create(
                name, dim=corpus.shape[1], shortlist_dim=sdim, index=index, quantization=quant,
                edge_path=str(work / "edge"),
            )  # fmt: skip
            edge.upload(corpus, ids, batch_size=1024, show_progress=False)
            engines["qdrant-edge"] = (edge, time.perf_counter() - t, queries)
            if not args.no_local and (index, quant) == ("flat", "none"):
                n_local = args.local_size or len(corpus)
                t = time.perf_counter()
                local = QdrantIndex.create(name, dim=corpus.shape[1], shortlist_dim=sdim, path=":memory:")
                local.upload(corpus[:n_local], ids[:n_local], batch_size=1024, show_progress=True)
                engines["qdrant-local"] = (local, time.perf_counter() - t, queries[: args.local_queries])
            results: dict[str, dict] = {e: {"batch": [], "single": []} for e in engines}
            for _ in range(args.rounds):
                for engine, (idx, _, qs) in engines.items():
                    singles = min(args.single, len(qs)) if engine != "qdrant-local" else min(5, len(qs))
                    found, batch_ms, single_ms = time_engine(
                        lambda q, idx=idx, s=shortlist: idx.search(q, k=K, shortlist=s).ids,
                        qs,
                        args.batch_size,
                        singles,
                    )
                    results[engine]["ids"] = found
                    results[engine]["batch"].append(batch_ms)
                    results[engine]["single"].append(single_ms)
            base = results["faiss"]
            for engine, (_idx, build_s, qs) in engines.items():
                r = results[engine]
                n = len(qs)
                row = {
                    "setting": name,
                    "shortlist_dim": sdim,
                    "index": index,
                    "quantization": quant,
                    "shortlist": shortlist,
                    "engine": engine,
                    "corpus": args.local_size
                    if engine == "qdrant-local" and args.local_size
                    else len(corpus),
                    "queries": n,
                    "recall@10": recall(r["ids"], truth[:n]),
                    "same_as_faiss": float(
                        np.mean([set(a) == set(b) for a, b in zip(r["ids"], base["ids"][:n])])
                    ),
                    "ms_batch": min(r["batch"]),
                    "ms_single": min(r["single"]),
                    **within_round_ratios(r, base),
                    "build_s": build_s,
                }
                rows.append(row)
                print(
                    f"{name:10s} {engine:12s} S={shortlist:<4d} recall@10={row['recall@10']:.4f} "
                    f"same-as-faiss={row['same_as_faiss']:.3f} batch={row['ms_batch']:.2f}ms "
                    f"({row['x_faiss_batch']:.2f}x faiss, {_span(row['x_faiss_batch_range'])}) "
                    f"single={row['ms_single']:.2f}ms ({row['x_faiss_single']:.2f}x faiss, "
                    f"{_span(row['x_faiss_single_range'])}) build={build_s:.1f}s  [{n} queries]",
                    flush=True,
                )
            for idx, _, _ in engines.values():
                if isinstance(idx, QdrantIndex):
                    idx.close()
            del engines
            gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"date": str(date.today()), "machine": machine(), **row}) + "\n")
    return 0


def within_round_ratios(times: dict, base: dict) -> dict:
    """Median and range over rounds of ``times[kind][i] / base[kind][i]`` for batch and single queries."""
    out = {}
    for kind in ("batch", "single"):
        ratios = [a / b for a, b in zip(times[kind], base[kind], strict=True)]
        out[f"x_faiss_{kind}"] = statistics.median(ratios)
        out[f"x_faiss_{kind}_range"] = [min(ratios), max(ratios)]
    return out


def _span(bounds: list[float]) -> str:
    return f"{bounds[0]:.2f}-{bounds[1]:.2f}"


if __name__ == "__main__":
    sys.exit(main())
