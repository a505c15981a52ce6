"""``embed_corpus``: encode a corpus once into Parquet shards for several (layers, dim) cells, resumably.

The job is: inputs (files, in order) x model x settings. It is cut into shards (see
:mod:`matryoshka2d.corpus.inputs`); each shard is encoded by one call of the model's streaming encoder
(:meth:`~matryoshka2d.model.EmbeddingModel.iter_encode`, one forward pass up to the deepest requested
layer count, every cell pooled from it) and written with :func:`~matryoshka2d.corpus.shards.write_shard`.
The local engine runs shards one after another in this process; the Ray engine
(:mod:`matryoshka2d.corpus.ray_engine`) runs the same shard function in a pool of Ray actors. A shard's
bytes depend only on its rows and the job's settings, never on the engine, the worker or the order, so
both engines write identical files, and a resumed job equals an uninterrupted one (with the torch float32
runtime; bfloat16 and int8 values may move in their last bits with a worker's thread count).
"""

from __future__ import annotations

import gc
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from matryoshka2d.corpus.inputs import CorpusPlan, ShardSpec, expand_inputs, plan_corpus, read_shard
from matryoshka2d.corpus.shards import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    CorpusOutputError,
    cell_folder,
    check_output_folder,
    finished_record,
    job_key,
    locked,
    plan_to_json,
    remove_stale_temporaries,
    write_manifest,
    write_shard,
)
from matryoshka2d.encoder import prompt_option
from matryoshka2d.errors import InvalidInputError
from matryoshka2d.validation import check_positive_int

