"""m2d serve: the OpenAI client against a loopback server; batching, errors, backpressure, shutdown."""

from __future__ import annotations

import base64
import gzip
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from conftest import SENTENCES, packaged_minilm, prompted_copy
from prometheus_client.parser import text_string_to_metric_families

from matryoshka2d import EmbeddingModel, InvalidInputError
from matryoshka2d.serving import BackgroundServer, BatchingEngine, QueueFullError, ServeConfig, create_app
from matryoshka2d.serving.runner import free_port

KEY = "test-key"
NAME = "tiny"
ALLOWED = (1, 2, 4)  # the tiny model has 4 layers; 3 is deliberately not served


class GatedModel:
    """A backend wrapper whose forward passes wait while ``gate`` is closed; counts the rows it ran."""

    def __init__(self, model: EmbeddingModel) -> None:
        self.model = model
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()
        self.rows = 0
        self._rows_lock = threading.Lock()  # several engine workers may count at once

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, features, layers):
        self.waiting.set()
        assert self.gate.wait(30)
        with self._rows_lock:
            self.rows += len(features["input_ids"])
        return self.model.forward(features, layers)


def make_app(model_dir, gated: GatedModel | None = None, **overrides):
    settings = dict(
        model_name=NAME,
        aliases=("tiny-alias",),
        layers_allowed=ALLOWED,
        api_key=KEY,
        max_inputs=16,
        max_request_bytes=16 * 1024,
        max_batch_tokens=256,
    )
    settings.update(overrides)
    return create_app(
        ServeConfig(**settings), (lambda: gated) if gated else (lambda: EmbeddingModel.load(model_dir))
    )


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs):
    return tiny_model_dirs["bert"]


