"""``m2d index build|add``, ``m2d search`` and ``m2d eval-retrieval``: shortlist-and-rerank search."""

from __future__ import annotations

import argparse
import json
import sys

from matryoshka2d.cli.common import (
    int_list,
    load_runtime,
    model_reference,
    positive_int,
    prompt_parent,
    runtime_note,
    runtime_parent,
    workers_parent,
)
from matryoshka2d.persistence import atomic_write, check_output_file, check_output_folder, json_with_keys

#: Candidates reranked with all dims per query when --shortlist is not given (or k, if larger).
DEFAULT_SHORTLIST = 200


def cmd_index_build(args: argparse.Namespace) -> int:
    from matryoshka2d.data import read_corpus
    from matryoshka2d.search.index import SearchIndex, index_lock

    if args.backend == "qdrant":
        return cmd_index_build_qdrant(args)
    check_qdrant_options(args, build=True)
    check_output_folder(args.out, "search-index", overwrite=args.overwrite, inputs=[args.corpus, args.model])
    texts, ids = read_corpus(args.corpus, args.column, args.id_column)  # validate before loading the model
    model = load_runtime(args, model_reference(args.model))
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
        prompt_name=args.prompt_name,
        prompt=args.prompt,
        workers=args.workers,
    )
    with index_lock(args.out, on_wait=waiting("index build", args.out)):  # not amid an 'index add'
        index.save(args.out, overwrite=args.overwrite, inputs=[args.corpus, args.model])
    c = index.shortlist
    print(f"indexed {len(index)} documents ({index.dim} dims) in {args.out} ({runtime_note(model)})")
    print(f"shortlist: first {c.dim} dims, {c.index} index, {c.quantization} codes")
    return 0


def cmd_index_add(args: argparse.Namespace) -> int:
    from matryoshka2d.data import read_corpus
    from matryoshka2d.search.index import SearchIndex, index_lock

    inputs = [args.corpus, args.model]
    # The index is updated in place: refuse a path it may not be written to before any work.
    folder = check_output_folder(args.index_dir, "search-index", overwrite=True, inputs=inputs)
    if not folder.is_dir():  # before the lock, which would create the folders of a mistyped path
        from matryoshka2d.errors import DataFileError

        raise DataFileError(
            f"search index folder not found: {args.index_dir} (build one with 'm2d index build')"
        )
    texts, ids = read_corpus(args.corpus, args.column, args.id_column)
    # Held from the load to the save: a concurrent 'index add' waits instead of losing one's documents.
    with index_lock(args.index_dir, on_wait=waiting("index add", args.index_dir)):
        index = SearchIndex.load(args.index_dir)
        model = load_runtime(args, args.model or index_model(index))
        index.add_texts(
            model,
            texts,
            ids,
            batch_size=args.batch_size,
            prompt_name=args.prompt_name,
            prompt=args.prompt,
            workers=args.workers,
        )
        index.save(args.index_dir, overwrite=True, inputs=inputs)
    print(f"added {len(texts)} documents to {args.index_dir} (now {len(index)}) ({runtime_note(model)})")
    return 0


def waiting(command: str, folder: str):
    """An ``on_wait`` for :func:`~matryoshka2d.search.index.index_lock`: says on stderr why it waits."""

    def say(lock) -> None:
        print(
            f"m2d {command}: waiting for another update of {folder} to finish (lock {lock})",
            file=sys.stderr,
            flush=True,
        )

    return say


def index_model(index) -> str:
    from matryoshka2d.errors import InvalidInputError

    if not index.model:
        raise InvalidInputError("the index records no model (it was built from embeddings): pass --model")
    return index.model


