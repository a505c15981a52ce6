"""``m2d embed-corpus``: encode a corpus into Parquet shards for several (layers, dim) cells, resumably."""

from __future__ import annotations

import argparse

from matryoshka2d.cli.common import (
    batch_parent,
    int_list,
    model_parent,
    positive_int,
    prompt_parent,
    runtime_parent,
)


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def cmd_embed_corpus(args: argparse.Namespace) -> int:
    from matryoshka2d.corpus import embed_corpus

    result = embed_corpus(
        args.model,
        args.input,
        args.out,
        layers=args.layers,
        dims=args.dims,
        text_column=args.text_column,
        id_column=args.id_column,
        shard_rows=args.shard_rows,
        batch_size=args.batch_size,
        engine=args.engine,
        ray_address=args.ray_address,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        max_shards=args.max_shards,
        prompt_name=args.prompt_name,
        prompt=args.prompt,
        runtime=args.runtime,
        dtype=args.dtype,
        compile=args.compile,
    )
    cells = ", ".join(f"{c['layers']}x{c['dim']}" for c in result.manifest["cells"])
    state = "finished" if result.complete else "stopped early"
    print(f"{state}: {result.rows} rows in {result.shards} shards, cells (layers x dim) {cells}")
    print(f"output: {result.out}")
    print(
        f"this run: encoded {result.encoded_shards} shard(s), {result.encoded_rows} rows in "
        f"{result.seconds:.1f} s ({result.rows_per_second:.0f} rows/s, engine {result.engine}, "
        f"{result.manifest['model']['runtime']} {result.manifest['model']['precision']}"
        f"{' compiled' if result.manifest['model'].get('compiled') else ''}); "
        f"kept {result.skipped_shards} finished shard(s)"
    )
    if not result.complete:
        print("run the same command again to continue")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "embed-corpus",
        parents=[model_parent(), batch_parent(), prompt_parent("every text", "document"), runtime_parent()],
        help="encode a corpus into Parquet shards per (layers, dim), resumable, locally or on Ray",
        description=(
            "One pass over the inputs writes, for every (layers, dim) cell, Parquet shards of "
            "(id, embedding) plus manifest.json. Re-running the same command resumes: intact shards "
            "are kept, missing or damaged ones are redone."
        ),
    )
    p.add_argument(
        "--input",
        required=True,
        action="append",
        help="a .txt/.jsonl/.csv/.tsv/.parquet file, a glob (quote it) or a folder; repeat for more",
    )
    p.add_argument("--out", required=True, help="output folder (new, empty, or holding this same job)")
    p.add_argument("--layers", type=int_list, help="comma-separated layer counts (default: all layers)")
    p.add_argument("--dims", type=int_list, help="comma-separated embedding sizes (default: full)")
    p.add_argument("--text-column", help="text column of table files (default: 'text' or the first column)")
    p.add_argument("--id-column", help="id column of table files (default: ids are row numbers 0, 1, ...)")
    p.add_argument("--shard-rows", type=positive_int, default=10_000, help="rows per shard (default 10000)")
    p.add_argument(
        "--engine", choices=("local", "ray"), default="local", help="where to encode (default local)"
    )
    p.add_argument(
        "--ray-address",
        help="Ray cluster to join ('auto': the running one; ray://host:10001); default: start a local Ray",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        help="local: batches encoded at once, each with the cores divided among them (default 1; on 2 "
        "cores 2 encoded 1.26x the rows in bfloat16); ray: actors, one model each (default: "
        "cluster CPUs / cpus-per-worker)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=positive_float,
        default=1.0,
        help="CPUs (torch or ONNX Runtime threads) per Ray actor (default 1)",
    )
    p.add_argument(
        "--max-shards", type=positive_int, help="encode at most this many shards now, then stop (resumable)"
    )
    p.set_defaults(func=cmd_embed_corpus)
