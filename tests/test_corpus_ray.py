"""The Ray engine of embed-corpus (matryoshka2d.corpus.ray_engine) on a local Ray instance.

Ray starts once for the module (it takes seconds); the tests check that Ray Data's actor pool writes
byte-identical shards to the local engine, and that a job can move between engines half-way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import WORDS

from matryoshka2d.corpus import embed_corpus, read_cell, read_manifest
from matryoshka2d.errors import DataFileError

ray = pytest.importorskip("ray", reason="the Ray engine needs the 'ray' extra (make test installs it)")

SETTINGS = dict(layers=[1, 3], dims=[32, 8], shard_rows=40, batch_size=16, show_progress=False)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance (2 CPUs) for the module; Ray's workers inherit this environment."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("ray-corpus") / "corpus.jsonl"
    lines = [
        f'{{"id": "doc{i}", "text": "{" ".join(rng.choice(WORDS, size=rng.integers(1, 14)))}"}}'
        for i in range(190)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.suffix in (".parquet",)
    }


def test_ray_actors_write_exactly_the_local_engines_shards(local_ray, tiny_model_dir, corpus, tmp_path):
    local = embed_corpus(tiny_model_dir, corpus, tmp_path / "local", id_column="id", **SETTINGS)
    on_ray = embed_corpus(
        tiny_model_dir, corpus, tmp_path / "ray", id_column="id", engine="ray", workers=2, **SETTINGS
    )
    assert on_ray.complete and on_ray.encoded_shards == 5 and on_ray.engine == "ray"
    assert files(tmp_path / "ray") == files(tmp_path / "local") and len(files(tmp_path / "ray")) == 20
    assert read_manifest(tmp_path / "ray") == read_manifest(tmp_path / "local") == local.manifest
    for k, d in [(1, 8), (3, 32)]:
        ids, emb = read_cell(tmp_path / "ray", k, d)
        local_ids, local_emb = read_cell(tmp_path / "local", k, d)
        assert ids.tolist() == local_ids.tolist() == [f"doc{i}" for i in range(190)]
        assert np.array_equal(emb, local_emb)


def test_a_job_started_locally_is_finished_on_ray(local_ray, tiny_model_dir, corpus, tmp_path):
    whole = tmp_path / "whole"
    embed_corpus(tiny_model_dir, corpus, whole, **SETTINGS)
    mixed = tmp_path / "mixed"
    embed_corpus(tiny_model_dir, corpus, mixed, max_shards=2, **SETTINGS)
    (mixed / "layers3-dim8" / "part-00001.parquet").write_bytes(b"damaged")
    result = embed_corpus(tiny_model_dir, corpus, mixed, engine="ray", workers=1, **SETTINGS)
    assert result.skipped_shards == 1 and result.encoded_shards == 4
    assert files(mixed) == files(whole)


def test_bad_input_met_by_a_worker_is_reported_as_is(local_ray, tiny_model_dir, tmp_path):
    from matryoshka2d.corpus.inputs import plan_corpus
    from matryoshka2d.corpus.job import ShardJob
    from matryoshka2d.corpus.ray_engine import run_on_ray

    path = tmp_path / "a.txt"
    path.write_text("a cat\nthe dog\nthe sky\n", encoding="utf-8")
    plan = plan_corpus([path], shard_rows=2)
    path.write_text("a cat\n", encoding="utf-8")  # the file shrinks after planning
    job = ShardJob(str(tiny_model_dir), plan, [3], [8], 8, str(tmp_path / "out"), "job")
    with pytest.raises(DataFileError, match="the file changed"):
        list(run_on_ray(job, plan.shards[1:], None, 1, 1))


def test_an_address_without_a_cluster_is_refused_quickly():
    from matryoshka2d.corpus.ray_engine import _check_reachable
    from matryoshka2d.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="--ray-address 127.0.0.1:9: no Ray cluster answers there"):
        _check_reachable("127.0.0.1:9")
    _check_reachable("auto")  # left to Ray, which knows where a local cluster is


def test_an_actor_loads_the_jobs_runtime(tiny_model_dir, corpus, tmp_path, monkeypatch):
    """The Ray actor (built here without Ray) loads what the driver chose, with its threads for ONNX."""
    import dataclasses

    from matryoshka2d.corpus.inputs import expand_inputs, plan_corpus
    from matryoshka2d.corpus.job import ShardJob
    from matryoshka2d.corpus.ray_engine import ShardEncoder

    monkeypatch.setenv("M2D_CACHE_DIR", str(tmp_path / "cache"))
    plan = plan_corpus(expand_inputs([str(corpus)]), shard_rows=10_000)
    job = ShardJob(str(tiny_model_dir), plan, [4], [8], 32, str(tmp_path / "out"), "id", None, "onnx-int8")
    actor = ShardEncoder(job, threads=1)
    assert actor.model.backend == "onnx-int8" and actor.model.threads == 1
    actor = ShardEncoder(dataclasses.replace(job, runtime="torch", dtype="bfloat16"), threads=1)
    assert actor.model.backend == "torch" and actor.model.precision == "bfloat16"


def test_an_actor_on_a_cpu_with_other_int8_kernels_refuses_the_shards(
    tiny_model_dir, corpus, tmp_path, monkeypatch
):
    """onnx-int8 picks its kernels from the CPU: a node that picks others than the driver reports an error
    for each shard instead of writing vectors that differ by ~4e-4."""
    from matryoshka2d.corpus.inputs import expand_inputs, plan_corpus
    from matryoshka2d.corpus.job import ShardJob
    from matryoshka2d.corpus.ray_engine import ShardEncoder

    monkeypatch.setenv("M2D_CACHE_DIR", str(tmp_path / "cache"))
    plan = plan_corpus(expand_inputs([str(corpus)]), shard_rows=10_000)
    args = (str(tiny_model_dir), plan, [4], [8], 32, str(tmp_path / "out"), "id", None, "onnx-int8")
    here = ShardEncoder(ShardJob(*args), threads=1).model.preset
    same = ShardEncoder(ShardJob(*args, int8_preset=here), threads=1)
    assert same.refusal is None
    other = ShardEncoder(ShardJob(*args, int8_preset="another-cpu"), threads=1)
    reply = other({"shard": np.array([0])})
    assert list(reply["error"]) == ["InvalidInputError"] and "'another-cpu'" in reply["message"][0]
    assert not (tmp_path / "out").exists()