def cmd_search(args: argparse.Namespace) -> int:
    from matryoshka2d.data import read_texts
    from matryoshka2d.errors import InvalidInputError
    from matryoshka2d.search.index import SearchIndex

    if bool(args.query) == bool(args.queries):
        raise InvalidInputError("give the queries either with --query (repeatable) or with --queries FILE")
    if args.column is not None and not args.queries:
        raise InvalidInputError(f"--column {args.column!r} applies to a --queries table file, not to --query")
    json_write = {
        "overwrite": args.overwrite,
        "inputs": [args.queries, args.index_dir, args.model],
        "recognize": json_with_keys("query", "hits", in_list=True),
    }
    if args.json:
        check_output_file(args.json, "search JSON", **json_write)  # refuse before the work
    for i, query in enumerate(args.query or []):
        if not query.strip():  # as a blank line of a --queries file is refused
            raise InvalidInputError(f"--query number {i + 1} is blank: give a query text")
    queries = args.query or read_texts(args.queries, column=args.column)
    if args.backend == "qdrant":
        index = open_qdrant(args)
    else:
        check_qdrant_options(args, build=False)
        index = SearchIndex.load(args.index_dir)
    model = load_runtime(args, args.model or index_model(index))
    result = index.search_texts(
        model,
        queries,
        k=args.k,
        # the default shortlist grows with k: "-k 500" alone must not fail for a shortlist of 200
        shortlist=args.shortlist if args.shortlist is not None else max(DEFAULT_SHORTLIST, args.k),
        batch_size=args.batch_size,
        prompt_name=args.prompt_name,
        prompt=args.prompt,
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
        atomic_write(args.json, text, "search JSON", **json_write)
        print(f"wrote {args.json}")
    return 0


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from matryoshka2d.evaluation.retrieval import evaluate_retrieval, load_retrieval

    json_write = {
        "overwrite": args.overwrite,
        "inputs": [args.data, args.model],
        "recognize": json_with_keys("layers", "dims", "metrics"),
    }
    if args.json:
        check_output_file(args.json, "eval-retrieval JSON", **json_write)  # refuse before the work
    if args.min_score is not None:  # an option that does not apply is an error, not ignored
        from matryoshka2d.data import read_rows
        from matryoshka2d.errors import InvalidInputError

        columns = set(read_rows(args.data)[0])
        if not {"sentence1", "sentence2", "score"} <= columns:
            raise InvalidInputError(
                f"--min-score applies to STS-style files (sentence1, sentence2, score); {args.data} has "
                f"{sorted(columns)}"
            )
    min_score = 4.0 if args.min_score is None else args.min_score
    data = load_retrieval(args.data, min_score=min_score)  # validate the data before loading the model
    model = load_runtime(args)
    result = evaluate_retrieval(
        model,
        data,
        args.layers,
        args.dims,
        batch_size=args.batch_size,
        show_progress=True,
        query_prompt_name=args.query_prompt_name,
        document_prompt_name=args.document_prompt_name,
        workers=args.workers,
    )
    print(
        f"retrieval — {args.model} ({runtime_note(model)}) on {args.data} ({len(data.queries)} queries, "
        f"{len(data.corpus)} documents)"
    )
    for metric in ("ndcg@10", "mrr@10", "recall@10"):
        print(result.table(metric))
        print()
    if args.json:
        text = json.dumps(result.to_dict(), indent=2).encode()
        atomic_write(args.json, text, "eval-retrieval JSON", **json_write)
        print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    """The ``index build``, ``index add``, ``search`` and ``eval-retrieval`` subcommands."""
    from matryoshka2d.search.index import QUANTIZATIONS, SHORTLIST_INDEXES

    index = sub.add_parser("index", help="build or extend a shortlist-and-rerank search index")
    index_sub = index.add_subparsers(dest="index_command", required=True)
    runtime = runtime_parent()
    documents = prompt_parent(
        "every document", "document", "; the faiss index records it and later adds use it"
    )
    p = index_sub.add_parser(
        "build",
        parents=[runtime, workers_parent(), documents],
        help="encode a corpus and write a search index folder",
    )
    p.add_argument("model", help="model folder or Hugging Face hub id")
    p.add_argument(
        "--corpus",
        required=True,
        help="one document a line (.txt) or a tsv/csv/jsonl/parquet file (with --backend qdrant also an "
        "'m2d embed-corpus' output folder, whose vectors are uploaded without encoding)",
    )
    p.add_argument("--column", help="text column of a table file (default: 'text' or the first column)")
    p.add_argument("--id-column", help="id column of a table file (default: row numbers 0, 1, ...)")
    p.add_argument("--out", help="output index folder (faiss backend; Qdrant: --collection)")
    p.add_argument("--overwrite", action="store_true", help="replace an index previously built at --out")
    p.add_argument(
        "--shortlist-dim", type=int, default=None, help="leading dims for the shortlist (default 64)"
    )
    p.add_argument("--layers", type=int, help="encode with the first K transformer layers (default: all)")
    p.add_argument(
        "--index", default="flat", choices=SHORTLIST_INDEXES, help="shortlist index (default flat)"
    )
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help="shortlist codes")
    p.add_argument("--no-texts", action="store_true", help="do not store the document texts in the index")
    p.add_argument("--batch-size", type=positive_int, default=32)
    add_qdrant_options(p, build=True)
    p.set_defaults(func=cmd_index_build)

    p = index_sub.add_parser(
        "add",
        parents=[
            runtime,
            workers_parent(),
            prompt_parent("every document", "document", "; default: the one the index recorded"),
        ],
        help="encode more documents into an existing index",
    )
    p.add_argument("index_dir", help="index folder written by 'm2d index build'")
    p.add_argument(
        "--corpus", required=True, help="one document a line (.txt) or a tsv/csv/jsonl/parquet file"
    )
    p.add_argument("--column", help="text column of a table file")
    p.add_argument("--id-column", help="id column of a table file (default: continue the row numbers)")
    p.add_argument("--model", help="model to encode with (default: the one recorded in the index)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.set_defaults(func=cmd_index_add)

    p = sub.add_parser(
        "search",
        parents=[runtime, prompt_parent("every query", "query")],
        help="search an index: shortlist on the first dims, rerank with all dims",
    )
    p.add_argument(
        "index_dir",
        metavar="INDEX_OR_COLLECTION",
        help="index folder written by 'm2d index build', or a collection name with --backend qdrant",
    )
    add_qdrant_options(p, build=False)
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
        "--shortlist",
        type=int,
        default=None,
        help=f"candidates reranked with all dims (default {DEFAULT_SHORTLIST}, or k if larger)",
    )
    p.add_argument("--model", help="model to encode queries with (default: the one recorded in the index)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--json", help="also write the hits as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace a previous --json file")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "eval-retrieval",
        parents=[runtime, workers_parent()],
        help="recall@k, MRR@10, nDCG@10 over the layers x dims grid",
    )
    p.add_argument("model", help="model folder or Hugging Face hub id")
    p.add_argument(
        "--data",
        required=True,
        help="SNLI-style file (premise, hypothesis, label: entailed hypotheses are relevant) or STS-style "
        "file (sentence1, sentence2, score: pairs scored >= --min-score are relevant)",
    )
    p.add_argument(
        "--min-score", type=float, default=None, help="relevance threshold for STS-style files (default 4.0)"
    )
    p.add_argument("--layers", type=int_list, help="comma-separated layer counts (default: all)")
    p.add_argument("--dims", type=int_list, help="comma-separated embedding sizes (default: full)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--json", help="write the grids as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace a previous --json file")
    p.add_argument(
        "--query-prompt-name",
        help="the model's prompt for the queries (e.g. query; default: its default prompt, if any)",
    )
    p.add_argument(
        "--document-prompt-name",
        help="the model's prompt for the documents (e.g. document; default: its default prompt, if any)",
    )
    p.set_defaults(func=cmd_eval_retrieval)


