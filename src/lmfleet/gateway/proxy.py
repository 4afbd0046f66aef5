"""The streaming proxy: ``/v1/chat/completions`` and ``/v1/completions``.

Plain ASGI (no middleware, no response classes) since every chunk of every stream
passes through here. One request:

1. authenticate the key and check its limits (401 / 429);
2. read the body (413 over ``max_body_bytes``) and find the model (404);
3. choose the version: the ``x-lmfleet-version`` header pins it, else the weighted
   split, sticky by session header or ``user``; maybe mirror a copy to the shadow
   version;
4. wait for a slot in the version's admission queue (429 when full, 503 after
   ``max_wait_s``: also what happens while no replica is ready, i.e. scale from zero);
5. pick a replica with the version's balancer and send. Only what is safe is tried
   again on another replica, while the retry budget allows: a connection that could
   not be opened or broke before the answer was complete, no response headers
   within ``first_byte_s`` (streamed or not), and a 429 or 503 "not now" answer
   (drain, backpressure). An answer saying the replica broke while serving the
   request (503 ``engine_dead``) marks the replica dead and fails the request
   without trying another replica: the request may be what broke it. Other 5xx
   answers are relayed as they came;
6. relay the answer with ``x-lmfleet-version``; a stream whose replica dies
   mid-way (connection lost, or silent for ``idle_s``) continues on another replica
   of the same version (:mod:`lmfleet.gateway.resume`), and the client sees one
   uninterrupted stream.

Prompt text is never logged unless ``gateway.log_prompts`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Receive, Scope, Send

from lmfleet.gateway import resume
from lmfleet.gateway.answers import (
    ADMITTED_HEADER,
    BROKE_CODES,
    EARLY_HEADERS,
    JSON_ONLY,
    RETRY_STATUSES,
    error_code,
    is_json,
    late_status,
)
from lmfleet.gateway.auth import ClientKey
from lmfleet.gateway.errors import (
    GatewayError,
    from_exception,
    from_queue,
    retry_after,
    send_error,
    sse_error_event,
)
from lmfleet.gateway.policies.admission import QueueRejected
from lmfleet.gateway.policies.balance import RouteRequest, prefix_hashes
from lmfleet.gateway.policies.split import VersionWeight, choose_version
from lmfleet.gateway.registry import ModelEntry, ReplicaInfo, VersionEntry
from lmfleet.gateway.rollout import StepWindow
from lmfleet.gateway.sse import StreamTracker
from lmfleet.gateway.state import GatewayState
from lmfleet.gateway.upstream import ConnectFailed, UpstreamError, UpstreamResponse

logger = logging.getLogger(__name__)

VERSION_HEADER = "x-lmfleet-version"
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
_PREFIX_POLICIES = frozenset({"prefix_affinity", "kv_aware"})
#: seconds to wait, after ``[DONE]``, for the end of the replica's response
_FINISH_S = 1.0
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(slots=True)
class Call:
    """One client request on its way through."""

    rid: str
    path: str
    chat: bool
    payload: dict[str, Any]
    model: ModelEntry
    version: VersionEntry
    stream: bool
    key: ClientKey
    t0: float
    route: RouteRequest
    priority: int = 0
    #: how the version was chosen: "split" (the weights), "pinned" (the header) or
    #: "shadow" (a copy); only split requests feed a rollout's window
    source: str = "split"
    #: the rollout window of the step this request started in, if it feeds one
    window: StepWindow | None = None
    #: perf_counter time by which a non-streaming answer must be complete
    deadline: float | None = None
    attempts: int = 0
    tried: set[str] = field(default_factory=set)
    replica: ReplicaInfo | None = None
    t_first: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: the response has begun (an error can no longer be sent as a status)
    responded: bool = False

    @property
    def labels(self) -> tuple[str, str]:
        return (self.version.model, self.version.name)


class _Passthrough(GatewayError):
    """A replica's own error answer, relayed as it came."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        super().__init__(status, "upstream error", headers=headers)
        self.raw = body

    def body_bytes(self) -> bytes:
        return self.raw


