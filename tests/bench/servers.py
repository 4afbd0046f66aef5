"""Test servers for the bench: a fake OpenAI streaming server whose pace is known,
and a helper that runs any ASGI app under uvicorn in a background thread."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.server_thread import ServerThread as _ServerThread


class ServerThread(_ServerThread):
    """The bench tests' servers always speak h11 (pure Python), as they did."""

    def __init__(self, app: object, *, lifespan: str = "off") -> None:
        super().__init__(app, lifespan=lifespan, http="h11")


@dataclass
class FakeOpenAI:
    """A streaming OpenAI endpoint: the first chunk after ``ttft_s``, then one every
    ``gap_s``, ``tokens_per_chunk`` words each, ``max_tokens`` words in all. The model
    name picks a failure: ``status-503``, ``disconnect`` (the connection breaks after
    two chunks), ``truncated`` (the stream ends cleanly without [DONE] or a finish
    reason), ``bad-json``, ``stream-error``, ``hang``."""

    ttft_s: float = 0.02
    gap_s: float = 0.01
    tokens_per_chunk: int = 1
    usage: bool = True
    replicas: int = 3
    running: int = 0
    max_running: int = 0
    prompts: list[str] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/completions", self._generate, methods=["POST"]),
                Route("/v1/chat/completions", self._generate, methods=["POST"]),
                Route("/v1/models", self._models),
                Route("/state", self._state),
                Route("/metrics", self._metrics),
            ]
        )

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _state(self, request: Request) -> Response:
        return JSONResponse({"running": self.running, "waiting": 0, "replicas": self.replicas})

    async def _metrics(self, request: Request) -> Response:
        text = (
            "# HELP lmfleet_num_requests_waiting waiting\n"
            "# TYPE lmfleet_num_requests_waiting gauge\n"
            'lmfleet_num_requests_waiting{model="m",version="a"} 2\n'
            'lmfleet_num_requests_waiting{model="m",version="b"} 1\n'
            f'lmfleet_num_requests_running{{model="m",version="a"}} {self.running}\n'
        )
        return PlainTextResponse(text)

    async def _generate(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        chat = "messages" in body
        prompt = " ".join(m["content"] for m in body["messages"]) if chat else str(body["prompt"])
        self.prompts.append(prompt)
        model = body.get("model", "")
        if model == "status-503":
            return JSONResponse({"error": {"message": "draining"}}, status_code=503)
        return StreamingResponse(
            self._stream(body, chat, len(prompt.split()), model), media_type="text/event-stream"
        )

    async def _stream(
        self, body: dict, chat: bool, n_prompt: int, model: str
    ) -> AsyncIterator[bytes]:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            n = int(body["max_tokens"])
            await asyncio.sleep(self.ttft_s)
            if model == "hang":
                await asyncio.sleep(60)
            sent = 0
            i = 0
            while sent < n:
                k = min(self.tokens_per_chunk, n - sent)
                text = "".join(f" w{sent + j}" for j in range(k))
                sent += k
                last = sent == n
                if model == "disconnect" and i == 2:
                    raise ConnectionError("the fake server breaks the stream")
                if model == "bad-json" and i == 1:
                    yield b"data: {not json\n\n"
                if model == "stream-error" and i == 1:
                    yield b'data: {"error": {"message": "engine died"}}\n\n'
                    return
                if model == "truncated" and i == 2:
                    return
                choice = (
                    {
                        "index": 0,
                        "delta": {"content": text},
                        "finish_reason": "length" if last else None,
                    }
                    if chat
                    else {"index": 0, "text": text, "finish_reason": "length" if last else None}
                )
                yield ("data: " + json.dumps({"choices": [choice]}) + "\n\n").encode()
                i += 1
                if not last:
                    await asyncio.sleep(self.gap_s)
            if self.usage:
                usage = {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": n,
                    "total_tokens": n + n_prompt,
                }
                yield ("data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n").encode()
            yield b"data: [DONE]\n\n"
        finally:
            self.running -= 1


def engine_app(model: str, **settings: object) -> Starlette:
    """The smallest OpenAI completions endpoint over lmfleet's ``AsyncEngine``: no
    admission, no metrics, so what the bench measures is the engine's timing plus
    the HTTP hop. Run it with ``ServerThread(app, lifespan="on")``."""
    import contextlib

    from lmfleet.engine.async_engine import AsyncEngine
    from lmfleet.engine.config import engine_config
    from lmfleet.engine.request import SamplingParams

    engine = AsyncEngine(engine_config(model, **settings), progress=False)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await engine.start()
        yield
        await engine.shutdown()

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model"}]})

    async def completions(request: Request) -> Response:
        body = await request.json()
        params = SamplingParams(
            max_tokens=int(body["max_tokens"]),
            temperature=float(body.get("temperature", 1.0)),
            ignore_eos=bool(body.get("ignore_eos", False)),
        )
        prompt_ids = engine.encode(body["prompt"])

        async def stream() -> AsyncIterator[bytes]:
            n = 0
            async for out in engine.generate(prompt_ids, params):
                n += len(out.token_ids)
                choice = {
                    "index": 0,
                    "text": out.text,
                    "finish_reason": out.finish_reason and "length",
                }
                yield ("data: " + json.dumps({"choices": [choice]}) + "\n\n").encode()
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": n}
            yield ("data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n").encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models),
        ],
        lifespan=lifespan,
    )