# ---------------------------------------------------------------------- Qdrant backend (--backend qdrant)
def add_qdrant_options(p: argparse.ArgumentParser, build: bool) -> None:
    """``--backend`` and where the Qdrant collection lives (``index build`` and ``search``)."""
    p.add_argument(
        "--backend",
        default="faiss",
        choices=("faiss", "qdrant"),
        help="faiss: an index folder (default); qdrant: a Qdrant collection (see --qdrant-*)",
    )
    where = p.add_argument_group("Qdrant (with --backend qdrant; give one of url, path, edge)")
    place = where.add_mutually_exclusive_group()
    place.add_argument(
        "--qdrant-url", metavar="URL", help="a Qdrant server or cluster, e.g. http://localhost:6333"
    )
    place.add_argument(
        "--qdrant-path",
        metavar="DIR",
        help="a folder for qdrant-client's embedded local mode (small corpora)",
    )
    place.add_argument(
        "--qdrant-edge",
        metavar="DIR",
        help="a folder for qdrant-edge: Qdrant's engine embedded in this process",
    )
    where.add_argument(
        "--qdrant-api-key", metavar="KEY", help="API key for --qdrant-url (default: $QDRANT_API_KEY)"
    )
    if build:
        where.add_argument(
            "--collection",
            metavar="NAME",
            help="collection name (default matryoshka2d); an existing one is added to",
        )
        where.add_argument("--recreate", action="store_true", help="delete the collection first")


def check_qdrant_options(args: argparse.Namespace, build: bool) -> None:
    """Refuse Qdrant-only options with the faiss backend, and a missing --out."""
    from matryoshka2d.errors import InvalidInputError

    given = [
        flag
        for flag, value in (
            ("--qdrant-url", args.qdrant_url),
            ("--qdrant-path", args.qdrant_path),
            ("--qdrant-edge", args.qdrant_edge),
            ("--qdrant-api-key", args.qdrant_api_key),
            ("--collection", getattr(args, "collection", None)),
            ("--recreate", getattr(args, "recreate", False) or None),
        )
        if value is not None
    ]
    if given:
        raise InvalidInputError(f"{given[0]} is a Qdrant option: add --backend qdrant")
    if build and args.out is None:
        raise InvalidInputError("--out is required: the index folder to write (or use --backend qdrant)")


