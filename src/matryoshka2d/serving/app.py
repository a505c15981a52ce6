"""The OpenAI-compatible embeddings API (FastAPI): ``/v1/embeddings`` with a ``layers`` extension.

Endpoints: ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` (503
until the model is loaded) and ``GET /metrics`` (Prometheus). Every error is answered in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with the status OpenAI would use: 400 for an invalid
request (FastAPI's 422 validation errors included), 401 for a missing or wrong API key, 404 for an
unknown model or route, 413 for a body over the size limit, 429 when the queue is full, 503 while the
model loads or the server shuts down. See docs/SERVING.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from matryoshka2d.encoder import unicode_problem
from matryoshka2d.errors import InvalidInputError
from matryoshka2d.serving.engine import (
    BatchingEngine,
    EngineStoppedError,
    InputTooLongError,
    QueueFullError,
)
from matryoshka2d.serving.metrics import CONTENT_TYPE_LATEST, ServerMetrics

log = logging.getLogger("matryoshka2d.serving")

EMBEDDINGS = "/v1/embeddings"


@dataclass
class ServeConfig:
    """Settings of one server (the ``m2d serve`` options).

    Attributes:
        model_name: the name clients send as ``model`` (also listed by ``/v1/models``).
        aliases: other names accepted as ``model`` (e.g. the path the server was started with).
        layers_allowed: layer counts a request may ask for (None: every ``1..num_layers``).
        default_layers: layers when a request does not say (None: the deepest allowed).
        max_inputs: texts per request at most.
        max_request_bytes: request body size limit (413 past it).
        max_batch_tokens, max_batch_size, sort_window, max_queue_texts, workers, batch_mode,
            pad_multiple: the engine's settings (:class:`~matryoshka2d.serving.engine.BatchingEngine`;
            ``pad_multiple`` None: the model's choice).
        api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
    """

    model_name: str
    aliases: tuple[str, ...] = ()
    layers_allowed: tuple[int, ...] | None = None
    default_layers: int | None = None
    max_inputs: int = 2048
    max_request_bytes: int = 8 * 1024 * 1024
    max_batch_tokens: int = 8192
    max_batch_size: int = 32
    sort_window: int = 512
    max_queue_texts: int = 4096
    workers: int = 1
    batch_mode: str = "grouped"
    pad_multiple: int | None = None
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        key = self.api_key
        # An empty key (e.g. --api-key "$KEY" with KEY unset) matched a bare "Authorization: Bearer"; a
        # non-ASCII one could never match (HTTP headers arrive as latin-1 bytes).
        if key is not None and (not key.strip() or not key.isascii() or not key.isprintable() or " " in key):
            raise InvalidInputError(
                "the API key must be a non-empty string of printable ASCII characters without spaces "
                f"(got {'an empty string' if not key.strip() else 'another string'})"
            )


class EmbeddingRequest(BaseModel):
    """The body of ``POST /v1/embeddings``: OpenAI's fields plus ``layers``, ``truncate`` and
    ``prompt_name`` (one of the model's prompts, as in TEI and sentence-transformers)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    input: str | list[Any]
    dimensions: int | None = None
    # null means the default, as for the other optional fields (the openai client sends
    # "encoding_format": null when it is passed None)
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None
    layers: int | None = None
    truncate: bool | None = None
    prompt_name: str | None = None


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        # ASCII JSON: a message quoting a request value holding a lone surrogate (JSON allows "\ud800")
        # cannot be encoded as UTF-8; escaped, it is still the error answer instead of a plain-text 500
        return Response(
            json.dumps(body), status_code=self.status, headers=self.headers, media_type="application/json"
        )


def _validation_error(errors: list[dict]) -> ApiError:
    """A 400 in OpenAI's shape for the first pydantic/FastAPI validation error."""
    error = errors[0]
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = loc[0] if loc else None
    kind = error.get("type", "")
    if kind == "json_invalid":
        return ApiError(400, f"could not parse the JSON body of the request: {error.get('msg')}")
    if kind == "string_unicode" and param is None:  # a field name with a lone surrogate
        return ApiError(400, "a field name of the request is not valid Unicode (a lone surrogate)")
    if kind == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "missing":
        return ApiError(400, f"you must provide a '{param}' parameter", param=param)
    if param == "input":
        return ApiError(
            400,
            f"input must be a string or a list of strings, got {_describe(error.get('input'))}",
            param=param,
        )
    got = _describe(error.get("input"))
    return ApiError(
        400, f"invalid value for '{param}': {error.get('msg', 'invalid')} (got {got})", param=param
    )


def _describe(value: object) -> str:
    text = (
        json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    )
    return text if len(text) <= 60 else text[:57] + "..."


def _check_texts(value: str | list[Any], max_inputs: int) -> list[str]:
    """The request's texts, or a 400 naming the bad item (empty, non-string, token ids, too many)."""
    if isinstance(value, str):
        value = [value]
    if not value:
        raise ApiError(400, "input is an empty list: send at least one string", param="input")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value) or all(
        isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v) for v in value
    ):
        raise ApiError(
            400,
            "token-id arrays are not supported: send input as a string or a list of strings",
            param="input",
            code="token_ids_not_supported",
        )
    if len(value) > max_inputs:
        raise ApiError(
            400, f"input has {len(value)} items, more than the limit of {max_inputs}", param="input"
        )
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise ApiError(400, f"input[{i}] must be a string, got {_describe(text)}", param="input")
        if not text:
            raise ApiError(400, f"input[{i}] is an empty string", param="input")
        problem = unicode_problem(text)  # JSON allows "\ud800"; no tokenizer takes a lone surrogate
        if problem is not None:
            raise ApiError(400, f"input[{i}] {problem}", param="input")
    return value


