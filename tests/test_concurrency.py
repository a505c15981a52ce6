"""Engine core under concurrency: one loaded model serves any (layers, dims) from many threads at once.

Every concurrent result must equal the same call made alone, exactly (max abs diff 0), and nothing in the
loaded model may change while it runs fewer layers. Also the streaming encoder ``iter_encode``.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import SENTENCES, build_tiny_model, packaged_minilm

from matryoshka2d import EmbeddingModel, InvalidInputError
from matryoshka2d.truncation import find_layer_stack

# (layers, dim) cells; None = full. Mixed on purpose: every thread asks for different depths and sizes.
TINY_CELLS = [(None, None), (1, None), (2, 16), (4, 8), (3, None), (1, 4), (2, None), (4, 32)]


def run_concurrently(model: EmbeddingModel, texts: list[str], cells, threads: int, calls: int, batch_size=4):
    """``threads`` x ``calls`` encode calls cycling through ``cells``: [(cell, result or exception)]."""
    barrier = threading.Barrier(threads)

    def worker(t: int):
        barrier.wait()  # start together so that forward passes of different depths overlap
        out = []
        for i in range(calls):
            cell = cells[(t + i) % len(cells)]
            try:
                out.append((cell, model.encode(texts, layers=cell[0], dim=cell[1], batch_size=batch_size)))
            except Exception as e:  # noqa: BLE001 - reported by the test
                out.append((cell, e))
        return out

    with ThreadPoolExecutor(threads) as pool:
        return list(itertools.chain.from_iterable(pool.map(worker, range(threads))))


def assert_equal_to_sequential(model, texts, cells, results, batch_size=4):
    reference = {c: model.encode(texts, layers=c[0], dim=c[1], batch_size=batch_size) for c in cells}
    errors = [f"{cell}: {r!r}" for cell, r in results if isinstance(r, Exception)]
    assert not errors, f"{len(errors)} concurrent calls failed, e.g. {errors[:3]}"
    worst = max(float(np.abs(r - reference[cell]).max()) for cell, r in results)
    assert worst == 0.0, f"concurrent results differ from sequential ones by up to {worst}"


@pytest.mark.parametrize("family", ["bert", "mpnet", "distilbert"])
def test_mixed_layers_and_dims_from_many_threads_equal_sequential(tmp_path, family):
    model = build_tiny_model(tmp_path, family)
    layers_before = find_layer_stack(model.transformer)
    results = run_concurrently(model, SENTENCES, TINY_CELLS, threads=4, calls=20)
    assert len(results) == 80
    assert_equal_to_sequential(model, SENTENCES, TINY_CELLS, results)
    parent, name = find_layer_stack(model.transformer)
    assert (parent, name) == layers_before and len(getattr(parent, name)) == 4 and model.num_layers == 4


def test_the_reported_case_one_full_three_single_layer_threads(tiny_model):
    """Issue 8's case: one thread at full depth while three run 1 layer; none may see the other's depth."""
    full = tiny_model.encode(SENTENCES)
    one = tiny_model.encode(SENTENCES, layers=1)
    seen_layers: list[int] = []
    stop = threading.Event()

    def full_caller():
        out = []
        for _ in range(40):
            out.append(tiny_model.encode(SENTENCES))
            seen_layers.append(tiny_model.num_layers)
        stop.set()
        return out

    def one_layer_caller():
        out = []
        while not stop.is_set():
            out.append(tiny_model.encode(SENTENCES, layers=1))
        return out

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(full_caller)] + [pool.submit(one_layer_caller) for _ in range(3)]
        full_results = futures[0].result()
        one_results = [r for f in futures[1:] for r in f.result()]
    assert all(np.array_equal(r, full) for r in full_results)
    assert all(np.array_equal(r, one) for r in one_results)
    assert set(seen_layers) == {tiny_model.num_layers}


def test_truncate_export_equals_encode_while_other_threads_encode(tiny_model, tmp_path):
    expected = tiny_model.encode(SENTENCES, layers=2, dim=16)
    stop = threading.Event()

    def busy():
        n = 0
        while not stop.is_set():
            tiny_model.encode(SENTENCES, layers=[1, 4, 3][n % 3])
            n += 1
        return n

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(busy) for _ in range(3)]
        try:
            exports = []
            for i in range(3):
                small = tiny_model.truncate(layers=2, dim=16)
                exports.append(EmbeddingModel.load(small.save(tmp_path / f"export-{i}")))
        finally:
            stop.set()
        assert all(f.result() > 0 for f in futures)
    for small in exports:
        assert small.num_layers == 2 and small.dim == 16
        assert np.abs(small.encode(SENTENCES) - expected).max() <= 1e-6
    assert tiny_model.num_layers == 4


def test_encode_leaves_train_eval_mode_alone(tiny_model, monkeypatch):
    """Another thread may be training: encode must not switch the shared model's mode."""

    def forbidden(*args, **kwargs):
        raise AssertionError("encode switched the model's train/eval mode")

    monkeypatch.setattr(tiny_model, "train", forbidden)
    monkeypatch.setattr(tiny_model, "eval", forbidden)
    tiny_model.encode(SENTENCES, layers=2)
    list(tiny_model.iter_encode(SENTENCES, layers=[1, 2], dims=[8, 32]))
    tiny_model.encode_layers(SENTENCES, [1, 4])
    assert not tiny_model.training


