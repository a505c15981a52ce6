"""m2d serve against Infinity (infinity-emb): throughput and latency over loopback, one server at a time.

all-MiniLM-L6-v2, 2 CPU threads per server (ours: by default 2 workers of 1 thread), STS Benchmark test
sentences, requests of 1..32 texts (fixed seed), closed-loop clients at concurrency 1, 8 and 32.
Measured, in this order:

1. ``m2d serve`` (torch float32, batch mode ``grouped``), ``m2d serve --backend onnx`` and ``m2d serve
   --dtype bfloat16`` at layers 6, 3, 1, plus a mixed-layer load (layers 1/3/6 per request) at
   concurrency 32 in batch mode ``shared``;
2. ``m2d serve --batch-mode grouped`` on the same mixed-layer load (which batch mode is faster);
3. Infinity, torch engine; 4. Infinity, optimum (ONNX) engine: both from the separate virtualenv made by
   ``benchmarks/infinity/setup.sh`` (skipped with a note if it is missing);
5. offline ``model.encode`` of exactly the requests ``m2d serve`` completed in its concurrency-1 window,
   in this process (the latency floor for concurrency 1: the same requests on both sides);
6. optionally (``--overload-seconds N``) an overload of ``m2d serve``: 256 connections sending 32 texts
   each as fast as they can; RSS of the server before, at peak and after, and the status counts.

With ``--rounds N`` the servers are measured N times in turn (steps 1-4, each server started afresh every
round) and every ratio uses the median of the rounds: one run of a few seconds per cell moved the
comparison with Infinity by +-15%.

``--interleave N`` measures only the concurrency-32 comparisons, paired in time: ``m2d serve`` (torch),
``m2d serve --backend onnx`` and Infinity's two engines are started together and stay up; after one
unrecorded pass of every cell, N rounds each run every cell once (our two servers at layers 6 and 3,
Infinity's at full size) in an order rotated from round to round, while the other servers sit idle
(their CPU use while idle is measured and printed). Each ratio is taken within a round, from cells a
minute apart, so a drift of the machine's speed over the hour (which moved single runs by more than the
margin) cancels; the median, the range and the number of rounds at or above the target are reported.
``--kinds onnx`` (or ``torch``, or ``int8``) starts only the servers of that backend kind: fewer servers
resident (six at once took memory bandwidth and cache from the one measured) and more rounds per hour.
``int8`` is ``m2d serve --backend onnx-int8`` against Infinity's optimum engine given the same ONNX export
plus optimum's dynamic int8 file of it (``model_quantized.onnx``, which that engine prefers on a CPU);
``bf16`` is ``m2d serve --dtype bfloat16`` against Infinity's torch engine with ``--dtype bfloat16`` (with
``--compiled`` also both with ``--compile``): the fastest torch path on a CPU with native bfloat16.
``pad`` is ours only: ``m2d serve --dtype bfloat16`` (batch widths padded to a multiple of 8, its default
on a CPU) against the same with ``--pad-multiple 1`` (with ``--compiled`` also both compiled). ``workers``
is ours only too: ``--dtype bfloat16`` and ``--backend onnx-int8`` with their default of 2 workers of 1
thread each against ``--workers 1`` (one worker of 2 threads, the default before 2026-12-06).
``fused`` is ours only: ``m2d serve`` in bf16 and in fp32 with its default fused layers against
``--no-fused-layers``; ``torchscript`` too: the default (fused layers run as TorchScript graphs) against
``--no-torchscript`` (the fused layers called from Python).

Run under the heavy-job lock (two heavy jobs at once on 2 cores ruin every timing)::

    flock /tmp/m2d-heavy.lock .venv/bin/python benchmarks/bench_server.py --overload-seconds 120

The client is a small asyncio HTTP/1.1 keep-alive client (much cheaper than httpx), so it takes as little
CPU from the server as possible; both servers share the machine with it alike. Results are printed with
ratios and written to ``benchmarks/results/server.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, minilm_path, save_results, stsb_sentences  # noqa: E402

from matryoshka2d.serving.runner import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INFINITY_VENV = Path(os.environ.get("INFINITY_VENV", "/work/bench-venvs/infinity"))
ONNX_DIR = Path(os.environ.get("INFINITY_ONNX_DIR", "/work/bench-venvs/models/minilm-onnx"))
#: The same export plus ``model_quantized.onnx`` (optimum's dynamic int8, per channel, the preset our
#: ``onnx-int8`` backend picks for this CPU): Infinity's optimum engine prefers a "quantize" file on a CPU.
INT8_DIR = ONNX_DIR.with_name(ONNX_DIR.name + "-int8")
NAME = "minilm"
THREADS = 2


# ---------------------------------------------------------------- the request mix
def make_requests(sentences: list[str], count: int, seed: int = 0) -> list[list[str]]:
    """``count`` requests of 1..32 STSB sentences (sizes uniform, fixed seed).

    The sentences are shuffled first (seeded): the STSB file comes in blocks by source whose sentences
    differ in length by ~2x, and a run covers a slice of the requests that depends on the server's speed,
    so without the shuffle a faster server would be measured on other sentence lengths.
    """
    rng = random.Random(seed)
    sentences = rng.sample(sentences, len(sentences))
    requests, position = [], 0
    for _ in range(count):
        size = rng.randint(1, 32)
        if position + size > len(sentences):
            position = 0
        requests.append(sentences[position : position + size])
        position += size
    return requests


# ---------------------------------------------------------------- a small keep-alive HTTP client
class Connection:
    """One HTTP/1.1 keep-alive connection that POSTs JSON and reads a Content-Length (or chunked) reply."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        await self.writer.drain()
        header = await self.reader.readuntil(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        if "content-length" in headers:
            payload = await self.reader.readexactly(int(headers["content-length"]))
        else:  # chunked
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            await self.reader.readexactly(2)
            payload = b"".join(parts)
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@dataclass
class RunResult:
    server: str
    layers: str
    concurrency: int
    seconds: float
    requests: int
    texts: int
    sentences_per_s: float
    p50_ms: float
    p99_ms: float
    errors: dict
    round: int = 0
    #: At concurrency 1: which requests (indices into the request list) completed in the window, so that
    #: the offline reference times exactly those (each run starts at request 0; the window's slice
    #: depends on the server's speed).
    window_requests: list[int] | None = None


async def _load(
    port: int | list[int], bodies: list[tuple[bytes, int]], concurrency: int, warmup: float, duration: float
) -> tuple[list[float], int, int, dict, list[int]]:
    """Closed-loop clients for warmup + duration seconds; latencies (and request indices) of the requests
    completed in the window. Several ports: the clients are spread over them in turn (one server each)."""
    ports = port if isinstance(port, list) else [port]
    latencies: list[float] = []
    completed: list[int] = []
    counts = {"requests": 0, "texts": 0}
    errors: dict[str, int] = {}
    next_index = 0
    start = time.perf_counter()
    window_start, window_end = start + warmup, start + warmup + duration

    async def client(port: int) -> None:
        nonlocal next_index
        connection = Connection("127.0.0.1", port)
        try:
            while (now := time.perf_counter()) < window_end:
                index = next_index % len(bodies)
                body, texts = bodies[index]
                next_index += 1
                try:
                    status, payload = await connection.post("/v1/embeddings", body)
                except (OSError, asyncio.IncompleteReadError) as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    await connection.close()
                    continue
                done = time.perf_counter()
                ok = status == 200 and payload.count(b'"index"') == texts
                if not ok:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                elif window_start <= done <= window_end:  # completed in the measured window
                    latencies.append(done - now)
                    completed.append(index)
                    counts["requests"] += 1
                    counts["texts"] += texts
        finally:
            await connection.close()

    await asyncio.gather(*(client(ports[i % len(ports)]) for i in range(concurrency)))
    return latencies, counts["requests"], counts["texts"], errors, completed


def run_load(
    server: str,
    port: int,
    requests: list[list[str]],
    layers: list[int] | None,
    concurrency: int,
    warmup: float,
    duration: float,
    label: str,
) -> RunResult:
    rng = random.Random(1)
    bodies = []
    for texts in requests:
        body = {"model": NAME, "input": texts}
        if layers is not None:
            body["layers"] = rng.choice(layers)
        bodies.append((json.dumps(body).encode(), len(texts)))
    latencies, n_requests, n_texts, errors, completed = asyncio.run(
        _load(port, bodies, concurrency, warmup, duration)
    )
    latencies.sort()
    result = RunResult(
        server=server,
        layers=label,
        concurrency=concurrency,
        seconds=duration,
        requests=n_requests,
        texts=n_texts,
        sentences_per_s=n_texts / duration,
        p50_ms=1000 * statistics.median(latencies) if latencies else float("nan"),
        p99_ms=1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else float("nan"),
        errors=errors,
        window_requests=completed if concurrency == 1 else None,
    )
    print(
        f"  {server:<16} layers {label:<6} c={concurrency:<3} {result.sentences_per_s:7.1f} sent/s  "
        f"p50 {result.p50_ms:7.1f} ms  p99 {result.p99_ms:7.1f} ms  ({n_requests} requests"
        + (f", errors {errors}" if errors else "")
        + ")",
        flush=True,
    )
    return result


# ---------------------------------------------------------------- servers
def thread_env() -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(THREADS),
        "MKL_NUM_THREADS": str(THREADS),
        "TOKENIZERS_PARALLELISM": "false",
    }


