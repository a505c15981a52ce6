"""Memory and disk of the ONNX backend's graph per layer count: one shared data file vs a copy per graph.

``OnnxEncoder`` builds one ONNX Runtime session per layer count (``layers=k`` runs only k layers). The cached
graph of all layers keeps its weights in ``model.onnx_data`` and every cut graph refers to that file, which
ONNX Runtime maps into memory: the sessions share its pages. "own weights" is the layout before: each cut
graph holding a copy of the weights it uses (the word embeddings in every one of them). Each variant runs
in a fresh subprocess that builds the sessions of every layer count of all-MiniLM-L6-v2 (float32 and
int8), encodes with each of them, and reports its memory (RSS, and PSS: shared pages split between the
processes that map them, here one) before and after; both variants must give the same embeddings. The
second table is the disk: the cache as built against the same graphs cut with their own weights.

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
import json, shutil, sys
from pathlib import Path
import psutil
import matryoshka2d.backends.onnx as onnx_backend
from matryoshka2d.export.onnx import external_data_path, extract_exits

model, quantize, mode, cache = sys.argv[1:5]
if mode == "own weights":  # cut from a copy in another folder: each cut graph holds its own weights
    def cut_with_own_weights(source, layers, path):
        copy = Path(cache) / "elsewhere" / Path(source).name
        if not copy.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(external_data_path(source), external_data_path(copy))
            shutil.copy(source, copy)
        return extract_exits(copy, layers, path)
    onnx_backend.extract_exits = cut_with_own_weights
encoder = onnx_backend.OnnxEncoder(model, quantize=quantize or None, threads=1, cache_dir=cache)
encoder._full_graph()
process = psutil.Process()
before = process.memory_full_info()
texts = json.loads(sys.stdin.read())
emb = {k: encoder.encode(texts, layers=k).tolist() for k in range(1, encoder.num_layers + 1)}
after = process.memory_full_info()
sizes = {p.name: p.stat().st_size for p in encoder.cache.iterdir() if p.is_file()}
print(json.dumps({"before": [before.rss, before.pss], "after": [after.rss, after.pss],
                  "layers": encoder.num_layers, "emb": emb, "sizes": sizes}))
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


def disk(sizes: dict[str, int], quantize: str) -> float:
    """MiB of the graphs of one precision in a cache folder (the graph of all layers, its data, the cuts)."""
    int8 = [n for n in sizes if "qint8" in n]
    names = int8 if quantize else [n for n in sizes if n not in int8]
    return sum(sizes[n] for n in names) / 2**20


def main() -> None:
    header("ONNX backend memory and disk: one data file shared by every layer count's graph vs a copy each")
    model = str(minilm_path())
    texts = stsb_sentences()[:64]
    print("| graphs | variant | RSS before the sessions (MiB) | after all of them | PSS after | disk (MiB) |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for quantize in ("", "int8"):
        rows = {}
        for mode in ("own weights", "one data file"):
            with tempfile.TemporaryDirectory() as cache:
                run(model, quantize, mode, cache, texts[:1])  # export / quantise / cut into the cache first
                rows[mode] = run(model, quantize, mode, cache, texts)
        shared, own = rows["one data file"], rows["own weights"]
        diff = max(
            float(np.abs(np.array(shared["emb"][k]) - np.array(own["emb"][k])).max()) for k in own["emb"]
        )
        for mode, r in rows.items():
            graphs = f"{quantize or 'float32'}, 1..{r['layers']} layers"
            print(
                f"| {graphs} | {mode} | {r['before'][0] / 2**20:.0f} | {r['after'][0] / 2**20:.0f} | "
                f"{r['after'][1] / 2**20:.0f} | {disk(r['sizes'], quantize):.0f} |"
            )
        ratios.append(
            f"{quantize or 'float32'}: RSS {shared['after'][0] / own['after'][0]:.2f}, "
            f"PSS {shared['after'][1] / own['after'][1]:.2f}, "
            f"disk {disk(shared['sizes'], quantize) / disk(own['sizes'], quantize):.2f}; "
            f"max abs difference of the embeddings {diff:.1e}"
        )
    print()
    print("one data file / own weights (after all sessions):")
    for line in ratios:
        print("  " + line)


if __name__ == "__main__":
    main()
