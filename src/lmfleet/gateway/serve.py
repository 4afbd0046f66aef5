"""``lmfleet gateway --config fleet.yaml``: the fleet's front door under uvicorn.

SIGHUP re-reads the fleet file and applies it in place: weights, replicas, keys and
limits change for new requests; requests in flight keep their replica, version and
queue slot, so nothing is dropped. A file that cannot be read or does not validate
is logged in one line and the running configuration stays.

``--port 0`` binds a free port; once the gateway listens it prints
``lmfleet gateway: listening on http://HOST:PORT`` and, with ``--port-file``, writes
the port number to that file (written whole, then renamed into place), so scripts
and tests never race for a port.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

import uvicorn

from lmfleet.errors import ConfigError
from lmfleet.fleet.config import load_config
from lmfleet.gateway.rollout_runner import RolloutRunner
from lmfleet.gateway.state import GatewayState
from lmfleet.serving import uvicorn_http, uvicorn_loop

logger = logging.getLogger(__name__)


def add_gateway_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "gateway",
        help="run the gateway in front of replicas (traffic split, balancing, retries)",
        description="Serve the OpenAI API in front of the replicas named in a fleet file: "
        "per-version traffic split (sticky, header override, shadow), balancing, an "
        "admission queue per model and version, retries and stream resume, API keys with "
        "rate limits, A/B statistics, progressive rollouts, an admin API and Prometheus "
        "metrics. SIGHUP reloads the fleet file without dropping requests.",
    )
    p.add_argument("--config", required=True, metavar="FLEET_YAML", help="the fleet file")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: %(default)s)")
    p.add_argument(
        "--port",
        type=int,
        default=8080,
        help="port to bind; 0 = a free one, printed once listening (default: %(default)s)",
    )
    p.add_argument(
        "--port-file",
        metavar="PATH",
        help="write the bound port to this file once listening (with --port 0)",
    )
    p.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per HTTP request (off by default: numbers go to /metrics)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the fleet file, print what it defines and exit",
    )
    p.set_defaults(func=run_gateway)
    return p


def _reload(state: GatewayState, runner: RolloutRunner, path: str) -> None:
    from lmfleet.gateway.app import one_line, reload_config

    try:
        reload_config(state, runner)
    except ConfigError as exc:
        logger.error("SIGHUP: keeping the running configuration: %s", one_line(str(exc)))
        return
    except Exception as exc:  # a signal handler must not die: one line, the config stays
        logger.error("SIGHUP: keeping the running configuration: reloading %s failed: "
                     "%s: %s", path, type(exc).__name__, exc)  # fmt: skip
        return
    logger.info("SIGHUP: reloaded %s", path)


def run_gateway(args: argparse.Namespace) -> int:
    from lmfleet.gateway.app import build_app

    config = load_config(args.config)
    if args.check:
        for m in config.models:
            versions = ", ".join(
                f"{v.name} (weight {v.weight:g}, {len(v.urls)} replicas)" for v in m.versions
            )
            print(f"{m.name}: {versions}; balancing {m.balancing.policy}")
        return 0
    state = GatewayState(config, config_path=args.config)
    app = build_app(config, config_path=args.config, state=state)
    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        log_level=args.log_level.lower(),
        access_log=args.access_log,
        timeout_graceful_shutdown=30,
        lifespan="on",
        backlog=4096,
        loop=uvicorn_loop(),
        http=uvicorn_http(),
    )
    server = _ReloadingServer(uv_config, state, app.state.rollouts, args.config, args.port_file)
    server.run()
    return 0


def _write_port(path: str, port: int) -> None:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, p)


class _ReloadingServer(uvicorn.Server):
    """uvicorn with SIGHUP bound to a reload of the fleet file, announcing the port
    it bound once it listens."""

    def __init__(
        self, config: uvicorn.Config, state: GatewayState, runner: RolloutRunner, path: str,
        port_file: str | None,
    ) -> None:  # fmt: skip
        super().__init__(config)
        self._state = state
        self._runner = runner
        self._path = path
        self._port_file = port_file

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, _reload, self._state, self._runner, self._path)
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        sock = self.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"lmfleet gateway: listening on http://{shown}:{port}", flush=True)
        if self._port_file:
            _write_port(self._port_file, port)
