"""The ``m2d`` command line.

One module per area registers its subcommands (:mod:`.models`: encode, eval-sts; :mod:`.export`: export
(alias truncate); :mod:`.rotate`; :mod:`.search`: index, search, eval-retrieval; :mod:`.train`;
:mod:`.demo`: demo, report). Options shared by several commands come from the argparse parents in
:mod:`.common`.

Errors a user can cause (:class:`~matryoshka2d.errors.Matryoshka2dError`) are printed as one line on
stderr and exit with code 2, like argparse's own usage errors; no traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from matryoshka2d.cli import corpus, demo, export, models, rotate, search, serve, train
from matryoshka2d.cli.common import OneLineErrorParser
from matryoshka2d.errors import Matryoshka2dError

# Each module has register(subparsers); the order is the order of `m2d --help`.
COMMAND_MODULES = (models, export, rotate, search, train, demo, serve, corpus)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"m2d: warning: {message}", file=sys.stderr if file is None else file)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="m2d", description="2D Matryoshka embedding models: layers x dims.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


#: Exit code after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """Run one ``m2d`` command; returns its exit code (0, 2 for a user error, 130 after Ctrl-C).

    Ctrl-C prints ``m2d CMD: interrupted`` and leaves no partial output: every writer writes under a
    temporary name that is removed on the interrupt (:func:`matryoshka2d.persistence.atomic_directory`).
    """
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("m2d: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    shown, warnings.showwarning = warnings.showwarning, _one_line_warning
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"m2d {args.command}: interrupted; no partial output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
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
