"""``m2d encode``, ``m2d eval-sts`` and ``m2d truncate``: one model, one (layers, dim) cell or the grid."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np

from matryoshka2d.cli.common import batch_parent, cell_parent, grid_parent, model_parent
from matryoshka2d.errors import InvalidInputError
from matryoshka2d.persistence import atomic_write


def cmd_encode(args: argparse.Namespace) -> int:
    from matryoshka2d.data import read_texts
    from matryoshka2d.model import EmbeddingModel

    out = Path(args.out)
    if out.is_dir():  # refuse before spending the encoding time
        raise InvalidInputError(f"--out {out} is a folder: give the path of the .npy file to write")
    texts = read_texts(args.input, column=args.column)
    model = EmbeddingModel.load(args.model)
    emb = model.encode(
        texts, layers=args.layers, dim=args.dim, batch_size=args.batch_size, show_progress=True
    )
    buffer = io.BytesIO()
    np.save(buffer, emb)
    atomic_write(out, buffer.getvalue())
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {out}")
    return 0


def cmd_eval_sts(args: argparse.Namespace) -> int:
    from matryoshka2d.data import load_sts
    from matryoshka2d.evaluation import evaluate_sts
    from matryoshka2d.model import EmbeddingModel

    data = load_sts(args.data)  # validate the data before loading the model
    model = EmbeddingModel.load(args.model)
    result = evaluate_sts(model, data, args.layers, args.dims, batch_size=args.batch_size, show_progress=True)
    print(f"STS Spearman x 100 — {args.model} on {args.data} ({len(data)} pairs)")
    print(result.table())
    if args.json:
        out = Path(args.json)
        atomic_write(out, json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def cmd_truncate(args: argparse.Namespace) -> int:
    from matryoshka2d.model import EmbeddingModel

    model = EmbeddingModel.load(args.model)
    small = model.truncate(layers=args.layers, dim=args.dim)
    small.save(args.out)
    print(f"saved {small.num_layers} layers x {small.dim} dims to {args.out}")
    print(f"(from {model.num_layers} layers x {model.dim} dims)")
    return 0


def register(sub) -> None:
    model, batch = model_parent(), batch_parent()

    p = sub.add_parser(
        "encode",
        parents=[model, cell_parent(), batch],
        help="embed texts at a chosen (layers, dim) into a .npy file",
    )
    p.add_argument("--input", required=True, help="one text a line (.txt) or a tsv/csv/jsonl/parquet file")
    p.add_argument("--column", help="column to read from a table file (default: 'text' or the first column)")
    p.add_argument("--out", required=True, help="output .npy file")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser(
        "eval-sts", parents=[model, grid_parent(), batch], help="STS Spearman over the layers x dims grid"
    )
    p.add_argument("--data", required=True, help="tsv/csv/jsonl with columns sentence1, sentence2, score")
    p.add_argument("--json", help="write the grid as JSON to this file")
    p.set_defaults(func=cmd_eval_sts)

    p = sub.add_parser(
        "truncate",
        parents=[model, cell_parent()],
        help="export a smaller standalone model (first K layers, first D dims)",
    )
    p.add_argument("--out", required=True, help="output folder (sentence-transformers layout)")
    p.set_defaults(func=cmd_truncate)
