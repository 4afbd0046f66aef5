"""``lmfleet gateway --config fleet.yaml``: the fleet's front door under uvicorn.

SIGHUP re-reads the fleet file and applies it in place: weights, replicas, keys and
limits change for new requests; requests in flight keep their replica, version and
queue slot, so nothing is dropped. A file that does not validate is logged and the
running configuration stays.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket

import uvicorn

from lmfleet.errors import ConfigError
from lmfleet.gateway.config import load_config
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
    p.add_argument("--port", type=int, default=8080, help="port to bind (default: %(default)s)")
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


def _reload(state: GatewayState, path: str) -> None:
    try:
        state.apply_config(load_config(path))
    except ConfigError as exc:
        logger.error("SIGHUP: keeping the running configuration: %s", exc)
        return
    logger.info("SIGHUP: reloaded %s", path)


def run_gateway(args: argparse.Namespace) -> int:
    from lmfleet.gateway.app import build_app

    config = load_config(args.config)
    if args.check:
        for m in config.models:
            versions = ", ".join(
                f"{v.name} (weight {v.weight:g}, {len(v.replicas)} replicas)" for v in m.versions
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
    _ReloadingServer(uv_config, state, args.config).run()
    return 0


class _ReloadingServer(uvicorn.Server):
    """uvicorn with SIGHUP bound to a reload of the fleet file."""

    def __init__(self, config: uvicorn.Config, state: GatewayState, path: str) -> None:
        super().__init__(config)
        self._state = state
        self._path = path

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, _reload, self._state, self._path)
        await super().serve(sockets)
