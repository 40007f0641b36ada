"""Serving the API in production: ``kvadrupel api`` (see docs/api.md).

Each worker process builds its own :class:`~kvadrupel.container.Container` from the
environment (``app_from_env``, an app *factory*) and hands it to the web layer
(:func:`api.app.create_app`), so its own pools, its own LISTEN connections and its
own version cache; the container is closed at the worker's lifespan shutdown.

Server: granian (Rust HTTP/1.1 and HTTP/2, ASGI) by default, uvicorn (with uvloop
and httptools) as the alternative — ``KVADRUPEL_API_SERVER``. The choice is
measured, not assumed: ``bench/bench_api.py`` serves the same app with both.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["SERVERS", "app_from_env", "run"]

SERVERS = ("granian", "uvicorn")
TARGET = "kvadrupel.serve:app_from_env"


def app_from_env() -> Any:
    """The ASGI app of one worker process, from ``KVADRUPEL_*`` settings."""
    from api.app import create_app
    from base import logs
    from kvadrupel.container import Container
    from kvadrupel.settings import Settings

    settings = Settings()
    logs.setup(settings.log_level)
    container = Container(settings)
    app = create_app(container)
    app.state.banner_api.closers.append(container.close)
    # The test panel's first answer should not wait for a sandbox child to start.
    threading.Thread(target=container.sandbox.warm, args=(1,), name="sandbox-warm",
                     daemon=True).start()
    return app


def run(server: str, host: str, port: int, workers: int, *, target: str = TARGET,
        backlog: int = 2048) -> None:
    """Serve ``target`` (an app factory) with ``server`` and ``workers`` processes; blocks."""
    if server == "granian":
        from granian.constants import Interfaces, Loops
        from granian.server import Server

        Server(target, address=host, port=port, interface=Interfaces.ASGI, workers=workers,
               factory=True, loop=Loops.uvloop, backlog=backlog, log_access=False,
               respawn_failed_workers=True, websockets=False).serve()
    elif server == "uvicorn":
        import uvicorn

        uvicorn.run(target, factory=True, host=host, port=port, workers=workers,
                    loop="uvloop", http="httptools", backlog=backlog, log_config=None,
                    access_log=False, lifespan="on")
    else:
        raise ValueError(f"unknown API server {server!r}: one of {', '.join(SERVERS)}")
