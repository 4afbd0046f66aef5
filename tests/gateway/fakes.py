"""In-process stand-ins for the gateway tests: a fake replica whose behaviour a test
sets (state, error answers, pace, a connection that breaks mid-stream, requests held
until released, a poisoned prompt, early headers for unary answers) and a helper
that serves any ASGI app from a background thread."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lmfleet.fleet.config import parse_config
from lmfleet.fleet.replica_status import ReplicaStatusReport
from tests.server_thread import ServerThread


class _Broken(Exception):
    """Raised inside a streaming body: uvicorn drops the connection mid-stream."""


@dataclass
class FakeReplica:
    """A replica: ``/state``, ``/tokenize`` and the two generation routes.

    Token ``i`` of a stream is ``w{i}`` (the position in the output), so a
    continuation that starts after k tokens is told apart from a restart."""

    name: str = "r"
    state: str = "ready"
    status: int | None = None  # answer every generation request with this status
    code: str | None = None  # ... and this error code
    gap_s: float = 0.005
    #: a prompt containing this marker fails: with 500 request_failed (the replica goes
    #: on), or with 503 engine_dead, after which every request gets that and /state
    #: says the engine is dead (``poison_kills``)
    poison: str | None = None
    poison_kills: bool = False
    dead: bool = False
    #: a dead replica says that the requests it refuses never reached its engine
    says_not_admitted: bool = False
    #: a unary answer takes this long (the replica holds it until complete)
    delay_s: float = 0.0
    #: with the gateway's x-lmfleet-early-headers: 200 headers at once, a space every
    #: heartbeat_s while "generating", then the body (or a late error with "status")
    early_headers: bool = False
    heartbeat_s: float = 0.05
    #: with early headers, drop the connection after the first heartbeat (a replica
    #: that dies while it generates a non-streaming answer)
    break_unary: bool = False
    #: drop the connection after this many chunks (original requests only: a
    #: continuation, whose prompt is token ids, always completes)
    break_after: int | None = None
    hold: threading.Event | None = None  # generation waits until this is set
    requests: list[dict[str, Any]] = field(default_factory=list)
    running: int = 0

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/state", self._state),
                Route("/tokenize", self._tokenize, methods=["POST"]),
                Route("/v1/completions", self._generate, methods=["POST"]),
                Route("/v1/chat/completions", self._generate, methods=["POST"]),
            ]
        )

    async def _state(self, request: Request) -> Response:
        report = ReplicaStatusReport(
            state=self.state, ready=self.state == "ready" and not self.dead,
            model=self.name, running=self.running, kv_cache_usage=0.1,
            engine_dead=self.dead,
        )  # fmt: skip
        return JSONResponse(report.model_dump(mode="json"))

    def _error(self, status: int, code: str | None, message: str) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": message, "type": "x", "param": None, "code": code}},
            status_code=status, headers={"Retry-After": "1"},
        )  # fmt: skip

    async def _tokenize(self, request: Request) -> Response:
        body = await request.json()
        if "messages" in body:
            words = " ".join(m["content"] for m in body["messages"]).split()
        else:
            words = body["prompt"].split()
        # generated words wK are token 1000 + K; prompt words are small ids
        ids = [1000 + int(w[1:]) if w[:1] == "w" and w[1:].isdigit() else 7 for w in words]
        return JSONResponse({"count": len(ids), "max_model_len": 4096, "tokens": ids})

    async def _generate(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append({"path": request.url.path, "body": body,
                              "headers": dict(request.headers)})  # fmt: skip
        if self.dead:
            refused = self._error(503, "engine_dead", f"{self.name}: the engine stopped")
            if self.says_not_admitted:
                refused.headers["x-lmfleet-admitted"] = "0"
            return refused
        if self.status is not None:
            return self._error(self.status, self.code, f"{self.name} says {self.status}")
        poisoned = self.poison is not None and self.poison in json.dumps(body)
        early = self.early_headers and request.headers.get("x-lmfleet-early-headers") == "1"
        if poisoned and not early:
            if self.poison_kills:
                self.dead = True
                return self._error(503, "engine_dead", f"{self.name}: the engine died")
            return self._error(500, "request_failed", f"{self.name}: this request failed")
        chat = request.url.path.endswith("chat/completions")
        n = body.get("max_tokens") or 8
        # a continuation over token ids starts after the tokens already generated
        prompt = body.get("prompt")
        start = sum(1 for t in prompt if t >= 1000) if isinstance(prompt, list) else 0
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{self.name}-{len(self.requests)}"
        if self.hold is not None:
            self.running += 1
            try:
                await asyncio.to_thread(self.hold.wait, 30)
            finally:
                self.running -= 1
        if not body.get("stream") and early:
            return StreamingResponse(
                self._early(rid, body, chat, n, start, poisoned), media_type="application/json",
                headers={"x-lmfleet-early-headers": "1"},
            )  # fmt: skip
        if not body.get("stream"):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return JSONResponse(self._unary(rid, body, chat, n, start))
        brk = None if isinstance(prompt, list) else self.break_after
        return StreamingResponse(self._stream(rid, body, chat, n, start, brk),
                                 media_type="text/event-stream")  # fmt: skip

    def _unary(self, rid: str, body: dict[str, Any], chat: bool, n: int, start: int) -> dict:
        text = "".join(f" w{start + i}" for i in range(n))
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": "length"} if chat
            else {"index": 0, "text": text, "finish_reason": "length"}
        )  # fmt: skip
        usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
        return {"id": rid, "object": "x", "created": 1, "model": body["model"],
                "choices": [choice], "usage": usage}  # fmt: skip

    async def _early(
        self, rid: str, body: dict[str, Any], chat: bool, n: int, start: int, poisoned: bool
    ):
        if self.break_unary:
            yield " "
            raise _Broken(self.name)
        loop = asyncio.get_running_loop()
        end = loop.time() + self.delay_s
        while loop.time() < end:
            yield " "
            await asyncio.sleep(min(self.heartbeat_s, max(0.0, end - loop.time())))
        if poisoned:
            code = "engine_dead" if self.poison_kills else "request_failed"
            self.dead = self.dead or self.poison_kills
            status = 503 if self.poison_kills else 500
            err = {"message": f"{self.name}: failed late", "type": "x", "param": None,
                   "code": code}  # fmt: skip
            yield json.dumps({"error": err, "status": status})
            return
        yield json.dumps(self._unary(rid, body, chat, n, start))

    async def _stream(
        self, rid: str, body: dict[str, Any], chat: bool, n: int, start: int, brk: int | None
    ):
        for i in range(n):
            if brk is not None and i >= brk:
                raise _Broken(self.name)
            await asyncio.sleep(self.gap_s)
            text = f" w{start + i}"
            last = i == n - 1
            choice: dict[str, Any] = (
                {"index": 0, "delta": {"content": text}, "finish_reason": "length" if last else None}
                if chat else {"index": 0, "text": text, "finish_reason": "length" if last else None}
            )  # fmt: skip
            chunk = {"id": rid, "object": "chunk", "created": 1, "model": body["model"],
                     "choices": [choice], "usage": None}  # fmt: skip
            yield f"data: {json.dumps(chunk)}\n\n"
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
            yield f"data: {json.dumps({'id': rid, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"


def fleet(replicas: dict[str, list[str]], **model: Any) -> dict[str, Any]:
    """A fleet document with one model ``m`` and the given versions → replica URLs."""
    gateway = model.pop("gateway", {})
    doc: dict[str, Any] = {
        "gateway": {"poll_interval_s": 0.05, **gateway},
        "models": [{
            "name": "m",
            "versions": [{"name": v, "weight": 1, "replicas": urls} for v, urls in replicas.items()],
            **model,
        }],
    }  # fmt: skip
    for key in ("api_keys",):
        if key in model:
            doc[key] = model.pop(key)
            doc["models"][0].pop(key)
    return doc


def gateway_thread(doc: dict[str, Any], config_path: str | None = None) -> tuple[ServerThread, Any]:
    """The gateway in a thread; ``config_path``: the fleet file it was read from
    (reloads read it again; the state file goes beside it)."""
    from lmfleet.gateway.app import build_app

    app = build_app(parse_config(doc), config_path=config_path)
    return ServerThread(app, lifespan="on"), app


class FakeProcess:
    """A fake replica in its own process (``tests.gateway.fake_process``), on the
    port it bound and reported."""

    def __init__(self, name: str, tmp: Path) -> None:
        port_file = tmp / f"{name}.port"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.gateway.fake_process", name, str(port_file)],
            cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
        wait_for(lambda: port_file.exists() or self.proc.poll() is not None, 30)
        if self.proc.poll() is not None:
            raise RuntimeError(f"fake replica {name} exited with {self.proc.returncode}")
        self.url = f"http://127.0.0.1:{int(port_file.read_text())}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process ignores SIGTERM
            self.proc.kill()
        self.proc.wait(10)


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@contextmanager
def running(*fakes: FakeReplica) -> Iterator[list[ServerThread]]:
    with ExitStack() as stack:
        yield [stack.enter_context(ServerThread(f.app())) for f in fakes]


@contextmanager
def gateway(doc: dict) -> Iterator[tuple[httpx.Client, object]]:
    server, app = gateway_thread(doc)
    with server, httpx.Client(base_url=server.url, timeout=20) as client:
        yield client, app


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if (
            line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
        ) or (line.startswith(name + " ") and not want):
            total += float(line.rsplit(" ", 1)[1])
    return total


def ready(app: object) -> None:
    reg = app.state.gateway.registry  # type: ignore[attr-defined]
    wait_for(lambda: all(r.routable for v in reg.all_versions() for r in v.replicas.values()))
