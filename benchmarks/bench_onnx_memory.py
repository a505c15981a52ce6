"""Memory of the ONNX backend with a graph per layer count: one shared set of weights vs a copy per graph.

``OnnxEncoder`` builds one ONNX Runtime session per layer count (``layers=k`` runs only k layers), and each
cut graph stores the weights it uses, the word embeddings included. The backend hands every session the
same weights (``SessionOptions.add_initializer`` with one ``OrtValue`` per weight, read once from the graph
of all layers). This script measures what that saves: each variant runs in a fresh subprocess that builds
the graphs of every layer count of all-MiniLM-L6-v2 (float32 and int8) and reports its resident memory
before and after, and checks that both give the same embeddings. "per graph" is the backend with the
sharing switched off (no shared weights handed to the sessions), i.e. what it did before.

    python benchmarks/bench_onnx_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
from common import header, minilm_path, stsb_sentences  # noqa: E402

CHILD = r"""
import json, sys
import numpy as np
import psutil
import matryoshka2d.backends.onnx as onnx_backend

model, quantize, mode, cache = sys.argv[1:5]
if mode == "per graph":
    onnx_backend.OnnxEncoder._shared_weights = lambda self: {}  # every session keeps its own file's weights
encoder = onnx_backend.OnnxEncoder(model, quantize=quantize or None, threads=1, cache_dir=cache)
encoder._full_graph()  # already in the cache (the parent's first run exported / quantised it)
process = psutil.Process()
before = process.memory_info().rss
encoder.warm_up()  # a session for every layer count
after = process.memory_info().rss
texts = json.loads(sys.stdin.read())
emb = {k: encoder.encode(texts, layers=k).tolist() for k in (1, 3, encoder.num_layers)}
print(json.dumps({"before": before, "after": after, "layers": encoder.num_layers, "emb": emb}))
"""


def run(model: str, quantize: str, mode: str, cache: str, texts: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, model, quantize, mode, cache],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    header("ONNX backend memory: shared weights vs a copy per layer-count graph")
    model = str(minilm_path())
    texts = stsb_sentences()[:64]
    columns = ["graphs", "variant", "RSS before the sessions (MiB)", "after all of them", "growth"]
    print("| " + " | ".join([*columns, "after: shared / per graph"]) + " |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        for quantize in ("", "int8"):
            run(model, quantize, "per graph", cache, texts[:1])  # export / quantise into the cache first
            rows = {mode: run(model, quantize, mode, cache, texts) for mode in ("per graph", "shared")}
            shared, own = rows["shared"]["emb"], rows["per graph"]["emb"]
            diff = max(float(np.abs(np.array(shared[k]) - np.array(own[k])).max()) for k in shared)
            growth = {mode: (r["after"] - r["before"]) / 2**20 for mode, r in rows.items()}
            for mode, r in rows.items():
                ratio = f"{r['after'] / rows['per graph']['after']:.2f}" if mode == "shared" else ""
                before, after = r["before"] / 2**20, r["after"] / 2**20
                graphs = f"{quantize or 'float32'}, 1..{r['layers']} layers"
                print(f"| {graphs} | {mode} | {before:.0f} | {after:.0f} | {growth[mode]:.0f} | {ratio} |")
            print(f"|  | max abs difference of the embeddings, shared vs per graph: {diff:.1e} | | | | |")


if __name__ == "__main__":
    main()
