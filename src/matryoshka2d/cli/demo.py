"""``m2d demo`` (the seeds' experiment) and ``m2d report`` (redraw its report).

Both write a report folder by the safe-output rule (:mod:`matryoshka2d.persistence`): a new or empty
folder, or a previous report with ``--overwrite``; never a folder holding other files or an input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matryoshka2d.cli.common import DTYPES, overwrite_parent, positive_int


def cmd_report(args: argparse.Namespace) -> int:
    from matryoshka2d.data import require_file
    from matryoshka2d.demo.report import load_results, write_report
    from matryoshka2d.persistence import atomic_directory, check_output_folder

    out = check_output_folder(args.out, "report", overwrite=args.overwrite, inputs=[args.results])
    load_results(require_file(args.results, "results file"))  # a clear error before anything is written
    with atomic_directory(out, "report", overwrite=args.overwrite, inputs=[args.results]) as tmp:
        write_report(args.results, tmp)
    print(f"wrote {out / 'REPORT.md'} and figures to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from matryoshka2d.demo.experiment import run_demo

    path = run_demo(
        Path(args.out),
        Path(args.work),
        base_model=args.model,
        overwrite=args.overwrite,
        speed_dtype=args.speed_dtype,
        common=None if args.epochs is None else {"epochs": args.epochs},
    )
    print(f"wrote {path}")
    return 0


def register(sub) -> None:
    overwrite = overwrite_parent()
    p = sub.add_parser(
        "demo",
        parents=[overwrite],
        help="the seeds' experiment: train 3 models, evaluate the grid, write a report",
    )
    p.add_argument("--out", default="reports/demo", help="report folder (results.json, REPORT.md, figures)")
    p.add_argument("--work", default="runs/demo", help="trained models, checkpoints and cached results")
    p.add_argument("--model", help="base model (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument(
        "--speed-dtype",
        choices=DTYPES,
        default="auto",
        help="what the speed measurement runs the layers in (default auto: bfloat16 on a CPU with native "
        "bf16, else float32); the quality grids are always float32",
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        help="epochs of every training run (default: the recipe's schedule, demo.experiment.COMMON; fewer is "
        "quicker and gives the lower figures of docs/RECIPE.md)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "report", parents=[overwrite], help="regenerate REPORT.md and the figures from a demo results.json"
    )
    p.add_argument("results", help="results.json written by the demo")
    p.add_argument("--out", required=True, help="output folder (new or empty, or a report with --overwrite)")
    p.set_defaults(func=cmd_report)
