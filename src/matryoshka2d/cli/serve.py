"""``m2d serve``: an OpenAI-compatible embeddings server where each request picks its dims and its layers."""

from __future__ import annotations

import argparse
import logging
import sys

from matryoshka2d.cli.common import int_list, model_parent, positive_int, runtime_parent

log = logging.getLogger("matryoshka2d.serving")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from matryoshka2d.serving import ServeConfig, create_app, make_server
        from matryoshka2d.serving.runner import check_port_free, run_until_signal
    except ImportError as e:  # the serve extra is missing
        from matryoshka2d.errors import Matryoshka2dError

        raise Matryoshka2dError(
            f"m2d serve needs the serve extra ({e.name} is missing): pip install 'matryoshka2d[serve]'"
        ) from None
    import torch

    from matryoshka2d.backends import load_encoder
    from matryoshka2d.errors import InvalidInputError
    from matryoshka2d.persistence import resolve_model_path

    resolve_model_path(args.model)  # a missing folder fails now, before the server starts
    if args.runtime != "torch" and args.dtype not in ("auto", "float32"):
        raise InvalidInputError(
            f"--dtype {args.dtype} is for the torch runtime; --runtime {args.runtime} computes in "
            "float32 (int8 weights for onnx-int8)"
        )
    workers, threads = worker_plan(args.workers, args.threads, torch.get_num_threads())
    torch.set_num_threads(threads)  # before the engine's threads start: they take this count
    name = args.served_model_name or _default_name(args.model)
    config = ServeConfig(
        model_name=name,
        aliases=tuple({args.model} - {name}),
        layers_allowed=tuple(args.layers_allowed) if args.layers_allowed else None,
        default_layers=args.default_layers,
        max_inputs=args.max_inputs,
        max_request_bytes=args.max_request_bytes,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_size=args.max_batch_size,
        sort_window=args.sort_window,
        max_queue_texts=args.max_queue_texts,
        workers=workers,
        batch_mode=args.batch_mode,
        pad_multiple=args.pad_multiple,
        api_key=args.api_key,
    )
    check_port_free(args.host, args.port)  # before the model loads
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    failed: list[BaseException] = []

    def on_load_error(error: BaseException) -> None:
        failed.append(error)
        server.should_exit = True

    from matryoshka2d.backends import backend_threads

    runtime_threads = backend_threads(args.runtime, workers, threads)

    def load():
        encoder = load_encoder(
            args.model, backend=args.runtime, dtype=args.dtype, threads=runtime_threads, compile=args.compile
        )
        if args.fused_layers and args.runtime == "torch" and not args.compile:
            try:
                # the server never changes the weights: nothing to rebuild
                encoder.fuse_layers(torchscript=args.torchscript)
                log.info(
                    "torch layers fused (%s)", "TorchScript graphs" if args.torchscript else "no TorchScript"
                )
            except InvalidInputError as e:  # a model whose layers cannot be fused runs them unfused
                log.info("torch layers not fused: %s", e)
        return encoder

    app = create_app(config, load, on_load_error=on_load_error)
    server = make_server(
        app,
        args.host,
        args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        drain_timeout=args.drain_timeout or None,
    )
    print(
        f"m2d serve: {args.model} ({args.runtime}; {workers} worker{'s' if workers > 1 else ''} of "
        f"{threads} thread{'s' if threads > 1 else ''}) as '{name}' on http://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    run_until_signal(server)  # SIGTERM: in-flight requests finish, then exit 0
    if failed:
        print(f"m2d serve: error: cannot load {args.model}: {failed[0]}", file=sys.stderr)
        return 2
    return 0


def _default_name(model: str) -> str:
    """The model's folder name (``all-MiniLM-L6-v2``) or the hub id as given."""
    from pathlib import Path

    path = Path(model)
    return path.resolve().name if path.is_dir() else model


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        parents=[model_parent(), runtime_parent(aliases=("--backend",))],
        help="OpenAI-compatible embeddings server; each request picks its layers and dims",
        description="Serve POST /v1/embeddings (OpenAI's API plus a 'layers' field), GET /v1/models, "
        "GET /health and GET /metrics. See docs/SERVING.md.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", help="the 'model' name clients send (default: the folder name)")
    p.add_argument(
        "--layers-allowed",
        type=int_list,
        help="comma-separated layer counts requests may ask for (default: all)",
    )
    p.add_argument(
        "--default-layers", type=positive_int, help="layers when a request has none (default: deepest)"
    )
    p.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=8192,
        help="padded tokens per forward pass (default 8192)",
    )
    p.add_argument(
        "--max-batch-size", type=positive_int, default=32, help="texts per forward pass (default 32)"
    )
    p.add_argument(
        "--sort-window",
        type=positive_int,
        default=512,
        help="texts taken from the queue at once and sorted by length before batching: larger pads "
        "less, smaller returns the first requests sooner (default 512)",
    )
    p.add_argument("--max-inputs", type=positive_int, default=2048, help="texts per request (default 2048)")
    p.add_argument(
        "--max-queue-texts",
        type=positive_int,
        default=4096,
        help="texts waiting at most; past it requests get 429 (default 4096)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=positive_int,
        default=8 * 1024 * 1024,
        help="request body limit; past it 413 (default 8 MiB)",
    )
    p.add_argument(
        "--batch-mode",
        choices=("shared", "grouped"),
        default="grouped",
        help="mixed layer counts: a pass per layer count (grouped, default: measured faster) or one pass "
        "to the deepest (shared)",
    )
    p.add_argument(
        "--pad-multiple",
        type=positive_int,
        help="round each batch's padded width up to a multiple of this (default: 8 for torch bfloat16 on a "
        "CPU with a right-padding tokenizer, where oneDNN builds kernels per input shape; else 1)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        help="engine worker threads, each running its own forward passes (default: 2 on an even number of "
        "cores, each with half of them: measured 1.3-1.4x the throughput of one worker for bfloat16 and "
        "int8 on 2 cores; else 1)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        help="CPU threads of torch or ONNX Runtime per worker (default: the cores divided among the workers)",
    )
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn log level",
    )
    p.add_argument(
        "--fused-layers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch runtime: run each transformer layer as torch's fused encoder layer, one native call "
        "(BERT, RoBERTa, XLM-R; ~1.05-1.1x the throughput; default on where the model supports it, "
        "not with --compile)",
    )
    p.add_argument(
        "--torchscript",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with fused layers: run each forward pass (embeddings, layers, pooling) as one TorchScript "
        "graph, traced for every allowed layer count at start-up, which runs without holding Python's GIL "
        "(default on)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request (off by default)")
    p.add_argument(
        "--drain-timeout",
        type=_seconds,
        default=60.0,
        help="on SIGTERM, seconds to wait for the requests in flight before cancelling the rest "
        "(default 60; 0 waits for ever)",
    )
    p.set_defaults(func=cmd_serve)


def _seconds(text: str) -> float:
    """argparse type: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def worker_plan(workers: int | None, threads: int | None, cores: int) -> tuple[int, int]:
    """The engine's worker threads and each one's runtime threads, for what was given (None: choose).

    By default an even number of cores is split between two workers, each running its own forward passes
    with half of them (an odd number goes to one worker): on 2 cores, 2 workers of 1 thread served 1.3-1.4x
    the sentences of 1 worker of 2 threads for bfloat16 and ONNX int8 and 1.1x for float32 (small batches
    parallelise poorly across threads).
    ``cores`` is the runtime's default thread count (``torch.get_num_threads()``; OMP_NUM_THREADS).
    """
    if workers is None:  # an odd count would leave a core idle: one worker for all then
        workers = 2 if cores % 2 == 0 and (threads is None or 2 * threads <= cores) else 1
    if threads is None:
        threads = max(1, cores // workers)
    return workers, threads
