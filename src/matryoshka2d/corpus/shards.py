"""The output folder of ``embed-corpus``: shard files, per-shard commit records and the manifest.

Layout of ``OUT``::

    manifest.json                       the job (model, inputs, settings), the shard plan, status
    layers3-dim64/part-00000.parquet    one folder per (layers, dim) cell, one Parquet file per shard,
    layers3-dim64/part-00001.parquet    columns ``id`` (int64 row number, or string ids) and
    ...                                 ``embedding`` (fixed-size list of float32)
    _shards/00000.json                  commit record of shard 0: rows, bytes and SHA-256 of each file
    .lock                               held while a job runs in this folder

A shard is written as: every cell's Parquet file under a temporary name, renamed into place; then its
commit record, the same way. The record is the commit point: a shard is finished only if its record
exists, belongs to this job and every file it lists still has the recorded size, row count and
SHA-256. Anything else (a crash before the record, a truncated or altered file) makes the shard count as
not finished, and it is encoded again; a shard's bytes depend only on its rows and the job's settings,
so a redone shard is identical to the lost one.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from matryoshka2d.corpus.inputs import CorpusPlan, ShardSpec
from matryoshka2d.errors import InvalidInputError
from matryoshka2d.persistence import write_replacing

MANIFEST = "manifest.json"
SHARDS_DIR = "_shards"
LOCK_FILE = ".lock"
FORMAT = "matryoshka2d-corpus"
FORMAT_VERSION = 1


class CorpusOutputError(InvalidInputError):
    """An output folder that cannot be used: another job's output, a folder of other files, or an input."""


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``path`` under a temporary name in its folder, flush it to disk, and rename it into place
    (:func:`~matryoshka2d.persistence.write_replacing`; the job has checked its output folder already).

    A reader (or a resumed job) sees the old file or the whole new one, never a partial one; a killed
    writer leaves only a ``.NAME.tmp-*`` file, which :func:`remove_stale_temporaries` deletes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    write_replacing(path, data)


def cell_folder(layers: int, dim: int) -> str:
    """The folder name of one (layers, dim) cell: ``layers3-dim64``."""
    return f"layers{layers}-dim{dim}"


def shard_file(index: int) -> str:
    return f"part-{index:05d}.parquet"


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
    return sha.hexdigest()


def job_key(job: dict) -> str:
    """A short digest of the job description (what must match for a folder to be resumed)."""
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


