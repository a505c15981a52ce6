"""matryoshka2d.encoder: what any backend gets from implementing only ``_encode_chunk``."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from matryoshka2d import InvalidDimError, InvalidInputError, InvalidLayersError
from matryoshka2d.encoder import Encoder, pad_rows, padded_width


class CountingEncoder(Encoder):
    """A backend without a model: text i at layer k pools to a fixed vector; records every chunk."""

    num_layers, dim, hidden_size, max_seq_length, name_or_path = 3, 6, 6, 16, "counting"

    def __init__(self) -> None:
        self.chunks: list[tuple[int, list[int]]] = []

    def tokenize(self, texts, padding=True, prompt=None):
        return {"input_ids": [[len(t)] for t in texts]}

    def _encode_chunk(self, texts, layers, batch_size, prompt=None, pool=None, workers=1):
        self.chunks.append((len(texts), list(layers)))
        base = np.array([[len(t), 1, 2, 3, 4, 5] for t in texts], dtype=np.float32)
        return {k: base * k for k in layers}


def test_encode_is_built_on_encode_chunk():
    enc = CountingEncoder()
    texts = ["a", "bb", "ccc"]
    raw = enc.encode(texts, layers=2, dim=3, normalize=False)
    np.testing.assert_array_equal(raw, [[2, 2, 4], [4, 2, 4], [6, 2, 4]])
    unit = enc.encode(texts, layers=2, dim=3)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    assert enc.encode("dddd", dim=2).shape == (2,)
    assert enc.describe() == "counting (3 layers, 6 dims; torch float32)"


def test_iter_encode_streams_chunks_in_order_with_every_cell():
    enc = CountingEncoder()
    texts = (f"t{'x' * i}" for i in range(7))  # a generator: length unknown
    batches = list(enc.iter_encode(texts, layers=[3, 1], dims=[2, 6], chunk_size=3, normalize=False))
    assert [(b.start, b.size) for b in batches] == [(0, 3), (3, 3), (6, 1)]
    assert enc.chunks == [(3, [1, 3]), (3, [1, 3]), (1, [1, 3])]  # one pass per chunk for all exits
    assert set(batches[0].embeddings) == {(1, 2), (1, 6), (3, 2), (3, 6)}
    assert batches[2][(3, 2)].tolist() == [[3 * len("txxxxxx"), 3]]


def test_encode_layers_returns_full_size_per_layer():
    out = CountingEncoder().encode_layers(["a", "bb"], layers=[1, 3])
    assert sorted(out) == [1, 3] and out[3].shape == (2, 6)
    np.testing.assert_array_equal(out[3], 3 * out[1])
    everything = CountingEncoder().encode_layers(["a", "bb"])  # default: every layer count, as documented
    assert sorted(everything) == [1, 2, 3]
    np.testing.assert_array_equal(everything[3], out[3])


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"layers": 4}, InvalidLayersError),
        ({"layers": 0}, InvalidLayersError),
        ({"dim": 7}, InvalidDimError),
        ({"batch_size": 0}, InvalidInputError),
    ],
)
def test_bad_cells_are_refused_before_encoding(kwargs, error):
    enc = CountingEncoder()
    with pytest.raises(error):
        enc.encode(["a"], **kwargs)
    assert enc.chunks == []


@pytest.mark.parametrize("texts", [[], {"a", "b"}, {"a": 1}, "text", ["a", 3]])
def test_bad_texts(texts):
    with pytest.raises(InvalidInputError):
        list(CountingEncoder().iter_encode(texts))


def test_pad_rows_pads_like_a_tokenizer():
    encoded = {"input_ids": [[5, 6, 7], [8]], "attention_mask": [[1, 1, 1], [1]]}
    right = pad_rows(encoded, [1, 0], pad_token_id=9)
    assert right["input_ids"].tolist() == [[8, 9, 9], [5, 6, 7]]
    assert right["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    left = pad_rows(encoded, [1], pad_token_id=None, left=True)
    assert left["input_ids"].tolist() == [[8]] and left["input_ids"].dtype == np.int64
    assert pad_rows(encoded, [0, 1], 0, left=True)["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pad_rows_rounds_the_width_up_to_a_multiple_within_max_width():
    encoded = {"input_ids": [[5, 6, 7], [8]], "attention_mask": [[1, 1, 1], [1]]}
    right = pad_rows(encoded, [0, 1], 9, multiple=4)
    assert right["input_ids"].tolist() == [[5, 6, 7, 9], [8, 9, 9, 9]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    left = pad_rows(encoded, [1, 0], 9, left=True, multiple=8, max_width=5)  # 8 would pass max_width
    assert left["input_ids"].tolist() == [[9, 9, 9, 9, 8], [9, 9, 5, 6, 7]]
    assert left["attention_mask"].tolist() == [[0, 0, 0, 0, 1], [0, 0, 1, 1, 1]]
    assert [padded_width(n, 8, 128) for n in (1, 8, 9, 121, 125, 128)] == [8, 8, 16, 128, 128, 128]
    assert padded_width(130, 8, 128) == 130  # a row already past max_width is never cut
    assert padded_width(3, 1) == 3 and padded_width(9, 8) == 16
    for bad in (0, -8, 2.5):
        with pytest.raises(InvalidInputError, match="multiple"):
            padded_width(5, bad)


def test_zero_dimensional_arrays_are_one_layer_count_or_dim():
    enc = CountingEncoder()
    (batch,) = enc.iter_encode(["ab", "c"], layers=np.array(2), dims=np.array(3))
    assert list(batch.embeddings) == [(2, 3)]


@pytest.mark.parametrize("data", [b"abc", bytearray(b"abc")])
def test_bytes_are_refused_with_a_hint_to_decode(data):
    with pytest.raises(InvalidInputError, match="decode it to str first"):
        CountingEncoder().encode(data)


class BatchEncoder(Encoder):
    """A backend with the shared chunk loop: tokenising records the parts, each batch calls ``on_batch``
    with its texts and records (thread, texts); text t pools to ``[len(t), 1, 2, 3, 4, 5] * k``."""

    num_layers, dim, hidden_size, max_seq_length, name_or_path = 3, 6, 6, 16, "batches"

    def __init__(self, on_batch=None) -> None:
        self.on_batch = on_batch
        self.tokenized: list[tuple[str, int]] = []
        self.batches: list[tuple[str, tuple[str, ...]]] = []
        self._lock = threading.Lock()

    def tokenize(self, texts, padding=True, prompt=None):
        with self._lock:
            self.tokenized.append((threading.current_thread().name, len(texts)))
        return {"input_ids": [[1] * len(t) for t in texts], "text": list(texts)}

    def _encode_batch(self, encoded, rows, layers):
        texts = tuple(encoded["text"][i] for i in rows)
        if self.on_batch is not None:
            self.on_batch(texts)
        with self._lock:
            self.batches.append((threading.current_thread().name, texts))
        base = np.array([[len(t), 1, 2, 3, 4, 5] for t in texts], dtype=np.float32)
        return {k: base * k for k in layers}


def test_workers_run_the_batches_of_one_worker_at_once_in_input_order():
    """workers=2: tokenised in two parts at once, then the batches of one sorted list (the same as with
    one worker) run on both threads at the same time (the barrier would time out otherwise)."""
    texts = [f"{'a' * (n % 9 + 1)} {n}" for n in range(40)]
    one = BatchEncoder()
    expected = one.encode(texts, layers=2, normalize=False, batch_size=4)
    barrier = threading.Barrier(2, timeout=10)
    first_two = []

    def meet(batch):
        with one._lock:
            first_two.append(batch)
            wait = len(first_two) <= 2
        if wait:
            barrier.wait()

    two = BatchEncoder(on_batch=meet)
    got = two.encode(texts, layers=2, normalize=False, batch_size=4, workers=2)
    np.testing.assert_array_equal(got, expected)
    assert sorted(t for _, t in two.batches) == sorted(t for _, t in one.batches)  # the same batches
    assert len({name for name, _ in two.batches}) == 2  # run by two threads
    assert sorted(n for _, n in two.tokenized) == [20, 20]
    assert all(name.startswith("m2d-encode") for name, _ in two.tokenized)
    layers = two.encode_layers(texts, layers=[1, 3], workers=2)
    assert layers[3][:, 0].tolist() == [3 * len(t) for t in texts]


def test_a_worker_on_a_slow_batch_leaves_the_rest_to_the_others():
    """The first (longest) batch blocks until every other batch is done: only workers that take the next
    batch of one shared list finish (parts fixed in advance would leave batches behind the blocked one)."""
    texts = [f"text {'x' * n}" for n in range(30)]  # sorted shortest first: the longest batch is last
    others_done = threading.Event()
    count = [0]

    def on_batch(batch):
        if any(len(t) == len("text ") + 29 for t in batch):
            assert others_done.wait(timeout=5), "the other batches were left behind the slow one"
            return
        count[0] += 1
        if count[0] == 30 // 3 - 1:
            others_done.set()

    enc = BatchEncoder(on_batch=on_batch)
    got = enc.encode(texts, layers=1, normalize=False, batch_size=3, workers=2)
    assert got[:, 0].tolist() == [len(t) for t in texts]


@pytest.mark.parametrize("workers,texts", [(3, ["x" * n for n in range(1, 8)]), (4, ["one"])])
def test_workers_more_than_texts_or_batches(workers, texts):
    enc = BatchEncoder()
    batches = list(enc.iter_encode(texts, layers=[1, 2], dims=[2, 6], workers=workers, chunk_size=5))
    assert [b.start for b in batches] == list(range(0, len(texts), 5))
    for cell in ((1, 2), (2, 6)):
        got = np.concatenate([b[cell] for b in batches])
        np.testing.assert_allclose(got, CountingEncoder().encode(texts, *cell))
    assert sorted(t for _, batch in enc.batches for t in batch) == sorted(texts)


@pytest.mark.parametrize("workers", [0, -1, 1.5, "2", True])
def test_workers_must_be_a_positive_int(workers):
    with pytest.raises(InvalidInputError, match="workers"):
        CountingEncoder().encode(["a", "b"], workers=workers)


@pytest.mark.parametrize("failing", [0, 1])
def test_an_error_in_one_worker_stops_the_others_after_their_current_batch(failing):
    """The first batch of the first (0) or the second (1) thread to start fails: whichever worker that is,
    the other stops after its current batch instead of running the ~200 others (10 s) first."""
    ran, threads, lock = [], [], threading.Lock()

    def on_batch(batch):
        with lock:
            name = threading.current_thread().name
            first_batch = name not in threads
            if first_batch:
                threads.append(name)
        if first_batch and threads.index(name) == failing:
            time.sleep(0.1)  # the other worker is encoding meanwhile
            raise RuntimeError("boom")
        ran.append(batch)
        time.sleep(0.05)

    enc = BatchEncoder(on_batch=on_batch)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="boom"):
        enc.encode(["x"] * 200, batch_size=1, workers=2)
    assert time.monotonic() - start < 2 and 1 <= len(ran) < 20


def test_a_lone_surrogate_is_refused_naming_the_text():
    enc = CountingEncoder()
    for call in (lambda t: enc.encode(t), lambda t: list(enc.iter_encode(t)), lambda t: enc.encode_layers(t)):
        with pytest.raises(InvalidInputError, match=r"texts\[1\] is not valid Unicode: a lone surrogate"):
            call(["ok", "bad \ud800 text"])
    assert enc.encode(["été", "日本語 🙂"]).shape == (2, 6)  # any valid non-ASCII text is fine


@pytest.mark.parametrize("normalize", ["no", None, 1, 0.0])
def test_normalize_must_be_true_or_false(normalize):
    enc = CountingEncoder()
    with pytest.raises(InvalidInputError, match="normalize must be True or False"):
        enc.encode(["a"], normalize=normalize)
    assert enc.chunks == []
    assert np.linalg.norm(enc.encode(["a"], normalize=np.bool_(False))) > 1  # numpy's bool is a bool


def test_dims_take_any_iterable_as_layers_do_and_mappings_are_refused():
    enc = CountingEncoder()
    for dims in ({6, 2}, (d for d in (2, 6)), range(2, 7, 4)):
        (batch,) = enc.iter_encode(["a"], layers=(k for k in (1, 3)), dims=dims)
        assert set(batch.embeddings) == {(1, 6), (1, 2), (3, 6), (3, 2)}
    with pytest.raises(InvalidLayersError, match="layers is a dict"):
        list(enc.iter_encode(["a"], layers={2: "x"}))  # not its keys
    with pytest.raises(InvalidDimError, match="dims is a dict"):
        list(enc.iter_encode(["a"], dims={2: 1}))
