"""The Ray engine of ``embed-corpus``: the same shards, encoded by a pool of Ray Data actors.

The pending shards become a Ray Dataset of shard numbers (``ray.data.from_items``, one block per shard),
mapped with ``map_batches`` over a fixed-size actor pool (``ray.data.ActorPoolStrategy``): each actor
loads the model once and, per shard, reads the shard's rows straight from the input file (the plan holds
each shard's byte or row offset), encodes them with the same function as the local engine
(:func:`~matryoshka2d.corpus.job.encode_shard`) and writes the shard's files and commit record into the
output folder. Only shard numbers and row counts travel through Ray; texts and vectors do not.

So on a multi-machine cluster the model, the inputs and the output folder must be reachable under the
same paths from every node (a shared file system), and matryoshka2d must be installed on every node. A
shard that Ray retries (a lost actor) is simply written again: the files are replaced atomically and are
byte-identical.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np

from matryoshka2d.corpus.inputs import ShardSpec
from matryoshka2d.errors import InvalidInputError, Matryoshka2dError, first_line

#: Environment variables the workers get from the driver when set there (offline hub, tokenizers).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM", "M2D_DATA_DIR", "M2D_CACHE_DIR")


class ShardEncoder:
    """A Ray Data actor: one model, encodes whole shards (``batch["shard"]`` holds shard numbers).

    Args:
        job: the :class:`~matryoshka2d.corpus.job.ShardJob`.
        threads: torch or ONNX Runtime threads for this actor (its CPU share).
    """

    def __init__(self, job, threads: int) -> None:
        import torch

        from matryoshka2d.backends import load_encoder

        threads = max(1, threads)
        torch.set_num_threads(threads)
        self.job = job
        self.model = load_encoder(
            job.model,
            backend=job.runtime,
            dtype=job.dtype,
            compile=job.compile,
            threads=threads if job.runtime != "torch" else None,
        )
        preset = getattr(self.model, "preset", None)
        #: why this actor may not encode the job's shards (reported for each shard), or None
        self.refusal = None
        if job.int8_preset is not None and preset != job.int8_preset:
            self.refusal = (
                f"this Ray node's CPU runs int8 with the {preset!r} kernels, the job was started with "
                f"{job.int8_preset!r}: the vectors would differ; run it on nodes of one CPU kind, or use "
                "--runtime onnx"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Encode the shards in ``batch["shard"]``; a user-facing error is returned as data, not raised.

        Ray wraps a raised exception in its own types and loses the original one on the way to the driver,
        so a :class:`~matryoshka2d.errors.Matryoshka2dError` (bad input met while reading a shard) comes
        back as ``error`` (its class name) and ``message`` for the driver to raise as is.
        """
        from matryoshka2d.corpus.job import encode_shard

        indices = [int(i) for i in batch["shard"]]
        errors, messages = [], []
        for index in indices:
            if self.refusal is not None:
                errors.append("InvalidInputError")
                messages.append(self.refusal)
                continue
            try:
                encode_shard(self.model, self.job, self.job.plan.shards[index])
                errors.append("")
                messages.append("")
            except Matryoshka2dError as e:
                errors.append(type(e).__name__)
                messages.append(str(e))
        return {
            "shard": np.asarray(indices, dtype=np.int64),
            "error": np.asarray(errors, dtype=object),
            "message": np.asarray(messages, dtype=object),
        }


def _user_error(name: str, message: str) -> Matryoshka2dError:
    """The error a worker reported, as its own class from :mod:`matryoshka2d.errors` (or the base class)."""
    from matryoshka2d import corpus, errors

    cls = getattr(errors, name, None) or getattr(corpus, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Matryoshka2dError)):
        cls = Matryoshka2dError
    return cls(message)


def _check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """Refuse a ``host:port`` cluster address that does not answer (Ray itself would wait minutes)."""
    import socket

    if not address or address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise InvalidInputError(
            f"--ray-address {address}: no Ray cluster answers there ({e}); start one with `ray start --head` "
            "or use 'auto' on a cluster node"
        ) from None


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise InvalidInputError(
            "--engine ray needs Ray Data: pip install 'matryoshka2d[ray]' (or use --engine local)"
        ) from None
    return ray


def run_on_ray(
    job, pending: list[ShardSpec], address: str | None, workers: int | None, cpus_per_worker: float
) -> Iterator[ShardSpec]:
    """Encode ``pending`` shards on Ray; yields each shard as its files are committed (in any order).

    Joins the cluster at ``address`` (``auto``: the running cluster; ``ray://...``: a remote one), or uses
    the Ray already initialised in this process, or starts a local one (shut down afterwards).

    Raises:
        InvalidInputError: Ray is not installed, or ``cpus_per_worker`` exceeds the cluster's CPUs.
    """
    ray = _import_ray()
    if not pending:
        return
    started_here = False
    if not ray.is_initialized():
        _check_reachable(address)
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
                runtime_env={"env_vars": env} if env else None,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:  # no cluster there, a bad address
            where = f"at --ray-address {address}" if address else "locally"
            first = first_line(e)
            raise InvalidInputError(f"cannot start or join Ray {where}: {first}") from None
        started_here = True
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # embed-corpus shows its own bar
        context.execution_options.verbose_progress = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        cluster_cpus = float(ray.cluster_resources().get("CPU", 0))
        if cpus_per_worker <= 0 or cpus_per_worker > cluster_cpus:
            raise InvalidInputError(
                f"cpus_per_worker={cpus_per_worker}: the Ray cluster has {cluster_cpus:g} CPUs"
            )
        size = workers or max(1, int(cluster_cpus // cpus_per_worker))
        size = min(size, len(pending))
        by_index = {s.index: s for s in pending}
        dataset = ray.data.from_items([{"shard": s.index} for s in pending], override_num_blocks=len(pending))
        encoded = dataset.map_batches(
            ShardEncoder,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1),
            num_cpus=cpus_per_worker,
            fn_constructor_kwargs={"job": job, "threads": int(cpus_per_worker)},
        )
        for row in encoded.iter_rows():
            if row["error"]:
                raise _user_error(str(row["error"]), str(row["message"]))
            yield by_index[int(row["shard"])]
    finally:
        if started_here:
            ray.shutdown()
