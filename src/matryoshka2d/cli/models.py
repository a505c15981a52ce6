"""``m2d encode``, ``m2d eval-sts`` and ``m2d truncate``: one model, one (layers, dim) cell or the grid.

Every output path is checked before the model is loaded (:mod:`matryoshka2d.persistence`'s safe-output
rule): an existing result is replaced only with ``--overwrite``, an input never.
"""

from __future__ import annotations

import argparse
import io
import json

import numpy as np

from matryoshka2d.cli.common import batch_parent, cell_parent, grid_parent, model_parent, overwrite_parent
from matryoshka2d.persistence import (
    atomic_write,
    check_output_file,
    check_output_folder,
    is_npy_file,
    json_with_keys,
)

#: What an ``eval-sts --json`` file holds (an existing file is replaced only if it has these keys).
STS_JSON_KEYS = ("model", "layers", "dims", "spearman")


def cmd_encode(args: argparse.Namespace) -> int:
    from matryoshka2d.data import read_texts
    from matryoshka2d.model import EmbeddingModel

    write = {"overwrite": args.overwrite, "inputs": [args.input, args.model], "recognize": is_npy_file}
    out = check_output_file(args.out, "embeddings", **write)  # refuse before spending the encoding time
    texts = read_texts(args.input, column=args.column)
    model = EmbeddingModel.load(args.model)
    emb = model.encode(
        texts, layers=args.layers, dim=args.dim, batch_size=args.batch_size, show_progress=True
    )
    buffer = io.BytesIO()
    np.save(buffer, emb)
    atomic_write(out, buffer.getvalue(), "embeddings", **write)
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {out}")
    return 0


def cmd_eval_sts(args: argparse.Namespace) -> int:
    from matryoshka2d.data import load_sts
    from matryoshka2d.evaluation import evaluate_sts
    from matryoshka2d.model import EmbeddingModel

    write = {
        "overwrite": args.overwrite,
        "inputs": [args.data, args.model],
        "recognize": json_with_keys(*STS_JSON_KEYS),
    }
    if args.json:
        check_output_file(args.json, "eval-sts JSON", **write)  # refuse before the work
    data = load_sts(args.data)  # validate the data before loading the model
    model = EmbeddingModel.load(args.model)
    result = evaluate_sts(model, data, args.layers, args.dims, batch_size=args.batch_size, show_progress=True)
    print(f"STS Spearman x 100 — {args.model} on {args.data} ({len(data)} pairs)")
    print(result.table())
    if args.json:
        out = atomic_write(args.json, json.dumps(result.to_dict(), indent=2) + "\n", "eval-sts JSON", **write)
        print(f"wrote {out}")
    return 0


def cmd_truncate(args: argparse.Namespace) -> int:
    from matryoshka2d.model import EmbeddingModel

    check_output_folder(args.out, "model", overwrite=args.overwrite, inputs=[args.model])
    model = EmbeddingModel.load(args.model)
    small = model.truncate(layers=args.layers, dim=args.dim)
    small.save(args.out, overwrite=args.overwrite, inputs=[args.model])
    print(f"saved {small.num_layers} layers x {small.dim} dims to {args.out}")
    print(f"(from {model.num_layers} layers x {model.dim} dims)")
    return 0


def register(sub) -> None:
    model, batch, overwrite = model_parent(), batch_parent(), overwrite_parent()

    p = sub.add_parser(
        "encode",
        parents=[model, cell_parent(), batch, overwrite],
        help="embed texts at a chosen (layers, dim) into a .npy file",
    )
    p.add_argument(
        "--input",
        required=True,
        help="one text a line (.txt: row i = line i; a blank line is an error naming it) or a "
        "tsv/csv/jsonl/json/parquet file",
    )
    p.add_argument("--column", help="column to read from a table file (default: 'text' or the first column)")
    p.add_argument("--out", required=True, help="output .npy file (an existing one only with --overwrite)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser(
        "eval-sts",
        parents=[model, grid_parent(), batch, overwrite],
        help="STS Spearman over the layers x dims grid",
    )
    p.add_argument("--data", required=True, help="tsv/csv/jsonl with columns sentence1, sentence2, score")
    p.add_argument("--json", help="write the grid as JSON to this file (an existing one: --overwrite)")
    p.set_defaults(func=cmd_eval_sts)

    p = sub.add_parser(
        "truncate",
        parents=[model, cell_parent(), overwrite],
        help="export a smaller standalone model (first K layers, first D dims)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder (sentence-transformers layout): new or empty; a model written by m2d only "
        "with --overwrite",
    )
    p.set_defaults(func=cmd_truncate)