@pytest.fixture(scope="module")
def offline(model_dir):
    return EmbeddingModel.load(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    with BackgroundServer(make_app(model_dir)) as running:
        yield running


@pytest.fixture(scope="module")
def two_worker_server(model_dir):
    with BackgroundServer(make_app(model_dir, workers=2)) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def post(server, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(server.url + "/v1/embeddings", json=body, headers=headers, timeout=30, **kwargs)
    return httpx.post(server.url + "/v1/embeddings", content=body, headers=headers, timeout=30, **kwargs)


def as_array(response) -> np.ndarray:
    return np.array([item.embedding for item in response.data], dtype=np.float32)


def decode_base64(response) -> np.ndarray:
    return np.stack([np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") for item in response.data])


# ---------------------------------------------------------------- results equal offline encode
@pytest.mark.parametrize("layers,dims", [(4, 32), (2, 16), (1, 5), (None, None)])
def test_openai_client_matches_offline_encode(client, offline, layers, dims):
    extra = {"layers": layers} if layers else None
    kwargs = {"dimensions": dims} if dims else {}
    response = client.embeddings.create(model=NAME, input=SENTENCES, extra_body=extra, **kwargs)
    expected = offline.encode(SENTENCES, layers=layers or 4, dim=dims or offline.dim)
    got = as_array(response)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # dims are re-normalised
    assert [item.index for item in response.data] == list(range(len(SENTENCES)))
    assert response.model == NAME and response.object == "list"
    tokens = sum(len(ids) for ids in offline.tokenize(SENTENCES, padding=False)["input_ids"])
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens

    b64 = client.embeddings.create(
        model=NAME, input=SENTENCES, encoding_format="base64", extra_body=extra, **kwargs
    )
    assert all(isinstance(item.embedding, str) for item in b64.data)
    decoded = decode_base64(b64)
    np.testing.assert_array_equal(decoded, got)  # the same float32 values, bit for bit
    assert np.abs(decoded - expected).max() <= 1e-5


def test_a_request_picks_one_of_the_models_prompts(model_dir, tmp_path):
    """``prompt_name`` (TEI's and sentence-transformers' name): the texts get that prompt instead of the
    default one, token counts include it, and an unknown name is a 400 naming the model's prompts."""
    folder = prompted_copy(model_dir, tmp_path / "prompted", default="query")
    offline = EmbeddingModel.load(folder)
    with BackgroundServer(make_app(folder)) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key=KEY, max_retries=0)
        for name in (None, "query", "document"):
            extra = {"layers": 2, **({"prompt_name": name} if name else {})}
            response = client.embeddings.create(model=NAME, input=SENTENCES, dimensions=16, extra_body=extra)
            expected = offline.encode(SENTENCES, layers=2, dim=16, prompt_name=name)
            assert np.abs(as_array(response) - expected).max() <= 1e-5, name
            tokens = offline.tokenize(SENTENCES, padding=False, prompt=offline.resolve_prompt(name))
            assert response.usage.prompt_tokens == sum(len(ids) for ids in tokens["input_ids"])
        assert (
            np.abs(
                as_array(
                    client.embeddings.create(
                        model=NAME, input=SENTENCES, extra_body={"prompt_name": "document"}
                    )
                )
                - as_array(client.embeddings.create(model=NAME, input=SENTENCES))
            ).max()
            > 1e-3
        )
        error = post(running, {**GOOD, "prompt_name": "passage"})
        assert error.status_code == 400 and error.json()["error"]["param"] == "prompt_name"
        assert "('document', 'query')" in error.json()["error"]["message"]


def test_single_string_and_alias(client, offline):
    response = client.embeddings.create(model="tiny-alias", input="a cat sat on the mat", dimensions=8)
    assert len(response.data) == 1
    expected = offline.encode(["a cat sat on the mat"], dim=8)
    assert np.abs(as_array(response) - expected).max() <= 1e-5


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    card = httpx.get(server.url + f"/v1/models/{NAME}", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert card["num_layers"] == 4 and card["dim"] == 32 and card["layers_allowed"] == list(ALLOWED)
    assert httpx.get(server.url + "/health").status_code == 200


# ---------------------------------------------------------------- concurrency
@pytest.mark.parametrize("which", ["server", "two_worker_server"])
def test_32_concurrent_clients_mixed_cells(which, offline, request):
    server = request.getfixturevalue(which)
    rng = random.Random(0)
    jobs = []
    for client_id in range(32):
        for _ in range(3):
            texts = rng.sample(SENTENCES, rng.randint(1, len(SENTENCES)))
            jobs.append((client_id, texts, rng.choice(ALLOWED), rng.choice([32, 16, 8, 3])))
    expected = {
        i: offline.encode(texts, layers=layers, dim=dim) for i, (_, texts, layers, dim) in enumerate(jobs)
    }
    clients = [openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) for _ in range(32)]

    def run(client_id: int) -> list[tuple[int, np.ndarray]]:
        out = []
        for i, (owner, texts, layers, dim) in enumerate(jobs):
            if owner == client_id:
                response = clients[client_id].embeddings.create(
                    model=NAME, input=texts, dimensions=dim, extra_body={"layers": layers}
                )
                out.append((i, as_array(response)))
        return out

    with ThreadPoolExecutor(32) as pool:
        results = [pair for chunk in pool.map(run, range(32)) for pair in chunk]
    assert sorted(i for i, _ in results) == list(range(len(jobs)))  # none lost
    for i, got in results:
        assert got.shape == expected[i].shape
        assert np.abs(got - expected[i]).max() <= 1e-5, jobs[i]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'status="500"' not in metrics and 'status="503"' not in metrics


# ---------------------------------------------------------------- bad input
GOOD = {"model": NAME, "input": ["a cat"]}
BAD_REQUESTS = [
    ({**GOOD, "dimensions": 0}, 400, "dimensions"),
    ({**GOOD, "dimensions": -3}, 400, "dimensions"),
    ({**GOOD, "dimensions": 33}, 400, "dimensions"),
    ({**GOOD, "dimensions": 3.5}, 400, "dimensions"),
    ({**GOOD, "dimensions": 8.0}, 400, "dimensions"),
    ({**GOOD, "dimensions": "8"}, 400, "dimensions"),
    ({**GOOD, "dimensions": True}, 400, "dimensions"),
    ({**GOOD, "layers": 0}, 400, "layers"),
    ({**GOOD, "layers": 5}, 400, "layers"),
    ({**GOOD, "layers": 3}, 400, "layers"),  # valid for the model, not in --layers-allowed
    ({**GOOD, "layers": "2"}, 400, "layers"),
    ({**GOOD, "input": []}, 400, "input"),
    ({**GOOD, "input": ""}, 400, "input"),
    ({**GOOD, "input": ["a", ""]}, 400, "input"),
    ({**GOOD, "input": ["a", 3]}, 400, "input"),
    ({**GOOD, "input": ["a", None]}, 400, "input"),
    ({**GOOD, "input": [101, 2023, 102]}, 400, "input"),
    ({**GOOD, "input": [[101, 2023], [101]]}, 400, "input"),
    ({**GOOD, "input": 7}, 400, "input"),
    ({**GOOD, "input": ["a"] * 17}, 400, "input"),  # max_inputs=16
    ({**GOOD, "encoding_format": "int8"}, 400, "encoding_format"),
    ({**GOOD, "truncate": "no"}, 400, "truncate"),
    ({**GOOD, "prompt_name": "passage"}, 400, "prompt_name"),  # this model has no such prompt
    ({**GOOD, "prompt_name": 3}, 400, "prompt_name"),
    ({**GOOD, "unknown_field": 1}, 400, "unknown_field"),
    ({"input": ["a"]}, 400, "model"),
    ({"model": NAME}, 400, "input"),
    ({**GOOD, "model": "gpt-4"}, 404, "model"),
    (b'{"model": "tiny", "input": ["a"', 400, None),  # malformed JSON
    (b"\xff\xfe not utf-8", 400, None),
    (b'["a list", "not an object"]', 400, None),
    (b'{"model": "tiny", "input": ["a"], "dimensions": ' + b"1" * 5000 + b"}", 400, None),  # > 4300 digits
    (b'{"model": "tiny", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),  # nested too deeply
    (b'{"model": "tiny", "input": ["a cat", "half a pair \\ud800 here"]}', 400, "input"),  # lone surrogate
    (json.dumps({**GOOD, "input": ["x" * 100] * 10, "pad": "y" * 20_000}).encode(), 413, None),
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS)
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, body, status, param):
    response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
    assert post(server, GOOD).status_code == 200


def test_bad_request_messages_name_the_value(server):
    assert "dimensions=0" in post(server, {**GOOD, "dimensions": 0}).json()["error"]["message"]
    assert (
        "allowed layer counts are [1, 2, 4]" in post(server, {**GOOD, "layers": 3}).json()["error"]["message"]
    )
    assert "input[1]" in post(server, {**GOOD, "input": ["a", 3]}).json()["error"]["message"]
    token_ids = post(server, {**GOOD, "input": [1, 2]}).json()["error"]
    assert token_ids["code"] == "token_ids_not_supported"
    assert post(server, {**GOOD, "model": "gpt-4"}).json()["error"]["code"] == "model_not_found"


def test_openai_client_raises_on_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="dimensions=0"):
        client.embeddings.create(model=NAME, input="a cat", dimensions=0)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="a cat")


def test_api_key(server):
    missing = post(server, GOOD, key=None)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    wrong = post(server, GOOD, key="nope")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key
    assert httpx.get(server.url + "/openapi.json").status_code == 404  # nothing without the key
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model=NAME, input="a cat")


