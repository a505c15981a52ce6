"""Does OpenVINO pay? ONNX Runtime (float32, int8) against OpenVINO (f32, bf16) on the same cut ONNX graphs.

Issue 9 asked for OpenVINO "only if you measure that it pays". OpenVINO reads ONNX directly, so it is
measured on exactly the graphs the ONNX backend runs (``OnnxEncoder.graph_path(k)``: the first k layers,
built and cached on first use), with the same padded batches (the 2,552 distinct STSB test sentences,
sorted longest first, batch 32, tokenised once beforehand: this measures the runtimes, not the
tokenizer), 2 threads each, in one process, in rounds whose order rotates. OpenVINO: one stream,
``INFERENCE_NUM_THREADS`` = threads, latency hint, ``INFERENCE_PRECISION_HINT`` f32 or bf16 (bf16 runs
the matrix products in bfloat16 on CPUs with avx512_bf16 / AMX). ONNX Runtime: the backend's own
session settings (``OnnxEncoder.session``). Each variant's pooled output is compared with ONNX Runtime
float32 (smallest cosine over every batch).

OpenVINO is not a dependency of the project (it is measured not to pay on the machine of
docs/BENCHMARKS.md); to repeat the measurement::

    pip install openvino
    flock /tmp/m2d-heavy.lock python benchmarks/bench_openvino.py [--model minilm|mpnet] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, minilm_path, mpnet_path, save_results, sorted_feeds, stsb_sentences  # noqa: E402

from matryoshka2d.backends.onnx import OnnxEncoder  # noqa: E402
from matryoshka2d.export.onnx import exit_output_name  # noqa: E402
from matryoshka2d.pooling import pool_numpy  # noqa: E402
from matryoshka2d.truncation import truncate_dims  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def runners(model: Path, threads: int) -> tuple[dict, OnnxEncoder, list[int]]:
    """``{(variant, layers): feed -> hidden state}``: ONNX Runtime float32 / int8, OpenVINO f32 / bf16."""
    import openvino as ov

    fp32 = OnnxEncoder(model, threads=threads)
    int8 = OnnxEncoder(model, quantize="int8", threads=threads)
    layer_counts = [fp32.num_layers, fp32.num_layers // 2]
    core = ov.Core()
    out: dict = {}
    for k in layer_counts:
        name = exit_output_name(k)
        for label, encoder in (("onnxruntime float32", fp32), ("onnxruntime int8", int8)):
            session = encoder.session(k)
            out[(label, k)] = lambda feed, s=session, n=name: s.run([n], feed)[0]
        graph = core.read_model(str(fp32.graph_path(k)))
        for precision in ("f32", "bf16"):
            compiled = core.compile_model(
                graph,
                "CPU",
                {
                    "INFERENCE_PRECISION_HINT": precision,
                    "INFERENCE_NUM_THREADS": threads,
                    "NUM_STREAMS": 1,
                    "PERFORMANCE_HINT": "LATENCY",
                },
            )
            request, port = compiled.create_infer_request(), compiled.output(name)
            out[(f"openvino {precision}", k)] = lambda feed, r=request, p=port: np.asarray(r.infer(feed)[p])
    return out, fp32, layer_counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["minilm", "mpnet"], default="minilm")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N sentences")
    parser.add_argument("--out", default=None, help="default benchmarks/results/openvino-MODEL.json")
    args = parser.parse_args()
    try:
        import openvino  # noqa: F401
    except ImportError:
        sys.exit("bench_openvino.py needs OpenVINO, which the project does not install: pip install openvino")
    model = minilm_path() if args.model == "minilm" else mpnet_path()
    if model is None:
        sys.exit("all-mpnet-base-v2 is not available: see benchmarks/common.py")
    texts = stsb_sentences("test")[: args.limit]
    print(f"machine: {machine()}; {args.model}, {len(texts)} sentences, batch {args.batch_size}", flush=True)

    run, encoder, layer_counts = runners(model, args.threads)
    full = layer_counts[0]
    _, feeds = sorted_feeds(encoder, texts, args.batch_size)
    reference = {k: [run[("onnxruntime float32", k)](f) for f in feeds] for k in layer_counts}

    def pooled(hidden: np.ndarray, feed: dict) -> np.ndarray:
        emb = pool_numpy(np.asarray(hidden, dtype=np.float32), feed["attention_mask"], encoder.pooling_mode)
        return truncate_dims(emb, None, normalize=True)

    min_cosine = {}
    for (label, k), fn in run.items():  # also the warm-up of every variant
        cos = [
            float((pooled(fn(f), f) * pooled(ref, f)).sum(axis=1).min())
            for f, ref in zip(feeds, reference[k])
        ]
        min_cosine[f"{label} @ {k}"] = min(cos)
        print(f"  {label} at {k} layers: smallest cosine to onnxruntime float32 {min(cos):.5f}", flush=True)

    rates: dict[str, list[float]] = {f"{label} @ {k}": [] for label, k in run}
    keys = list(run)
    for round_ in range(args.rounds):
        shift = round_ % len(keys)
        for label, k in keys[shift:] + keys[:shift]:
            fn = run[(label, k)]
            start = time.perf_counter()
            for feed in feeds:
                fn(feed)
            rates[f"{label} @ {k}"].append(len(texts) / (time.perf_counter() - start))

    print(f"\nsentences/s (median of {args.rounds} rounds; ratios within a round, then the median):")
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "model": args.model,
        "sentences": len(texts),
        "rounds": args.rounds,
        "rates": rates,
        "min_cosine_to_onnxruntime_float32": min_cosine,
        "ratios": {},
    }

    def ratio(a: str, b: str) -> float:
        values = [x / y for x, y in zip(rates[a], rates[b])]
        report["ratios"][f"{a} / {b}"] = values
        return statistics.median(values)

    for k in layer_counts:
        base = f"onnxruntime float32 @ {k}"
        for label in ("onnxruntime float32", "onnxruntime int8", "openvino f32", "openvino bf16"):
            key = f"{label} @ {k}"
            line = f"  {label:20s} {k:2d} layers: {statistics.median(rates[key]):7.0f}"
            if key != base:
                line += f"   {ratio(key, base):.2f}x onnxruntime float32"
            if label == "openvino bf16":
                line += f", {ratio(key, f'onnxruntime int8 @ {k}'):.2f}x onnxruntime int8"
            print(line)
    for label in ("onnxruntime float32", "onnxruntime int8", "openvino f32", "openvino bf16"):
        half = ratio(f"{label} @ {layer_counts[1]}", f"{label} @ {full}")
        print(f"  {label}: {layer_counts[1]} of {full} layers {half:.2f}x its full depth")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"openvino-{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_results(out, report)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
