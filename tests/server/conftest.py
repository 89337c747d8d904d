"""Servers for the server tests: an in-process TestClient app, and a live uvicorn server on loopback."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install -e '.[server]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(config):
    """A uvicorn server for ``config`` (its port replaced by a free one) in a thread; yields the base URL."""
    import dataclasses

    import uvicorn

    from diffspeed.server.app import create_app

    config = dataclasses.replace(config, port=free_port())
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=config.port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    """A live server on loopback serving tiny-sd (no preset), outputs in a temporary folder."""
    from diffspeed.server.config import ServerConfig

    out = tmp_path_factory.mktemp("server-outputs")
    with running(ServerConfig(outputs_dir=str(out))) as url:
        yield url


@pytest.fixture(scope="session")
def app_client(tmp_path_factory):
    """An in-process client of one app (tiny-sd, small queue), shared by the tests that do not change it."""
    from fastapi.testclient import TestClient

    from diffspeed.server.app import create_app
    from diffspeed.server.config import ServerConfig

    out = tmp_path_factory.mktemp("app-outputs")
    with TestClient(create_app(ServerConfig(outputs_dir=str(out)))) as client:
        client.outputs = out
        yield client