def test_unknown_route_and_method(server):
    response = httpx.get(server.url + "/v1/nothing")
    assert response.status_code == 404 and set(response.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    response = httpx.get(server.url + "/v1/embeddings")
    assert response.status_code == 405 and "error" in response.json()
    assert response.headers["allow"] == "POST"  # HTTP requires it on a 405


def test_a_trailing_slash_is_a_404_in_openai_shape_not_a_redirect(server):
    auth = {"Authorization": f"Bearer {KEY}", "Host": "elsewhere.example"}
    response = httpx.post(server.url + "/v1/embeddings/", json=GOOD, headers=auth)
    assert response.status_code == 404 and "location" not in response.headers
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/health/").status_code == 404


def test_head_is_answered_wherever_get_is(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    for path in ("/health", "/metrics", "/v1/models", f"/v1/models/{NAME}"):
        response = httpx.head(server.url + path, headers=auth)
        assert response.status_code == 200 and response.content == b"", path
    assert httpx.head(server.url + "/v1/models").status_code == 401  # the key is still asked for


def test_a_compressed_body_is_refused_with_415(server):
    body = gzip.compress(json.dumps(GOOD).encode())
    headers = {
        "Authorization": f"Bearer {KEY}",
        "Content-Encoding": "gzip",
        "Content-Type": "application/json",
    }
    response = httpx.post(server.url + "/v1/embeddings", content=body, headers=headers)
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_content_encoding"
    assert "gzip" in response.json()["error"]["message"]
    assert post(server, GOOD).status_code == 200  # and the next request is served


def test_lone_surrogate_message_names_the_item(server):
    body = b'{"model": "tiny", "input": ["a cat", "x\\udc00"]}'
    assert "input[1] is not valid Unicode" in post(server, body).json()["error"]["message"]


def test_lone_surrogates_elsewhere_get_errors_in_openai_shape(server):
    """A model name or a field name holding one: a 404 / 400 in OpenAI's JSON shape (the error message
    quoting the name used to fail to encode: a plain-text 500, not counted in the metrics)."""
    response = post(server, b'{"model": "x\\ud800", "input": "a cat"}')
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert "x\ud800" in response.json()["error"]["message"]
    response = post(server, b'{"model": "tiny", "input": "a cat", "\\ud800": 1}')
    assert response.status_code == 400
    assert "field name of the request is not valid Unicode" in response.json()["error"]["message"]
    assert post(server, GOOD).status_code == 200


def test_null_means_the_default_for_every_optional_field(server, client, offline):
    """The openai client sends "encoding_format": null when passed None."""
    response = client.embeddings.create(model=NAME, input=SENTENCES[:2], encoding_format=None)
    assert np.abs(as_array(response) - offline.encode(SENTENCES[:2])).max() <= 1e-5
    body = {"model": NAME, "input": SENTENCES[:2], "truncate": None, "dimensions": None, "layers": None}
    assert post(server, body).status_code == 200


@pytest.mark.parametrize("key", ["", "  ", "clé", "two words"])
def test_an_api_key_that_could_never_be_sent_right_is_refused_at_startup(key):
    from matryoshka2d.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="API key must be a non-empty string of printable ASCII"):
        ServeConfig(model_name="m", api_key=key)


def test_unexpected_error_is_a_500_in_openai_shape_and_counted(model_dir):
    class BrokenTokenizer(GatedModel):
        broken = False  # after loading (the server warms up with a forward pass)

        def tokenize(self, texts, padding=True):
            if self.broken:
                raise RuntimeError("tokenizer exploded")
            return self.model.tokenize(texts, padding=padding)

    broken = BrokenTokenizer(EmbeddingModel.load(model_dir))
    app = make_app(model_dir, broken, api_key=None)
    with BackgroundServer(app) as running:
        broken.broken = True
        response = post(running, GOOD, key=None)
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error"
        assert "tokenizer exploded" in response.json()["error"]["message"]
        assert (
            'm2d_requests_total{endpoint="/v1/embeddings",status="500"} 1.0'
            in httpx.get(running.url + "/metrics").text
        )


def test_truncation(server, offline):
    long_text = " ".join(["the cat sat on the mat"] * 20)  # far more than max_seq_length (48) tokens
    truncated = post(server, {**GOOD, "input": [long_text, "a dog"]})
    assert truncated.status_code == 200
    got = np.array([row["embedding"] for row in truncated.json()["data"]], dtype=np.float32)
    assert np.abs(got - offline.encode([long_text, "a dog"])).max() <= 1e-5
    assert truncated.json()["usage"]["prompt_tokens"] == offline.max_seq_length + 4  # [CLS] a dog [SEP]

    refused = post(server, {**GOOD, "input": ["a dog", long_text], "truncate": False})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded" and "input[1]" in error["message"]

    words = ["cat"] * (offline.max_seq_length - 2)  # exactly max_seq_length tokens with [CLS] and [SEP]
    exact = " ".join(words)
    assert len(offline.tokenize([exact], padding=False)["input_ids"][0]) == offline.max_seq_length
    assert post(server, {**GOOD, "input": [exact], "truncate": False}).status_code == 200


def test_metrics_parse(server):
    post(server, GOOD)
    post(server, {**GOOD, "dimensions": 0})
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    requests = {
        s.labels["status"]: s.value
        for s in families["m2d_requests"].samples
        if s.name == "m2d_requests_total"
    }
    assert requests["200"] >= 1 and requests["400"] >= 1
    latency_count = [s for s in families["m2d_request_latency_seconds"].samples if s.name.endswith("_count")]
    assert latency_count[0].value >= 2
    batches = [s for s in families["m2d_batch_size"].samples if s.name.endswith("_count")]
    assert batches[0].value >= 1
    assert families["m2d_prompt_tokens"].samples[0].value > 0
    assert families["m2d_model_loaded"].samples[0].value == 1
    assert "m2d_queue_texts" in families and "m2d_queue_requests" in families


def test_batch_metrics_count_requests_only_not_the_warm_up(model_dir):
    def batch_size(url: str) -> tuple[float, float]:
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
        samples = {s.name: s.value for s in families["m2d_batch_size"].samples}
        return samples["m2d_batch_size_count"], samples["m2d_batch_size_sum"]

    with BackgroundServer(make_app(model_dir)) as running:
        assert batch_size(running.url) == (0, 0)  # loaded and warmed up, no request yet
        assert post(running, {**GOOD, "input": ["a", "b", "c"]}).status_code == 200
        assert batch_size(running.url)[1] == 3


# ---------------------------------------------------------------- loading, backpressure, disconnects
def test_health_503_until_loaded(model_dir):
    release = threading.Event()

    def slow_loader():
        assert release.wait(30)
        return EmbeddingModel.load(model_dir)

    app = create_app(ServeConfig(model_name=NAME), slow_loader)
    with BackgroundServer(app).start(wait_loaded=False) as running:
        health = httpx.get(running.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        early = httpx.post(running.url + "/v1/embeddings", json=GOOD)
        assert early.status_code == 503 and early.json()["error"]["code"] == "model_loading"
        release.set()
        assert app.state.server.wait_loaded(30)
        assert httpx.get(running.url + "/health").status_code == 200
        assert httpx.post(running.url + "/v1/embeddings", json=GOOD).status_code == 200


def test_load_error_is_reported(tmp_path):
    errors = []
    app = create_app(ServeConfig(model_name=NAME), lambda: EmbeddingModel.load(tmp_path), errors.append)
    with BackgroundServer(app).start(wait_loaded=False) as running:
        deadline = time.monotonic() + 10
        while not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        health = httpx.get(running.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert httpx.post(running.url + "/v1/embeddings", json=GOOD).status_code == 503
    assert len(errors) == 1


def _in_thread(fn):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("value", fn()), daemon=True)
    thread.start()
    return thread, box


def test_full_queue_answers_429_at_once(model_dir, offline):
    gated = GatedModel(EmbeddingModel.load(model_dir))
    app = make_app(model_dir, gated, api_key=None, max_queue_texts=3)
    with BackgroundServer(app) as running:
        gated.gate.clear()
        gated.waiting.clear()
        first, first_box = _in_thread(lambda: post(running, {**GOOD, "input": ["a cat"]}, key=None))
        assert gated.waiting.wait(10)  # the worker holds the first request
        second, second_box = _in_thread(lambda: post(running, {**GOOD, "input": SENTENCES[:3]}, key=None))
        engine = app.state.server.engine
        deadline = time.monotonic() + 10
        while engine.queued_texts < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        start = time.perf_counter()
        refused = post(running, {**GOOD, "input": ["one more"]}, key=None)
        assert time.perf_counter() - start < 2
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        gated.gate.set()
        first.join(10)
        second.join(10)
        assert first_box["value"].status_code == 200 and second_box["value"].status_code == 200
        got = np.array([r["embedding"] for r in second_box["value"].json()["data"]], dtype=np.float32)
        assert np.abs(got - offline.encode(SENTENCES[:3])).max() <= 1e-5
        assert post(running, GOOD, key=None).status_code == 200  # serving again


def test_disconnected_client_leaves_no_work(model_dir):
    gated = GatedModel(EmbeddingModel.load(model_dir))
    app = make_app(model_dir, gated, api_key=None)
    with BackgroundServer(app) as running:
        engine = app.state.server.engine
        gated.gate.clear()
        gated.waiting.clear()
        first, first_box = _in_thread(lambda: post(running, {**GOOD, "input": ["a cat"]}, key=None))
        assert gated.waiting.wait(10)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(running.url + "/v1/embeddings", json={**GOOD, "input": SENTENCES}, timeout=0.5)
        deadline = time.monotonic() + 10
        while engine.queued_texts and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.queued_texts == 0 and engine.queued_requests == 0  # its texts left the queue
        rows_before = gated.rows
        gated.gate.set()
        first.join(10)
        assert first_box["value"].status_code == 200
        assert gated.rows == rows_before + 1  # only the first request's text ran
        metrics = httpx.get(running.url + "/metrics").text
        assert 'status="499"' in metrics


def _wait_healthy(url: str, seconds: float = 60) -> float:
    """Wait until the server at ``url`` answers /health with 200; returns the deadline used."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return deadline


def test_sigterm_drains_in_flight_requests_and_exits_0(model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "matryoshka2d.cli", "serve", str(model_dir), "--port", str(port)]
    command += [
        "--served-model-name",
        NAME,
        "--max-batch-size",
        "1",
        "--sort-window",
        "16",
        "--workers",
        "2",
        "--threads",
        "1",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = _wait_healthy(url)
        texts = [f"{s} number {i}" for i in range(30) for s in SENTENCES[:2]]
        body = {"model": NAME, "input": texts}
        with ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(httpx.post, url + "/v1/embeddings", json=body, timeout=60) for _ in range(4)
            ]
            while time.monotonic() < deadline:  # wait until requests are queued behind the worker
                metrics = httpx.get(url + "/metrics").text
                queued = [line for line in metrics.splitlines() if line.startswith("m2d_queue_requests ")]
                if queued and float(queued[0].split()[1]) >= 2:
                    break
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 4
        assert all(len(r.json()["data"]) == len(texts) for r in responses)
        assert proc.wait(30) == 0
        assert "(torch; 2 workers of 1 thread)" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_does_not_wait_for_ever_on_a_stalled_client(model_dir):
    port = free_port()
    command = [sys.executable, "-m", "matryoshka2d.cli", "serve", str(model_dir), "--port", str(port)]
    command += ["--log-level", "warning", "--drain-timeout", "1"]  # default workers: 2 cores -> 2 of 1 thread
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url)
        with socket.create_connection(("127.0.0.1", port)) as stalled:  # promises 100 bytes, sends 2
            stalled.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{}"
            )
            time.sleep(0.5)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            assert time.monotonic() - start < 15
        assert "(torch; 2 workers of 1 thread)" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_drain_timeout_must_be_a_number(model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "matryoshka2d.cli", "serve", str(model_dir), "--drain-timeout", "-1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--drain-timeout: must be a finite number >= 0" in result.stderr


# ---------------------------------------------------------------- the engine itself
def test_engine_runs_the_graphs_a_compiled_model_warmed_up(model_dir):
    from torch._dynamo.utils import counters

    model = EmbeddingModel.load(model_dir).compile_for_inference().warm_up([2])
    graphs = counters["stats"]["unique_graphs"]
    engine = BatchingEngine(model, max_batch_size=4).start()
    try:
        for texts in (SENTENCES, SENTENCES[:1], SENTENCES[:3]):  # batches of 4, 1 and 3 rows
            np.testing.assert_allclose(
                engine.encode(texts, 2, 16), EmbeddingModel.load(model_dir).encode(texts, layers=2, dim=16),
                atol=1e-5,
            )  # fmt: skip
    finally:
        engine.stop()
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled again for the engine's passes


@pytest.mark.parametrize("mode", ["shared", "grouped"])
@pytest.mark.parametrize("workers", [1, 2])
def test_engine_modes_match_offline_and_respect_the_token_budget(offline, mode, workers):
    stats = []
    engine = BatchingEngine(offline, max_batch_tokens=64, max_batch_size=5, mode=mode, workers=workers)
    engine.on_batch = stats.append
    engine.start()
    # transformers installs its capturing hooks on the model's first pass: count them after it
    offline.encode(SENTENCES[:1])
    hooks = len(offline.transformer.encoder.layer[0]._forward_hooks)
    try:
        cells = [(k, d) for k in (1, 2, 4) for d in (32, 7)]
        jobs = [
            (texts, k, d, engine.submit(engine.prepare(texts), k, d))
            for (k, d), texts in zip(cells * 2, [SENTENCES, SENTENCES[:3]] * len(cells))
        ]
        for texts, k, d, job in jobs:
            assert np.abs(job.future.result(10) - offline.encode(texts, layers=k, dim=d)).max() <= 1e-5
    finally:
        engine.stop()
    # mixed-layer passes run layer views with hidden states: they must not add hooks to the shared layers
    assert len(offline.transformer.encoder.layer[0]._forward_hooks) == hooks
    assert stats and all(s.padded_tokens <= 64 and s.rows <= 5 for s in stats)
    if mode == "grouped":
        assert all(len(s.layers) == 1 for s in stats)


def test_engine_pads_batch_widths_to_a_multiple_within_the_budget(model_dir, offline):
    """A bfloat16 model on a CPU asks for widths rounded up to 8 (fewer shapes for oneDNN); any model can be
    given a multiple. The budget counts the rounded width; the embeddings are those of offline encode."""
    low = EmbeddingModel.load(model_dir, dtype="bfloat16")
    assert BatchingEngine(low).pad_multiple == 8 and BatchingEngine(offline).pad_multiple == 1
    assert BatchingEngine(low, pad_multiple=1).pad_multiple == 1
    with pytest.raises(InvalidInputError, match="pad_multiple"):
        BatchingEngine(offline, pad_multiple=0)
    for model, multiple, atol in ((offline, 8, 1e-5), (low, None, 0.02)):
        stats = []
        engine = BatchingEngine(model, max_batch_tokens=64, max_batch_size=5, pad_multiple=multiple)
        engine.on_batch = stats.append
        engine.start()
        try:
            jobs = [
                (texts, engine.submit(engine.prepare(texts), 4, 16)) for texts in (SENTENCES, SENTENCES[:3])
            ]
            for texts, job in jobs:
                np.testing.assert_allclose(
                    job.future.result(10), model.encode(texts, layers=4, dim=16), atol=atol
                )
        finally:
            engine.stop()
        widths = [s.padded_tokens // s.rows for s in stats]
        assert stats and all(s.padded_tokens <= 64 and s.padded_tokens % s.rows == 0 for s in stats)
        assert all(w % 8 == 0 for w in widths), widths


def test_engine_takes_backends_without_a_pad_multiple_and_refuses_one_for_left_padding(model_dir, offline):
    class OldStyle:  # the engine interface before pad_multiple: pad(encoded, rows) only
        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            if name == "pad_multiple":
                raise AttributeError(name)
            return getattr(self.model, name)

        def pad(self, encoded, rows):
            return self.model.pad(encoded, rows)

    engine = BatchingEngine(OldStyle(offline)).start()
    try:
        assert engine.pad_multiple == 1
        np.testing.assert_allclose(
            engine.encode(SENTENCES, 2, 8), offline.encode(SENTENCES, layers=2, dim=8), atol=1e-5
        )
    finally:
        engine.stop()
    left = EmbeddingModel.load(model_dir, dtype="bfloat16")
    left.tokenizer.padding_side = "left"
    assert BatchingEngine(left).pad_multiple == 1
    with pytest.raises(InvalidInputError, match="pads on the left"):
        BatchingEngine(left, pad_multiple=8)


@pytest.mark.parametrize("mode,expected", [("grouped", {1: 8, 2: 8, 4: 8}), ("shared", {1: 4, 2: 2, 4: 2})])
def test_take_budget_is_per_layer_count_when_grouped(offline, mode, expected):
    """Grouped: each layer count gets a full take (a sort window of 8 rows here), so each group has as many
    rows to sort by length as a single-layer load; shared: one budget for all, first in first out."""
    engine = BatchingEngine(offline, max_batch_size=2, sort_window=8, mode=mode)  # _take called by hand
    for k in (1, 2, 4) * 4:
        engine.submit(engine.prepare(SENTENCES[:2]), k, 8)
    rows = engine._take()
    counts: dict[int, int] = {}
    for job, _ in rows:
        counts[job.layers] = counts.get(job.layers, 0) + 1
    assert counts == expected
    assert engine.queued_texts == 24 - len(rows)


def test_larger_sort_window_pads_less(offline):
    """Requests that each mix a short and a long text: a window of one request's rows pads every batch to
    the long text; a window of all rows sorts the long texts together."""
    short, long = "a cat", " ".join(["a long sentence about cats and dogs"] * 4)

    def padded(window: int) -> tuple[int, int]:
        engine = BatchingEngine(offline, max_batch_size=2, sort_window=window)  # _take called by hand
        for _ in range(4):
            engine.submit(engine.prepare([short, long]), 4, 8)
        total = taken = 0
        while engine.queued_texts:
            rows = engine._take()
            assert len(rows) <= window
            taken += len(rows)
            for batch in engine._batches(rows):
                total += len(batch) * max(job.prepared.lengths[i] for job, i in batch)
        return total, taken

    (narrow, rows_narrow), (wide, rows_wide) = padded(2), padded(8)
    assert rows_narrow == rows_wide == 8
    lengths = BatchingEngine(offline).prepare([short, long]).lengths
    assert narrow == 8 * max(lengths)  # every batch of 2 holds a long text
    assert wide == 4 * sum(lengths)  # long with long, short with short: no padding at all


class PairedModel(GatedModel):
    """Each forward pass waits until another one is running beside it (a barrier of 2), and records the
    thread that ran it: a pass that nobody joins within 10 s fails."""

    def __init__(self, model: EmbeddingModel) -> None:
        super().__init__(model)
        self.barrier = threading.Barrier(2, timeout=10)
        self.threads: list[str] = []

    def forward(self, features, layers):
        self.barrier.wait()
        self.threads.append(threading.current_thread().name)
        return self.model.forward(features, layers)


@pytest.mark.parametrize("workers", [2, 3])
def test_a_lone_request_runs_on_every_worker_at_once(offline, workers):
    """With 2 workers, one request's 6 rows are cut into 2 batches that run at the same time on both
    workers (each worker has half the cores: one worker alone would take twice as long); with 3, a take cut
    into 3 batches wakes both idle workers (the three passes meet at a barrier of 3)."""
    paired = PairedModel(offline)
    paired.barrier = threading.Barrier(workers, timeout=10)
    engine = BatchingEngine(paired, workers=workers).start()
    try:
        got = engine.encode(SENTENCES[:6], 4, 16)
    finally:
        engine.stop(10)
    np.testing.assert_allclose(got, offline.encode(SENTENCES[:6], layers=4, dim=16), atol=1e-5)
    assert sorted(paired.threads) == [f"m2d-engine-{i}" for i in range(workers)]


@pytest.mark.parametrize(
    "workers,small,large",
    [(1, [6], [32, 32, 32, 4]), (2, [3, 3], [32, 32, 32, 4]), (4, [2, 2, 1, 1], [32, 32, 32, 4])],
)
def test_a_small_take_is_cut_into_a_batch_per_worker(offline, workers, small, large):
    """Fewer batches than workers: the largest are halved until every worker has one."""
    engine = BatchingEngine(offline, max_batch_size=32, workers=workers)  # _take called by hand
    engine.submit(engine.prepare(SENTENCES[:6]), 4, 8)
    assert sorted((len(b) for b in engine._batches(engine._take())), reverse=True) == small
    engine.submit(engine.prepare((SENTENCES * 20)[:100]), 4, 8)  # batches enough: cut by max_batch_size
    assert [len(b) for b in engine._batches(engine._take())] == large
    for k in (1, 2, 4):  # grouped: a batch per layer count already, 3 for 4 workers: one more
        engine.submit(engine.prepare(SENTENCES[:4]), k, 8)
    batches = engine._batches(engine._take())
    assert sorted((len(b) for b in batches), reverse=True) == ([4, 4, 2, 2] if workers == 4 else [4, 4, 4])
    assert all(len({job.layers for job, _ in b}) == 1 for b in batches)


def test_engine_queue_bound_and_stop(offline):
    gated = GatedModel(offline)
    engine = BatchingEngine(gated, max_batch_tokens=64, max_queue_texts=4).start()
    gated.gate.clear()
    running = engine.submit(engine.prepare(["a"]), 4, 32)
    assert gated.waiting.wait(10)
    queued = engine.submit(engine.prepare(SENTENCES[:4]), 2, 8)
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit(engine.prepare(["b"]), 4, 32)
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    gated.gate.set()
    stopper.join(10)
    assert running.future.result(1).shape == (1, 32) and queued.future.result(1).shape == (4, 8)


def test_stop_with_two_workers_runs_every_batch_already_cut(offline):
    """Batches cut from a take wait in a list shared by the workers: stopping runs them all first."""
    gated = GatedModel(offline)
    engine = BatchingEngine(gated, max_batch_size=2, workers=2).start()
    gated.gate.clear()
    jobs = [engine.submit(engine.prepare(texts), 4, 8) for texts in (SENTENCES[:7], SENTENCES[:3])]
    assert gated.waiting.wait(10)
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    gated.gate.set()
    stopper.join(10)
    assert not stopper.is_alive() and gated.rows == 10
    for job, n in zip(jobs, (7, 3)):
        np.testing.assert_allclose(
            job.future.result(1), offline.encode(SENTENCES[:n], layers=4, dim=8), atol=1e-5
        )


class FailingModel(GatedModel):
    """Raises in every forward pass while ``fail`` is set; records the rows of each pass."""

    def __init__(self, model: EmbeddingModel) -> None:
        super().__init__(model)
        self.fail = True
        self.passes: list[int] = []

    def forward(self, features, layers):
        self.passes.append(len(features["input_ids"]))
        if self.fail:
            raise RuntimeError("out of memory")
        return self.model.forward(features, layers)


def test_failed_forward_pass_drops_the_rest_of_its_request(offline):
    failing = FailingModel(offline)
    engine = BatchingEngine(failing, max_batch_tokens=64, max_batch_size=2, sort_window=2).start()
    try:
        job = engine.submit(engine.prepare(SENTENCES[:6]), 4, 32)  # three batches of 2
        with pytest.raises(RuntimeError, match="out of memory"):
            job.future.result(10)
        deadline = time.monotonic() + 10
        while engine.queued_texts and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.queued_texts == 0 and engine.queued_requests == 0
        assert failing.passes == [2]  # its other two batches never ran
        failing.fail = False
        assert engine.submit(engine.prepare(["a cat"]), 4, 32).future.result(10).shape == (1, 32)
    finally:
        engine.stop(10)


def test_worker_survives_an_error_outside_the_forward_pass(offline):
    calls = []

    def on_batch(stats):  # e.g. a metrics hook that raises
        calls.append(stats)
        if len(calls) == 1:
            raise ValueError("metrics broke")

    engine = BatchingEngine(offline, max_batch_tokens=64, on_batch=on_batch).start()
    try:
        first = engine.submit(engine.prepare(["a cat"]), 4, 32)
        with pytest.raises(ValueError, match="metrics broke"):
            first.future.result(10)
        second = engine.submit(engine.prepare(SENTENCES[:3]), 2, 8)
        assert np.abs(second.future.result(10) - offline.encode(SENTENCES[:3], layers=2, dim=8)).max() <= 1e-5
    finally:
        engine.stop(10)


def test_engine_refuses_a_budget_below_max_seq_length(offline):
    with pytest.raises(ValueError, match="max_batch_tokens=8"):
        BatchingEngine(offline, max_batch_tokens=8)


def test_bfloat16_model_serves_its_own_offline_values(model_dir):
    model = EmbeddingModel.load(model_dir, dtype="bfloat16")
    app = create_app(ServeConfig(model_name=NAME), lambda: model)
    with BackgroundServer(app) as running:
        response = httpx.post(running.url + "/v1/embeddings", json={**GOOD, "input": SENTENCES, "layers": 2})
        got = np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)
    assert np.abs(got - model.encode(SENTENCES, layers=2)).max() <= 1e-2  # bf16 rounding differs by batch


@pytest.mark.parametrize("mode", ["shared", "grouped"])
def test_onnx_backend_serves_its_own_offline_values(model_dir, offline, tmp_path, mode):
    from matryoshka2d.backends.onnx import OnnxEncoder

    onnx = OnnxEncoder(model_dir, cache_dir=tmp_path / "cache")
    app = create_app(ServeConfig(model_name=NAME, layers_allowed=ALLOWED, batch_mode=mode), lambda: onnx)
    cells = [(k, d) for k in ALLOWED for d in (32, 7)]
    with BackgroundServer(app) as running:
        # every allowed layer count's graph is built while loading, none is left to a client's request
        assert all(onnx.graph_path(k).is_file() for k in ALLOWED) and not onnx.graph_path(3).is_file()

        def ask(cell):
            k, d = cell
            body = {**GOOD, "input": SENTENCES, "layers": k, "dimensions": d}
            return cell, httpx.post(running.url + "/v1/embeddings", json=body, timeout=30)

        with ThreadPoolExecutor(8) as pool:  # mixed layer counts arrive together and share batches
            answers = list(pool.map(ask, cells * 3))
    for (k, d), response in answers:
        assert response.status_code == 200
        got = np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)
        assert np.abs(got - onnx.encode(SENTENCES, layers=k, dim=d)).max() <= 1e-5
        assert np.abs(got - offline.encode(SENTENCES, layers=k, dim=d)).max() <= 1e-4  # = the torch model


# ---------------------------------------------------------------- CLI
def test_cli_serve_refuses_a_port_in_use_before_loading(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "matryoshka2d.cli", "serve", str(model_dir), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr


def test_cli_serve_missing_model_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "matryoshka2d.cli", "serve", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing" in proc.stderr


def test_cli_serve_refuses_a_dtype_the_runtime_lacks(model_dir):
    for option in ("--backend", "--runtime"):
        proc = subprocess.run(
            [sys.executable, "-m", "matryoshka2d.cli", "serve", str(model_dir), option, "onnx-int8"]
            + ["--dtype", "bfloat16"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2
        assert proc.stderr.strip().count("\n") == 0 and "--dtype bfloat16" in proc.stderr


@pytest.mark.integration
def test_minilm_openai_client_matches_offline_encode():
    folder = packaged_minilm()
    model = EmbeddingModel.load(folder)
    app = create_app(ServeConfig(model_name="minilm"), lambda: model)
    texts = ["A man is playing a guitar.", "Someone plays an instrument.", "The sky is blue."] * 3
    with BackgroundServer(app) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        for layers, dims in ((6, 384), (3, 64), (1, 128)):
            response = client.embeddings.create(
                model="minilm", input=texts, dimensions=dims, extra_body={"layers": layers}
            )
            expected = model.encode(texts, layers=layers, dim=dims)
            assert np.abs(as_array(response) - expected).max() <= 1e-5


@pytest.mark.parametrize(
    "family, options",
    [
        ("bert", []),
        ("mpnet", []),
        ("bert", ["--no-fused-layers"]),
        ("bert", ["--runtime", "onnx"]),
        ("bert", ["--no-torchscript"]),
    ],
)
def test_cli_serve_fuses_the_layers_where_the_model_allows(tiny_model_dirs, family, options):
    """m2d serve runs torch's fused encoder layers by default where the model supports them (BERT), with
    the offline values; a model that does not (MPNet) is served by transformers' layers, and says why;
    --no-fused-layers and the ONNX runtime leave the layers alone; --no-torchscript fuses them without
    TorchScript graphs."""
    model_dir = tiny_model_dirs[family]
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "matryoshka2d.cli", "serve", str(model_dir), "--port", str(port)]
    command += ["--served-model-name", NAME, "--workers", "1", "--threads", "1", *options]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url)
        body = {"model": NAME, "input": SENTENCES, "layers": 2, "dimensions": 16}
        response = httpx.post(url + "/v1/embeddings", json=body, timeout=60)
        assert response.status_code == 200
        got = np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)
        expected = EmbeddingModel.load(model_dir).encode(SENTENCES, layers=2, dim=16)  # not fused
        np.testing.assert_allclose(got, expected, atol=1e-4 if "onnx" in options else 1e-5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log = proc.stdout.read()
        if options == ["--no-torchscript"]:
            assert "torch layers fused (no TorchScript)" in log
        elif options:
            assert "torch layers" not in log
        elif family == "bert":
            assert "torch layers fused (TorchScript graphs)" in log
        else:
            assert "torch layers not fused:" in log and "MPNetModel is not one of" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
