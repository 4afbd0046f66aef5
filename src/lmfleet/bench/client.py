"""A streaming OpenAI client that times every chunk.

httpx with an unbounded connection pool (one connection per stream in flight); the
server-sent events are parsed here from raw bytes, which costs less per chunk than a
general SSE library. Each request fills a ``RequestRecord``: send time, the arrival
of every chunk that carries output, token counts (from ``usage`` when the target
reports it, else one per chunk) and, on failure, the error's type:

- ``http_<status>``: the target answered with an error status;
- ``timeout``: no answer or no chunk within the timeout, or the request ran past it;
- ``connect``: the connection could not be opened;
- ``disconnect``: the connection broke after the response began, or the stream
  ended without ``[DONE]`` or a finish reason (a mid-stream disconnect);
- ``disconnect_before_response``: the connection broke before any response (the
  server closed or reset it);
- ``stream_error``: an ``{"error": ...}`` event inside the stream;
- ``bad_response``: a chunk that is not JSON.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from lmfleet.bench.metrics import RequestRecord
from lmfleet.errors import ConfigError

COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"
_DETAIL_CHARS = 300
#: seconds an idle connection is kept for reuse
KEEPALIVE_S = 2.0


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to send requests."""

    base_url: str
    model: str
    chat: bool = False
    #: path of the generation route; default: the OpenAI path for ``chat``
    endpoint: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: per request, from send to the end of the stream; also the idle limit per chunk
    timeout_s: float = 600.0
    ignore_eos: bool = True
    temperature: float = 0.0
    #: more fields merged into every request body
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        path = self.endpoint or (CHAT_PATH if self.chat else COMPLETIONS_PATH)
        return self.base_url.rstrip("/") + path


def make_client(
    *,
    timeout_s: float = 600.0,
    headers: dict[str, str] | None = None,
    verify: ssl.SSLContext | bool = True,
) -> httpx.AsyncClient:
    """A client with no limit on connections, so its pool never queues a stream."""
    return httpx.AsyncClient(
        # idle connections expire before the server's keep-alive (uvicorn: 5 s) closes
        # them, so a request never races the server's close on a reused connection
        limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=None, keepalive_expiry=KEEPALIVE_S
        ),
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0), pool=None),
        headers=headers,
        verify=verify,
        trust_env=False,  # a proxy between bench and target would distort every number
    )


class ClientPool:
    """Several httpx clients, request ``i`` on client ``i % n``.

    httpcore's connection pool scans all of its connections whenever a request
    starts or ends, so one client with hundreds of streams in flight spends most of
    the bench's CPU there (quadratic in the streams); shards keep each scan short.
    """

    def __init__(
        self, n: int = 32, *, timeout_s: float = 600.0, headers: dict[str, str] | None = None
    ) -> None:
        if n < 1:
            raise ValueError("a client pool needs at least one client")
        tls = ssl.create_default_context()  # one context: building one costs milliseconds
        self.clients = [
            make_client(timeout_s=timeout_s, headers=headers, verify=tls) for _ in range(n)
        ]

    def get(self, i: int) -> httpx.AsyncClient:
        return self.clients[i % len(self.clients)]

    async def __aenter__(self) -> ClientPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients))


def build_payload(
    target: Target, prompt: str | list[dict[str, str]], max_tokens: int
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": max_tokens,
        "temperature": target.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.chat:
        body["messages"] = (
            prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        )
    else:
        if not isinstance(prompt, str):
            raise TypeError("a completions endpoint takes a text prompt")
        body["prompt"] = prompt
    if target.ignore_eos:
        body["ignore_eos"] = True
    body.update(target.extra_body)
    return body


class _StreamFailed(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


async def stream_request(
    client: httpx.AsyncClient,
    target: Target,
    payload: dict[str, Any],
    record: RequestRecord,
    *,
    run_start: float,
    keep_text: bool = False,
) -> str:
    """Send one streaming request and fill ``record``. Never raises for the
    target's failures: they end up in ``record.error``. Returns the generated text
    when ``keep_text`` (sessions need it), else an empty string."""
    parts: list[str] = []
    start = time.perf_counter()
    record.send_time = start - run_start
    try:
        async with asyncio.timeout(target.timeout_s):
            await _stream(client, target, payload, record, start, parts if keep_text else None)
        record.success = True
    except _StreamFailed as exc:
        _fail(record, exc.kind, str(exc))
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        _fail(record, "connect", repr(exc))
    except (httpx.TimeoutException, TimeoutError) as exc:
        _fail(record, "timeout", repr(exc) if str(exc) else f"no end within {target.timeout_s} s")
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.CloseError) as exc:
        kind = "disconnect" if record.status is not None else "disconnect_before_response"
        _fail(record, kind, repr(exc))
    except httpx.HTTPError as exc:
        _fail(record, type(exc).__name__, repr(exc))
    record.latency = time.perf_counter() - start
    if record.chunk_times:
        record.ttft = record.chunk_times[0]
    return "".join(parts)


def _fail(record: RequestRecord, kind: str, detail: str) -> None:
    record.success = False
    record.error = kind
    record.error_detail = detail[:_DETAIL_CHARS]


async def _stream(
    client: httpx.AsyncClient,
    target: Target,
    payload: dict[str, Any],
    record: RequestRecord,
    start: float,
    parts: list[str] | None,
) -> None:
    chat = target.chat
    times = record.chunk_times
    done = finished = False
    usage_tokens: int | None = None
    async with client.stream("POST", target.url, json=payload) as resp:
        record.status = resp.status_code
        if resp.status_code >= 400:
            body = (await resp.aread()).decode("utf-8", "replace")
            raise _StreamFailed(f"http_{resp.status_code}", body)
        buf = b""
        perf_counter = time.perf_counter
        loads = json.loads
        async for data in resp.aiter_bytes():
            now = perf_counter() - start
            buf += data
            if b"\n" not in data:
                continue
            lines = buf.split(b"\n")
            buf = lines.pop()
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                body = line[5:].strip()
                if body == b"[DONE]":
                    done = True
                    continue
                try:
                    obj = loads(body)
                except ValueError:
                    raise _StreamFailed(
                        "bad_response", body[:_DETAIL_CHARS].decode("utf-8", "replace")
                    ) from None
                if "error" in obj:
                    raise _StreamFailed("stream_error", json.dumps(obj["error"])[:_DETAIL_CHARS])
                choices = obj.get("choices")
                if choices:
                    c = choices[0]
                    if chat:
                        delta = c.get("delta") or {}
                        text = delta.get("content") or delta.get("reasoning_content")
                    else:
                        text = c.get("text")
                    if text:
                        times.append(now)
                        if parts is not None:
                            parts.append(text)
                    if c.get("finish_reason"):
                        finished = True
                usage = obj.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
                    record.prompt_tokens = usage.get("prompt_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    record.cached_tokens = details.get("cached_tokens")
    if not (done or finished):
        raise _StreamFailed("disconnect", "the stream ended before [DONE] or a finish reason")
    record.output_tokens = usage_tokens if usage_tokens is not None else len(times)


async def resolve_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model the target lists at ``/v1/models``."""
    url = base_url.rstrip("/") + "/v1/models"
    try:
        resp = await client.get(url, timeout=30.0)
    except httpx.HTTPError as exc:
        raise ConfigError(f"base-url: cannot reach {url}: {exc!r}; is the server up?") from None
    if resp.status_code != 200:
        raise ConfigError(f"{url} answered {resp.status_code}; pass --model explicitly")
    try:
        return str(resp.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise ConfigError(f"{url} lists no models; pass --model explicitly") from None
