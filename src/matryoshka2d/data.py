"""Reading data files: tsv, csv, jsonl, json (and parquet when pyarrow is installed), all UTF-8.

All readers return plain Python rows (``list[dict[str, str]]``) so that the callers choose columns by
name and validate them with messages that name the file, the column and the row.

No silent partial or misaligned input: lines are split on ``\n`` only (``\r\n`` accepted), so row i of
the output always comes from line i of a ``.txt`` file (data row i of a table, after its header). A blank
line before the last text is an error naming the line (blank lines at the very end are ignored); a
tsv/csv field that starts with a quote must end with one on the same line (a quoted field spanning lines,
a stray character after a closing quote, a field count different from the header's, a repeated column
name: an error naming the line and the cause); options that do not apply to a file are errors.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from matryoshka2d.errors import DataFileError, InvalidInputError


def allow_long_csv_fields() -> None:
    """Lift Python's csv limit of 131,072 characters a field ("field larger than field limit"): a long
    document in a tsv/csv file is as valid as in a jsonl one. For the process (the limit is global)."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))


allow_long_csv_fields()

#: Where the shared evaluation data lives unless ``M2D_DATA_DIR`` says otherwise.
DEFAULT_DATA_DIR = Path("../shared/data")


def data_dir() -> Path:
    """The data folder: ``$M2D_DATA_DIR`` if set, else ``../shared/data`` next to the working directory or,
    failing that, next to this source checkout."""
    if os.environ.get("M2D_DATA_DIR"):
        return Path(os.environ["M2D_DATA_DIR"])
    checkout = Path(__file__).resolve().parents[2] / DEFAULT_DATA_DIR
    return DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() or not checkout.is_dir() else checkout.resolve()


#: Table files :func:`read_rows` reads; :func:`read_texts` also takes ``.txt`` (one text a line).
TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".parquet")
#: Every data file suffix (tables and plain text).
SUFFIXES = (*TABLE_SUFFIXES, ".txt")


def require_file(path: str | os.PathLike, what: str = "data file") -> Path:
    """``path`` as a :class:`~pathlib.Path` if it is an existing regular file.

    Raises:
        DataFileError: ``"<path> is a folder, not a <what>"``, ``"<what> not found: <path>"`` or ``"<path>
            is not a regular file"`` (a device, a pipe, ...).
    """
    if path is None or not str(os.fspath(path)).strip():
        raise DataFileError(f"no {what} given (empty path)")
    path = Path(path).expanduser()
    if path.is_dir():
        article = "an" if what[:1] in "aeiou" else "a"
        raise DataFileError(f"{path} is a folder, not {article} {what}: give the path of a file")
    if not path.exists():
        raise DataFileError(f"{what} not found: {path}")
    if not path.is_file():
        raise DataFileError(f"{path} is not a regular file (a {what} is read from a file)")
    return path


def read_text_file(path: Path) -> str:
    """The contents of a UTF-8 text file (a leading byte-order mark is dropped).

    Raises:
        DataFileError: naming the file and the line of the first byte that is not UTF-8.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataFileError(
            f"{path}, line {line}: not UTF-8 text (byte {data[e.start : e.start + 1]!r} at offset "
            f"{e.start}); save the file as UTF-8"
        ) from None


def split_lines(text: str, path: Path) -> list[str]:
    """The lines of a text file, split on ``\n`` only (a trailing ``\r`` is dropped), without the blank
    lines at its end.

    Raises:
        DataFileError: a blank (empty or whitespace-only) line before the last non-blank one, naming it:
            skipping it would shift every later row against its line number.
    """
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise DataFileError(
                f"{path}, line {n}: blank line; every line is one row (output row i is input line i), so "
                "remove the blank line or put a text on it"
            )
    return lines


def _json_lines(text: str, path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(split_lines(text, path), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataFileError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _json_rows(text: str, path: Path) -> list[dict]:
    """A ``.json`` file: a top-level array of objects, or else JSON Lines (as ``datasets`` writes them)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _json_lines(text, path)  # several values: JSON Lines, with line-precise errors
    if isinstance(data, dict):
        return [data]
    if not isinstance(data, list):
        raise DataFileError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for n, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataFileError(
                f"{path}: item {n} of the JSON array is {type(row).__name__}, expected an object"
            )
    return data


