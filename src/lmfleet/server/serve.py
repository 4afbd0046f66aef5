"""``lmfleet serve MODEL_DIR``: one replica, the way ``vllm serve`` starts one.

``MODEL_DIR`` may also be ``sim:PROFILE``: the simulated accelerator (real
scheduler and KV cache, timed stand-in model), sped up by ``--sim-time-scale``.

Flags keep vLLM's names. uvicorn runs programmatically; its signal handling is
replaced so that the first SIGTERM or SIGINT drains (readiness 503, new requests
503 + Retry-After, running ones finish) and the process exits 0 once idle or when
``--drain-timeout`` ends. A second SIGINT quits at once.

For a supervisor (``lmfleet up``'s local provider): ``--port 0`` binds any free port,
which is logged (``listening: host=H port=P pid=N``) and, with ``--port-file``,
written to a file once the socket listens; ``--exit-with-parent PID`` drains and
exits when the supervisor dies, even of SIGKILL (Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from lmfleet.engine_flags import add_shared_engine_flags, default_model
from lmfleet.server.lifecycle import ReplicaState
from lmfleet.server.replica import Replica
from lmfleet.server.settings import DEFAULT_MAX_BODY_BYTES, ServerSettings, parse_bytes
from lmfleet.serving import uvicorn_http, uvicorn_loop

logger = logging.getLogger(__name__)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve one model over an OpenAI-compatible HTTP API (one replica)",
        description="Start one replica: an OpenAI-compatible API (/v1/chat/completions, "
        "/v1/completions, /v1/models, /tokenize, /detokenize), health probes "
        "(/health/live, /health/ready), a JSON state endpoint (/state), Prometheus "
        "metrics (/metrics) and admin actions (/admin/drain, /admin/sleep, /admin/wake). "
        "SIGTERM drains before exiting.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        help="Hugging Face checkpoint directory, a GGUF file (or a directory holding one), "
        "a built-in model name, or sim:PROFILE for the simulated accelerator (e.g. "
        "sim:llama-8b-h100; no weights, no GPU). Default: the built-in "
        "smollm2-135m-instruct",
    )
    _server_flags(p)
    _engine_flags(p)
    _admission_flags(p)
    p.set_defaults(func=run_serve)
    return p


def _server_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="address to bind (default: %(default)s)")
    g.add_argument(
        "--port",
        type=int,
        default=8000,
        help="port to bind; 0 binds any free port, logged as 'listening: ... port=P' "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--port-file",
        type=Path,
        metavar="PATH",
        help="once the socket listens, write the bound port to PATH (atomically: a "
        "temporary file renamed), for a supervisor that started the replica with --port 0",
    )
    g.add_argument(
        "--exit-with-parent",
        type=int,
        metavar="PID",
        help="Linux: drain and exit (SIGTERM) when the parent process dies, even when it "
        "is killed with SIGKILL (prctl PR_SET_PDEATHSIG); PID is the parent's process id, "
        "and the replica exits at once if its parent is not that process any more "
        "(default: off)",
    )
    g.add_argument(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help="model name(s) clients use in the 'model' field; the first is reported in "
        "responses (default: MODEL_DIR as given)",
    )
    g.add_argument(
        "--version-label",
        default="v1",
        help="version of this deployment, reported by /state and as a metric label for "
        "A/B comparisons (default: %(default)s)",
    )
    g.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on the OpenAI routes (401 otherwise); "
        "env LMFLEET_API_KEY",
    )
    g.add_argument(
        "--admin-token",
        help="require 'Authorization: Bearer TOKEN' on /admin/* (default: the API key, "
        "if one is set); env LMFLEET_ADMIN_TOKEN",
    )
    g.add_argument(
        "--disable-uvicorn-access-log",
        dest="access_log",
        action="store_false",
        help="do not log one line per HTTP request",
    )
    g.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="render chat_template sources sent in requests (default: such requests get "
        "400, as in vLLM); every render, the model's own template's too, is limited by "
        "--chat-template-timeout and a size cap",
    )
    g.add_argument(
        "--chat-template-timeout",
        dest="chat_template_timeout_s",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="a chat-template render that takes longer is stopped, and its request gets "
        "400 (default: %(default)s)",
    )
    g.add_argument(
        "--strict-request-fields",
        action="store_true",
        help="answer 400 to request fields lmfleet does not know (default: ignore them, "
        "with one warning per field name and lmfleet_request_unknown_fields_total)",
    )
    g.add_argument(
        "--stream-write-timeout",
        dest="stream_write_timeout_s",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="abort a stream whose client has taken no data for this long, freeing its "
        "engine slot (default: %(default)s)",
    )


def _engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--device",
        default="auto",
        help="torch device: auto (cuda when available), cpu, cuda:0 ... (default: %(default)s)",
    )
    g.add_argument(
        "--kv-cache-memory",
        dest="kv_cache_memory_bytes",
        type=parse_bytes,
        metavar="BYTES",
        help="KV cache budget, e.g. 4G or 512Mi (default: 1 GiB on CPU; on a GPU what "
        "--gpu-memory-utilization leaves)",
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache of shared prompt prefixes (default: on)",
    )
    add_shared_engine_flags(g)
    g.add_argument(
        "--engine-process",
        action="store_true",
        help="run the engine core in its own process, as vLLM V1 does: the step loop no "
        "longer shares the GIL with HTTP handling and detokenization, which matters on a "
        "GPU at high request rates; costs a second process and one pickle round trip "
        "per engine step (default: off, the core runs in a background thread)",
    )
    g.add_argument(
        "--sim-time-scale",
        type=float,
        metavar="FACTOR",
        help="speed the simulated accelerator up uniformly (steps, load, sleep, wake), "
        "e.g. 10 = ten times faster; only for sim:PROFILE models (default: 1)",
    )
    g.add_argument(
        "--fault-injection",
        action="store_true",
        help="for tests and drills, never in production: a request whose request_id "
        "contains lmfleet-fault-STAGE[-after-N] fails on purpose once it has N tokens; "
        "STAGE sample or output fails that request alone (500 request_failed), step "
        "kills the engine (see docs/server.md) (default: off)",
    )


def _admission_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("admission and lifecycle")
    g.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=1024,
        help="generation requests in flight beyond which new ones get 429 at once "
        "(TGI's max_concurrent_requests) (default: %(default)s)",
    )
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        help="sequences allowed to wait for a batch slot; beyond it new requests get 429 "
        "(default: no limit)",
    )
    g.add_argument(
        "--max-body-size",
        dest="max_body_bytes",
        type=parse_bytes,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="BYTES",
        help="request bodies larger than this get 413 (default: 8Mi)",
    )
    g.add_argument(
        "--drain-timeout",
        "--shutdown-timeout",
        dest="drain_timeout_s",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on drain or SIGTERM, how long running requests may take before the rest are "
        "aborted (503 'aborted', or an error event in a stream); keep "
        "terminationGracePeriodSeconds above preStop + this (default: %(default)s)",
    )
    g.add_argument(
        "--retry-after",
        dest="retry_after_s",
        type=int,
        default=1,
        metavar="SECONDS",
        help="Retry-After of 429 and 503 answers (default: %(default)s)",
    )
    g.add_argument(
        "--exit-on-engine-dead-after",
        dest="exit_on_engine_dead_after_s",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="when the engine dies (a failed step, a crashed core process), exit with "
        "status 1 after this long so that a supervisor (Kubernetes, lmfleet up) "
        "replaces the replica; until then /health/live answers 503 and requests 503 "
        "engine_dead (default: %(default)s)",
    )


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM / SIGINT start a drain; the replica sets
    ``should_exit`` when it stops. uvicorn re-raises the signals it captured after
    it exits; these are not captured, so a clean drain exits with status 0."""

    def __init__(
        self, config: uvicorn.Config, replica: Replica, *, port_file: Path | None = None
    ) -> None:
        super().__init__(config)
        self.replica = replica
        self.port_file = port_file
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        # one stable line a supervisor or a script can parse (also for --port 0)
        logger.info("listening: host=%s port=%d pid=%d", host, port, os.getpid())
        if self.port_file is not None:
            _write_atomically(self.port_file, f"{port}\n")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self.replica.state
        if self._loop is None or state is ReplicaState.STOPPED or self.should_exit:
            if sig == signal.SIGINT and self.should_exit:
                self.force_exit = True  # Ctrl-C twice: stop waiting for connections
            self.should_exit = True
            return
        if state is ReplicaState.DRAINING:
            if sig == signal.SIGINT:  # Ctrl-C while draining: give up on the drain
                self.should_exit = True
            return
        logger.info("%s received: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self.replica.start_drain)


def _write_atomically(path: Path, text: str) -> None:
    """Readers see no file or the whole text, never a partial one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _exit_with_parent(parent_pid: int) -> bool:
    """Have the kernel send SIGTERM (a drain) when the parent dies. False when the
    parent is already gone (this process was re-parented before it got here).

    The signal comes when the parent *thread* that started this process ends, so a
    supervisor must start replicas from a thread that lives as long as it does (the
    event loop's)."""
    if not sys.platform.startswith("linux"):
        logger.warning("--exit-with-parent works on Linux only; ignored")
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    return os.getppid() == parent_pid  # checked after the prctl: no window left


def run_serve(args: argparse.Namespace) -> int:
    from lmfleet.server.app import build_app

    if args.exit_with_parent is not None and not _exit_with_parent(args.exit_with_parent):
        print(
            f"lmfleet serve: the parent process {args.exit_with_parent} is gone "
            "(--exit-with-parent); not starting",
            file=sys.stderr,
        )
        return 1
    if args.api_key is None:
        args.api_key = os.environ.get("LMFLEET_API_KEY") or None
    if args.admin_token is None:
        args.admin_token = os.environ.get("LMFLEET_ADMIN_TOKEN") or None
    args.log_level = args.log_level.lower()
    if args.model is None:
        args.model = default_model()
    settings = ServerSettings.from_args(args)
    settings.engine_config()  # fail fast on a bad engine flag, before binding the port
    replica = Replica(settings)
    app = build_app(settings, replica=replica)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the CLI's logging setup
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=5,
        lifespan="on",
        loop=uvicorn_loop(),
        http=uvicorn_http(),
    )
    # Bound here, before the model load starts: a taken port fails at once, and with
    # --port 0 there is exactly one socket, so one port to report.
    sock = config.bind_socket()
    sock.set_inheritable(False)  # (uvicorn's, for its workers) no child may hold the port
    server = DrainingServer(config, replica, port_file=args.port_file)

    def stopped() -> None:
        server.should_exit = True

    replica.on_stopped = stopped
    server.run(sockets=[sock])  # asyncio.run(server.serve()) on the configured loop
    if replica.error is not None:
        print(f"lmfleet serve: {replica.error}", file=sys.stderr)
    return replica.exit_code