def qdrant_place(args: argparse.Namespace) -> dict:
    """The ``url``/``path``/``edge_path`` (and API key) keyword arguments of :class:`QdrantIndex`."""
    import os

    from matryoshka2d.errors import InvalidInputError

    if args.qdrant_url:
        return {"url": args.qdrant_url, "api_key": args.qdrant_api_key or os.environ.get("QDRANT_API_KEY")}
    if args.qdrant_api_key:
        raise InvalidInputError("--qdrant-api-key is for --qdrant-url")
    if args.qdrant_path:
        return {"path": args.qdrant_path}
    if args.qdrant_edge:
        return {"edge_path": args.qdrant_edge}
    raise InvalidInputError("--backend qdrant needs --qdrant-url URL, --qdrant-path DIR or --qdrant-edge DIR")


def cmd_index_build_qdrant(args: argparse.Namespace) -> int:
    from pathlib import Path

    from matryoshka2d.data import read_corpus
    from matryoshka2d.errors import InvalidInputError
    from matryoshka2d.search.fingerprint import ModelFingerprint
    from matryoshka2d.search.qdrant import DEFAULT_COLLECTION, QdrantIndex

    if args.out is not None or getattr(args, "overwrite", False):
        raise InvalidInputError(
            "--out/--overwrite are for the faiss backend: name the Qdrant collection with --collection"
        )
    place = qdrant_place(args)
    collection = args.collection or DEFAULT_COLLECTION
    if (Path(args.corpus) / "manifest.json").is_file():  # an embed-corpus output: upload its vectors
        not_for_vectors = (
            ("--column", args.column),
            ("--id-column", args.id_column),
            ("--no-texts", args.no_texts),
            ("--prompt-name", args.prompt_name),
            ("--prompt", args.prompt is not None),
            ("--workers", args.workers != 1),
        )
        unused = [flag for flag, value in not_for_vectors if value]
        if unused:
            raise InvalidInputError(
                f"{', '.join(unused)}: not for an embed-corpus output (its shards hold ids and vectors, no "
                "texts, already encoded); leave them out"
            )
        model = load_runtime(args, model_reference(args.model))  # checked against the vectors' model
        with QdrantIndex.from_corpus(
            args.corpus,
            collection,
            layers=args.layers,
            check_model=model,
            shortlist_dim=args.shortlist_dim,
            index=args.index,
            quantization=args.quantization,
            recreate=args.recreate,
            **place,
        ) as index:
            print(
                f"uploaded the {index.dim}-dim, {index.layers}-layer vectors of {args.corpus} (model "
                f"{index.model}) to {index.backend} collection {collection!r} (now {len(index)} points)"
            )
        return 0
    texts, ids = read_corpus(args.corpus, args.column, args.id_column)  # validate before loading the model
    if ids is None:
        # Row numbers, as for a faiss index: building the same corpus again replaces its points (an
        # interrupted build is finished by running it again) instead of adding them a second time.
        ids = [str(i) for i in range(len(texts))]
    model = load_runtime(args, model_reference(args.model))
    with QdrantIndex.create(
        collection,
        dim=model.dim,
        shortlist_dim=args.shortlist_dim,
        index=args.index,
        quantization=args.quantization,
        model=str(model.name_or_path),
        layers=args.layers,
        fingerprint=ModelFingerprint.of(model, args.layers),
        recreate=args.recreate,
        **place,
    ) as index:
        before = len(index)
        if before and args.id_column is None:
            print(
                f"m2d index build: note: collection {collection!r} already holds {before} points and the ids "
                "are row numbers (no --id-column): documents with the same numbers are replaced, not added",
                file=sys.stderr,
            )
        index.upload_texts(
            model,
            texts,
            ids,
            batch_size=args.batch_size,
            store_texts=not args.no_texts,
            prompt_name=args.prompt_name,
            prompt=args.prompt,
            workers=args.workers,
        )
        c = index.shortlist
        print(
            f"uploaded {len(texts)} documents ({index.dim} dims) to {index.backend} collection "
            f"{collection!r} (now {len(index)} points, {before} before)"
        )
        print(f"shortlist: first {c.dim} dims, {c.index} index, {c.quantization} codes")
    return 0


def open_qdrant(args: argparse.Namespace):
    """The :class:`QdrantIndex` named by ``search``'s positional argument and --qdrant-* options."""
    from matryoshka2d.search.qdrant import QdrantIndex

    return QdrantIndex.open(args.index_dir, **qdrant_place(args))
