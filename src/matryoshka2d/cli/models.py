"""``m2d encode`` and ``m2d eval-sts``: one model, one (layers, dim) cell or the grid.

(``m2d truncate`` is an alias of ``m2d export``: :mod:`matryoshka2d.cli.export`.)

Every output path is checked before the model is loaded (:mod:`matryoshka2d.persistence`'s safe-output
rule): an existing result is replaced only with ``--overwrite``, an input never.
"""

from __future__ import annotations

import argparse
import io
import json

import numpy as np

from matryoshka2d.cli.common import (
    batch_parent,
    cell_parent,
    grid_parent,
    load_runtime,
    model_parent,
    overwrite_parent,
    prompt_parent,
    runtime_note,
    runtime_parent,
    workers_parent,
)
from matryoshka2d.persistence import (
    atomic_write,
    check_output_file,
    is_npy_file,
    json_with_keys,
)

#: What an ``eval-sts --json`` file holds (an existing file is replaced only if it has these keys).
STS_JSON_KEYS = ("model", "layers", "dims", "spearman")


def cmd_encode(args: argparse.Namespace) -> int:
    from matryoshka2d.data import read_texts

    write = {"overwrite": args.overwrite, "inputs": [args.input, args.model], "recognize": is_npy_file}
    out = check_output_file(args.out, "embeddings", **write)  # refuse before spending the encoding time
    texts = read_texts(args.input, column=args.column)
    model = load_runtime(args)
    emb = model.encode(
        texts,
        layers=args.layers,
        dim=args.dim,
        batch_size=args.batch_size,
        show_progress=True,
        prompt_name=args.prompt_name,
        prompt=args.prompt,
        workers=args.workers,
    )
    buffer = io.BytesIO()
    np.save(buffer, emb)
    atomic_write(out, buffer.getvalue(), "embeddings", **write)
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {out} ({runtime_note(model)})")
    return 0


def cmd_eval_sts(args: argparse.Namespace) -> int:
    from matryoshka2d.data import load_sts
    from matryoshka2d.evaluation import evaluate_sts

    write = {
        "overwrite": args.overwrite,
        "inputs": [args.data, args.model],
        "recognize": json_with_keys(*STS_JSON_KEYS),
    }
    if args.json:
        check_output_file(args.json, "eval-sts JSON", **write)  # refuse before the work
    data = load_sts(args.data)  # validate the data before loading the model
    model = load_runtime(args)
    result = evaluate_sts(
        model,
        data,
        args.layers,
        args.dims,
        batch_size=args.batch_size,
        show_progress=True,
        workers=args.workers,
    )
    print(f"STS Spearman x 100 — {args.model} ({runtime_note(model)}) on {args.data} ({len(data)} pairs)")
    print(result.table())
    if args.json:
        record = {**result.to_dict(), "backend": model.backend, "dtype": model.precision}
        out = atomic_write(args.json, json.dumps(record, indent=2) + "\n", "eval-sts JSON", **write)
        print(f"wrote {out}")
    return 0


def register(sub) -> None:
    model, batch, overwrite, runtime = model_parent(), batch_parent(), overwrite_parent(), runtime_parent()

    p = sub.add_parser(
        "encode",
        parents=[model, cell_parent(), batch, runtime, workers_parent(), overwrite, prompt_parent()],
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
        parents=[model, grid_parent(), batch, runtime, workers_parent(), overwrite],
        help="STS Spearman over the layers x dims grid",
    )
    p.add_argument("--data", required=True, help="tsv/csv/jsonl with columns sentence1, sentence2, score")
    p.add_argument("--json", help="write the grid as JSON to this file (an existing one: --overwrite)")
    p.set_defaults(func=cmd_eval_sts)
