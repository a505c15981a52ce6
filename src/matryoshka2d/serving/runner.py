"""Running the app with uvicorn: in the foreground (``m2d serve``) or in a background thread (tests).

uvicorn answers SIGTERM/SIGINT gracefully: it stops accepting connections, lets the requests in flight
finish (their queued texts are still batched and embedded; at most ``drain_timeout`` seconds, then the
ones left are cancelled), then runs the app's shutdown, which finishes anything left in the engine's
queue; the process exits 0.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from matryoshka2d.errors import Matryoshka2dError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Refuse, before the model loads, a ``host:port`` that cannot be listened on (in use, or not an
    address of this machine): uvicorn would say so only once the server starts, with exit status 3.

    Raises:
        InvalidInputError: naming the address and the reason.
    """
    from matryoshka2d.errors import InvalidInputError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as e:
        raise InvalidInputError(
            f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or --host"
        ) from None


def make_server(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    access_log: bool = False,
    drain_timeout: float | None = 60.0,
) -> uvicorn.Server:
    """A uvicorn server for ``app``.

    Args:
        drain_timeout: seconds a graceful shutdown waits for the requests in flight; past it the ones left
            (e.g. a client that stalls in the middle of its body) are cancelled and their queued texts
            dropped, and the shutdown goes on. ``None`` waits for ever.
    """
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=drain_timeout,
        lifespan="on",
    )
    return uvicorn.Server(config)


def run_until_signal(server: uvicorn.Server) -> None:
    """Run ``server`` in the foreground; SIGTERM or SIGINT shut it down gracefully and return normally.

    uvicorn re-raises the signal it caught after its graceful shutdown (so the default action would kill
    the process with that signal); the quiet handlers installed here absorb it, so a drained server exits 0.
    """
    quiet = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in quiet.items():
            signal.signal(sig, handler)


class BackgroundServer:
    """uvicorn serving ``app`` in a daemon thread, for tests and benchmarks (loopback by default).

    Example:
        >>> with BackgroundServer(app) as server:
        ...     httpx.get(server.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.app = app
        self.host = host
        self.port = port or free_port(host)
        self.server = make_server(app, host, self.port, log_level="warning")
        self.server.install_signal_handlers = lambda: None  # signals belong to the main thread
        self.thread = threading.Thread(target=self.server.run, name="m2d-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0, wait_loaded: bool = True) -> BackgroundServer:
        """Start serving; wait until uvicorn listens and (by default) the model is loaded."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise Matryoshka2dError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        if wait_loaded:
            state = self.app.state.server
            if not state.wait_loaded(max(0.0, deadline - time.monotonic())):
                raise Matryoshka2dError(f"the model did not load: {state.load_error or 'timed out'}")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful shutdown: in-flight requests finish first."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self if self.thread.is_alive() else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
