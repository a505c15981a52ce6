"""Corpus inputs: expanding paths and globs, planning fixed-size shards, reading one shard back.

A corpus is one or more files read in a fixed order (paths as given, a glob's matches sorted by name, a
folder's data files sorted by name). Every file is cut into shards of ``shard_rows`` rows in file order
(the last shard of a file may be shorter); a shard never spans two files. Row ``r`` of the corpus
(counting over all files in order) has the default id ``r``.

Planning scans every file once with bounded memory: it validates each row (the text column is text, the
id column a non-empty id), counts rows, hashes the file's bytes (so a resumed job can tell that its input
is unchanged) and records where each shard starts: a byte offset for text formats, a row offset for
Parquet. Reading a shard seeks to that position and reads only its rows, so any worker can read any
shard without reading what comes before it.

Formats: ``.txt`` (one text a line; no id column), ``.jsonl`` (one JSON object a line): blank lines at
the end are ignored, one before the last text is refused (row i is line i); ``.csv`` / ``.tsv`` (a header
row, standard CSV quoting, fields of any length), ``.parquet``.
Lines end with ``\\n`` (a trailing ``\\r`` is dropped); a leading UTF-8 byte-order mark is ignored.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from matryoshka2d.data import allow_long_csv_fields
from matryoshka2d.errors import DataFileError

#: File suffixes ``embed-corpus`` reads.
CORPUS_SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv", ".parquet")
_GLOB_CHARS = set("*?[")
allow_long_csv_fields()  # a long document in a csv/tsv corpus is as valid as in a jsonl one
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class InputFile:
    """One input file as planned: its resolved path, size, SHA-256 and row count."""

    path: str
    size: int
    sha256: str
    rows: int

    @property
    def format(self) -> str:
        return Path(self.path).suffix.lower()[1:]

    def check_unchanged(self, hash_it: bool = False) -> None:
        """Raise if the file is no longer the one planned: another size (a line added or removed shifts
        every later shard's cursor into the middle of a line) or, with ``hash_it``, other contents.

        Raises:
            DataFileError: naming the file.
        """
        path = Path(self.path)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise DataFileError(f"{path}: cannot read it any more ({e})") from e
        if size != self.size or (hash_it and _file_sha256(path) != self.sha256):
            raise DataFileError(
                f"{path}: the file changed while the job ran ({self.size} bytes when planned, {size} now"
                f"{'' if size != self.size else ', other contents'}); its rows no longer match the plan: "
                "run the job again on a new --out (or delete this one) once the file stays unchanged"
            )


@dataclass(frozen=True)
class ShardSpec:
    """One shard: ``rows`` consecutive rows of input file ``input``, starting at ``cursor`` there.

    Attributes:
        index: the shard's number (0, 1, ... over the whole corpus, in input order).
        input: index of its file in the plan's input list.
        cursor: where the shard's first row starts: a byte offset (text formats) or a row offset (Parquet).
        rows: number of rows.
        first_row: corpus row number of its first row (the default id of that row).
    """

    index: int
    input: int
    cursor: int
    rows: int
    first_row: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class CorpusPlan:
    """Inputs, the columns read from them and the shards they are cut into."""

    inputs: list[InputFile]
    text_column: str | None
    id_column: str | None
    shard_rows: int
    shards: list[ShardSpec]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.inputs)


def expand_inputs(patterns: list[str], skip: str | os.PathLike | None = None) -> list[Path]:
    """The input files named by ``patterns``, in order: a file, a glob (``**`` recurses; matches sorted by
    name) or a folder (its data files, sorted by name). A file named twice is read once.

    ``skip``: a folder whose files a glob or a folder pattern does not match (the job's own output
    folder: ``corpus/**/*.parquet`` with ``--out corpus/emb`` must not read back its own shards, which
    exist only from the first run on). A file named explicitly is kept (and refused by the caller).

    Raises:
        DataFileError: a pattern that matches nothing, a missing file, or a file of an unsupported type.
    """
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            matches = sorted(
                p
                for p in path.iterdir()
                if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES and not _inside(p, skip)
            )
            if not matches:
                raise DataFileError(
                    f"--input {pattern}: the folder holds no {'/'.join(CORPUS_SUFFIXES)} files"
                )
        elif _GLOB_CHARS & set(pattern):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
            matches = [p for p in matches if p.is_file() and not _inside(p, skip)]
            if not matches:
                raise DataFileError(f"--input {pattern}: no file matches this pattern")
        elif path.is_file():
            matches = [path]
        else:
            raise DataFileError(f"input file not found: {pattern}")
        for match in matches:
            if match.suffix.lower() not in CORPUS_SUFFIXES:
                raise DataFileError(
                    f"{match}: unsupported input type {match.suffix or '(none)'!r}; use one of "
                    f"{', '.join(CORPUS_SUFFIXES)}"
                )
            files.append(match.resolve())
    unique: list[Path] = []
    for f in files:
        if f not in unique:
            unique.append(f)
    return unique


def _inside(path: Path, folder: str | os.PathLike | None) -> bool:
    if folder is None:
        return False
    return Path(folder).resolve() in path.resolve().parents


# ---------------------------------------------------------------------------------------------- lines
def _lines(f: BinaryIO, path: Path, start: int, line_no: int | None = None) -> Iterator[tuple[int, int, str]]:
    """``(offset, line number, text)`` of each line from byte ``start`` (line numbers only when known)."""
    f.seek(start)
    offset = start
    n = line_no
    for raw in f:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            where = f"line {n}" if n is not None else f"byte {offset + e.start}"
            raise DataFileError(f"{path}, {where}: not UTF-8 text; save the file as UTF-8") from None
        if offset == 0:
            text = text.removeprefix("\ufeff")
        yield offset, (n if n is not None else 0), text
        offset += len(raw)
        if n is not None:
            n += 1


def _strip_eol(text: str) -> str:
    return text[:-1].removesuffix("\r") if text.endswith("\n") else text.removesuffix("\r")


def _check_text(value: object, column: str, path: Path, where: str) -> str:
    if not isinstance(value, str):
        raise DataFileError(f"{path}, {where}: column {column!r} is {value!r:.60}, expected text")
    return value


def _check_id(value: object, column: str, path: Path, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise DataFileError(
            f"{path}, {where}: id column {column!r} is {value!r:.60}, expected a non-empty id"
        )
    return str(value)


def _json_row(text: str, path: Path, line: int) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}, line {line}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise DataFileError(f"{path}, line {line}: expected a JSON object, got {type(row).__name__}")
    return row


def _csv_records(
    f: BinaryIO, path: Path, start: int, delimiter: str, line_no: int | None = None
) -> Iterator[tuple[int, int, list[str]]]:
    """``(offset, line number, fields)`` of each CSV record from byte ``start``; quoted newlines allowed."""
    f.seek(start)
    offset = start
    n = line_no

    def raw_lines() -> Iterator[str]:
        nonlocal offset, n
        for raw in f:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                where = f"line {n}" if n is not None else f"byte {offset}"
                raise DataFileError(f"{path}, {where}: not UTF-8 text; save the file as UTF-8") from None
            if offset == 0:
                text = text.removeprefix("\ufeff")
            offset += len(raw)
            if n is not None:
                n += 1
            yield text

    # strict: a quote that never closes is an error at the end of the file, not one last field that
    # swallowed every line after it
    reader = csv.reader(raw_lines(), delimiter=delimiter, strict=True)
    record_start, record_line = start, line_no or 0
    try:
        for fields in reader:
            yield record_start, record_line, fields
            record_start, record_line = offset, (n or 0)
    except csv.Error as e:
        where = f"line {record_line}" if line_no is not None else f"the record at byte {record_start}"
        raise DataFileError(
            f"{path}, {where}: malformed {path.suffix[1:]} ({e}); a field that starts with a quote must end "
            'with one (it may hold line breaks), and a quote inside it is written ""'
        ) from None


# ---------------------------------------------------------------------------------------------- planning
class _Planner:
    """Cuts files into shards while scanning them (one pass, bounded memory)."""

    def __init__(self, shard_rows: int) -> None:
        self.shard_rows = shard_rows
        self.shards: list[ShardSpec] = []
        self.first_row = 0

    def add(self, input_index: int, cursors: Iterator[int]) -> int:
        """Record a shard at every ``shard_rows``-th row of a file; ``cursors`` yields each row's cursor."""
        rows = 0
        opened: tuple[int, int] | None = None  # (cursor, first row) of the shard being filled
        for cursor in cursors:
            if rows % self.shard_rows == 0:
                if opened is not None:
                    self._close(input_index, opened, self.shard_rows)
                opened = (cursor, self.first_row + rows)
            rows += 1
        if opened is not None:
            self._close(input_index, opened, rows - (rows - 1) // self.shard_rows * self.shard_rows)
        self.first_row += rows
        return rows

    def _close(self, input_index: int, opened: tuple[int, int], rows: int) -> None:
        self.shards.append(ShardSpec(len(self.shards), input_index, opened[0], rows, opened[1]))


class _HashingReader:
    """A binary file wrapper that hashes every byte read sequentially (planning reads each file once)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()

    def __iter__(self):
        for raw in self.f:
            self.sha.update(raw)
            yield raw

    def seek(self, offset: int) -> None:
        if offset != 0:
            raise AssertionError("planning reads files from the start")
        self.f.seek(0)


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            sha.update(block)
    return sha.hexdigest()


def _resolve_column(name: str | None, have: list[str], path: Path, what: str) -> str:
    if name not in have:
        raise DataFileError(f"{path}: missing {what} column {name!r}; the file has {have}")
    return name  # type: ignore[return-value]


def plan_corpus(
    files: list[Path], text_column: str | None = None, id_column: str | None = None, shard_rows: int = 10_000
) -> CorpusPlan:
    """Scan ``files`` once and cut them into shards of ``shard_rows`` rows.

    Args:
        files: input files (see :func:`expand_inputs`).
        text_column: the text column of table files (default: ``text`` if the first table file has it,
            else its first column); ignored for ``.txt``.
        id_column: a column of ids (stored as strings); default: ids are corpus row numbers.
        shard_rows: rows per shard.

    Raises:
        DataFileError: naming the file and line or row of the first unusable value, a missing column, an
            id column asked of a ``.txt`` file, or a corpus without rows.
    """
    planner = _Planner(shard_rows)
    inputs: list[InputFile] = []
    for i, path in enumerate(files):
        suffix = path.suffix.lower()
        if suffix == ".txt" and id_column is not None:
            raise DataFileError(f"{path}: --id-column needs table files; a .txt file has one text a line")
        if suffix == ".parquet":
            text_column, rows = _plan_parquet(path, i, planner, text_column, id_column)
            sha = _file_sha256(path)
        else:
            with open(path, "rb") as raw:
                f = _HashingReader(raw)
                if suffix == ".txt":
                    rows = planner.add(i, _txt_cursors(f, path))  # type: ignore[arg-type]
                elif suffix == ".jsonl":
                    rows, text_column = _plan_jsonl(f, path, i, planner, text_column, id_column)
                else:
                    rows, text_column = _plan_csv(f, path, i, planner, text_column, id_column)
                for _ in f:  # hash whatever the parser did not read (nothing, normally)
                    pass
                sha = f.sha.hexdigest()
        inputs.append(InputFile(str(path), path.stat().st_size, sha, rows))
    if not planner.shards:
        names = ", ".join(str(p) for p in files)
        raise DataFileError(f"{names}: no texts to encode (the input is empty)")
    return CorpusPlan(inputs, text_column, id_column, shard_rows, planner.shards)


def _text_lines(f: BinaryIO, path: Path, skip_blank: bool = False) -> Iterator[tuple[int, int, str]]:
    """:func:`_lines` from the start without the blank lines at the end of the file; a blank line before
    the last text is refused (skipping it would make row i, and its default id, another line than i, as
    ``m2d encode`` refuses it too), or skipped with ``skip_blank`` (rows with ids of their own)."""
    blank = None
    for offset, n, text in _lines(f, path, 0, 1):
        if not text.strip():
            blank = blank or n
            continue
        if blank is not None and not skip_blank:
            raise DataFileError(
                f"{path}, line {blank}: blank line before the last text (row i must be line i: its default "
                "id is its row number); remove the blank lines, or give the rows ids (--id-column)"
            )
        yield offset, n, text


def _txt_cursors(f: BinaryIO, path: Path) -> Iterator[int]:
    for offset, _, _ in _text_lines(f, path):
        yield offset


def _plan_jsonl(f, path, i, planner, text_column, id_column) -> tuple[int, str | None]:
    state = {"text": text_column}

    def cursors() -> Iterator[int]:
        for offset, n, text in _text_lines(f, path, skip_blank=id_column is not None):
            row = _json_row(text, path, n)
            if state["text"] is None:
                if not row:
                    raise DataFileError(f"{path}, line {n}: an empty JSON object has no text column")
                state["text"] = "text" if "text" in row else next(iter(row))
            column = state["text"]
            if column not in row:
                raise DataFileError(f"{path}, line {n}: missing column {column!r}; the row has {list(row)}")
            _check_text(row[column], column, path, f"line {n}")
            if id_column is not None:
                if id_column not in row:
                    raise DataFileError(
                        f"{path}, line {n}: missing id column {id_column!r}; the row has {list(row)}"
                    )
                _check_id(row[id_column], id_column, path, f"line {n}")
            yield offset

    rows = planner.add(i, cursors())
    return rows, state["text"]


def _plan_csv(f, path, i, planner, text_column, id_column) -> tuple[int, str | None]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    records = _csv_records(f, path, 0, delimiter, 1)
    first = next(records, None)
    if first is None or not first[2]:
        raise DataFileError(f"{path}: empty file (no header row)")
    header = first[2]
    text_column = text_column if text_column is not None else ("text" if "text" in header else header[0])
    _resolve_column(text_column, header, path, "text")
    k = header.index(_resolve_column(id_column, header, path, "id")) if id_column is not None else None

    def cursors() -> Iterator[int]:
        for offset, n, fields in records:
            if not fields:
                continue  # a blank line
            if len(fields) != len(header):
                raise DataFileError(
                    f"{path}, line {n}: {len(fields)} field(s), but the header has {len(header)} ({header})"
                )
            if k is not None:
                _check_id(fields[k], id_column, path, f"line {n}")  # type: ignore[arg-type]
            yield offset

    return planner.add(i, cursors()), text_column


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow comes with the corpus extra
        raise DataFileError(f"{path}: reading parquet needs pyarrow (pip install 'matryoshka2d[ray]')") from e
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow's own error types for a corrupt or non-parquet file
        raise DataFileError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from None


def _plan_parquet(path, i, planner, text_column, id_column) -> tuple[str, int]:
    import pyarrow as pa

    pf = _parquet_file(path)
    schema = pf.schema_arrow
    names = list(schema.names)
    if not names:
        raise DataFileError(f"{path}: the parquet file has no columns")
    text_column = text_column if text_column is not None else ("text" if "text" in names else names[0])
    _resolve_column(text_column, names, path, "text")
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataFileError(f"{path}: column {text_column!r} holds {kind}, expected text (string)")
    columns = [text_column]
    if id_column is not None:
        _resolve_column(id_column, names, path, "id")
        kind = schema.field(id_column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)):
            raise DataFileError(f"{path}: id column {id_column!r} holds {kind}, expected strings or integers")
        columns.append(id_column)
    # Validate every value (nulls, empty ids) now rather than hours into the job.
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=65_536):
        texts = batch.column(0)
        if texts.null_count:
            bad = next(j for j, v in enumerate(texts.is_null().to_pylist()) if v)
            raise DataFileError(f"{path}, row {row + bad + 1}: column {text_column!r} is None, expected text")
        if id_column is not None:
            for j, value in enumerate(batch.column(1).to_pylist()):
                _check_id(value, id_column, path, f"row {row + j + 1}")
        row += batch.num_rows
    planner.add(i, iter(range(row)))
    return text_column, row


# ---------------------------------------------------------------------------------------------- reading
def read_shard(plan: CorpusPlan, shard: ShardSpec) -> tuple[list[str], list[str] | None]:
    """The texts of ``shard`` (and its ids as strings when the plan has an id column), read from its cursor.

    Raises:
        DataFileError: the file no longer holds the rows the plan recorded (it changed since planning).
    """
    source = plan.inputs[shard.input]
    source.check_unchanged()
    path = Path(source.path)
    suffix = path.suffix.lower()
    texts: list[str] = []
    ids: list[str] | None = [] if plan.id_column is not None else None
    if suffix == ".parquet":
        texts, ids = _read_parquet_rows(path, shard, plan.text_column, plan.id_column)  # type: ignore[arg-type]
    else:
        with open(path, "rb") as f:
            if suffix == ".txt":
                for _, _, text in _lines(f, path, shard.cursor):
                    if text.strip():
                        texts.append(_strip_eol(text))
                        if len(texts) == shard.rows:
                            break
            elif suffix == ".jsonl":
                for _, _, text in _lines(f, path, shard.cursor):
                    if not text.strip():
                        continue
                    row = _json_row(text, path, 0)
                    where = f"shard {shard.index}"
                    texts.append(_check_text(row.get(plan.text_column), plan.text_column, path, where))  # type: ignore[arg-type]
                    if ids is not None:
                        ids.append(_check_id(row.get(plan.id_column), plan.id_column, path, where))  # type: ignore[arg-type]
                    if len(texts) == shard.rows:
                        break
            else:
                texts, ids = _read_csv_rows(f, path, shard, plan)
    if len(texts) != shard.rows:
        raise DataFileError(
            f"{path}: shard {shard.index} should hold {shard.rows} rows from position {shard.cursor}, found "
            f"{len(texts)}; the file changed since the job was planned"
        )
    return texts, ids


def _read_csv_rows(f, path: Path, shard: ShardSpec, plan: CorpusPlan) -> tuple[list[str], list[str] | None]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    header = next(_csv_records(f, path, 0, delimiter), (0, 0, []))[2]
    if plan.text_column not in header or (plan.id_column is not None and plan.id_column not in header):
        raise DataFileError(f"{path}: the header changed since the job was planned (now {header})")
    t = header.index(plan.text_column)  # type: ignore[arg-type]
    k = header.index(plan.id_column) if plan.id_column is not None else None
    texts: list[str] = []
    ids: list[str] | None = [] if k is not None else None
    for _, _, fields in _csv_records(f, path, shard.cursor, delimiter):
        if not fields:
            continue
        if len(fields) != len(header):
            raise DataFileError(
                f"{path}: shard {shard.index} has a row of {len(fields)} field(s); the file changed"
            )
        texts.append(fields[t])
        if ids is not None:
            ids.append(fields[k])  # type: ignore[index]
        if len(texts) == shard.rows:
            break
    return texts, ids


def _read_parquet_rows(
    path: Path, shard: ShardSpec, text_column: str, id_column: str | None
) -> tuple[list[str], list[str] | None]:
    pf = _parquet_file(path)
    columns = [text_column] + ([id_column] if id_column is not None else [])
    # Only the row groups that overlap the shard's rows are read.
    groups, skip, seen = [], 0, 0
    end = shard.cursor + shard.rows
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if seen + n > shard.cursor and seen < end:
            if not groups:
                skip = shard.cursor - seen
            groups.append(g)
        seen += n
    texts: list[str] = []
    ids: list[str] | None = [] if id_column is not None else None
    if groups:
        table = pf.read_row_groups(groups, columns=columns).slice(skip, shard.rows)
        texts = table.column(0).to_pylist()
        if ids is not None:
            ids = [str(v) for v in table.column(1).to_pylist()]
        if any(t is None for t in texts):
            raise DataFileError(f"{path}: shard {shard.index} holds a null text; the file changed")
    return texts, ids