def _table_rows(text: str, path: Path, delimiter: str) -> list[dict]:
    # Standard CSV quoting for both tsv and csv: the shared tsv files quote fields that contain '"' and
    # double the inner quotes ("says ""no diving""."), and a quote inside an unquoted field is kept as is.
    # strict: a character after a closing quote is an error, not silently joined; a quoted field may not
    # span lines (an unclosed quote would otherwise swallow every following line into one field).
    kind = path.suffix[1:] or "table"
    separators = "tabs" if delimiter == "\t" else "commas"
    lines = split_lines(text, path)  # blank lines are errors (they would shift the rows)
    if not lines:
        raise DataFileError(f"{path}: empty file (no header row)")
    reader = csv.reader(io.StringIO("\n".join(lines) + "\n", newline=""), delimiter=delimiter, strict=True)
    rows: list[dict] = []
    header: list[str] | None = None
    start = 1
    try:
        for fields in reader:
            end = reader.line_num
            if end > start:
                raise DataFileError(
                    f"{path}, line {start}: a quoted field runs over lines {start}-{end} (an unclosed quote? "
                    f'a field that starts with " must end with " on the same line; write a quote inside it '
                    f'as ""); texts with line breaks need a jsonl file'
                )
            if header is None:
                header = fields
                repeated = sorted({name for name in header if header.count(name) > 1})
                if repeated:
                    raise DataFileError(f"{path}, line 1: repeated column name(s) {repeated} in the header")
            elif len(fields) != len(header):
                raise DataFileError(
                    f"{path}, line {start}: {len(fields)} field(s), but the header has {len(header)} "
                    f"({header}); check the {separators} and quotes on that line"
                )
            else:
                rows.append(dict(zip(header, fields)))
            start = end + 1
    except csv.Error as e:
        end = reader.line_num
        where = f"line {start}" + (f" (the quoted field runs to line {end})" if end > start else "")
        raise DataFileError(
            f"{path}, {where}: malformed {kind} ({e}); a field that starts with a quote must end with one, "
            'and a quote inside it is written ""'
        ) from None
    if header is None:
        raise DataFileError(f"{path}: empty file (no header row)")
    return rows


def read_rows(path: str | os.PathLike) -> list[dict[str, object]]:
    """Read a table file into a list of row dicts.

    Args:
        path: a UTF-8 ``.tsv`` or ``.csv`` file with a header row (standard CSV quoting; every row has as
            many fields as the header), a ``.jsonl`` file (one JSON object a line), a ``.json`` file (an
            array of objects, or JSON Lines), or a ``.parquet`` file (needs pyarrow).

    Raises:
        DataFileError: naming the file (and the line where known): the file is missing, of an unknown type,
            not UTF-8, unparsable, has a row with the wrong number of fields, or has no data rows.
    """
    path = require_file(path, "data file")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataFileError(
            f"{path}: unknown data file type {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}"
        )
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise DataFileError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises its own error types for corrupt files
            raise DataFileError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from None
    elif suffix == ".jsonl":
        rows = _json_lines(read_text_file(path), path)
    elif suffix == ".json":
        rows = _json_rows(read_text_file(path), path)
    else:
        rows = _table_rows(read_text_file(path), path, "\t" if suffix == ".tsv" else ",")
    if not rows:
        raise DataFileError(f"{path}: no data rows")
    return rows


def require_columns(rows: list[dict[str, object]], columns: list[str], path: str | os.PathLike) -> None:
    """Raise :class:`DataFileError` naming the missing columns, if any are missing from the first row."""
    have = list(rows[0].keys())
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataFileError(f"{path}: missing column(s) {missing}; the file has {have}")


def text_column(
    rows: list[dict[str, object]], column: str, path: str | os.PathLike, non_empty: bool = False
) -> list[str]:
    """The values of one column as strings; with ``non_empty``, none empty or only whitespace (no sentence
    to train on or score: training and evaluation data; a corpus to encode may hold them, each keeps its
    row).

    Raises:
        DataFileError: naming the file, the row (1 = the first data row) and the column.
    """
    require_columns(rows, [column], path)
    out = []
    for n, row in enumerate(rows, 1):
        value = row.get(column)
        if not isinstance(value, str):
            raise DataFileError(f"{path}, row {n}: column {column!r} is {value!r}, expected text")
        if non_empty and not value.strip():
            what = "empty" if not value else "only whitespace"
            raise DataFileError(
                f"{path}, row {n}: column {column!r} is {what}; remove the row or fill in the text"
            )
        out.append(value)
    return out


def score_column(rows: list[dict[str, object]], column: str, path: str | os.PathLike) -> list[float]:
    """The values of one column as finite floats."""
    require_columns(rows, [column], path)
    out = []
    for n, row in enumerate(rows, 1):
        value = row.get(column)
        try:
            if isinstance(value, bool):  # JSON true/false: not a score
                raise TypeError
            score = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise DataFileError(f"{path}, row {n}: column {column!r} is {value!r}, not a number") from None
        if not math.isfinite(score):
            raise DataFileError(f"{path}, row {n}: column {column!r} is {value!r}, not a finite number")
        out.append(score)
    return out