# ---------------------------------------------------------------------- iter_encode


def test_iter_encode_streams_a_generator_in_bounded_chunks(tiny_model):
    consumed = 0

    def texts():
        nonlocal consumed
        for text in SENTENCES * 5:  # 60 texts, no len()
            consumed += 1
            yield text

    stream = tiny_model.iter_encode(texts(), layers=[1, 4], dims=[32, 8], batch_size=4, chunk_size=16)
    first = next(stream)
    assert consumed <= 16 + 1, "the whole input was read before the first batch was yielded"
    batches = [first, *stream]
    assert [b.start for b in batches] == [0, 16, 32, 48] and [b.size for b in batches] == [16, 16, 16, 12]
    assert set(first.embeddings) == {(1, 32), (1, 8), (4, 32), (4, 8)}
    for (k, d), _ in first.embeddings.items():
        streamed = np.concatenate([b[(k, d)] for b in batches])
        np.testing.assert_allclose(streamed, tiny_model.encode(SENTENCES * 5, layers=k, dim=d), atol=1e-6)


def test_iter_encode_serves_several_layers_from_one_forward_pass(tiny_model, monkeypatch):
    depths = []
    forward = type(tiny_model).forward

    def counting_forward(self, features, layers=None):
        depths.append(sorted(layers))
        return forward(self, features, layers)

    monkeypatch.setattr(type(tiny_model), "forward", counting_forward)
    list(tiny_model.iter_encode(SENTENCES, layers=[1, 2, 4], dims=[16], batch_size=len(SENTENCES)))
    assert depths == [[1, 2, 4]]  # one pass, every exit pooled from it


def test_iter_encode_keeps_input_order_and_unnormalised_prefixes(tiny_model):
    batch = next(tiny_model.iter_encode(SENTENCES, layers=3, dims=[8], normalize=False, batch_size=3))
    raw = tiny_model.encode_layers(SENTENCES, [3])[3][:, :8]
    np.testing.assert_allclose(batch[(3, 8)], raw, atol=1e-6)
    assert not np.allclose(np.linalg.norm(batch[(3, 8)], axis=1), 1.0)


@pytest.mark.parametrize(
    "texts, message",
    [
        (set(SENTENCES), "no row order"),
        ({"a": 1}, "no row order"),
        ("one string", "list of strings"),
        (iter([]), "empty"),
        (["ok", 3], r"texts\[1\] is int"),
    ],
)
def test_iter_encode_refuses_bad_input(tiny_model, texts, message):
    with pytest.raises(InvalidInputError, match=message):
        list(tiny_model.iter_encode(texts))


@pytest.mark.parametrize("kwargs", [{"chunk_size": 0}, {"batch_size": True}, {"layers": []}, {"dims": []}])
def test_iter_encode_refuses_bad_arguments(tiny_model, kwargs):
    from matryoshka2d import Matryoshka2dError

    with pytest.raises(Matryoshka2dError):
        list(tiny_model.iter_encode(SENTENCES, **kwargs))


@pytest.mark.integration
def test_minilm_mixed_calls_from_threads_equal_sequential():
    model = EmbeddingModel.load(packaged_minilm())
    texts = [f"{s}, said person {i}" for i, s in enumerate(SENTENCES)]
    cells = [(None, None), (1, None), (3, 64), (6, 128), (2, 32), (4, None)]
    results = run_concurrently(model, texts, cells, threads=4, calls=20, batch_size=6)
    assert len(results) == 80
    assert_equal_to_sequential(model, texts, cells, results, batch_size=6)
    assert model.num_layers == 6


def test_shallow_multi_layer_passes_stay_right_call_after_call(tiny_model):
    """Several exits below the full depth (a layer view with hidden states) again and again, from threads."""
    expected = {k: tiny_model.encode(SENTENCES, layers=k, batch_size=5) for k in (2, 3)}

    def run(_):
        batches = tiny_model.iter_encode(SENTENCES, layers=[2, 3], batch_size=5, show_progress=False)
        return [b for b in batches]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(12)))
    for batches in results:
        for k in (2, 3):
            got = np.concatenate([b[(k, tiny_model.dim)] for b in batches])
            assert np.array_equal(got, expected[k])


def test_compiled_model_from_many_threads_equals_sequential(tmp_path):
    # the threads start on a model with nothing compiled yet: first uses of each layer count race
    model = build_tiny_model(tmp_path, "bert").compile_for_inference()
    cells = [(None, None), (1, None), (2, 16), (1, 4)]
    results = run_concurrently(model, SENTENCES, cells, threads=4, calls=6)
    assert len(results) == 24
    assert_equal_to_sequential(model, SENTENCES, cells, results)
    assert set(model._compiled) == {1, 2, 4}
