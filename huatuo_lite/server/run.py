"""Start the server: in the foreground (serve) or on a thread for tests (background_server)."""
from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import replace

from ..errors import HuatuoError
from .policy import DEFAULT_HOST, DEFAULT_PORT, ServerSettings


# ---------------------------------------------------------------- running ----
def serve(model, settings: ServerSettings, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          log_level: str = "info") -> None:
    """Run the server in the foreground until Ctrl-C."""
    import uvicorn

    from .app import create_app

    app = create_app(model, replace(settings, bind_host=host))
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def background_server(model, settings: ServerSettings, host: str = "127.0.0.1"):
    """Serve on a free loopback port in a thread; yields the base URL
    (http://127.0.0.1:PORT). For tests and embedding; stops on exit."""
    import uvicorn

    from .app import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    config = uvicorn.Config(create_app(model, replace(settings, bind_host=host)), log_level="warning",
                            access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise HuatuoError("The server thread stopped while starting; see the log above.")
            thread.join(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