class Server:
    """A server subprocess; ready once an embeddings request succeeds."""

    def __init__(self, name: str, command: list[str], port: int, cwd: Path | None = None) -> None:
        self.name, self.port = name, port
        self.log = open(f"/tmp/bench-server-{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command, cwd=cwd, env=thread_env(), stdout=self.log, stderr=subprocess.STDOUT
        )
        self.started = time.perf_counter()

    def wait_ready(self, timeout: float = 600) -> float:
        import httpx

        deadline = time.monotonic() + timeout
        body = {"model": NAME, "input": ["warm up"]}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                r = httpx.post(f"http://127.0.0.1:{self.port}/v1/embeddings", json=body, timeout=30)
                if r.status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become ready; see {self.log.name}")

    def rss_mib(self) -> float:
        return rss_mib(self.proc.pid)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        return code


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def flag_suffix(extra: list[str] | None) -> str:
    """``["--compile"]`` -> ``"-compile"``: part of a server's name, so each gets its own log file."""
    return "".join("-" + flag.lstrip("-") for flag in extra or [])


def m2d_server(mode: str, extra: list[str] | None = None) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "matryoshka2d.cli", "serve", str(minilm_path()), "--port", str(port)]
    # No --threads: the server splits the THREADS cores (OMP_NUM_THREADS in thread_env) among its
    # workers, by default 2 workers of 1 thread (``--kinds workers`` compares that with 1 worker of 2).
    command += [
        "--served-model-name",
        NAME,
        "--batch-mode",
        mode,
        "--log-level",
        "warning",
    ]
    return Server(f"m2d-{mode}{flag_suffix(extra)}", command + (extra or []), port)


