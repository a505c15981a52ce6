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

    def _encode_chunk(self, texts, layers, batch_size, prompt=None, cancel=None):
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


class PairedEncoder(CountingEncoder):
    """Each chunk waits until another one is being encoded beside it (a barrier of 2, 10 s)."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier = threading.Barrier(2, timeout=10)

    def _encode_chunk(self, texts, layers, batch_size, prompt=None, cancel=None):
        self.barrier.wait()
        return super()._encode_chunk(texts, layers, batch_size, prompt, cancel)


def test_workers_encode_the_parts_of_a_chunk_at_once_in_input_order():
    """workers=2: the chunk is cut in two parts encoded at the same time (the barrier would time out
    otherwise), each part on its own; the result is in input order, as with one worker."""
    texts = ["a" * n for n in (5, 1, 4, 2, 3, 6, 7)]
    enc = PairedEncoder()
    got = enc.encode(texts, layers=2, normalize=False, workers=2)
    assert sorted(n for n, _ in enc.chunks) == [3, 4]
    np.testing.assert_array_equal(got, CountingEncoder().encode(texts, layers=2, normalize=False))
    layers = enc.encode_layers(texts, layers=[1, 3], workers=2)
    assert layers[3][:, 0].tolist() == [3 * len(t) for t in texts]


@pytest.mark.parametrize("workers,texts", [(3, ["x" * n for n in range(1, 8)]), (4, ["one"])])
def test_workers_more_than_texts_or_uneven_parts(workers, texts):
    enc = CountingEncoder()
    batches = list(enc.iter_encode(texts, layers=[1, 2], dims=[2, 6], workers=workers, chunk_size=5))
    assert [b.start for b in batches] == list(range(0, len(texts), 5))
    for cell in ((1, 2), (2, 6)):
        got = np.concatenate([b[cell] for b in batches])
        np.testing.assert_allclose(got, CountingEncoder().encode(texts, *cell))
    assert sum(n for n, _ in enc.chunks) == len(texts) and all(n > 0 for n, _ in enc.chunks)


@pytest.mark.parametrize("workers", [0, -1, 1.5, "2", True])
def test_workers_must_be_a_positive_int(workers):
    with pytest.raises(InvalidInputError, match="workers"):
        CountingEncoder().encode(["a", "b"], workers=workers)


class FailingPartEncoder(CountingEncoder):
    """The part holding text "boom" fails at once; the other encodes slowly, batch by batch, until the
    cancel event asks it to stop."""

    def __init__(self) -> None:
        super().__init__()
        self.batches_run = 0

    def _encode_chunk(self, texts, layers, batch_size, prompt=None, cancel=None):
        if "boom" in texts:
            raise RuntimeError("boom")
        for _ in range(0, len(texts), batch_size):
            if cancel is not None and cancel.is_set():
                break
            self.batches_run += 1
            time.sleep(0.05)
        return super()._encode_chunk(texts, layers, batch_size, prompt, cancel)


def test_an_error_in_one_part_stops_the_others_after_their_current_batch():
    """Without the cancel event the healthy part would run its 100 batches (5 s) before the error."""
    enc = FailingPartEncoder()
    texts = ["boom"] + ["x"] * 199  # parts: "boom" + 99 texts, and 100 texts of 1 batch each
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="boom"):
        enc.encode(texts, batch_size=1, workers=2)
    assert time.monotonic() - start < 2 and enc.batches_run < 20
