"""Training-step speed of the 2D Matryoshka loss: ours vs the plain loss vs sentence-transformers.

One process, one shared batch sequence, variants run side by side (round-robin, rotating the order every
step so no variant always runs first). Each variant owns a copy of the model and an AdamW optimiser and
times forward + backward + optimiser step (tokenisation is done up front, outside the timing).

Variants (all on SNLI triplets with MultipleNegativesRankingLoss as the base loss):

* ``ours plain MNRL``: the last layer only.
* ``ours 2D (2DMSE)``: Matryoshka2dLoss, one sampled prior layer and one sampled dim per layer.
* ``ours 2D (all)``: Matryoshka2dLoss.all_pairs, every layer at every dim each step.
* ``ST 2D (2DMSE)`` / ``ST 2D (all)``: sentence-transformers' Matryoshka2dLoss with the same settings,
  on its own SentenceTransformer model and forward.
* ``ST plain MNRL``: sentence-transformers' plain loss, for reference.

Our 2D variants use ``include_embedding_layer=True`` so that they sample from the same prior layers as
sentence-transformers (it makes no difference to the cost of one sampled layer).

Targets (issue 3): ``ours 2D (2DMSE)`` costs at most 10% more per step than ``ours plain MNRL``, and is at
least as fast as ``ST 2D (2DMSE)``.

Usage::

    flock /tmp/m2d-heavy.lock python benchmarks/bench_train_step.py [--steps 20] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import header, minilm_path

from matryoshka2d import EmbeddingModel
from matryoshka2d.data import data_dir, read_rows, require_columns
from matryoshka2d.losses import Matryoshka2dLoss, MultipleNegativesRankingLoss

DIMS = [384, 256, 128, 64, 32]
COLUMNS = ["anchor", "positive", "negative"]


@dataclass
class Variant:
    name: str
    step: object  # callable(batch_index) -> float loss
    times: list[float] = field(default_factory=list)


def ours(model_path: Path, loss, batches: list[list[list[str]]], lr: float) -> object:
    """A train step of our model + loss: one forward per column returning the layers the loss asks for."""
    model = EmbeddingModel.load(model_path).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    features = [[model.tokenize(column) for column in batch] for batch in batches]

    def step(i: int) -> float:
        layers = loss.layers_for_step(model.num_layers)
        outputs = [model(f, layers=layers) for f in features[i]]
        value = loss(outputs, None)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value.item()

    return step


def sentence_transformers_step(
    model_path: Path, make_loss, batches: list[list[list[str]]], lr: float
) -> object:
    """A train step of sentence-transformers' model + loss (its own forward, its own column handling)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path), device="cpu").train()
    loss = make_loss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    features = [[model.preprocess(column) for column in batch] for batch in batches]

    def step(i: int) -> float:
        value = loss([dict(f) for f in features[i]], None)  # fresh dicts: the loss writes into them
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value.item()

    return step