@dataclass(frozen=True)
class StsData:
    """Scored sentence pairs (STS Benchmark format)."""

    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]

    def __post_init__(self) -> None:
        lengths = (len(self.sentence1), len(self.sentence2), len(self.scores))
        if len(set(lengths)) != 1:  # checked here, before the slow encoding of an evaluation
            raise InvalidInputError(
                f"StsData needs as many sentence1, sentence2 and scores, got {lengths[0]}, {lengths[1]} "
                f"and {lengths[2]}"
            )

    def __len__(self) -> int:
        return len(self.scores)


def load_sts(
    path: str | os.PathLike,
    sentence1: str = "sentence1",
    sentence2: str = "sentence2",
    score: str = "score",
    varied_scores: bool = True,
) -> StsData:
    """Load scored pairs from a tsv/csv/jsonl/parquet file with columns sentence1, sentence2, score.

    ``varied_scores=False`` accepts scores that are all equal (a retrieval set of positive pairs only).

    Raises:
        DataFileError: missing file or columns, no rows, a non-text sentence, an unparsable or NaN score,
            or scores that are all equal (Spearman correlation is undefined then; unless
            ``varied_scores=False``).
    """
    rows = read_rows(path)
    require_columns(rows, [sentence1, sentence2, score], path)
    data = StsData(
        text_column(rows, sentence1, path, non_empty=True),
        text_column(rows, sentence2, path, non_empty=True),
        score_column(rows, score, path),
    )
    if varied_scores and len(set(data.scores)) < 2:
        raise DataFileError(f"{path}: every score is {data.scores[0]}; a correlation needs varied scores")
    return data


def default_text_column(rows: list[dict[str, object]]) -> str:
    """The text column used when none is named: ``text`` if the table has one, else its first column."""
    return "text" if "text" in rows[0] else next(iter(rows[0]))


def id_values(rows: list[dict[str, object]], column: str, path: str | os.PathLike) -> list[str]:
    """The values of one column as document ids: non-empty strings or integers, unique, as strings."""
    require_columns(rows, [column], path)
    out: list[str] = []
    first_row: dict[str, int] = {}
    for n, row in enumerate(rows, 1):
        value = row.get(column)
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
            raise DataFileError(
                f"{path}, row {n}: id column {column!r} is {value!r}, expected a non-empty id"
            )
        value = str(value)
        if value in first_row:
            raise DataFileError(f"{path}, rows {first_row[value]} and {n}: duplicate id {value!r}")
        first_row[value] = n
        out.append(value)
    return out


def read_corpus(
    path: str | os.PathLike, column: str | None = None, id_column: str | None = None
) -> tuple[list[str], list[str] | None]:
    """Texts to encode, and their ids if ``id_column`` is given.

    Args:
        path: a ``.txt`` file (one text a line: text i is line i; a blank line before the last text is an
            error naming it; no ids) or a table file (see :func:`read_rows`).
        column: the text column of a table file; default :func:`default_text_column`.
        id_column: the id column of a table file (see :func:`id_values`); None: no ids.

    Raises:
        DataFileError: a missing or unreadable file, a folder, no texts, a blank line, a missing column, a
            non-text value, a missing, empty or repeated id, or a column or id column asked of a ``.txt``
            file (it has no columns).
    """
    path = Path(path)
    if path.suffix.lower() in (".txt", ""):
        for option, value in (("a column", column), ("an id column", id_column)):
            if value is not None:
                raise DataFileError(
                    f"{path}: {option} ({value!r}) was given, but a .txt file has no columns (one text a "
                    f"line); use a table file ({', '.join(TABLE_SUFFIXES)}) or leave the option out"
                )
        path = require_file(path, "input file")
        texts = split_lines(read_text_file(path), path)
        if not texts:
            raise DataFileError(f"{path}: no texts (the file is empty)")
        return texts, None
    rows = read_rows(path)
    texts = text_column(rows, column or default_text_column(rows), path)
    return texts, (id_values(rows, id_column, path) if id_column is not None else None)


def read_texts(path: str | os.PathLike, column: str | None = None) -> list[str]:
    """Texts to encode: one a line from a ``.txt`` file (text i is line i), or one column of a table.

    Args:
        path: a ``.txt`` file, or a tsv/csv/jsonl/json/parquet file.
        column: the column to read from a table file (an error for a ``.txt`` file); defaults to ``text``
            if present, else the first column.
    """
    return read_corpus(path, column)[0]
