"""In-process stand-ins for the gateway tests: a fake replica whose behaviour a test
sets (state, error answers, pace, a connection that breaks mid-stream, requests held
until released) and a helper that serves any ASGI app from a background thread."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lmfleet.gateway.config import parse_config
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
    gap_s: float = 0.005
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
        return JSONResponse({
            "state": self.state, "ready": self.state == "ready", "running": self.running,
            "waiting": 0, "kv_cache_usage": 0.1, "prefix_cache_hit_rate": 0.0,
        })  # fmt: skip

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
        if self.status is not None:
            return JSONResponse(
                {"error": {"message": f"{self.name} says {self.status}", "type": "x",
                           "param": None, "code": None}},
                status_code=self.status, headers={"Retry-After": "1"},
            )  # fmt: skip
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
        if not body.get("stream"):
            text = "".join(f" w{start + i}" for i in range(n))
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": text},
                 "finish_reason": "length"} if chat
                else {"index": 0, "text": text, "finish_reason": "length"}
            )  # fmt: skip
            usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
            return JSONResponse({"id": rid, "object": "x", "created": 1, "model": body["model"],
                                 "choices": [choice], "usage": usage})  # fmt: skip
        brk = None if isinstance(prompt, list) else self.break_after
        return StreamingResponse(self._stream(rid, body, chat, n, start, brk),
                                 media_type="text/event-stream")  # fmt: skip

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


def gateway_thread(doc: dict[str, Any]) -> tuple[ServerThread, Any]:
    from lmfleet.gateway.app import build_app

    app = build_app(parse_config(doc))
    return ServerThread(app, lifespan="on"), app


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