class _TryElsewhere(Exception):
    """This try failed in a way that is safe to try on another replica; ``err`` is
    what the client gets if no other try succeeds."""

    def __init__(self, err: GatewayError) -> None:
        super().__init__(err.message)
        self.err = err


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def _prompt_text(payload: dict[str, Any], chat: bool) -> str:
    if chat:
        parts = []
        for m in payload.get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"{m.get('role', '') if isinstance(m, dict) else ''}\n{content or ''}\n")
        return "".join(parts)
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt)[:65536]


class Proxy:
    """The ASGI app of the two generation routes."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self._shadows: set[asyncio.Task[None]] = set()
        self._shadow_inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = _headers(scope)
        rid = headers.get("x-request-id") or uuid.uuid4().hex
        t0 = time.perf_counter()
        call: Call | None = None
        try:
            if scope["method"] != "POST":
                raise GatewayError(405, f"{scope['method']} {scope['path']}: use POST")
            key = self.state.auth.authenticate(headers)
            if not is_json(headers.get("content-type", "")):
                raise GatewayError(400, JSON_ONLY, code="invalid_json")
            body = await self._read_body(scope, receive, headers)
            call = self._prepare(scope["path"], rid, body, headers, key, t0)
            self.state.version_stats.record_arrival(*call.labels)
            self._maybe_shadow(call, headers)
            await self._admit(call)
            try:
                if call.stream:
                    await self._stream(call, receive, send)
                else:
                    await self._unary(call, send)
            finally:
                call.version.queue.release()
        except Exception as exc:
            err = from_exception(exc)
            if err.status >= 500 and not isinstance(exc, GatewayError | QueueRejected):
                logger.exception("request %s failed", rid)
            if call is not None:
                self._record(call, outcome=f"error_{err.status}", error=err.status >= 500)
            else:
                self.state.metrics.rejected.labels(err.code or str(err.status)).inc()
            if call is None or not call.responded:
                extra = {"x-request-id": rid}
                if call is not None:
                    extra[VERSION_HEADER] = call.version.name
                await send_error(send, err, extra)

    # ---- request preparation --------------------------------------------------------------
    async def _read_body(self, scope: Scope, receive: Receive, headers: dict[str, str]) -> bytes:
        limit = self.state.config.gateway.max_body_bytes
        length = headers.get("content-length")
        too_large = GatewayError(
            413, f"the request body is larger than the limit of {limit} bytes",
            code="request_too_large",
        )  # fmt: skip
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise GatewayError(499, "client disconnected", code="client_closed")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _prepare(
        self, path: str, rid: str, body: bytes, headers: dict[str, str], key: ClientKey,
        t0: float,
    ) -> Call:  # fmt: skip
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise GatewayError(
                400, f"The request body is not valid JSON: {exc}", code="invalid_json"
            ) from None
        except RecursionError:
            raise GatewayError(
                400, "The request body is not valid JSON: it is nested too deeply",
                code="invalid_json",
            ) from None  # fmt: skip
        if not isinstance(payload, dict):
            raise GatewayError(400, JSON_ONLY, code="invalid_json")
        name = payload.get("model")
        if not isinstance(name, str):
            raise GatewayError(
                400, "you must name a model in the 'model' field", param="model",
                code="missing_required_parameter",
            )  # fmt: skip
        model = self.state.registry.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.state.registry.models))
            raise GatewayError(
                404, f"The model '{name}' does not exist; this gateway serves: {known}",
                param="model", code="model_not_found",
            )  # fmt: skip
        version, source = self._choose_version(model, payload, headers)
        chat = path == CHAT_PATH
        stream = bool(payload.get("stream"))
        policy = model.config.balancing.policy
        hashes = prefix_hashes(_prompt_text(payload, chat)) if policy in _PREFIX_POLICIES else ()
        priority = payload.get("priority", 0)
        call = Call(
            rid=rid, path=path, chat=chat, payload=payload, model=model, version=version,
            stream=stream, key=key, t0=t0, route=RouteRequest(hashes),
            priority=priority if isinstance(priority, int) else 0, source=source,
        )  # fmt: skip
        window = self.state.windows.get(name) if source == "split" else None
        if window is not None and window.samples_for(version.name) is not None:
            call.window = window
        if self.state.config.gateway.log_prompts:
            logger.info("request %s prompt: %r", rid, _prompt_text(payload, chat)[:2000])
        return call

    def _choose_version(
        self, model: ModelEntry, payload: dict[str, Any], headers: dict[str, str]
    ) -> tuple[VersionEntry, str]:
        pin = headers.get(VERSION_HEADER)
        if pin:
            v = model.versions.get(pin)
            if v is None:
                raise GatewayError(
                    400,
                    f"{VERSION_HEADER}: model '{model.config.name}' has no version '{pin}'; "
                    f"versions: {', '.join(model.versions)}",
                    param=VERSION_HEADER, code="unknown_version",
                )  # fmt: skip
            return v, "pinned"
        sticky = model.config.stickiness
        key = headers.get(sticky.header.lower()) if sticky.header else None
        if key is None and sticky.by_user and isinstance(payload.get("user"), str):
            key = payload["user"]
        weights = [VersionWeight(v.name, v.weight) for v in model.versions.values()]
        try:
            return model.versions[choose_version(weights, key, self.state.rng)], "split"
        except ValueError as exc:
            raise GatewayError(503, f"no version takes traffic: {exc}", code="no_version") from None

    def _upstream_body(self, call: Call, version: VersionEntry) -> bytes:
        payload = call.payload
        changes: dict[str, Any] = {}
        if version.served_model_name:
            changes["model"] = version.served_model_name
        if call.stream:
            opts = payload.get("stream_options") or {}
            if isinstance(opts, dict) and not opts.get("include_usage"):
                changes["stream_options"] = {**opts, "include_usage": True}
        try:
            return json.dumps({**payload, **changes} if changes else payload).encode()
        except RecursionError:
            raise GatewayError(
                400, "The request body is not valid JSON: it is nested too deeply",
                code="invalid_json",
            ) from None  # fmt: skip

    async def _admit(self, call: Call) -> None:
        queue = call.version.queue
        if queue.try_admit():
            self.state.metrics.queue_wait.labels(*call.labels).observe(0.0)
            return
        t = time.perf_counter()
        try:
            await queue.acquire(call.priority)
        except QueueRejected as exc:
            logger.info("request %s rejected by the queue of %s/%s: %s", call.rid,
                        *call.labels, exc.reason)  # fmt: skip
            raise from_queue(exc) from None
        self.state.metrics.queue_wait.labels(*call.labels).observe(time.perf_counter() - t)

    # ---- sending to a replica ---------------------------------------------------------------
    def _pick(self, call: Call, version: VersionEntry) -> ReplicaInfo | None:
        views = version.views(exclude=call.tried)
        if not views:
            return None
        view = version.balancer.pick(views, call.route, self.state.rng)
        if view is None:
            return None
        version.balancer.on_routed(view.replica_id, call.route)
        return version.replicas.get(view.replica_id)

    async def _attempt(
        self, call: Call, replica: ReplicaInfo, path: str, body: bytes
    ) -> UpstreamResponse:
        """One try. Returns a response whose head has arrived (for a non-streaming
        request and for an error answer, with the whole body in ``content``); raises
        :class:`_TryElsewhere` when another replica may try, or the
        :class:`GatewayError` the client gets."""
        t = self.state.config.gateway.timeouts
        head_s = t.first_byte_s
        if call.deadline is not None:
            head_s = min(head_s, call.deadline - time.perf_counter())
            if head_s <= 0:
                raise self._total_timeout()
        resp: UpstreamResponse | None = None
        headers = [("content-type", "application/json"), ("x-request-id", call.rid),
                   *call.version.upstream_headers]  # fmt: skip
        if not call.stream:
            headers.append((EARLY_HEADERS, "1"))
        try:
            async with asyncio.timeout(head_s):
                resp = await self.state.upstream.request(
                    replica.url, path, body, headers, connect_timeout=t.connect_s,
                    head_timeout=None,
                )  # fmt: skip
        except ConnectFailed as exc:  # refused or unreachable: the replica is gone
            self.state.registry.eject(replica, f"connect: {exc}")
            raise _TryElsewhere(GatewayError(
                502, "replica unreachable (connect failed)", code="upstream_unreachable"
            )) from None  # fmt: skip
        except TimeoutError:
            if head_s < t.first_byte_s:
                raise self._total_timeout() from None
            # a hung or very busy replica: try elsewhere; ejection is the polls' call
            raise _TryElsewhere(GatewayError(
                504, f"no response headers from the replica within first_byte_s "
                f"({t.first_byte_s:g} s)", code="upstream_timeout",
            )) from None  # fmt: skip
        except UpstreamError as exc:  # broke before any answer (or a stale pooled one)
            raise _TryElsewhere(GatewayError(
                502, f"replica error before the answer ({type(exc).__name__})",
                code="upstream_error",
            )) from None  # fmt: skip
        try:
            if not call.stream or resp.status != 200:
                await self._read_answer(call, resp)
            return self._judge_answer(call, replica, resp)
        except BaseException:
            resp.close()
            raise

    def _total_timeout(self) -> GatewayError:
        total = self.state.config.gateway.timeouts.total_s
        return GatewayError(504, f"no complete answer within total_s ({total:g} s)",
                            code="upstream_timeout")  # fmt: skip

    async def _read_answer(self, call: Call, resp: UpstreamResponse) -> None:
        """The whole body into ``resp.content``: within the request's deadline, and
        with no silence over ``idle_s`` once the replica sent early headers (it
        then sends a whitespace heartbeat while it generates)."""
        t = self.state.config.gateway.timeouts
        idle = t.idle_s if resp.headers.get(EARLY_HEADERS) else None
        left = t.total_s if call.deadline is None else call.deadline - time.perf_counter()
        parts: list[bytes] = []
        try:
            async with asyncio.timeout(max(left, 0.0)) as scope:
                while (chunk := await resp.next_chunk(idle)) is not None:
                    parts.append(chunk)
        except TimeoutError:
            if scope.expired():
                raise self._total_timeout() from None
            raise _TryElsewhere(GatewayError(
                504, f"the replica sent its headers, then nothing for idle_s ({t.idle_s:g} s)",
                code="upstream_timeout",
            )) from None  # fmt: skip
        except UpstreamError as exc:  # it died after its headers: nothing reached the client
            raise _TryElsewhere(GatewayError(
                502, f"the replica's answer broke off ({type(exc).__name__})",
                code="upstream_error",
            )) from None  # fmt: skip
        resp.content = b"".join(parts)
        if resp.status == 200 and idle is not None:
            late = late_status(resp.content)
            if late is not None:
                resp.status, resp.content = late
            else:
                resp.content = resp.content.lstrip()

    def _judge_answer(
        self, call: Call, replica: ReplicaInfo, resp: UpstreamResponse
    ) -> UpstreamResponse:
        """A complete answer (or a stream's head): return it, or raise what to do."""
        status = resp.status
        if status < 500 and status != 429:
            return resp
        content = resp.content or b""
        code = error_code(content)
        if code in BROKE_CODES:
            self.state.registry.mark_dead(replica, f"answered {status} {code}")
            resp.close()
            if resp.headers.get(ADMITTED_HEADER) == "0":  # it died before this request
                raise _TryElsewhere(_Passthrough(status, content, {}))
            detail = content[:300].decode(errors="replace")
            raise GatewayError(
                502, f"the replica serving this request failed ({code}) and was taken out "
                "of rotation; the request was not sent to another replica, since it may "
                f"be what broke this one. The replica said: {detail}",
                code="replica_failed", type="upstream_error",
            )  # fmt: skip
        if status in RETRY_STATUSES:
            resp.close()
            if status == 503:
                self.state.registry.eject(replica, "answered 503 (draining or not ready)")
            keep = {k: v for k, v in resp.headers.items() if k == "retry-after"}
            raise _TryElsewhere(_Passthrough(status, content, keep))
        logger.warning("request %s: %s answered %d %s; not retried", call.rid, replica.url,
                       status, code or "")  # fmt: skip
        return resp  # another 5xx: the replica's answer for this request, relayed

    async def _send(
        self, call: Call, version: VersionEntry
    ) -> tuple[ReplicaInfo, UpstreamResponse]:
        """Try replicas of ``version`` until one answers; the replica's in-flight count
        stays raised on success (the caller lowers it)."""
        retries = self.state.config.gateway.retries
        body = self._upstream_body(call, version)
        if not call.stream and call.deadline is None:
            call.deadline = time.perf_counter() + self.state.config.gateway.timeouts.total_s
        self.state.retry_budget.note_request()
        last: GatewayError | None = None
        for attempt in range(retries.max_attempts):
            if attempt > 0 and not self.state.retry_budget.try_retry():
                logger.info("request %s: retry budget exhausted", call.rid)
                break
            replica = self._pick(call, version)
            if replica is None and attempt > 0:
                replica = await self._await_replica(call, version)
            if replica is None:
                break
            if attempt > 0:
                reason = (last.code if last is not None else None) or "error"
                self.state.metrics.retries.labels(*call.labels, reason).inc()
            call.tried.add(replica.url)
            call.attempts += 1
            replica.inflight += 1
            try:
                resp = await self._attempt(call, replica, call.path, body)
            except _TryElsewhere as exc:
                replica.inflight -= 1
                last = exc.err
                logger.info("request %s: attempt %d on %s failed: %s %s", call.rid, attempt + 1,
                            replica.url, last.status, last.code or "")  # fmt: skip
                continue
            except BaseException:
                replica.inflight -= 1
                raise
            call.replica = replica
            return replica, resp
        if last is not None:
            raise last
        raise GatewayError(
            503, f"no ready replica of {version.model}/{version.name}", code="no_replica",
            headers=retry_after(1),
        )  # fmt: skip

    async def _await_replica(self, call: Call, version: VersionEntry) -> ReplicaInfo | None:
        """A retry that finds no replica it has not tried (they all failed at once, a
        restart is on the way) waits for one, as a new request waits in the queue:
        up to ``first_byte_s``, within the request's deadline. When a routable replica
        is left (it answered 429 or 503 for backpressure and stays in rotation), its
        answer is relayed at once instead."""
        if version.views():
            return None
        wait_s = self.state.config.gateway.timeouts.first_byte_s
        if call.deadline is not None:
            wait_s = min(wait_s, call.deadline - time.perf_counter())
        if wait_s <= 0:
            return None
        logger.info("request %s: no other ready replica of %s/%s; waiting up to %.1f s",
                    call.rid, version.model, version.name, wait_s)  # fmt: skip
        deadline = time.perf_counter() + wait_s
        while not version.views(exclude=call.tried):
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(version.changed.wait(), left)
        return self._pick(call, version)

    # ---- non-streaming ----------------------------------------------------------------------
    async def _unary(self, call: Call, send: Send) -> None:
        replica, resp = await self._send(call, call.version)
        replica.inflight -= 1
        resp.close()
        body = resp.content or b""
        status = resp.status
        ctype = resp.headers.get("content-type", "application/json")
        if status == 200:
            self._account_json(call, body)
        call.responded = True
        await send({
            "type": "http.response.start", "status": status,
            "headers": [
                (b"content-type", ctype.encode()),
                (b"content-length", str(len(body)).encode()),
                (VERSION_HEADER.encode(), call.version.name.encode()),
                (b"x-request-id", call.rid.encode()),
            ],
        })  # fmt: skip
        await send({"type": "http.response.body", "body": body})
        self._record(call, outcome="ok" if status == 200 else f"error_{status}",
                     error=status >= 500)  # fmt: skip

    def _account_json(self, call: Call, body: bytes) -> None:
        try:
            obj = json.loads(body)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        usage = obj.get("usage")
        if isinstance(usage, dict):
            with contextlib.suppress(TypeError, ValueError):
                call.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                call.completion_tokens = int(usage.get("completion_tokens") or 0)
        if isinstance(obj.get("id"), str):
            self.state.remember_response(obj["id"], *call.labels)

    # ---- streaming ---------------------------------------------------------------------------
    async def _stream(self, call: Call, receive: Receive, send: Send) -> None:
        replica, resp = await self._send(call, call.version)
        if resp.status != 200:  # the replica's error answer (400 ...), read whole: relay it
            replica.inflight -= 1
            resp.close()
            raise _Passthrough(resp.status, resp.content or b"", {})
        call.responded = True
        await send({
            "type": "http.response.start", "status": 200,
            "headers": [*_SSE_HEADERS, (VERSION_HEADER.encode(), call.version.name.encode()),
                        (b"x-request-id", call.rid.encode())],
        })  # fmt: skip
        prefix = "chatcmpl-" if call.chat else "cmpl-"
        tracker = StreamTracker(
            chat=call.chat,
            client_usage=bool((call.payload.get("stream_options") or {}).get("include_usage")),
            fallback_id=prefix + call.rid,
        )
        task = asyncio.current_task()
        gone = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(self._watch(receive, gone, task))
        try:
            await self._relay(call, replica, resp, tracker, send)
        except asyncio.CancelledError:
            if not gone.is_set() or task is None:
                raise
            task.uncancel()
            self._finish_stream(call, tracker, "client_disconnect")
            return
        finally:
            watcher.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _watch(
        self, receive: Receive, gone: asyncio.Event, task: asyncio.Task | None
    ) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
                if task is not None:
                    task.cancel()
                return

    async def _relay(
        self, call: Call, replica: ReplicaInfo, resp: UpstreamResponse, tracker: StreamTracker,
        send: Send,
    ) -> None:  # fmt: skip
        max_resumes = self.state.config.gateway.retries.max_resumes
        resumes = 0
        while True:
            try:
                failure = await self._pump(resp, tracker, send)
                if failure is None:
                    await resp.finish(_FINISH_S)  # keep the connection for the next call
            finally:
                replica.inflight -= 1
                resp.close()
            if failure is None:
                err = tracker.upstream_error
                if err is not None and error_code(json.dumps(err).encode()) in BROKE_CODES:
                    self.state.registry.mark_dead(replica, "its stream reported engine_dead")
                    self._finish_stream(call, tracker, "error_stream", error=True)
                    return
                self._finish_stream(call, tracker, "ok" if err is None else "error_stream",
                                    error=err is not None)  # fmt: skip
                return
            if tracker.finished:  # everything arrived but the closing [DONE]
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                            "more_body": True})  # fmt: skip
                self._finish_stream(call, tracker, "ok")
                return
            logger.warning("request %s: stream from %s broke after %d chunks: %s", call.rid,
                           replica.url, tracker.content_chunks, failure)  # fmt: skip
            why_not = resume.resumable(call.payload, call.chat)
            if why_not is None and resumes >= max_resumes:
                why_not = f"already resumed {resumes} times"
            if why_not is not None:
                self.state.metrics.resumes.labels(*call.labels, "impossible").inc()
                await self._fail_stream(call, tracker, send, f"the replica failed mid-stream "
                                        f"and the stream cannot be resumed ({why_not})")  # fmt: skip
                return
            resumes += 1
            try:
                nxt = await self._resume(call, tracker, send)
            except (GatewayError, resume.CannotResume) as exc:
                self.state.metrics.resumes.labels(*call.labels, "failed").inc()
                await self._fail_stream(call, tracker, send, f"resuming the stream failed: {exc}")
                return
            if nxt is None:  # no token was left to generate
                self._finish_stream(call, tracker, "ok")
                return
            self.state.metrics.resumes.labels(*call.labels, "ok").inc()
            replica, resp = nxt

    async def _pump(self, resp: UpstreamResponse, tracker: StreamTracker, send: Send) -> str | None:
        """Relay events until ``[DONE]``; the failure, or None."""
        idle_s = self.state.config.gateway.timeouts.idle_s
        buf = b""
        try:
            while (chunk := await resp.next_chunk(idle_s)) is not None:
                buf = buf + chunk if buf else chunk
                cut = buf.rfind(b"\n\n")
                if cut < 0:
                    continue
                if cut + 2 == len(buf):
                    events, buf = buf, b""
                else:
                    events, buf = buf[: cut + 2], buf[cut + 2 :]
                out = tracker.feed(events)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if tracker.done:
                    return None
        except TimeoutError:
            return f"no chunk for {idle_s:g} s"
        except UpstreamError as exc:
            return f"{type(exc).__name__}: {exc}"
        if tracker.upstream_error is not None:
            return None  # the replica reported its own error in the stream: relayed
        return None if tracker.done else "stream ended without [DONE]"

    async def _resume(
        self, call: Call, tracker: StreamTracker, send: Send
    ) -> tuple[ReplicaInfo, UpstreamResponse] | None:
        """Continue the stream on another replica: the next one when the chosen one
        does not answer (it may be dead too and not ejected yet), waiting up to
        ``first_byte_s`` once for a replica when none is left."""
        version = call.version
        timeouts = self.state.config.gateway.timeouts
        if call.replica is not None:
            self.state.registry.eject(call.replica, "stream broke")
        waited = False
        while True:
            if not version.views(exclude=call.tried):
                if waited:
                    raise GatewayError(503, "no other ready replica", code="no_replica")
                waited = True
                call.tried.clear()  # the failed replica may be back; prefer any routable one
                await self.state.registry.wait_routable(version.model, version.name,
                                                        timeouts.first_byte_s)  # fmt: skip
                continue
            replica = self._pick(call, version)
            if replica is None:
                waited = True
                continue
            try:
                return await self._continue_on(call, tracker, send, replica)
            except resume.ReplicaUnavailable as exc:
                call.tried.add(replica.url)
                self.state.registry.eject(replica, f"resume: {exc}")
                logger.warning("request %s: continuing on %s failed (%s); trying another",
                               call.rid, replica.url, exc)  # fmt: skip

    async def _continue_on(
        self, call: Call, tracker: StreamTracker, send: Send, replica: ReplicaInfo
    ) -> tuple[ReplicaInfo, UpstreamResponse] | None:
        version = call.version
        upstream_model = version.served_model_name or call.payload["model"]
        body, sent_tokens = await resume.continuation(
            self.state.upstream, replica.url, call.payload, chat=call.chat,
            upstream_model=upstream_model, sent_text=tracker.text,
            headers=version.upstream_headers,
            timeout=self.state.config.gateway.timeouts.total_s,
        )  # fmt: skip
        if body is None:
            out = tracker.finish_chunk("length") + b"data: [DONE]\n\n"
            if call.chat and not tracker.sent_any:
                out = tracker.role_chunk() + out
            await send({"type": "http.response.body", "body": out, "more_body": True})
            return None
        call.tried.add(replica.url)
        replica.inflight += 1
        try:
            resp = await self._attempt(call, replica, COMPLETIONS_PATH, json.dumps(body).encode())
        except _TryElsewhere as exc:
            replica.inflight -= 1
            raise resume.ReplicaUnavailable(f"{exc.err.status} {exc.err.code or ''}") from None
        except BaseException:
            replica.inflight -= 1
            raise
        if resp.status != 200:
            replica.inflight -= 1
            resp.close()
            detail = (resp.content or b"")[:200].decode(errors="replace")
            if resp.status in RETRY_STATUSES:
                raise resume.ReplicaUnavailable(f"continuation answered {resp.status}")
            raise GatewayError(502, f"continuation answered {resp.status}: {detail}")
        if call.chat and not tracker.sent_any:
            await send({"type": "http.response.body", "body": tracker.role_chunk(),
                        "more_body": True})  # fmt: skip
        tracker.begin_continuation(sent_tokens, via_completions=True)
        logger.info("request %s: resuming on %s after %d tokens", call.rid, replica.url,
                    sent_tokens)  # fmt: skip
        call.replica = replica
        return replica, resp

    async def _fail_stream(
        self, call: Call, tracker: StreamTracker, send: Send, message: str
    ) -> None:
        err = GatewayError(502, message, code="upstream_failed", type="upstream_error")
        await send({"type": "http.response.body", "body": sse_error_event(err), "more_body": True})
        self._finish_stream(call, tracker, "error_stream", error=True)

    def _finish_stream(
        self, call: Call, tracker: StreamTracker, outcome: str, *, error: bool = False
    ) -> None:
        call.t_first = tracker.t_first
        usage = tracker.usage or {}
        call.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        call.completion_tokens = int(usage.get("completion_tokens") or tracker.content_chunks)
        if tracker.resumed_tokens and tracker.usage:
            g = tracker.resumed_tokens
            call.prompt_tokens = max(0, call.prompt_tokens - g)
            call.completion_tokens += g
        if tracker.response_id:
            self.state.remember_response(tracker.response_id, *call.labels)
        self._record(call, outcome=outcome, error=error)

    # ---- accounting ---------------------------------------------------------------------------
    def _record(self, call: Call, *, outcome: str, error: bool) -> None:
        m = self.state.metrics
        labels = call.labels
        now = time.perf_counter()
        e2e = now - call.t0
        ttft = call.t_first - call.t0 if call.t_first is not None else None
        tpot = None
        m.requests.labels(*labels, outcome).inc()
        if error:
            m.errors.labels(*labels, outcome).inc()
        else:
            m.e2e.labels(*labels).observe(e2e)
            if ttft is not None:
                m.ttft.labels(*labels).observe(ttft)
                if call.completion_tokens > 1:
                    tpot = (e2e - ttft) / (call.completion_tokens - 1)
                    m.tpot.labels(*labels).observe(tpot)
            elif not call.stream and call.completion_tokens > 0:
                # a unary answer shows no first token: per output token of the whole
                # answer (for the A/B samples and rollouts, not the TPOT histogram)
                tpot = e2e / call.completion_tokens
        if call.prompt_tokens:
            m.tokens.labels(*labels, "prompt").inc(call.prompt_tokens)
        if call.completion_tokens:
            m.tokens.labels(*labels, "completion").inc(call.completion_tokens)
        streamed = ttft is not None and not error  # what the TTFT/TPOT histograms observe
        self.state.version_stats.record_finish(
            *labels, ttft_s=ttft if streamed else None, tpot_s=tpot if streamed else None,
            output_tokens=call.completion_tokens, error=error,
        )  # fmt: skip
        call.key.record_tokens(call.prompt_tokens + call.completion_tokens)
        if outcome != "client_disconnect":
            sample = {"ttft": ttft, "tpot": tpot, "e2e": None if error else e2e, "error": error}
            self.state.version_samples(*labels).record(**sample)
            side = call.window.samples_for(call.version.name) if call.window else None
            if side is not None:
                side.record(**sample)

    # ---- shadow traffic -----------------------------------------------------------------------
    def _maybe_shadow(self, call: Call, headers: dict[str, str]) -> None:
        shadow = call.model.config.shadow
        if shadow is None or shadow.version == call.version.name or headers.get(VERSION_HEADER):
            return
        if self.state.rng.random() * 100.0 >= shadow.percent:
            return
        version = call.model.versions.get(shadow.version)
        if version is None:
            return
        # a copy uses spare capacity only: a free slot nobody waits for, taken now
        skip = (
            "max_inflight" if self._shadow_inflight >= shadow.max_inflight
            else None if version.queue.try_admit() else "no_capacity"
        )  # fmt: skip
        if skip is not None:
            self.state.metrics.shadow.labels(version.model, version.name, "skipped").inc()
            self.state.metrics.shadow_skipped.labels(version.model, version.name, skip).inc()
            return
        self._shadow_inflight += 1
        # a copy sent is real load on the shadow version's replicas: an arrival there
        self.state.version_stats.record_arrival(version.model, version.name)
        copy = Call(
            rid=call.rid + "-shadow", path=call.path, chat=call.chat, payload=call.payload,
            model=call.model, version=version, stream=call.stream, key=_SHADOW_KEY,
            t0=time.perf_counter(), route=call.route, source="shadow",
        )  # fmt: skip
        task = asyncio.get_running_loop().create_task(self._shadow(copy))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(self, call: Call) -> None:
        """Send the copy, read the answer (timing it), throw it away."""
        labels = call.labels
        outcome = "ok"
        try:
            replica, resp = await self._send(call, call.version)
            try:
                if call.stream:
                    tracker = StreamTracker(chat=call.chat, client_usage=False, fallback_id="")
                    failure = await self._pump(resp, tracker, _discard)
                    call.t_first = tracker.t_first
                    usage = tracker.usage or {}
                    call.completion_tokens = int(usage.get("completion_tokens") or 0)
                    call.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    if failure is not None:
                        outcome = "error"
                else:
                    self._account_json(call, resp.content or b"")
                    if resp.status != 200:
                        outcome = "error"
            finally:
                replica.inflight -= 1
                resp.close()
        except Exception as exc:
            outcome = "error"
            logger.debug("shadow copy %s failed: %s", call.rid, exc)
        finally:
            self._shadow_inflight -= 1
            call.version.queue.release()
        self.state.metrics.shadow.labels(*labels, outcome).inc()
        self._record(call, outcome=f"shadow_{outcome}", error=outcome != "ok")

    async def close(self) -> None:
        for task in list(self._shadows):
            task.cancel()
        for task in list(self._shadows):
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _discard(message: Any) -> None:
    return None


_SHADOW_KEY = ClientKey("shadow", None, None)
