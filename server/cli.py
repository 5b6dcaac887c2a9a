"""``restune serve``: run the service under uvicorn.

Registered in the ``restune.commands`` entry-point group (see ``clients/cli.py``) and also
reachable as ``python -m server serve``. Options override the environment (``RESTUNE_*``),
which overrides ``--config``. SIGTERM or Ctrl-C: uvicorn stops accepting, waits for in-flight
requests (up to ``graceful_shutdown_s``), then the lifespan drains the batcher and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from typing import Any

from pydantic import ValidationError

from server.settings import Settings
from server.tenancy import Tenancy

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_FAILED = 1

# CLI option -> Settings field, for options that map one to one.
_OPTION_FIELDS = {
    "host": "host",
    "port": "port",
    "backbone": "backbone",
    "weights": "backbone_weights",
    "store": "store",
    "runtime": "runtime",
    "device": "device",
    "demo": "demo",
}


def register(subparsers: Any) -> None:
    """Add ``serve`` to a ``restune`` (or ``python -m server``) argument parser."""
    p = subparsers.add_parser(
        "serve",
        help="run the inference server",
        description="Run the restune inference server (HTTP API, playground, /metrics).",
    )
    p.add_argument("--config", metavar="FILE", help="settings file (.toml or .json)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--backbone", metavar="PRESET", help="backbone preset name")
    p.add_argument("--weights", metavar="PATH", help="backbone weights: file or random:<seed>")
    p.add_argument("--store", metavar="URL", help="tuner store: file:///dir or redis://host/db")
    p.add_argument("--runtime", choices=["torch", "onnxruntime"], help="backbone runtime")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--demo",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train and register the demo tuners into an empty store on start",
    )
    p.set_defaults(func=run_serve)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from ``--config``, the environment and the command-line options."""
    overrides = {
        field: getattr(args, option)
        for option, field in _OPTION_FIELDS.items()
        if getattr(args, option, None) is not None
    }
    if getattr(args, "config", None):
        return Settings.from_file(args.config, **overrides)
    return Settings(**overrides)


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then end the process with the exit code.

    A command, not a library call: it never returns after serving (use :func:`serve` to run
    the server inside a program of your own)."""
    try:
        settings = settings_from_args(args)
        Tenancy.from_settings(settings)  # a bad tokens file is a settings error too
    except (ValidationError, OSError, ValueError) as exc:
        print(f"restune serve: invalid settings: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    code = asyncio.run(serve(settings))
    # Everything is drained and closed here. Interpreter teardown with torch loaded takes
    # seconds (measured 2-3.6 s on a 2-core box) and only delays the exit that a rolling
    # update or a test is waiting for, so leave now with the logs flushed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def serve(settings: Settings) -> int:
    """Run uvicorn with the app for ``settings``; print the URL once it listens."""
    # Imported here so `restune --help` and the clients' commands never load torch.
    import uvicorn

    from server.app import create_app
    from server.http_protocol import protocol_with_header_timeout
    from server.logging_config import configure_logging

    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    configure_logging(settings.log_format, settings.log_level, secrets=[token])
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
        server_header=False,
        # Slow clients: headers have a deadline here, bodies in the body-limit middleware.
        http=protocol_with_header_timeout(settings.request_header_timeout_s),
        # Past this many connections + requests, uvicorn answers 503 instead of queueing
        # without bound; per-client connection limits are the proxy's (docs/RELIABILITY.md).
        limit_concurrency=settings.limit_concurrency or None,
        backlog=settings.backlog,
    )
    server = _announcing_server_class()(config)
    await server.serve()
    # uvicorn returns without raising when startup (the lifespan) fails.
    return EXIT_OK if server.started else EXIT_FAILED


def _announcing_server_class() -> Any:
    import uvicorn

    class AnnouncingServer(uvicorn.Server):  # type: ignore[misc]
        """uvicorn's server, printing the URLs it listens on once startup completed."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal after its graceful shutdown, so the process
            # dies "by SIGTERM" even when every request completed. A drained shutdown is a
            # success: forget the signal and exit 0 (a second Ctrl-C still forces exit).
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                # Everything loaded so far (torch, the backbone, the app: ~200k objects) lives
                # as long as the process. Left to the collector, each full collection walks it
                # all while holding the GIL: ~0.3 s with every request stalled, measured on a
                # 2-core box, triggered by whatever request allocates enough. Frozen, it is
                # skipped; what requests allocate is still collected.
                gc.freeze()
                for url in _listening_urls(self):
                    print(f"restune serving on {url}  (docs {url}/docs)", flush=True)

    return AnnouncingServer


def _listening_urls(server: Any) -> list[str]:
    urls = []
    for srv in getattr(server, "servers", []):
        for sock in srv.sockets:
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            urls.append(f"http://{shown}:{port}")
    return urls


def main(argv: list[str] | None = None) -> int:
    """``python -m server``: the server's own commands without the clients' dispatcher."""
    parser = argparse.ArgumentParser(prog="python -m server")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code
