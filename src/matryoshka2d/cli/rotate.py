"""``m2d rotate``: fit exit rotations on training sentences and save the rotated model.

The output folder is checked before the model is loaded (the safe-output rule of
:mod:`matryoshka2d.persistence`).
"""

from __future__ import annotations

import argparse

from matryoshka2d.cli.common import batch_parent, int_list, model_parent, overwrite_parent, positive_int


def cmd_rotate(args: argparse.Namespace) -> int:
    from matryoshka2d.data import read_texts
    from matryoshka2d.exit_rotations import fit_exit_rotations, sample_texts
    from matryoshka2d.model import EmbeddingModel
    from matryoshka2d.persistence import check_output_folder

    inputs = [args.model, *args.texts]
    check_output_folder(args.out, "model", overwrite=args.overwrite, inputs=inputs)
    texts: list[str] = []
    for path in args.texts:
        for column in args.column or [None]:
            texts += read_texts(path, column)
    texts = sample_texts(texts, args.max_texts)
    model = EmbeddingModel.load(args.model, dtype="float32")
    rotations = fit_exit_rotations(model, texts, args.layers, batch_size=args.batch_size, show_progress=True)
    model.set_exit_rotations({**model.exit_rotations, **rotations})
    metadata = {"exit_rotations": {"layers": sorted(rotations), "texts": len(texts), "fitted_on": args.texts}}
    model.save(args.out, metadata=metadata, overwrite=args.overwrite, inputs=args.texts)
    print(f"rotated layer exits {', '.join(map(str, sorted(rotations)))} (fitted on {len(texts)} texts)")
    print(f"saved to {args.out}")
    return 0


def register(sub) -> None:
    """The ``rotate`` subcommand."""
    p = sub.add_parser(
        "rotate",
        parents=[model_parent(), batch_parent(), overwrite_parent()],
        help="rotate the earlier layer exits so that their small dim prefixes keep more (no training)",
        description="Fit, for each layer exit before the last, the orthogonal rotation that puts its "
        "principal directions first (uncentred PCA of the exit's embeddings of TEXTS), and save the model "
        "with those rotations. Full-size cosines do not change; small dims of the earlier exits gain. Fit "
        "on training sentences, never on evaluation data.",
    )
    p.add_argument(
        "--texts",
        nargs="+",
        required=True,
        help="files of training sentences: .txt (one a line) or tsv/csv/jsonl/json/parquet tables",
    )
    p.add_argument(
        "--column",
        action="append",
        help="a text column of the table files (repeat for several, e.g. anchor, positive, negative; "
        "default: 'text' if present, else the first column)",
    )
    p.add_argument(
        "--layers",
        type=int_list,
        help="comma-separated layer exits to rotate (default: every exit but the last)",
    )
    p.add_argument(
        "--max-texts",
        type=positive_int,
        default=10_000,
        help="fit on at most this many distinct texts, a fixed random sample (default 10000)",
    )
    p.add_argument(
        "--out", required=True, help="output model folder: new or empty; an m2d model only with --overwrite"
    )
    p.set_defaults(func=cmd_rotate)
