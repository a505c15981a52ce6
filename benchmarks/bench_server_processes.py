"""One server process against two: does splitting ``m2d serve`` into processes beat one process's GIL?

In one process, a bf16 server at c=32 keeps only ~1.75-1.85 of 2 cores busy (its two worker threads wait
for the GIL that the event loop, the tokenising and transformers' Python between torch ops all need;
docs/SERVING.md, "Where the rest of the time goes"). Two processes have a GIL each. Here, in rounds, the
same closed-loop load (32 clients, requests of 1..32 STSB test sentences) goes either to one server with
its default two workers of one thread, or split between two servers of one worker of one thread each
(what ``uvicorn --workers 2`` would run), at layers 6 and 3; the servers' CPU time comes from /proc.

    python benchmarks/bench_server_processes.py --rounds 3 --dtype bfloat16

Prints sentences/s, cores busy, and per round the two / one ratios and each setting's layers 3 / 6.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import NAME, _load, cpu_seconds, m2d_server, make_requests  # noqa: E402
from common import stsb_sentences  # noqa: E402


def closed_loop(
    ports: list[int], bodies: list[tuple[bytes, int]], clients: int, warmup: float, duration: float
) -> float:
    """Sentences/s completed in the window by ``clients`` keep-alive clients spread over ``ports``."""
    _, _, texts, errors, _ = asyncio.run(_load(ports, bodies, clients, warmup, duration))
    if errors:
        raise RuntimeError(f"failed requests: {errors}")
    return texts / duration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()

    requests = make_requests(stsb_sentences(), 2000)
    bodies = {
        layers: [
            (json.dumps({"model": NAME, "input": t, "layers": layers}).encode(), len(t)) for t in requests
        ]
        for layers in (6, 3)
    }
    settings = {
        "one process, 2 workers x 1 thread": [["--dtype", args.dtype]],
        "two processes, 1 worker x 1 thread": [["--dtype", args.dtype, "--workers", "1", "--threads", "1"]]
        * 2,
    }
    rates: dict[tuple[str, int], list[float]] = {}
    for round_ in range(args.rounds):
        for label, flags in settings.items():
            servers = [m2d_server("shared", extra) for extra in flags]
            try:
                for server in servers:
                    server.wait_ready()
                for layers in (6, 3):
                    cpu = sum(cpu_seconds(s.proc.pid) for s in servers)
                    rate = closed_loop(
                        [s.port for s in servers],
                        bodies[layers],
                        args.concurrency,
                        args.warmup,
                        args.duration,
                    )
                    cores = (sum(cpu_seconds(s.proc.pid) for s in servers) - cpu) / (
                        args.warmup + args.duration
                    )
                    rates.setdefault((label, layers), []).append(rate)
                    print(
                        f"round {round_} {label:<36} layers {layers}: {rate:7.1f} sent/s, {cores:.2f} cores",
                        flush=True,
                    )
            finally:
                for server in servers:
                    server.stop()
    one, two = settings
    for label in settings:
        r6, r3 = rates[(label, 6)], rates[(label, 3)]
        print(
            f"{label:<36} median {statistics.median(r6):.0f} / {statistics.median(r3):.0f} sent/s at 6 / 3 "
            f"layers; 3 / 6 per round {[round(b / a, 2) for a, b in zip(r6, r3)]}"
        )
    for layers in (6, 3):
        ratios = [round(b / a, 2) for a, b in zip(rates[(one, layers)], rates[(two, layers)])]
        print(f"two processes / one, layers {layers}, per round: {ratios}")


if __name__ == "__main__":
    main()