class EmbeddingServer:
    """The state behind the app: the loaded model, its engine and the metrics.

    Args:
        config: the server settings.
        loader: returns the backend (e.g. ``lambda: EmbeddingModel.load(path)``); run in a background
            thread when the app starts, so ``/health`` answers 503 while it loads.
        on_load_error: called with the exception if loading fails (the CLI stops the server).
    """

    def __init__(
        self,
        config: ServeConfig,
        loader: Callable[[], Any],
        on_load_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.config = config
        self.loader = loader
        self.on_load_error = on_load_error
        self.model = None
        self.engine: BatchingEngine | None = None
        self.load_error: str | None = None
        self.metrics = ServerMetrics()
        self.layers_allowed: tuple[int, ...] = ()
        self.default_layers = 0
        self._loaded = threading.Event()

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        """Load the model and start the engine (run in a background thread)."""
        try:
            model = self.loader()
            num_layers = model.num_layers
            allowed = self.config.layers_allowed or tuple(range(1, num_layers + 1))
            bad = [k for k in allowed if not 1 <= k <= num_layers]
            if bad:
                raise InvalidInputError(
                    f"--layers-allowed {bad[0]} is out of range: the model has 1..{num_layers} layers"
                )
            default = self.config.default_layers or max(allowed)
            if default not in allowed:
                raise InvalidInputError(
                    f"default layers {default} is not in --layers-allowed {list(allowed)}"
                )
            engine = BatchingEngine(
                model,
                max_batch_tokens=self.config.max_batch_tokens,
                max_batch_size=self.config.max_batch_size,
                sort_window=self.config.sort_window,
                max_queue_texts=self.config.max_queue_texts,
                workers=self.config.workers,
                mode=self.config.batch_mode,
                pad_multiple=self.config.pad_multiple,
            ).start()
            if hasattr(model, "warm_up"):  # every allowed layer count's graphs now (ONNX, compiled torch,
                # TorchScript of fused layers), with the several-exit passes of the shared batch mode (their
                # own graphs when compiled or fused)
                model.warm_up(allowed, exits=self.config.batch_mode == "shared")
            engine.encode(["warm up"], default, model.dim)  # the first pass is slow; keep it off a client
            # batch metrics from here on: the warm-up is not traffic (a worker calls on_batch before it
            # hands the batch's results over, so the warm-up's call is over by now)
            engine.on_batch = self.metrics.observe_batch
        except BaseException as e:  # noqa: BLE001 - reported on /health and to the CLI
            self.load_error = str(e) or type(e).__name__
            log.error("cannot load the model: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(e)
            return
        self.model = model
        self.layers_allowed = tuple(sorted(set(allowed)))
        self.default_layers = default
        self.metrics.watch_queue(lambda: engine.queued_texts, lambda: engine.queued_requests)
        self.engine = engine
        self.metrics.model_loaded.set(1)
        self._loaded.set()
        log.info(
            "model %s loaded: %d layers, %d dims, max_seq_length %d; layers allowed %s; batches padded to "
            "a multiple of %d tokens",
            self.config.model_name,
            num_layers,
            model.dim,
            model.max_seq_length,
            list(self.layers_allowed),
            engine.pad_multiple,
        )

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until the model is loaded (True) or ``timeout`` passes (False)."""
        return self._loaded.wait(timeout)

    def shutdown(self) -> None:
        """Finish every queued job, then stop the engine's workers."""
        if self.engine is not None:
            self.engine.stop()

    # ------------------------------------------------------------------ request handling
    def check_auth(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise ApiError(
                401,
                "You didn't provide an API key: send it as 'Authorization: Bearer KEY'",
                code="missing_api_key",
            )
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.config.model_name and name not in self.config.aliases:
            raise ApiError(
                404,
                f"The model '{name}' does not exist: this server serves '{self.config.model_name}'",
                param="model",
                code="model_not_found",
            )

    def require_engine(self) -> BatchingEngine:
        if self.engine is None:
            if self.load_error is not None:
                raise ApiError(503, f"the model failed to load: {self.load_error}", type="server_error")
            raise ApiError(
                503, "the model is still loading: retry shortly", type="server_error", code="model_loading"
            )
        return self.engine

    async def read_body(self, request: Request) -> bytes:
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":  # gzip & co. would be parsed as garbage JSON (and skip the size limit)
            raise ApiError(
                415,
                f"Content-Encoding {encoding!r} is not supported: send the JSON body uncompressed",
                code="unsupported_content_encoding",
            )
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body has {declared} bytes, more than the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is larger than the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def embeddings(self, request: Request) -> Response:
        self.check_auth(request)
        engine = self.require_engine()
        body = await self.read_body(request)
        try:
            payload = json.loads(body)
        except RecursionError:
            raise ApiError(400, "could not parse the JSON body of the request: nested too deeply") from None
        except ValueError as e:  # malformed JSON, bytes that are not UTF-8, an integer of >4300 digits
            raise ApiError(400, f"could not parse the JSON body of the request: {e}") from None
        if not isinstance(payload, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(payload).__name__}")
        try:
            req = EmbeddingRequest.model_validate(payload)
        except ValidationError as e:
            raise _validation_error(e.errors()) from None
        texts = _check_texts(req.input, self.config.max_inputs)
        self.check_model(req.model)
        model = self.model
        dim = model.dim if req.dimensions is None else req.dimensions
        if not 1 <= dim <= model.dim:
            raise ApiError(
                400,
                f"dimensions={dim} is out of range: the model's embeddings have 1..{model.dim} dims",
                param="dimensions",
            )
        layers = self.default_layers if req.layers is None else req.layers
        if layers not in self.layers_allowed:
            if not 1 <= layers <= model.num_layers:
                message = f"layers={layers} is out of range: the model has 1..{model.num_layers} layers"
            else:
                message = (
                    f"layers={layers} is not served: allowed layer counts are {list(self.layers_allowed)}"
                )
            raise ApiError(400, message, param="layers")
        prompt = None  # the model's default prompt
        if req.prompt_name is not None:
            if not hasattr(model, "resolve_prompt"):  # a backend of the engine interface only
                raise ApiError(400, "this model takes no prompts", param="prompt_name")
            try:
                prompt = model.resolve_prompt(req.prompt_name)
            except InvalidInputError as e:
                raise ApiError(400, str(e), param="prompt_name") from None
        if not engine.has_room(len(texts)):
            raise _queue_full(f"the server is busy ({engine.queued_texts} texts queued): retry later")
        try:
            truncate = True if req.truncate is None else req.truncate
            prepared = await run_in_threadpool(engine.prepare, texts, truncate, prompt)
        except InputTooLongError as e:
            raise ApiError(400, str(e), param="input", code="context_length_exceeded") from None
        try:
            job = engine.submit(prepared, layers, dim)
        except QueueFullError as e:
            raise _queue_full(str(e)) from None
        except EngineStoppedError as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
        result = await self._wait(request, engine, job)
        if result is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        tokens = prepared.num_tokens
        self.metrics.prompt_tokens.inc(tokens)
        self.metrics.embeddings.labels(layers=str(layers)).inc(len(texts))
        return Response(
            _embedding_body(result, req.encoding_format or "float", self.config.model_name, tokens),
            media_type="application/json",
        )

    async def _wait(self, request: Request, engine: BatchingEngine, job) -> np.ndarray | None:
        """The job's result, or None (job cancelled) if the client disconnects first."""
        result = asyncio.wrap_future(job.future)
        disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({result, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            engine.cancel(job)
            raise
        finally:
            disconnect.cancel()
        if result in done:
            try:
                return result.result()
            except asyncio.CancelledError:
                return None
            except Exception as e:  # noqa: BLE001 - a failed forward pass
                raise ApiError(500, f"the forward pass failed: {e}", type="server_error") from None
        engine.cancel(job)
        result.cancel()
        return None


def _queue_full(message: str) -> ApiError:
    return ApiError(
        429, message, type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"}
    )


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    receive = request.receive
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _embedding_body(result: np.ndarray, encoding_format: str, model_name: str, tokens: int) -> bytes:
    """OpenAI's response JSON; base64 is the little-endian float32 bytes of each row.

    Floats are written by orjson as the shortest text that reads back as the same float32 (so a client
    that parses them and casts to float32 gets the server's values exactly), ~20x faster than ``json``.
    """
    if encoding_format == "base64":
        rows = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in result]
    else:
        rows = list(result)
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
    body = {
        "object": "list",
        "data": data,
        "model": model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def create_app(
    config: ServeConfig,
    loader: Callable[[], Any],
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The FastAPI app for one model; the model is loaded in a background thread at startup.

    Args:
        config: the server settings.
        loader: returns the backend (an :class:`~matryoshka2d.model.EmbeddingModel` or anything with its
            engine-core interface).
        on_load_error: called if loading fails.

    The :class:`EmbeddingServer` is at ``app.state.server``. Shutdown (SIGTERM) lets uvicorn finish the
    requests in flight, then finishes whatever is still queued and stops the engine.
    """
    server = EmbeddingServer(config, loader, on_load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=server.load, name="m2d-load", daemon=True)
        thread.start()
        yield
        await run_in_threadpool(server.shutdown)

    app = FastAPI(
        title="matryoshka2d embeddings",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # the schema is no secret, but a server behind an API key answers nothing to a client without it
        openapi_url=None if config.api_key is not None else "/openapi.json",
        # "/v1/embeddings/" is a 404 in OpenAI's shape, not an empty 307 to a Location built from the
        # client's Host header (which some clients follow, re-sending the body and the API key)
        redirect_slashes=False,
    )
    app.state.server = server
    metrics = server.metrics

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> Response:
        return _validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(
            exc.status_code,
            f"{request.method} {request.url.path}: {exc.detail}",
            code=code,
            headers=exc.headers,
        ).response()

    @app.post(EMBEDDINGS)
    async def embeddings(request: Request) -> Response:
        start = time.perf_counter()
        try:
            response = await server.embeddings(request)
        except ApiError as e:
            response = e.response()
        except ClientDisconnect:  # gone while sending the body: nobody reads an answer
            response = Response(status_code=499)
        except Exception as e:  # a bug: still an answer in OpenAI's shape, and counted
            log.exception("POST %s failed", EMBEDDINGS)
            response = ApiError(
                500, f"internal error: {type(e).__name__}: {e}", type="server_error"
            ).response()
        metrics.observe_request(EMBEDDINGS, response.status_code, time.perf_counter() - start)
        return response

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models(request: Request) -> Response:
        try:
            server.check_auth(request)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [_model_card(server)]})

    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
    async def model(request: Request, model_id: str) -> Response:
        try:
            server.check_auth(request)
            server.check_model(model_id)
        except ApiError as e:
            return e.response()
        return JSONResponse(_model_card(server))

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: health checkers, curl -I
    async def health() -> Response:
        if server.engine is not None:
            return JSONResponse({"status": "ok"})
        if server.load_error is not None:
            return JSONResponse({"status": "error", "message": server.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _model_card(server: EmbeddingServer) -> dict:
    card: dict[str, Any] = {
        "id": server.config.model_name,
        "object": "model",
        "created": server.config.created,
        "owned_by": "matryoshka2d",
    }
    if server.model is not None:  # the extension: what a request may ask for
        card.update(
            num_layers=server.model.num_layers,
            dim=server.model.dim,
            layers_allowed=list(server.layers_allowed),
            max_seq_length=server.model.max_seq_length,
        )
    return card
