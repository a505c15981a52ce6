"""``m2d train``: every training option from a YAML config and/or flags (see docs/TRAINING.md)."""

from __future__ import annotations

import argparse


def cmd_train(args: argparse.Namespace) -> int:
    from matryoshka2d.training.trainer import run_train

    return run_train(args)


def register(sub) -> None:
    from matryoshka2d.training.config import add_train_arguments

    p = sub.add_parser(
        "train",
        help="train a 2D Matryoshka model from a YAML config and/or flags (see docs/TRAINING.md)",
        description="Train a 2D Matryoshka model. Every option can be set in the --config YAML file or as a "
        "flag; flags override the file. Runs unchanged under torchrun / accelerate launch. The output folder "
        "must be new, empty or a previous result (replaced with --overwrite); a run resumes only its own "
        "checkpoints and locks its checkpoint folder.",
    )
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)