#: Rows per shard unless told otherwise: a few seconds to a minute of encoding per shard.
DEFAULT_SHARD_ROWS = 10_000
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class CorpusResult:
    """What a run of :func:`embed_corpus` did.

    Attributes:
        out: the output folder.
        complete: every shard is finished (False after ``max_shards`` stopped the run early).
        rows: rows in the corpus.
        shards: shards in the plan.
        encoded_shards, encoded_rows: shards and rows encoded by this run.
        skipped_shards: shards found finished and intact (from an earlier run) and not redone.
        seconds: wall time of the encoding phase (after planning and model loading).
        plan_seconds: time spent scanning the inputs.
        engine: ``local`` or ``ray``.
        manifest: the manifest as written.
    """

    out: Path
    complete: bool
    rows: int
    shards: int
    encoded_shards: int
    encoded_rows: int
    skipped_shards: int
    seconds: float
    plan_seconds: float
    engine: str
    manifest: dict

    @property
    def rows_per_second(self) -> float:
        return self.encoded_rows / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to encode any shard of a job (picklable, sent to Ray actors)."""

    model: str
    plan: CorpusPlan
    layers: list[int]
    dims: list[int]
    batch_size: int
    out: str
    job_id: str
    #: prepended to every text (the model's ``resolve_prompt`` result); None: its default prompt
    prompt: str | None = None
    #: how workers load the model (:func:`~matryoshka2d.backends.load_encoder`): the driver's choice, with
    #: ``dtype`` resolved (``"auto"`` becomes what it chose, so every worker computes alike)
    runtime: str = "torch"
    dtype: str = "float32"
    compile: bool = False
    #: onnx-int8: the driver's int8 kernels (chosen from its CPU); a worker whose CPU picks others refuses
    int8_preset: str | None = None

    @property
    def cells(self) -> list[str]:
        return [cell_folder(k, d) for k in self.layers for d in self.dims]


def encode_shard(model, job: ShardJob, shard: ShardSpec, workers: int = 1) -> dict:
    """Read, encode and write one shard (the unit of work of every engine); returns its commit record.

    ``workers``: batches encoded at once (:meth:`~matryoshka2d.encoder.Encoder.iter_encode`; the same
    batches, so the same vectors, as one)."""
    texts, ids = read_shard(job.plan, shard)
    (batch,) = model.iter_encode(
        texts,
        job.layers,
        job.dims,
        batch_size=job.batch_size,
        chunk_size=len(texts),
        show_progress=False,
        workers=workers,
        **prompt_option(job.prompt),
    )
    return write_shard(Path(job.out), job.job_id, shard, ids, batch.embeddings)


def model_fingerprint(folder: Path) -> str:
    """SHA-256 over the names and contents of a model folder's files (hidden files skipped)."""
    sha = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        sha.update(str(rel).encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                sha.update(block)
    return sha.hexdigest()


def _int_list(values: int | Sequence[int] | None, name: str) -> list[int] | None:
    if values is None:
        return None
    if isinstance(values, (int, np.integer)):
        return [int(values)]
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise InvalidInputError(f"{name} must be an integer or a list of integers, got {values!r}")
    return list(values)


def embed_corpus(
    model: str | os.PathLike,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    layers: int | Sequence[int] | None = None,
    dims: int | Sequence[int] | None = None,
    text_column: str | None = None,
    id_column: str | None = None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    batch_size: int = 32,
    engine: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1,
    max_shards: int | None = None,
    show_progress: bool = True,
    prompt_name: str | None = None,
    prompt: str | None = None,
    runtime: str = "torch",
    dtype: str = "float32",
    compile: bool = False,
) -> CorpusResult:
    """Encode a corpus into Parquet shards of (id, embedding) for every (layers, dim) cell, plus a manifest.

    Re-running the same job on the same ``out`` resumes it: finished shards whose files still match their
    recorded size, row count and SHA-256 are kept; missing, partial or altered shards are encoded again.

    Args:
        model: a model folder or hub id (Ray workers load it by this name, so it must resolve there too).
        inputs: a file, a glob or a folder, or a list of them (see :func:`~.inputs.expand_inputs`).
        out: the output folder: new, empty, or holding this same job (anything else is refused).
        layers: layer counts to write (default: all layers).
        dims: embedding sizes to write (default: the model's dim).
        text_column: text column of table inputs (default: ``text`` or the first column).
        id_column: id column of table inputs (default: ids are corpus row numbers, int64).
        shard_rows: rows per shard.
        batch_size: texts per forward pass.
        engine: ``local`` (this process) or ``ray`` (Ray Data actors, see :mod:`.ray_engine`).
        ray_address: Ray cluster to join (``auto``, ``ray://host:10001``); default: start a local Ray.
        workers: local: batches encoded at once in this process, each with torch's threads divided
            among them (default 1; on 2 cores 2 encoded 1.26x the rows in bfloat16, see
            :meth:`~matryoshka2d.encoder.Encoder.iter_encode`); ray: actors, one model each (default:
            the cluster's CPUs / ``cpus_per_worker``).
        cpus_per_worker: CPUs (torch or ONNX Runtime threads) per Ray actor.
        max_shards: encode at most this many shards in this run, then stop (the job stays resumable).
        show_progress: a tqdm bar counting rows (with rows/s).
        prompt_name, prompt: the prompt prepended to every text (e.g. ``prompt_name="document"`` for a
            retrieval model; see :meth:`~matryoshka2d.encoder.Encoder.resolve_prompt`); default: the
            model's default prompt. Part of the job: a run with another prompt is another job.
        runtime, dtype, compile: how the model runs (:func:`~matryoshka2d.backends.load_encoder`:
            ``"torch"``, ``"onnx"`` or ``"onnx-int8"``; ``"float32"``, ``"bfloat16"``, ``"float16"`` or
            ``"auto"``). Part of the job unless torch float32 eager (the vectors differ slightly), with
            ``"auto"`` resolved and onnx-int8's kernels (chosen from the CPU): a job is resumed only with
            what it was started with, and Ray workers whose CPU picks other int8 kernels refuse it.

    Returns:
        :class:`CorpusResult`.

    Raises:
        DataFileError: an unreadable input or an unusable value (named with file and line).
        CorpusOutputError: ``out`` is or holds an input, holds other files, or holds another job.
        InvalidLayersError, InvalidDimError, InvalidInputError: bad settings.
    """
    from matryoshka2d.backends import check_compile, load_encoder, worker_runtime_threads
    from matryoshka2d.persistence import resolve_model_path

    if engine not in ENGINES:
        raise InvalidInputError(f"engine {engine!r} is unknown; use one of {ENGINES}")
    shard_rows = check_positive_int(shard_rows, "shard_rows")
    batch_size = check_positive_int(batch_size, "batch_size")
    if max_shards is not None:
        max_shards = check_positive_int(max_shards, "max_shards")
    if workers is not None:
        workers = check_positive_int(workers, "workers")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out = Path(out)
    files = expand_inputs([str(p) for p in inputs], skip=out)
    _refuse_input_as_output(out, files)

    model_path = resolve_model_path(model)
    _refuse_model_as_output(out, model_path)
    local_workers = workers if engine == "local" and workers is not None else 1
    check_compile(runtime, compile)
    # compiled (local engine) only after the fingerprints below: they run every layer count once
    threads = worker_runtime_threads(runtime, local_workers)
    loaded = load_encoder(model_path, backend=runtime, dtype=dtype, threads=threads)
    runs_as = {"runtime": loaded.backend, "precision": loaded.precision}
    preset = getattr(loaded, "preset", None)  # onnx-int8: the int8 kernels chosen for this CPU
    if preset:
        runs_as["int8_preset"] = preset
    if compile:  # compiled float32 differs from eager in the last bits
        runs_as["compiled"] = True
    ks, ds = loaded._layer_list(_int_list(layers, "layers")), loaded._dim_list(_int_list(dims, "dims"))
    asked = None if prompt_name is None and prompt is None else loaded.resolve_prompt(prompt_name, prompt)
    model_info = {"name": str(model), "num_layers": loaded.num_layers, "dim": loaded.dim, **runs_as}
    from matryoshka2d.search.fingerprint import ModelFingerprint

    # The model's embeddings of a few probe sentences at each layer count written: what a search index
    # or Qdrant collection the vectors are uploaded into checks other models against.
    fingerprints = {str(k): ModelFingerprint.of(loaded, k).to_json() for k in ks}
    if compile and engine == "local":
        loaded.compile_for_inference()

    started = time.perf_counter()
    plan = plan_corpus(files, text_column=text_column, id_column=id_column, shard_rows=shard_rows)
    plan_seconds = time.perf_counter() - started
    job = {
        "model_sha256": model_fingerprint(model_path),
        "inputs": [{"path": f.path, "bytes": f.size, "sha256": f.sha256} for f in plan.inputs],
        "text_column": plan.text_column,
        "id_column": plan.id_column,
        "layers": ks,
        "dims": ds,
        "shard_rows": shard_rows,
        "batch_size": batch_size,
        "normalize": True,
        "format_version": FORMAT_VERSION,
        # only when asked for, so that the ids of jobs without one (and their resumption) are unchanged
        **prompt_option(asked),
        **(runs_as if runs_as != {"runtime": "torch", "precision": "float32"} else {}),
    }
    job_id = job_key(job)
    ref = str(model_path.resolve()) if Path(str(model)).expanduser().is_dir() else str(model)
    worker_dtype = loaded.precision if runtime == "torch" else "float32"
    shard_job = ShardJob(
        ref,
        plan,
        ks,
        ds,
        batch_size,
        str(out.resolve()),
        job_id,
        asked,
        runtime,
        worker_dtype,
        compile,
        preset,
    )
    cells = [{"layers": k, "dim": d, "folder": cell_folder(k, d), "rows": plan.rows} for k in ks for d in ds]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "job_id": job_id,
        "status": "running",
        "model": model_info,
        "job": job,
        "layers": ks,
        "dims": ds,
        "rows": plan.rows,
        "id_type": "string" if plan.id_column is not None else "int64",
        "embedding": "float32, L2-normalised after truncation to dim",
        "cells": cells,
        "model_fingerprints": fingerprints,
        **plan_to_json(plan),
    }

    check_output_folder(out, job, job_id)  # before locked() creates anything in a folder it refuses
    with locked(out):
        check_output_folder(out, job, job_id)  # again: another job may have started meanwhile
        remove_stale_temporaries(out)
        if not (out / MANIFEST).exists():
            write_manifest(out, manifest)
        records: dict[int, dict] = {}
        for shard in plan.shards:
            record = finished_record(out, job_id, shard, shard_job.cells)
            if record is not None:
                records[shard.index] = record
        pending = [s for s in plan.shards if s.index not in records]
        skipped = len(records)
        if max_shards is not None:
            pending = pending[:max_shards]
        done_rows = sum(s.rows for s in plan.shards if s.index in records)
        bar = tqdm(
            total=plan.rows,
            initial=done_rows,
            desc="embed-corpus",
            unit="row",
            unit_scale=True,
            smoothing=0.1,
            disable=not show_progress,
        )
        started = time.perf_counter()
        with bar:
            if engine == "local":
                for shard in pending:
                    records[shard.index] = encode_shard(loaded, shard_job, shard, local_workers)
                    bar.update(shard.rows)
            else:
                del loaded  # the actors load their own copies
                gc.collect()
                from matryoshka2d.corpus.ray_engine import run_on_ray

                for shard in run_on_ray(shard_job, pending, ray_address, workers, cpus_per_worker):
                    bar.update(shard.rows)
        seconds = time.perf_counter() - started
        if engine == "ray":  # the actors wrote the files: check them as a resumed run would
            for shard in pending:
                record = finished_record(out, job_id, shard, shard_job.cells)
                if record is None:
                    raise CorpusOutputError(f"{out}: shard {shard.index} was reported done but is not intact")
                records[shard.index] = record
        complete = len(records) == len(plan.shards)
        if complete:
            for source in plan.inputs:  # one more read: an edit that kept the size is caught too
                source.check_unchanged(hash_it=True)
            manifest["status"] = "complete"
            manifest["shards"] = [{**s.to_dict(), "files": records[s.index]["files"]} for s in plan.shards]
            write_manifest(out, manifest)
    return CorpusResult(
        out=out,
        complete=complete,
        rows=plan.rows,
        shards=len(plan.shards),
        encoded_shards=len(pending),
        encoded_rows=sum(s.rows for s in pending),
        skipped_shards=skipped,
        seconds=seconds,
        plan_seconds=plan_seconds,
        engine=engine,
        manifest=manifest,
    )


def _refuse_model_as_output(out: Path, model_path: Path) -> None:
    """Refuse an ``out`` inside the model folder (the shards would change the model's fingerprint, so the
    job could never be resumed) or holding it."""
    model, resolved = model_path.resolve(), out.resolve()
    if model == resolved or model in resolved.parents or resolved in model.parents:
        raise CorpusOutputError(
            f"--out {out} is inside (or holds) the model folder {model_path}: choose an output folder "
            "outside the model"
        )


def _refuse_input_as_output(out: Path, files: list[Path]) -> None:
    """Refuse before any work: ``out`` is a file, or is (or contains) one of the inputs."""
    resolved = out.resolve()
    for f in files:
        if f == resolved or resolved in f.parents:
            raise CorpusOutputError(
                f"--out {out} would hold the input {f}: choose an output folder outside the inputs"
            )
    if out.exists() and not out.is_dir():
        raise CorpusOutputError(f"--out {out} is a file: give a folder")
