"""``lmfleet up [FLEET_YAML]``: the whole fleet in one process.

One event loop runs the gateway (uvicorn's ``serve()`` coroutine, not its blocking
``run()``), the autoscaler's control loop and the local provider, whose children
are the replicas (``lmfleet serve`` processes on port 0). With no file it runs the
built-in fleet (``fleet/default.yaml``): SmolLM2-135M-Instruct, v1 float32 and v2
int8 split 90/10, autoscaled, one v1 replica asleep as a warm standby.

Once the gateway listens it prints its URL and an API example; when a version is
READY it sends a first chat request through the gateway and prints the answer
(``--ask``); then a live status view (``rich``, or a log line every
``--status-every`` seconds when stdout is not a terminal) until Ctrl-C or SIGTERM:
stop admitting, let the gateway finish what it relays, drain every replica, exit 0.
A second Ctrl-C stops at once: the replicas are killed, none is left behind (they
also die with this process, even of SIGKILL: ``lmfleet serve --exit-with-parent``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from lmfleet.errors import ConfigError
from lmfleet.fleet.config import FleetConfig, load_config, parse_config

logger = logging.getLogger(__name__)

DEFAULT_QUESTION = "What is the capital of France?"


def default_fleet() -> FleetConfig:
    """The built-in fleet (``fleet/default.yaml``)."""
    import yaml

    text = resources.files("lmfleet.fleet").joinpath("default.yaml").read_text("utf-8")
    return parse_config(yaml.safe_load(text), source="the built-in fleet")


def add_up_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "up",
        help="run a fleet: gateway, autoscaler and replicas, in one process",
        description="Run the fleet a fleet file describes, on this machine: the gateway, "
        "the autoscaler's control loop and the replicas (child `lmfleet serve` processes) "
        "in one process. With no file: the built-in fleet on SmolLM2-135M-Instruct (v1 "
        "float32, v2 int8, 90/10, autoscaled, one warm standby). Ctrl-C or SIGTERM drains "
        "everything and exits 0; a second Ctrl-C stops at once.",
    )
    p.add_argument(
        "fleet", nargs="?", metavar="FLEET_YAML", help="the fleet file (default: the built-in one)"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address the gateway binds (default: %(default)s)"
    )
    p.add_argument(
        "--port",
        type=int,
        default=8080,
        help="port the gateway binds; 0 = a free one (default: %(default)s)",
    )
    p.add_argument(
        "--port-file", metavar="PATH", help="write the gateway's port to this file once it listens"
    )
    p.add_argument(
        "--run-dir",
        metavar="DIR",
        help="replica logs, port and pid files (default: the fleet file's provider.run_dir, "
        "else $LMFLEET_HOME/run/FLEET)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="the autoscaler decides and logs but starts and stops nothing",
    )
    p.add_argument(
        "--ask",
        metavar="TEXT",
        help="the first chat request sent through the gateway once a version is ready, "
        f"and its answer printed (default with the built-in fleet: {DEFAULT_QUESTION!r}; "
        "with a fleet file: none)",
    )
    p.add_argument(
        "--no-ask", action="store_true", help="send no first request, even with the built-in fleet"
    )
    p.add_argument(
        "--status",
        choices=["auto", "live", "log", "off"],
        default="auto",
        help="the status view: live (a rich table redrawn in place), log (a line per "
        "version every --status-every seconds), auto (live on a terminal, else log), off",
    )
    p.add_argument(
        "--status-every",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between status lines in log mode (default: %(default)s)",
    )
    p.add_argument(
        "--check", action="store_true", help="validate the fleet file, print what it runs and exit"
    )
    p.set_defaults(func=run_up)
    return p


def run_up(args: argparse.Namespace) -> int:
    # one line per replica probe would drown the fleet's own lines
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = load_config(args.fleet) if args.fleet else default_fleet()
    if args.check:
        for line in describe(config):
            print(line)
        return 0
    if not config.managed() and not any(v.urls for m in config.models for v in m.versions):
        raise ConfigError("the fleet file has no version with a model or urls: nothing to run")
    question = None if args.no_ask else (args.ask or (None if args.fleet else DEFAULT_QUESTION))
    from lmfleet.serving import uvicorn_loop

    if uvicorn_loop() == "uvloop":
        import uvloop

        return uvloop.run(_up(config, args, question))
    return asyncio.run(_up(config, args, question))


def describe(config: FleetConfig) -> list[str]:
    """One line per version: what it runs, how many, its weight."""
    lines = []
    for m in config.models:
        for v in m.versions:
            what = []
            if v.model is not None:
                args = " ".join(v.serve_args())
                what.append(f"runs {v.model}{' ' + args if args else ''}, replicas "
                            f"{v.replicas.min}..{v.replicas.max}, standby {v.replicas.standby}")  # fmt: skip
            if v.urls:
                what.append(f"{len(v.urls)} static replica(s)")
            lines.append(f"{m.name}/{v.name}: weight {v.weight:g}; " + "; ".join(what or ["empty"]))
    return lines


def run_dir_of(config: FleetConfig, args: argparse.Namespace) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    if config.provider.run_dir:
        return Path(config.provider.run_dir)
    home = Path(os.environ.get("LMFLEET_HOME", str(Path.home() / ".cache" / "lmfleet")))
    name = Path(args.fleet).stem if args.fleet else "default"
    # two fleet files of the same name elsewhere get their own run dirs
    tag = hashlib.blake2b(str(Path(args.fleet).resolve()).encode(), digest_size=3).hexdigest() \
        if args.fleet else "builtin"  # fmt: skip
    return home / "run" / f"{name}-{tag}"


async def _up(config: FleetConfig, args: argparse.Namespace, question: str | None) -> int:
    import uvicorn

    from lmfleet.autoscaler.controller import Controller
    from lmfleet.autoscaler.providers.local import LocalProvider
    from lmfleet.fleet.status_view import StatusView
    from lmfleet.gateway.app import build_app
    from lmfleet.gateway.state import GatewayState
    from lmfleet.serving import uvicorn_http

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = {"count": 0}

    def on_signal(sig: signal.Signals) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            logger.info("%s: draining the fleet (again to stop at once)", sig.name)
            stop.set()
        else:
            logger.warning("%s again: stopping at once", sig.name)
            server.force_exit = True
            stop_now.set()

    stop_now = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    run_dir = run_dir_of(config, args)
    pc = config.provider
    provider = LocalProvider(
        run_dir, host=pc.host, poll_interval_s=pc.poll_interval_s, kill_grace_s=pc.kill_grace_s
    )
    await provider.open()
    state = GatewayState(config, config_path=args.fleet)
    app = build_app(config, config_path=args.fleet, state=state)
    drain_s = max((v.drain_timeout_s for _, v in config.managed()), default=30.0)
    server = _Server(
        uvicorn.Config(
            app, host=args.host, port=args.port, log_config=None, access_log=False,
            timeout_graceful_shutdown=int(drain_s) + 5, lifespan="on", backlog=4096,
            http=uvicorn_http(),
        )
    )  # fmt: skip
    serving = loop.create_task(server.serve(), name="gateway")
    controller: Controller | None = None
    view: StatusView | None = None
    code = 0
    try:
        while not server.started:
            if serving.done():
                serving.result()  # raises what stopped it (a port in use)
                raise ConfigError(f"the gateway could not listen on {args.host}:{args.port}")
            await asyncio.sleep(0.05)
        url = server.url
        if args.port_file:
            _write_port(args.port_file, server.port)
        controller = Controller(state, provider, config, dry_run=args.dry_run or None)
        app.state.controller = controller
        _print_intro(config, url, run_dir)
        await controller.start()
        view = StatusView.for_mode(args.status, controller, state, every_s=args.status_every)
        first = None
        if question:
            first = loop.create_task(_first_answer(config, state, url, question))
        if view is not None:
            view.start()
        await _wait_any(stop, stop_now, serving)
        if first is not None:
            first.cancel()
    finally:
        if view is not None:
            await view.close()
        if controller is not None:
            await controller.close()
        if stop_now.is_set():
            code = 130
            server.force_exit = True
            server.should_exit = True
            await provider.close(grace_s=0)
        else:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await _wait_any(stop_now, serving)
            if stop_now.is_set():
                code = 130
                await provider.close(grace_s=0)
            else:
                closing = loop.create_task(provider.close())
                await _wait_any(stop_now, closing)
                if stop_now.is_set():
                    code = 130
                    await provider.close(grace_s=0)
                    closing.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(serving, 5)
    logger.info("fleet stopped%s", "" if code == 0 else " at once")
    return code


async def _wait_any(*things: asyncio.Event | asyncio.Task[Any]) -> None:
    waits = [asyncio.ensure_future(t.wait()) if isinstance(t, asyncio.Event) else t for t in things]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w, t in zip(waits, things, strict=True):
        if isinstance(t, asyncio.Event):
            w.cancel()


def _print_intro(config: FleetConfig, url: str, run_dir: Path) -> None:
    model = config.models[0].name
    out = sys.stdout
    out.write(f"lmfleet up: gateway on {url}  (replica logs in {run_dir})\n")
    for line in describe(config):
        out.write(f"  {line}\n")
    out.write(
        f"  try: curl -s {url}/v1/chat/completions -H 'content-type: application/json' "
        f'-d \'{{"model": "{model}", "messages": [{{"role": "user", "content": '
        f'"Hello!"}}]}}\'\n'
        f"  status: lmfleet status {url}   metrics: {url}/metrics   "
        f"decisions: {url}/admin/autoscaler\n"
    )
    out.flush()


async def _first_answer(config: FleetConfig, state: Any, url: str, question: str) -> None:
    """Once the first model has a routable version, ask it ``question`` through the
    gateway (as a client would) and print the answer."""
    import httpx

    model = config.models[0]
    t0 = time.monotonic()
    budget = max((v.load_timeout_s for v in model.versions), default=600.0)
    while not any(v.routable() for v in state.registry.model(model.name).versions.values()):
        if time.monotonic() - t0 > budget:
            logger.warning("no version of %s became ready in %.0f s", model.name, budget)
            return
        await asyncio.sleep(0.2)
    body = {"model": model.name, "messages": [{"role": "user", "content": question}],
            "max_tokens": 64, "temperature": 0}  # fmt: skip
    async with httpx.AsyncClient(trust_env=False, timeout=120) as client:
        r = await client.post(f"{url}/v1/chat/completions", json=body)
    took = time.monotonic() - t0
    if r.status_code != 200:
        logger.warning("the first request answered %d: %s", r.status_code, r.text[:300])
        return
    data = r.json()
    answer = data["choices"][0]["message"]["content"]
    served = r.headers.get("x-lmfleet-version", "?")
    sys.stdout.write(
        f"lmfleet up: asked {question!r} → {answer.strip()!r} "
        f"(version {served}, {took:.1f} s after start)\n"
    )
    sys.stdout.flush()


def _write_port(path: str, port: int) -> None:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, p)


class _Server:
    """uvicorn's server without its signal handling (``lmfleet up`` owns SIGINT and
    SIGTERM: the first drains the fleet, the second stops at once)."""

    def __init__(self, config: Any) -> None:
        import uvicorn

        class Quiet(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # type: ignore[override]
                yield

        self._server = Quiet(config)

    async def serve(self) -> None:
        await self._server.serve()

    @property
    def started(self) -> bool:
        return self._server.started

    @property
    def port(self) -> int:
        sock: socket.socket = self._server.servers[0].sockets[0]
        return int(sock.getsockname()[1])

    @property
    def url(self) -> str:
        sock = self._server.servers[0].sockets[0]
        host = sock.getsockname()[0]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    @property
    def should_exit(self) -> bool:
        return self._server.should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._server.should_exit = value

    @property
    def force_exit(self) -> bool:
        return self._server.force_exit

    @force_exit.setter
    def force_exit(self, value: bool) -> None:
        self._server.force_exit = value