def parquet_bytes(ids: list[str] | None, first_row: int, embeddings: np.ndarray) -> bytes:
    """One shard of one cell as Parquet bytes: ``id`` and ``embedding`` (fixed-size float32 list).

    The bytes depend only on the arguments (and the pyarrow version), so a redone shard is byte-identical.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, d = embeddings.shape
    id_array = (
        pa.array(np.arange(first_row, first_row + n, dtype=np.int64))
        if ids is None
        else pa.array(ids, type=pa.string())
    )
    values = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    table = pa.table({"id": id_array, "embedding": pa.FixedSizeListArray.from_arrays(values, d)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=max(n, 1), write_statistics=["id"])
    return buffer.getvalue()


def write_shard(
    out: Path,
    job_id: str,
    shard: ShardSpec,
    ids: list[str] | None,
    embeddings: dict[tuple[int, int], np.ndarray],
) -> dict:
    """Write one shard's files atomically, then its commit record; returns the record."""
    files = {}
    for (k, d), emb in sorted(embeddings.items()):
        if emb.shape[0] != shard.rows:
            raise AssertionError(f"shard {shard.index}: {emb.shape[0]} embeddings for {shard.rows} rows")
        data = parquet_bytes(ids, shard.first_row, emb)
        rel = f"{cell_folder(k, d)}/{shard_file(shard.index)}"
        atomic_write(out / rel, data)
        files[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    record = {"job": job_id, "shard": shard.to_dict(), "files": files}
    atomic_write(out / SHARDS_DIR / f"{shard.index:05d}.json", json.dumps(record, indent=1) + "\n")
    return record


def finished_record(out: Path, job_id: str, shard: ShardSpec, cells: list[str]) -> dict | None:
    """The commit record of ``shard`` if the shard is finished and intact, else None (it must be redone).

    Checks that the record parses, belongs to this job and this shard, lists a file for every cell, and
    that each file has the recorded size, SHA-256 and the shard's row count.
    """
    path = out / SHARDS_DIR / f"{shard.index:05d}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("job") != job_id or record.get("shard") != shard.to_dict():
        return None
    files = record.get("files")
    expected = {f"{cell}/{shard_file(shard.index)}" for cell in cells}
    if not isinstance(files, dict) or set(files) != expected:
        return None
    for rel, info in files.items():
        target = out / rel
        try:
            if target.stat().st_size != info["bytes"] or sha256_file(target) != info["sha256"]:
                return None
            if _parquet_rows(target) != shard.rows:
                return None
        except (OSError, KeyError, TypeError):
            return None
    return record


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # a file that is not Parquet any more
        return -1


def write_manifest(out: Path, manifest: dict) -> None:
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def read_manifest(out: str | os.PathLike) -> dict:
    """The manifest of an ``embed-corpus`` output folder.

    Raises:
        CorpusOutputError: there is no manifest, or it is not an ``embed-corpus`` manifest.
    """
    path = Path(out) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorpusOutputError(f"{out}: no {MANIFEST}; not an embed-corpus output folder") from None
    except (OSError, ValueError) as e:
        raise CorpusOutputError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusOutputError(f"{path} is not an embed-corpus manifest (no format {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorpusOutputError(
            f"{path}: format version {manifest.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    return manifest


def plan_to_json(plan: CorpusPlan) -> dict:
    return {
        "inputs": [
            {"path": f.path, "bytes": f.size, "sha256": f.sha256, "rows": f.rows} for f in plan.inputs
        ],
        "shards": [s.to_dict() for s in plan.shards],
    }


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold ``OUT/.lock`` for the duration of a job; a second job on the same folder is refused."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CorpusOutputError(
                f"--out {out}: another embed-corpus job is running in this folder"
            ) from None
        yield
    finally:
        os.close(fd)


def remove_stale_temporaries(out: Path) -> None:
    """Delete temporary files left by an interrupted job (only names :func:`atomic_write` creates)."""
    for folder in [out, *(p for p in out.iterdir() if p.is_dir())]:
        for p in folder.glob(".*.tmp-*"):
            if p.is_file():
                p.unlink(missing_ok=True)


def check_output_folder(out: Path, job: dict, job_id: str) -> dict | None:
    """Refuse an output folder that holds other files or another job; return its manifest.

    Returns:
        The existing manifest if ``out`` holds this same job (it is resumed), else None (a new job).

    Raises:
        CorpusOutputError: naming the conflict (for another job: which settings differ).
    """
    if out.exists() and not out.is_dir():
        raise CorpusOutputError(f"--out {out} is a file: give a folder")
    if not out.exists() or not (out / MANIFEST).exists():
        if out.exists():
            # the lock, and what a run killed while writing its first manifest left (write_manifest's
            # temporary file, removed once the job is accepted), are this job's own
            others = sorted(
                p.name
                for p in out.iterdir()
                if p.name != LOCK_FILE and not (p.is_file() and p.name.startswith(f".{MANIFEST}.tmp-"))
            )
            if others:
                raise CorpusOutputError(
                    f"--out {out} is not empty and has no {MANIFEST} (it holds {others[:3]}); "
                    "give an empty or new folder"
                )
        return None
    manifest = read_manifest(out)
    if manifest.get("job_id") != job_id:
        old = manifest.get("job", {})
        diffs = [
            f"{key}: {old.get(key)!r} there, {job.get(key)!r} now"
            for key in sorted(set(old) | set(job))
            if old.get(key) != job.get(key)
        ]
        raise CorpusOutputError(
            f"--out {out} holds another embed-corpus job ({'; '.join(diffs)[:400]}); use another --out, or "
            "delete that folder to start over"
        )
    return manifest


def read_cell(out: str | os.PathLike, layers: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """All ids and embeddings of one (layers, dim) cell of a finished output, in corpus order.

    Returns:
        ``(ids, embeddings)``: ids as an int64 or string array, embeddings float32 ``(rows, dim)``.

    Raises:
        CorpusOutputError: the folder is not a finished output or does not hold that cell.
    """
    import pyarrow.parquet as pq

    manifest = read_manifest(out)
    if manifest.get("status") != "complete":
        raise CorpusOutputError(f"{out}: the job is not finished (status {manifest.get('status')!r})")
    cell = cell_folder(layers, dim)
    if not any(c["folder"] == cell for c in manifest["cells"]):
        have = [(c["layers"], c["dim"]) for c in manifest["cells"]]
        raise CorpusOutputError(f"{out}: no cell layers={layers}, dim={dim}; it holds {have}")
    ids, embs = [], []
    for shard in manifest["shards"]:
        table = pq.read_table(Path(out) / cell / shard_file(shard["index"]))
        ids.append(table.column("id").to_numpy())
        flat = table.column("embedding").combine_chunks().flatten().to_numpy()
        embs.append(flat.reshape(table.num_rows, dim))
    return np.concatenate(ids), np.concatenate(embs).astype(np.float32, copy=False)


def list_temporaries(out: Path) -> list[Path]:
    """Temporary files in ``out`` (for tests and diagnostics)."""
    return [p for p in out.rglob(".*.tmp-*") if p.is_file()]


__all__ = [
    "CorpusOutputError",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "cell_folder",
    "check_output_folder",
    "finished_record",
    "job_key",
    "locked",
    "parquet_bytes",
    "read_cell",
    "read_manifest",
    "write_manifest",
    "write_shard",
]
