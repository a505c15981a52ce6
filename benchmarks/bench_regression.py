"""Encode speed of this checkout vs another checkout of matryoshka2d, side by side in one run.

Two worker processes load the same model, one importing ``matryoshka2d`` from ``--baseline-src`` (e.g. a
``git worktree`` of an older commit) and one from this checkout's ``src``. The parent asks them in turn
(round-robin, ``--repeats`` rounds) to encode the same texts at each layer count and prints the speed
ratio this / baseline, so a refactoring can show it did not slow encoding down.

    git worktree add /tmp/m2d-before <commit>
    python benchmarks/bench_regression.py --baseline-src /tmp/m2d-before/src [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def worker(args) -> None:
    """Load MiniLM, then answer each stdin line "k" with the seconds one encode at k layers took."""
    import time

    import torch
    from common import minilm_path, stsb_sentences

    now = time.process_time if args.clock == "cpu" else time.perf_counter

    def timed(fn) -> float:
        start = now()
        fn()
        return now() - start

    from matryoshka2d import EmbeddingModel

    torch.set_num_threads(args.threads)  # encode(workers=) divides them among its workers itself
    model = EmbeddingModel.load(minilm_path(), dtype=args.dtype)
    texts = stsb_sentences("test")
    if args.sorted:
        texts.sort(key=len)  # a file sorted by length
    batch_size, workers = args.batch_size, args.workers
    model.encode(texts[:64], batch_size=batch_size, show_progress=False, workers=workers)  # warm up
    print(json.dumps({"ready": len(texts)}), flush=True)
    for line in sys.stdin:
        k = int(line)
        seconds = timed(
            lambda k=k: model.encode(
                texts, layers=k, batch_size=batch_size, show_progress=False, workers=workers
            )
        )
        print(json.dumps({"seconds": seconds}), flush=True)


def start(src: Path, args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{HERE}"}
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--layers",
        args.layers,
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
    ]
    command += ["--sorted"] if args.sorted else []
    command += ["--threads", str(args.threads), "--clock", args.clock, "--dtype", args.dtype]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def ask(proc: subprocess.Popen, message: str | None = None) -> dict:
    if message is not None:
        proc.stdin.write(message + "\n")
        proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", type=Path, help="the other checkout's src folder")
    parser.add_argument("--layers", default="6,3,1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time (needs a quiet machine); cpu: the worker's CPU time, which other jobs on a "
        "busy machine disturb much less (use with --threads 1)",
    )
    parser.add_argument("--dtype", default="float32", help="what both load: float32, bfloat16, auto")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="encode(workers=N), each with threads / N torch threads (encode divides them itself from "
        "7ad2183 on: a baseline before it would run N x threads)",
    )
    parser.add_argument("--sorted", action="store_true", help="texts sorted by length (a sorted file)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    layer_counts = [int(k) for k in args.layers.split(",")]
    if args.worker:
        worker(args)
        return
    if args.baseline_src is None:
        parser.error("--baseline-src is required")
    sys.path.insert(0, str(HERE))
    from common import header, median

    header("Encode speed: this checkout vs a baseline checkout (round-robin)")
    print(f"baseline: {args.baseline_src.resolve()}\nthis:     {SRC}")
    procs = {"baseline": start(args.baseline_src.resolve(), args), "this": start(SRC, args)}
    n = [ask(p)["ready"] for p in procs.values()][0]
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for k in layer_counts:
            for name, proc in procs.items():  # alternate, so both see the same machine load
                times.setdefault((name, k), []).append(ask(proc, str(k))["seconds"])
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    print(f"\n{n} STSB test sentences, batch {args.batch_size}, {args.threads} threads, ", end="")
    order = ", sorted by length" if args.sorted else ""
    print(f"median of {args.repeats}, {args.clock} clock, {args.dtype}, workers={args.workers}{order}")
    first = layer_counts[0]
    print("| layers | baseline (sent/s) | this (sent/s) | this / baseline ", end="")
    print(f"| x {first} layers: baseline, this |")
    print("|---|---|---|---|---|")
    speed = {key: n / median(seconds) for key, seconds in times.items()}
    for k in layer_counts:
        before, after = speed[("baseline", k)], speed[("this", k)]
        own = f"{before / speed[('baseline', first)]:.3f}, {after / speed[('this', first)]:.3f}"
        print(f"| {k} | {before:.1f} | {after:.1f} | {after / before:.3f} | {own} |")


if __name__ == "__main__":
    main()
