"""Pieces shared by the ``m2d`` subcommands: the one-line-error parser, argument types and parents.

A parent is an ``argparse.ArgumentParser(add_help=False)`` holding options that several commands take
(``model``, ``--batch-size``, ``--layers/--dims`` grids); a command lists the parents it needs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2), like every other m2d error."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: ``"1,2,3"`` as ``[1, 2, 3]``."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def model_reference(name: str) -> str:
    """An absolute path for a local model folder (so an index works from any directory), else the hub id."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def overwrite_parent() -> argparse.ArgumentParser:
    """``--overwrite``: allow replacing a previous output of the same kind (see persistence's safe-output
    rule; files and folders not written by matryoshka2d are never replaced)."""
    p = _parent()
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous output of this command at the output path (never other files or folders)",
    )
    return p


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def prompt_parent(
    texts: str = "every text", example: str = "query", note: str = ""
) -> argparse.ArgumentParser:
    """``--prompt-name NAME`` or ``--prompt TEXT`` (one of them): the prompt prepended to ``texts``
    (:meth:`~matryoshka2d.encoder.Encoder.resolve_prompt`; default: the model's default prompt)."""
    p = _parent()
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--prompt-name",
        help=f"prepend the model's prompt of this name to {texts} (e.g. {example}; default: the model's "
        f"default prompt, if any){note}",
    )
    group.add_argument("--prompt", help=f"prepend this text to {texts} instead ('': no prompt)")
    return p


def model_parent() -> argparse.ArgumentParser:
    """The positional MODEL argument."""
    p = _parent()
    p.add_argument("model", help="model folder or Hugging Face hub id")
    return p


def batch_parent(default: int = 32) -> argparse.ArgumentParser:
    """``--batch-size``."""
    p = _parent()
    p.add_argument(
        "--batch-size", type=positive_int, default=default, help=f"texts per forward pass (default {default})"
    )
    return p


def workers_parent() -> argparse.ArgumentParser:
    """``--workers``: batches encoded at once (``encode(workers=)``; :func:`load_runtime` sizes ONNX)."""
    p = _parent()
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="run this many batches at once, each with the cores divided among them "
        "(default 1; on 2 cores 2 encoded 1.3-1.6x the sentences in bfloat16 and onnx-int8)",
    )
    return p


def grid_parent() -> argparse.ArgumentParser:
    """``--layers`` and ``--dims`` lists for grid evaluation."""
    p = _parent()
    p.add_argument("--layers", type=int_list, help="comma-separated layer counts (default: all)")
    p.add_argument("--dims", type=int_list, help="comma-separated embedding sizes (default: full)")
    return p


def cell_parent() -> argparse.ArgumentParser:
    """``--layers K`` and ``--dim D``: one cell of the grid."""
    p = _parent()
    p.add_argument("--layers", type=int, help="number of transformer layers to run (default: all)")
    p.add_argument("--dim", type=int, help="embedding size to keep (default: full)")
    return p


# The inference runtimes and dtypes (the same as matryoshka2d.backends.BACKENDS and model.DTYPES; kept
# here as literals so that building the parser does not import torch).
RUNTIMES = ("torch", "onnx", "onnx-int8")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def runtime_parent(aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """``--runtime`` and ``--dtype``: how a command that encodes runs the model (see :func:`load_runtime`).

    Args:
        aliases: other option names for ``--runtime`` (``m2d serve`` also takes ``--backend``, the name
            other embedding servers use; elsewhere ``--backend`` picks the search index's engine).
    """
    p = _parent()
    p.add_argument(
        "--runtime",
        *aliases,
        choices=RUNTIMES,
        default="torch",
        help="inference backend: torch (default), onnx (ONNX Runtime, CPU) or onnx-int8 (dynamic int8)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="what the torch layers compute in: float32 (default, exact), bfloat16, float16, or auto "
        "(bfloat16 on a CPU with avx512_bf16/AMX or a GPU with bf16, else float32: ~1.8-2.7x faster "
        "there at ~0.01 STSB); pooling and normalisation are float32",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch runtime: run the layers through torch.compile with frozen weights (1.1-1.2x faster "
        "in float32 on CPU, after 12-28 s of compiling per layer count: pays for long jobs and servers)",
    )
    return p


def load_runtime(args: argparse.Namespace, model: str | None = None, threads: int | None = None):
    """Load ``model`` (default ``args.model``) with ``args.runtime``/``args.dtype`` (and, for ONNX
    Runtime, ``threads`` intra-op threads; default: sized for ``args.workers`` if the command has
    ``--workers`` (:func:`~matryoshka2d.backends.worker_runtime_threads`), else its own choice).

    Commands name the choice in their summary line (:func:`runtime_note`), after the work, so that
    nothing is printed before it (an error stays one line on stderr).

    Returns:
        an :class:`~matryoshka2d.encoder.Encoder` (``EmbeddingModel`` for the torch runtime).
    """
    from matryoshka2d.backends import load_encoder, worker_runtime_threads

    runtime = getattr(args, "runtime", "torch")
    if threads is None:
        threads = worker_runtime_threads(runtime, getattr(args, "workers", 1))
    encoder = load_encoder(
        model if model is not None else args.model,
        backend=runtime,
        dtype=getattr(args, "dtype", "float32"),
        compile=getattr(args, "compile", False),
        threads=threads if runtime != "torch" else None,
    )
    return encoder


def runtime_note(encoder) -> str:
    """``"torch bfloat16"``, ``"onnx-int8 int8"``, ...: how an encoder ran, for summary lines."""
    compiled = " compiled" if getattr(encoder, "compiled", False) else ""
    return f"{encoder.backend} {encoder.precision}{compiled}"