def loss_alone(loss, batch: int, hidden: int = 384, num_layers: int = 6, repeats: int = 50) -> float:
    """Median seconds of layers_for_step + loss forward + backward on fixed random embeddings (no model)."""
    outputs = [
        {k: torch.randn(batch, hidden, requires_grad=True) for k in range(num_layers + 1)} for _ in COLUMNS
    ]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        layers = loss.layers_for_step(num_layers)
        loss([{k: out[k] for k in layers} for out in outputs], None).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--model", type=Path, default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument(
        "--data", type=Path, default=None, help="default: <data_dir>/snli/triplet-validation.tsv"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-st", action="store_true", help="skip the sentence-transformers variants")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = args.model or minilm_path()
    data_path = args.data or data_dir() / "snli" / "triplet-validation.tsv"

    rows = read_rows(data_path)
    require_columns(rows, COLUMNS, data_path)
    random.Random(0).shuffle(rows)
    n_batches = args.warmup + args.steps
    if len(rows) < n_batches * args.batch_size:
        sys.exit(f"{data_path} has {len(rows)} rows, fewer than {n_batches} batches of {args.batch_size}")
    batches = [
        [[str(r[c]) for r in rows[i * args.batch_size : (i + 1) * args.batch_size]] for c in COLUMNS]
        for i in range(n_batches)
    ]

    header("Training step: 2D Matryoshka loss vs plain loss vs sentence-transformers")
    print(f"model: {model_path}")
    print(f"data: {data_path} ({len(rows)} triplets), batch {args.batch_size}, dims {DIMS}")
    print(f"steps: {args.warmup} warm-up + {args.steps} timed per variant, round-robin, AdamW lr {args.lr}")

    torch.manual_seed(0)
    random.seed(0)
    mnrl = MultipleNegativesRankingLoss()
    our_losses = {
        "ours plain MNRL": mnrl,
        "ours 2D (2DMSE)": Matryoshka2dLoss(mnrl, DIMS, include_embedding_layer=True),
        "ours 2D (all)": Matryoshka2dLoss.all_pairs(mnrl, DIMS, include_embedding_layer=True),
    }
    variants = [Variant(name, ours(model_path, loss, batches, args.lr)) for name, loss in our_losses.items()]
    if not args.no_st:
        from sentence_transformers import __version__ as st_version
        from sentence_transformers.sentence_transformer import losses as st

        print(f"sentence-transformers {st_version}")
        variants += [
            Variant(
                "ST 2D (2DMSE)",
                sentence_transformers_step(
                    model_path,
                    lambda m: st.Matryoshka2dLoss(m, st.MultipleNegativesRankingLoss(m), DIMS),
                    batches,
                    args.lr,
                ),
            ),
            Variant(
                "ST 2D (all)",
                sentence_transformers_step(
                    model_path,
                    lambda m: st.Matryoshka2dLoss(
                        m, st.MultipleNegativesRankingLoss(m), DIMS, n_layers_per_step=-1, n_dims_per_step=-1
                    ),
                    batches,
                    args.lr,
                ),
            ),
            Variant(
                "ST plain MNRL",
                sentence_transformers_step(model_path, st.MultipleNegativesRankingLoss, batches, args.lr),
            ),
        ]

    for i in range(n_batches):
        shift = i % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            start = time.perf_counter()
            variant.step(i)
            if i >= args.warmup:
                variant.times.append(time.perf_counter() - start)
        if i >= args.warmup:
            print(f"\r  step {i - args.warmup + 1}/{args.steps}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    median = {v.name: statistics.median(v.times) for v in variants}
    base = median["ours plain MNRL"]
    print("\n| variant | median s/step | min s/step | mean s/step | steps/s (median) | vs ours plain |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        m = median[v.name]
        print(
            f"| {v.name} | {m:.3f} | {min(v.times):.3f} | {statistics.mean(v.times):.3f} | {1 / m:.3f} "
            f"| {m / base:.3f}x |"
        )
    ratios = [
        ("ours 2D (2DMSE) / ours plain MNRL", "ours 2D (2DMSE)", "ours plain MNRL", "<= 1.10"),
        ("ours 2D (all)   / ours plain MNRL", "ours 2D (all)", "ours plain MNRL", ""),
    ]
    if not args.no_st:
        ratios += [
            ("ours 2D (2DMSE) / ST 2D (2DMSE)  ", "ours 2D (2DMSE)", "ST 2D (2DMSE)", "<= 1.00"),
            ("ours 2D (all)   / ST 2D (all)    ", "ours 2D (all)", "ST 2D (all)", "<= 1.00"),
        ]
    variants_by_name = {v.name: v for v in variants}
    print()
    for label, a, b, target in ratios:
        by_min = min(variants_by_name[a].times) / min(variants_by_name[b].times)
        goal = f", target {target}" if target else ""
        print(f"{label}: {median[a] / median[b]:.3f}x median time per step ({by_min:.3f}x by min{goal})")

    print(
        f"\nThe loss alone (no model): forward + backward on fixed {len(COLUMNS)} x {args.batch_size} x 384"
    )
    print("embeddings of 7 layers, median of 50 calls, and its share of the median training step:")
    for name, loss in our_losses.items():
        seconds = loss_alone(loss, args.batch_size)
        print(f"  {name:<16} {seconds * 1000:7.2f} ms  ({seconds / median[name]:.2%} of a step)")


if __name__ == "__main__":
    main()