def infinity_server(engine: str, extra: list[str] | None = None) -> Server | None:
    binary = INFINITY_VENV / "bin" / "infinity_emb"
    if not binary.exists():
        print(f"  (Infinity not installed at {INFINITY_VENV}: run benchmarks/infinity/setup.sh)")
        return None
    port = free_port()
    common_args = ["--served-model-name", NAME, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
    common_args += ["--url-prefix", "/v1", "--no-vector-disk-cache", "--log-level", "warning"]
    if engine == "torch":
        return Server(
            f"infinity-torch{flag_suffix(extra)}",
            [str(binary), "v2", "--model-id", str(minilm_path()), "--engine", "torch"]
            + common_args
            + (extra or []),
            port,
        )
    if not (ONNX_DIR / "model.onnx").exists():
        print(f"  exporting MiniLM to ONNX for Infinity's optimum engine: {ONNX_DIR}", flush=True)
        subprocess.run(
            [str(INFINITY_VENV / "bin" / "optimum-cli"), "export", "onnx", "--model", str(minilm_path()),
             "--task", "feature-extraction", "--library-name", "transformers", str(ONNX_DIR)],
            env=thread_env(),
            check=True,
            capture_output=True,
        )  # fmt: skip
    folder = ONNX_DIR
    if engine == "int8":
        folder = INT8_DIR
        if not (INT8_DIR / "model_quantized.onnx").exists():
            from matryoshka2d.export import int8_preset

            preset = int8_preset()
            print(f"  quantising it (optimum, --{preset} --per_channel) for Infinity: {INT8_DIR}", flush=True)
            shutil.rmtree(INT8_DIR, ignore_errors=True)
            shutil.copytree(ONNX_DIR, INT8_DIR)
            subprocess.run(
                [str(INFINITY_VENV / "bin" / "optimum-cli"), "onnxruntime", "quantize", "--onnx_model",
                 str(ONNX_DIR), f"--{preset}", "--per_channel", "-o", str(INT8_DIR)],
                env=thread_env(),
                check=True,
                capture_output=True,
            )  # fmt: skip
    command = [str(binary), "v2", "--model-id", ".", "--engine", "optimum", "--pooling-method", "mean"]
    return Server(
        f"infinity-{'int8' if engine == 'int8' else 'onnx'}", command + common_args, port, cwd=folder
    )


# ---------------------------------------------------------------- offline reference
def offline_latency(requests: list[list[str]], layers: int, count: int) -> float:
    """Median seconds of ``model.encode`` per request over the first ``count`` of ``requests`` (pass the
    requests a server completed to compare like with like), same threads, in this process."""
    import torch

    from matryoshka2d import EmbeddingModel

    torch.set_num_threads(THREADS)
    model = EmbeddingModel.load(minilm_path())
    model.encode(requests[0], layers=layers)
    times = []
    for texts in requests[:count]:
        start = time.perf_counter()
        model.encode(texts, layers=layers)
        times.append(time.perf_counter() - start)
    del model
    gc.collect()
    return statistics.median(times)


# ---------------------------------------------------------------- overload
async def _overload(port: int, body: bytes, connections: int, seconds: float, sample) -> dict:
    statuses: dict[str, int] = {}
    end = time.perf_counter() + seconds

    async def client() -> None:
        connection = Connection("127.0.0.1", port)
        while time.perf_counter() < end:
            try:
                status, _ = await connection.post("/v1/embeddings", body)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
            except (OSError, asyncio.IncompleteReadError) as e:
                statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1
                await connection.close()
        await connection.close()

    async def sampler() -> None:
        while time.perf_counter() < end:
            sample()
            await asyncio.sleep(1.0)

    await asyncio.gather(sampler(), *(client() for _ in range(connections)))
    return statuses


def overload(requests: list[list[str]], seconds: float, connections: int = 256) -> dict:
    texts = [t for r in requests for t in r][:32]
    body = json.dumps({"model": NAME, "input": texts}).encode()
    server = m2d_server("grouped")
    server.wait_ready()
    # steady state first: a normal load, so "before" is the RSS of a warmed-up server
    run_load("m2d serve", server.port, requests, [6], 8, 1.0, 3.0, "6")
    before = server.rss_mib()
    samples: list[float] = []
    statuses = asyncio.run(
        _overload(server.port, body, connections, seconds, lambda: samples.append(server.rss_mib()))
    )
    time.sleep(5)
    after = server.rss_mib()
    code = server.stop()
    result = {
        "seconds": seconds,
        "connections": connections,
        "texts_per_request": len(texts),
        "rss_before_mib": round(before, 1),
        "rss_peak_mib": round(max(samples), 1),
        "rss_after_mib": round(after, 1),
        "statuses": statuses,
        "exit_code_after_sigterm": code,
    }
    print(
        f"  overload {seconds:.0f}s x {connections} connections: RSS {before:.0f} MiB before, "
        f"{max(samples):.0f} peak, {after:.0f} after; statuses {statuses}; exit code {code}",
        flush=True,
    )
    return result


# ---------------------------------------------------------------- paired in time
def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by the process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def interleaved(
    requests: list[list[str]],
    rounds: int,
    concurrency: int,
    warmup: float,
    duration: float,
    compiled: bool,
    kinds: tuple[str, ...] = ("torch", "onnx"),
) -> dict:
    """The concurrency-``concurrency`` ratios measured in ``rounds`` rounds of every cell, servers kept up.

    ``compiled`` adds ``m2d serve --compile`` and Infinity's torch engine with its ``--compile``; ``kinds``
    keeps only the servers of those backend kinds (``torch``, ``onnx``, ``int8``, ``bf16``; ``pad``: ours
    with and without width rounding; ``fused``: ours in bf16 and fp32 with and without fused layers): fewer
    servers resident, more rounds in the same time.
    """
    servers = {}
    if "torch" in kinds:
        servers["m2d serve"] = m2d_server("grouped")
    if "onnx" in kinds:
        servers["m2d onnx"] = m2d_server("grouped", ["--backend", "onnx"])
    if "int8" in kinds:
        servers["m2d int8"] = m2d_server("grouped", ["--backend", "onnx-int8"])
    if compiled and "torch" in kinds:
        servers["m2d compiled"] = m2d_server("grouped", ["--compile"])
    bf16 = ["--dtype", "bfloat16"]
    if "bf16" in kinds:
        servers["m2d bf16"] = m2d_server("grouped", bf16)
        if compiled:
            servers["m2d bf16 compiled"] = m2d_server("grouped", [*bf16, "--compile"])
    if "workers" in kinds:
        for label, kind in (("bf16", bf16), ("int8", ["--backend", "onnx-int8"])):
            servers[f"m2d {label} 2 workers"] = m2d_server("grouped", kind)
            servers[f"m2d {label} 1 worker"] = m2d_server("grouped", [*kind, "--workers", "1"])
    if "fused" in kinds:
        for label, kind in (("bf16", bf16), ("fp32", [])):
            servers[f"m2d {label} fused"] = m2d_server("grouped", kind)
            servers[f"m2d {label} unfused"] = m2d_server("grouped", [*kind, "--no-fused-layers"])
    if "torchscript" in kinds:
        for label, kind in (("bf16", bf16), ("fp32", [])):
            servers[f"m2d {label} torchscript"] = m2d_server("grouped", kind)
            servers[f"m2d {label} eager"] = m2d_server("grouped", [*kind, "--no-torchscript"])
    if "pad" in kinds:
        servers["m2d bf16 pad 8"] = m2d_server("grouped", [*bf16, "--pad-multiple", "8"])
        servers["m2d bf16 pad 1"] = m2d_server("grouped", [*bf16, "--pad-multiple", "1"])
        if compiled:
            servers["m2d bf16 compiled pad 8"] = m2d_server("grouped", [*bf16, "--compile"])
            servers["m2d bf16 compiled pad 1"] = m2d_server(
                "grouped", [*bf16, "--compile", "--pad-multiple", "1"]
            )
    engines = [("torch", None), ("onnx", None), ("int8", None), ("bf16", bf16)]
    engines += [("torch", ["--compile"]), ("bf16", [*bf16, "--compile"])] if compiled else []
    for kind, extra in engines:
        if kind not in kinds:
            continue
        server = infinity_server("torch" if kind == "bf16" else kind, extra)
        if server is not None:
            servers[server.name] = server
    try:
        for label, server in servers.items():
            ready = server.wait_ready()
            print(f"{label}: ready in {ready:.0f} s, RSS {server.rss_mib():.0f} MiB", flush=True)
        cells = [(label, k) for label in servers if label.startswith("m2d") for k in ("6", "3")]
        cells += [(label, "6") for label in servers if label.startswith("infinity")]
        runs: list[RunResult] = []
        print("warm-up pass of every cell (not recorded):", flush=True)
        for label, layers in cells:
            asked = None if label.startswith("infinity") else [int(layers)]
            run_load(label, servers[label].port, requests, asked, concurrency, warmup, 2.0, layers)
        idle_cpu = {label: 0.0 for label in servers}  # CPU seconds used while another server was loaded
        for round_ in range(rounds):
            print(f"round {round_ + 1} of {rounds}:", flush=True)
            shift = round_ % len(cells)
            for label, layers in cells[shift:] + cells[:shift]:
                others = {name: cpu_seconds(s.proc.pid) for name, s in servers.items() if name != label}
                asked = None if label.startswith("infinity") else [int(layers)]
                port = servers[label].port
                result = run_load(label, port, requests, asked, concurrency, warmup, duration, layers)
                result.round = round_
                runs.append(result)
                for name, before in others.items():
                    idle_cpu[name] += cpu_seconds(servers[name].proc.pid) - before
    finally:
        codes = {label: server.stop() for label, server in servers.items()}

    def rate(label: str, layers: str, round_: int) -> float:
        (run,) = [r for r in runs if (r.server, r.layers, r.round) == (label, layers, round_)]
        return run.sentences_per_s

    pairs = {
        "m2d serve / infinity-torch": (("m2d serve", "6"), ("infinity-torch", "6"), 1.3),
        "m2d onnx / infinity-onnx": (("m2d onnx", "6"), ("infinity-onnx", "6"), 1.3),
        "m2d int8 / infinity-int8": (("m2d int8", "6"), ("infinity-int8", "6"), 1.3),
        "m2d serve layers 3 / layers 6": (("m2d serve", "3"), ("m2d serve", "6"), 1.8),
        "m2d onnx layers 3 / layers 6": (("m2d onnx", "3"), ("m2d onnx", "6"), 1.8),
        "m2d int8 layers 3 / layers 6": (("m2d int8", "3"), ("m2d int8", "6"), 1.8),
        "m2d compiled / infinity-torch": (("m2d compiled", "6"), ("infinity-torch", "6"), 1.3),
        "m2d compiled / infinity-torch --compile": (
            ("m2d compiled", "6"),
            ("infinity-torch-compile", "6"),
            1.3,
        ),
        "m2d compiled / m2d serve": (("m2d compiled", "6"), ("m2d serve", "6"), 1.0),
        "m2d compiled layers 3 / layers 6": (("m2d compiled", "3"), ("m2d compiled", "6"), 1.8),
        "m2d bf16 / infinity-torch bf16": (("m2d bf16", "6"), ("infinity-torch-dtype-bfloat16", "6"), 1.3),
        "m2d bf16 layers 3 / layers 6": (("m2d bf16", "3"), ("m2d bf16", "6"), 1.8),
        "m2d bf16 compiled / infinity-torch bf16": (
            ("m2d bf16 compiled", "6"),
            ("infinity-torch-dtype-bfloat16", "6"),
            1.3,
        ),
        "m2d bf16 compiled / infinity-torch bf16 --compile": (
            ("m2d bf16 compiled", "6"),
            ("infinity-torch-dtype-bfloat16-compile", "6"),
            1.3,
        ),
        "m2d bf16 compiled layers 3 / layers 6": (
            ("m2d bf16 compiled", "3"),
            ("m2d bf16 compiled", "6"),
            1.8,
        ),
        "m2d bf16 2 workers / 1 worker": (("m2d bf16 2 workers", "6"), ("m2d bf16 1 worker", "6"), 1.0),
        "m2d bf16 2 workers / 1 worker, layers 3": (
            ("m2d bf16 2 workers", "3"),
            ("m2d bf16 1 worker", "3"),
            1.0,
        ),
        "m2d int8 2 workers / 1 worker": (("m2d int8 2 workers", "6"), ("m2d int8 1 worker", "6"), 1.0),
        "m2d int8 2 workers / 1 worker, layers 3": (
            ("m2d int8 2 workers", "3"),
            ("m2d int8 1 worker", "3"),
            1.0,
        ),
        "m2d bf16 fused / unfused": (("m2d bf16 fused", "6"), ("m2d bf16 unfused", "6"), 1.0),
        "m2d bf16 fused / unfused, layers 3": (("m2d bf16 fused", "3"), ("m2d bf16 unfused", "3"), 1.0),
        "m2d bf16 fused layers 3 / layers 6": (("m2d bf16 fused", "3"), ("m2d bf16 fused", "6"), 1.8),
        "m2d bf16 unfused layers 3 / layers 6": (("m2d bf16 unfused", "3"), ("m2d bf16 unfused", "6"), 1.8),
        "m2d bf16 torchscript / eager": (("m2d bf16 torchscript", "6"), ("m2d bf16 eager", "6"), 1.0),
        "m2d bf16 torchscript / eager, layers 3": (
            ("m2d bf16 torchscript", "3"),
            ("m2d bf16 eager", "3"),
            1.0,
        ),
        "m2d bf16 torchscript layers 3 / layers 6": (
            ("m2d bf16 torchscript", "3"),
            ("m2d bf16 torchscript", "6"),
            1.8,
        ),
        "m2d bf16 eager layers 3 / layers 6": (("m2d bf16 eager", "3"), ("m2d bf16 eager", "6"), 1.8),
        "m2d fp32 eager layers 3 / layers 6": (("m2d fp32 eager", "3"), ("m2d fp32 eager", "6"), 1.8),
        "m2d fp32 torchscript / eager": (("m2d fp32 torchscript", "6"), ("m2d fp32 eager", "6"), 1.0),
        "m2d fp32 torchscript / eager, layers 3": (
            ("m2d fp32 torchscript", "3"),
            ("m2d fp32 eager", "3"),
            1.0,
        ),
        "m2d fp32 torchscript layers 3 / layers 6": (
            ("m2d fp32 torchscript", "3"),
            ("m2d fp32 torchscript", "6"),
            1.8,
        ),
        "m2d fp32 fused / unfused": (("m2d fp32 fused", "6"), ("m2d fp32 unfused", "6"), 1.0),
        "m2d fp32 fused / unfused, layers 3": (("m2d fp32 fused", "3"), ("m2d fp32 unfused", "3"), 1.0),
        "m2d bf16 pad 8 / pad 1": (("m2d bf16 pad 8", "6"), ("m2d bf16 pad 1", "6"), 1.0),
        "m2d bf16 pad 8 / pad 1, layers 3": (("m2d bf16 pad 8", "3"), ("m2d bf16 pad 1", "3"), 1.0),
        "m2d bf16 compiled pad 8 / pad 1": (
            ("m2d bf16 compiled pad 8", "6"),
            ("m2d bf16 compiled pad 1", "6"),
            1.0,
        ),
        "m2d bf16 compiled pad 8 / pad 1, layers 3": (
            ("m2d bf16 compiled pad 8", "3"),
            ("m2d bf16 compiled pad 1", "3"),
            1.0,
        ),
        "m2d bf16 pad 8 layers 3 / layers 6": (("m2d bf16 pad 8", "3"), ("m2d bf16 pad 8", "6"), 1.8),
        "m2d bf16 compiled pad 8 layers 3 / layers 6": (
            ("m2d bf16 compiled pad 8", "3"),
            ("m2d bf16 compiled pad 8", "6"),
            1.8,
        ),
    }
    ratios = {}
    print(f"\nratios within each round (c={concurrency}, {rounds} rounds of {duration:.0f} s cells):")
    for name, (a, b, target) in pairs.items():
        if a[0] not in servers or b[0] not in servers:
            continue
        values = [rate(*a, r) / rate(*b, r) if rate(*b, r) else float("nan") for r in range(rounds)]
        ratios[name] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "rounds_at_target": sum(v >= target for v in values),
            "target": target,
            "per_round": values,
        }
        print(
            f"  {name}: median {statistics.median(values):.2f}x, range {min(values):.2f}-{max(values):.2f}x, "
            f"{sum(v >= target for v in values)} of {rounds} rounds >= {target}x  "
            f"({', '.join(f'{v:.2f}' for v in values)})"
        )
    seconds_loaded = rounds * (warmup + duration) * (len(cells) - 1)
    print("CPU used by each server while the others were loaded (idle):")
    for label, cpu in idle_cpu.items():
        print(f"  {label}: {cpu:.1f} CPU s in ~{seconds_loaded:.0f} s")
    print(f"exit codes after SIGTERM: {codes}")
    return {
        "interleave_rounds": rounds,
        "concurrency": concurrency,
        "runs": [asdict(r) for r in runs],
        "ratios": ratios,
        "idle_cpu_seconds": idle_cpu,
        "exit_codes": codes,
    }


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds before each run")
    parser.add_argument("--rounds", type=int, default=1, help="measure every server this many times, in turn")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--overload-seconds", type=float, default=0, help="0: skip the overload test")
    parser.add_argument("--skip-infinity", action="store_true")
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="with --interleave: also m2d serve --compile and Infinity's torch engine with --compile",
    )
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="N",
        help="only the c=32 comparisons, all servers up at once, N rounds of every cell in turn (see above)",
    )
    parser.add_argument(
        "--kinds",
        default="torch,onnx",
        help="with --interleave: the backend kinds compared (torch, onnx, int8, bf16, pad, workers, fused, "
        "torchscript: "
        "comma-separated), the others not started",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "server.json"))
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or set(kinds) - {"torch", "onnx", "int8", "bf16", "pad", "workers", "fused", "torchscript"}:
        parser.error(
            "--kinds takes torch, onnx, int8, bf16, pad, workers, fused, torchscript (comma-separated), "
            f"got {args.kinds!r}"
        )
    requests = make_requests(stsb_sentences("test"), 2000)
    print(
        f"machine: {machine()}; {THREADS} threads per server; requests of 1..32 STSB test sentences",
        flush=True,
    )
    results: list[RunResult] = []
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "threads": THREADS}
    if args.interleave:
        report.update(
            interleaved(
                requests, args.interleave, max(levels), args.warmup, args.duration, args.compiled, kinds
            )
        )
        write_json(Path(args.out), report)
        return

    def measure(
        server: Server, label: str, layer_sets: list[tuple[str, list[int] | None]], levels_, round_: int
    ) -> None:
        ready = server.wait_ready()
        print(f"{label}: ready in {ready:.0f} s, RSS {server.rss_mib():.0f} MiB", flush=True)
        for name, layers in layer_sets:
            for c in levels_:
                result = run_load(label, server.port, requests, layers, c, args.warmup, args.duration, name)
                result.round = round_
                results.append(result)
        print(f"  stopped (SIGTERM) with exit code {server.stop()}", flush=True)

    each = [("6", [6]), ("3", [3]), ("1", [1])]
    mixed = [("1/3/6", [1, 3, 6])]
    for round_ in range(args.rounds):
        if args.rounds > 1:
            print(f"round {round_ + 1} of {args.rounds}:", flush=True)
        measure(m2d_server("grouped"), "m2d serve", each, levels, round_)
        measure(m2d_server("grouped", ["--backend", "onnx"]), "m2d onnx", each, levels, round_)
        measure(m2d_server("grouped", ["--dtype", "bfloat16"]), "m2d bf16", each, levels, round_)
        measure(m2d_server("shared"), "m2d shared", mixed, [32], round_)
        measure(m2d_server("grouped"), "m2d grouped", mixed, [32], round_)
        if not args.skip_infinity:
            for engine in ("torch", "onnx"):
                server = infinity_server(engine)
                if server is not None:
                    measure(server, f"infinity-{engine}", [("6", None)], levels, round_)
    # The offline reference of the c=1 latency: model.encode of exactly the requests the server completed
    # in its c=1 window (the first round's; capped at 120), here in this process.
    report["offline_p50_ms"] = {}
    if 1 in levels:
        print("offline encode (the requests the server completed at c=1, this process):", flush=True)
        for k in ("6", "3", "1"):
            single = next(
                (r for r in results if r.server == "m2d serve" and r.layers == k and r.concurrency == 1), None
            )
            if single is None or not single.window_requests:
                continue
            chosen = [requests[i] for i in single.window_requests[:120]]
            p50 = 1000 * offline_latency(chosen, int(k), len(chosen))
            report["offline_p50_ms"][k] = p50
            print(f"  layers {k}: p50 {p50:.1f} ms per request over {len(chosen)} requests", flush=True)
    report["runs"] = [asdict(r) for r in results]
    if args.overload_seconds > 0:
        print("overload:", flush=True)
        report["overload"] = overload(requests, args.overload_seconds)

    def get(server: str, layers: str, c: int) -> RunResult | None:
        """The cell's run, or with several rounds a run holding the rounds' medians."""
        runs = [r for r in results if r.server == server and r.layers == layers and r.concurrency == c]
        if len(runs) <= 1:
            return runs[0] if runs else None
        median = {
            key: statistics.median(getattr(r, key) for r in runs)
            for key in ("sentences_per_s", "p50_ms", "p99_ms")
        }
        return RunResult(**{**asdict(runs[0]), **median, "round": -1})

    ratios = {}
    top = max(levels)
    full32 = get("m2d serve", "6", top)
    for engine in ("torch", "onnx"):
        other = get(f"infinity-{engine}", "6", top)
        if full32 and other and other.sentences_per_s:
            ratios[f"m2d/infinity-{engine} c={top}"] = full32.sentences_per_s / other.sentences_per_s
    onnx32, bf32 = get("m2d onnx", "6", top), get("m2d bf16", "6", top)
    other = get("infinity-onnx", "6", top)
    if onnx32 and other and other.sentences_per_s:
        ratios[f"m2d onnx/infinity-onnx c={top}"] = onnx32.sentences_per_s / other.sentences_per_s
    fastest_infinity = max(
        (
            cell.sentences_per_s
            for engine in ("torch", "onnx")
            if (cell := get(f"infinity-{engine}", "6", top)) is not None
        ),
        default=0,
    )
    if bf32 and fastest_infinity:
        ratios[f"m2d bf16/fastest infinity c={top}"] = bf32.sentences_per_s / fastest_infinity
    for server in ("m2d serve", "m2d onnx", "m2d bf16"):
        full = get(server, "6", top)
        for k in ("3", "1"):
            part = get(server, k, top)
            if full and part:
                ratios[f"{server} layers {k} / layers 6 c={top}"] = (
                    part.sentences_per_s / full.sentences_per_s
                )
    for k in ("6", "3", "1"):
        single = get("m2d serve", k, 1)
        if single and k in report["offline_p50_ms"]:
            ratios[f"m2d c=1 p50 / offline encode p50 (the same requests), layers {k}"] = (
                single.p50_ms / report["offline_p50_ms"][k]
            )
    shared, grouped = get("m2d shared", "1/3/6", 32), get("m2d grouped", "1/3/6", 32)
    if shared and grouped and grouped.sentences_per_s:
        ratios["mixed layers c=32: shared / grouped throughput"] = (
            shared.sentences_per_s / grouped.sentences_per_s
        )
    if args.rounds > 1:
        print(f"\nmedians of {args.rounds} rounds (sentences/s):")
        cells = sorted({(r.server, r.layers, r.concurrency) for r in results}, key=str)
        for server, layers, c in cells:
            values = [
                r.sentences_per_s
                for r in results
                if (r.server, r.layers, r.concurrency) == (server, layers, c)
            ]
            print(
                f"  {server:<16} layers {layers:<6} c={c:<3} {get(server, layers, c).sentences_per_s:7.1f}"
                f"  (rounds: {', '.join(f'{v:.1f}' for v in values)})"
            )
        report["medians"] = [asdict(get(*cell)) for cell in cells]
    print("\nratios:")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")
    report["ratios"] = ratios
    write_json(Path(args.out), report)


def write_json(out: Path, report: dict) -> None:
    save_results(out, report, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
