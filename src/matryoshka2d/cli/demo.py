"""``m2d demo`` (the seeds' experiment) and ``m2d report`` (redraw its report)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_report(args: argparse.Namespace) -> int:
    from matryoshka2d.demo.report import write_report

    path = write_report(args.results, args.out)
    print(f"wrote {path} and figures to {Path(args.out)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from matryoshka2d.demo.experiment import run_demo

    path = run_demo(Path(args.out), Path(args.work), base_model=args.model)
    print(f"wrote {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="the seeds' experiment: train 3 models, evaluate the grid, write a report"
    )
    p.add_argument("--out", default="reports/demo", help="report folder (results.json, REPORT.md, figures)")
    p.add_argument("--work", default="runs/demo", help="trained models, checkpoints and cached results")
    p.add_argument("--model", help="base model (default: the packaged all-MiniLM-L6-v2)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="regenerate REPORT.md and the figures from a demo results.json")
    p.add_argument("results", help="results.json written by the demo")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_report)
