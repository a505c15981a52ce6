"""The ``m2d`` command line.

Each subcommand is one small function. Errors a user can cause (:class:`Matryoshka2dError`) are printed
as one line on stderr and exit with code 2, like argparse's own usage errors; no traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from matryoshka2d.errors import InvalidInputError, Matryoshka2dError
from matryoshka2d.persistence import atomic_write


def int_list(text: str) -> list[int]:
    """Parse ``"1,2,3"`` into ``[1, 2, 3]``."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


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


def cmd_report(args: argparse.Namespace) -> int:
    from matryoshka2d.report import write_report

    path = write_report(args.results, args.out)
    print(f"wrote {path} and figures to {Path(args.out)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from matryoshka2d.demo import run_demo

    path = run_demo(Path(args.out), Path(args.work), base_model=args.model)
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------- search and retrieval
def model_reference(name: str) -> str:
    """An absolute path for a local model folder (so an index works from any directory), else the hub id."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def cmd_index_build(args: argparse.Namespace) -> int:
    from matryoshka2d.data import read_corpus
    from matryoshka2d.model import EmbeddingModel
    from matryoshka2d.search import SearchIndex

    texts, ids = read_corpus(args.corpus, args.column, args.id_column)  # validate before loading the model
    model = EmbeddingModel.load(model_reference(args.model))
    index = SearchIndex.from_model(
        model,
        texts,
        ids,
        shortlist_dim=args.shortlist_dim,
        layers=args.layers,
        batch_size=args.batch_size,
        store_texts=not args.no_texts,
        index=args.index,
        quantization=args.quantization,
    )
    index.save(args.out)
    c = index.shortlist
    print(f"indexed {len(index)} documents ({index.dim} dims) in {args.out}")
    print(f"shortlist: first {c.dim} dims, {c.index} index, {c.quantization} codes")
    return 0


def cmd_index_add(args: argparse.Namespace) -> int:
    from matryoshka2d.data import read_corpus
    from matryoshka2d.model import EmbeddingModel
    from matryoshka2d.search import SearchIndex

    index = SearchIndex.load(args.index_dir)
    texts, ids = read_corpus(args.corpus, args.column, args.id_column)
    model = EmbeddingModel.load(args.model or index_model(index))
    index.add_texts(model, texts, ids, batch_size=args.batch_size)
    index.save(args.index_dir)
    print(f"added {len(texts)} documents to {args.index_dir} (now {len(index)})")
    return 0


def index_model(index) -> str:
    from matryoshka2d.errors import InvalidInputError

    if not index.model:
        raise InvalidInputError("the index records no model (it was built from embeddings): pass --model")
    return index.model


def cmd_search(args: argparse.Namespace) -> int:
    from matryoshka2d.data import read_texts
    from matryoshka2d.errors import InvalidInputError
    from matryoshka2d.model import EmbeddingModel
    from matryoshka2d.search import SearchIndex

    if bool(args.query) == bool(args.queries):
        raise InvalidInputError("give the queries either with --query (repeatable) or with --queries FILE")
    queries = args.query or read_texts(args.queries, column=args.column)
    index = SearchIndex.load(args.index_dir)
    model = EmbeddingModel.load(args.model or index_model(index))
    result = index.search_texts(
        model, queries, k=args.k, shortlist=args.shortlist, batch_size=args.batch_size
    )
    hits = []
    for i, query in enumerate(queries):
        texts = result.texts[i] if result.texts is not None else [None] * len(result.ids[i])
        rows = zip(result.ids[i], result.scores[i].tolist(), texts, strict=False)
        hits.append({"query": query, "hits": [{"id": d, "score": s, "text": t} for d, s, t in rows]})
    for entry in hits:
        print(f"query: {entry['query']}")
        for rank, hit in enumerate(entry["hits"], 1):
            print(f"{rank:>4}  {hit['score']:.4f}  {hit['id']}" + (f"  {hit['text']}" if hit["text"] else ""))
    if args.json:
        text = json.dumps(hits, indent=2, ensure_ascii=False).encode()
        atomic_write(args.json, text)
        print(f"wrote {args.json}")
    return 0


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from matryoshka2d.model import EmbeddingModel
    from matryoshka2d.retrieval import evaluate_retrieval, load_retrieval

    data = load_retrieval(args.data, min_score=args.min_score)  # validate the data before loading the model
    model = EmbeddingModel.load(args.model)
    result = evaluate_retrieval(
        model, data, args.layers, args.dims, batch_size=args.batch_size, show_progress=True
    )
    print(
        f"retrieval — {args.model} on {args.data} ({len(data.queries)} queries, {len(data.corpus)} documents)"
    )
    for metric in ("ndcg@10", "mrr@10", "recall@10"):
        print(result.table(metric))
        print()
    if args.json:
        text = json.dumps(result.to_dict(), indent=2).encode()
        atomic_write(args.json, text)
        print(f"wrote {args.json}")
    return 0


def add_search_parsers(sub) -> None:
    """The ``index build``, ``index add``, ``search`` and ``eval-retrieval`` subcommands."""
    from matryoshka2d.search import QUANTIZATIONS, SHORTLIST_INDEXES

    index = sub.add_parser("index", help="build or extend a shortlist-and-rerank search index")
    index_sub = index.add_subparsers(dest="index_command", required=True)
    p = index_sub.add_parser("build", help="encode a corpus and write a search index folder")
    p.add_argument("model", help="model folder or Hugging Face hub id")
    p.add_argument(
        "--corpus", required=True, help="one document a line (.txt) or a tsv/csv/jsonl/parquet file"
    )
    p.add_argument("--column", help="text column of a table file (default: 'text' or the first column)")
    p.add_argument("--id-column", help="id column of a table file (default: row numbers 0, 1, ...)")
    p.add_argument("--out", required=True, help="output index folder")
    p.add_argument(
        "--shortlist-dim", type=int, default=None, help="leading dims for the shortlist (default 64)"
    )
    p.add_argument("--layers", type=int, help="encode with the first K transformer layers (default: all)")
    p.add_argument(
        "--index", default="flat", choices=SHORTLIST_INDEXES, help="shortlist index (default flat)"
    )
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help="shortlist codes")
    p.add_argument("--no-texts", action="store_true", help="do not store the document texts in the index")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_index_build)

    p = index_sub.add_parser("add", help="encode more documents into an existing index")
    p.add_argument("index_dir", help="index folder written by 'm2d index build'")
    p.add_argument(
        "--corpus", required=True, help="one document a line (.txt) or a tsv/csv/jsonl/parquet file"
    )
    p.add_argument("--column", help="text column of a table file")
    p.add_argument("--id-column", help="id column of a table file (default: continue the row numbers)")
    p.add_argument("--model", help="model to encode with (default: the one recorded in the index)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_index_add)

    p = sub.add_parser("search", help="search an index: shortlist on the first dims, rerank with all dims")
    p.add_argument("index_dir", help="index folder written by 'm2d index build'")
    p.add_argument("--query", action="append", help="a query text (repeat for several)")
    p.add_argument("--queries", help="a file of queries: one a line (.txt) or a table file")
    p.add_argument("--column", help="query column of a table file")
    p.add_argument(
        "-k",
        type=int,
        default=10,
        help="hits per query (default 10; above the corpus size: clamped, with a warning)",
    )
    p.add_argument(
        "--shortlist", type=int, default=200, help="candidates reranked with all dims (default 200)"
    )
    p.add_argument("--model", help="model to encode queries with (default: the one recorded in the index)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", help="also write the hits as JSON to this file")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("eval-retrieval", help="recall@k, MRR@10, nDCG@10 over the layers x dims grid")
    p.add_argument("model", help="model folder or Hugging Face hub id")
    p.add_argument(
        "--data",
        required=True,
        help="SNLI-style file (premise, hypothesis, label: entailed hypotheses are relevant) or STS-style "
        "file (sentence1, sentence2, score: pairs scored >= --min-score are relevant)",
    )
    p.add_argument("--min-score", type=float, default=4.0, help="relevance threshold for STS-style files")
    p.add_argument("--layers", type=int_list, help="comma-separated layer counts (default: all)")
    p.add_argument("--dims", type=int_list, help="comma-separated embedding sizes (default: full)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", help="write the grids as JSON to this file")
    p.set_defaults(func=cmd_eval_retrieval)


def cmd_train(args: argparse.Namespace) -> int:
    from matryoshka2d.training import run_train

    return run_train(args)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2), like every other m2d error."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"m2d: warning: {message}", file=sys.stderr if file is None else file)


def build_parser() -> argparse.ArgumentParser:
    from matryoshka2d.training import add_train_arguments

    parser = OneLineErrorParser(prog="m2d", description="2D Matryoshka embedding models: layers x dims.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("encode", help="embed texts at a chosen (layers, dim) into a .npy file")
    p.add_argument("model", help="model folder or Hugging Face hub id")
    p.add_argument("--input", required=True, help="one text a line (.txt) or a tsv/csv/jsonl/parquet file")
    p.add_argument("--column", help="column to read from a table file (default: 'text' or the first column)")
    p.add_argument("--layers", type=int, help="number of transformer layers to run (default: all)")
    p.add_argument("--dim", type=int, help="embedding size to keep (default: full)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True, help="output .npy file")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("eval-sts", help="STS Spearman over the layers x dims grid")
    p.add_argument("model", help="model folder or Hugging Face hub id")
    p.add_argument("--data", required=True, help="tsv/csv/jsonl with columns sentence1, sentence2, score")
    p.add_argument("--layers", type=int_list, help="comma-separated layer counts (default: all)")
    p.add_argument("--dims", type=int_list, help="comma-separated embedding sizes (default: full)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", help="write the grid as JSON to this file")
    p.set_defaults(func=cmd_eval_sts)

    p = sub.add_parser("truncate", help="export a smaller standalone model (first K layers, first D dims)")
    p.add_argument("model", help="model folder or Hugging Face hub id")
    p.add_argument("--layers", type=int, help="layers to keep (default: all)")
    p.add_argument("--dim", type=int, help="embedding size to keep (default: full)")
    p.add_argument("--out", required=True, help="output folder (sentence-transformers layout)")
    p.set_defaults(func=cmd_truncate)

    p = sub.add_parser("report", help="regenerate REPORT.md and the figures from a demo results.json")
    p.add_argument("results", help="results.json written by the demo")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "demo", help="the seeds' experiment: train 3 models, evaluate the grid, write a report"
    )
    p.add_argument("--out", default="reports/demo", help="report folder (results.json, REPORT.md, figures)")
    p.add_argument("--work", default="runs/demo", help="trained models, checkpoints and cached results")
    p.add_argument("--model", help="base model (default: the packaged all-MiniLM-L6-v2)")
    p.set_defaults(func=cmd_demo)

    add_search_parsers(sub)

    p = sub.add_parser(
        "train",
        help="train a 2D Matryoshka model from a YAML config and/or flags (see docs/TRAINING.md)",
        description="Train a 2D Matryoshka model. Every option can be set in the --config YAML file or as a "
        "flag; flags override the file. Runs unchanged under torchrun / accelerate launch.",
    )
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "batch_size", 1) is not None and getattr(args, "batch_size", 1) < 1:
        parser.exit(2, f"m2d: error: --batch-size must be >= 1, got {args.batch_size}\n")
    shown, warnings.showwarning = warnings.showwarning, _one_line_warning
    try:
        return int(args.func(args) or 0)
    except Matryoshka2dError as e:
        print(f"m2d {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. an output path that is a folder, an unreadable input, a full disk
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"m2d {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
