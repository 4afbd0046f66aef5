"""The request pipeline: ``/v1/chat/completions`` and ``/v1/completions``.

Plain ASGI (no middleware, no response classes) since every chunk of every stream
passes through here. One request:

1. authenticate the key and check its limits (401 / 429);
2. read the body (413 over ``max_body_bytes``) and find the model (404);
3. choose the version: the ``x-lmfleet-version`` header pins it, else the weighted
   split, sticky by session header or ``user``; maybe mirror a copy to the shadow
   version (:mod:`lmfleet.gateway.shadow`);
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
6. answer with ``x-lmfleet-version``: a non-streaming answer here, a stream through
   the relay (:mod:`lmfleet.gateway.relay`), which resumes it on another replica
   when its replica dies mid-way.

Every try holds a :class:`~lmfleet.gateway.lease.ReplicaLease` on its replica (the
replica's in-flight count): a failed try releases it; a successful one hands it to
the caller with the answer (:class:`~lmfleet.gateway.call.Reply`), who closes it.

Prompt text is never logged unless ``gateway.log_prompts`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

from starlette.types import Receive, Scope, Send

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
from lmfleet.gateway.call import (
    CHAT_PATH,
    VERSION_HEADER,
    Call,
    Passthrough,
    Reply,
    TryElsewhere,
    account_json,
    record,
)
from lmfleet.gateway.errors import GatewayError, from_exception, from_queue, retry_after, send_error
from lmfleet.gateway.lease import ReplicaLease
from lmfleet.gateway.policies.admission import QueueRejected
from lmfleet.gateway.policies.balance import RouteRequest, prefix_hashes
from lmfleet.gateway.policies.split import VersionWeight, choose_version
from lmfleet.gateway.registry import ModelEntry, ReplicaInfo, VersionEntry
from lmfleet.gateway.relay import StreamRelay
from lmfleet.gateway.shadow import Shadows
from lmfleet.gateway.state import GatewayState
from lmfleet.gateway.upstream import ConnectFailed, UpstreamError, UpstreamResponse

logger = logging.getLogger(__name__)

_PREFIX_POLICIES = frozenset({"prefix_affinity", "kv_aware"})


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
        self.relay = StreamRelay(state, self)
        self.shadows = Shadows(state, self)

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
            self.shadows.maybe_mirror(call, headers)
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
                record(self.state, call, outcome=f"error_{err.status}", error=err.status >= 500)
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
    def pick(self, call: Call, version: VersionEntry) -> ReplicaInfo | None:
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
        :class:`TryElsewhere` when another replica may try, or the
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
            raise TryElsewhere(GatewayError(
                502, "replica unreachable (connect failed)", code="upstream_unreachable"
            )) from None  # fmt: skip
        except TimeoutError:
            if head_s < t.first_byte_s:
                raise self._total_timeout() from None
            # a hung or very busy replica: try elsewhere; ejection is the polls' call
            raise TryElsewhere(GatewayError(
                504, f"no response headers from the replica within first_byte_s "
                f"({t.first_byte_s:g} s)", code="upstream_timeout",
            )) from None  # fmt: skip
        except UpstreamError as exc:  # broke before any answer (or a stale pooled one)
            raise TryElsewhere(GatewayError(
                502, f"replica error before the answer ({type(exc).__name__})",
                code="upstream_error",
            )) from None  # fmt: skip
        try:
            if not call.stream or resp.status != 200:
                await self._read_answer(call, replica, resp)
            return self._judge_answer(call, replica, resp)
        except BaseException:
            resp.close()
            raise

    def _total_timeout(self) -> GatewayError:
        total = self.state.config.gateway.timeouts.total_s
        return GatewayError(504, f"no complete answer within total_s ({total:g} s)",
                            code="upstream_timeout")  # fmt: skip

    async def _read_answer(self, call: Call, replica: ReplicaInfo, resp: UpstreamResponse) -> None:
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
            raise TryElsewhere(GatewayError(
                504, f"the replica sent its headers, then nothing for idle_s ({t.idle_s:g} s)",
                code="upstream_timeout",
            )) from None  # fmt: skip
        except UpstreamError as exc:  # it died after its headers: nothing reached the client
            # out of rotation until its next READY poll: the other tries of this and of
            # every other request must not spend their attempts on a dead replica
            self.state.registry.eject(replica, f"its answer broke off ({type(exc).__name__})")
            raise TryElsewhere(GatewayError(
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
                raise TryElsewhere(Passthrough(status, content, {}))
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
            raise TryElsewhere(Passthrough(status, content, keep))
        logger.warning("request %s: %s answered %d %s; not retried", call.rid, replica.url,
                       status, code or "")  # fmt: skip
        return resp  # another 5xx: the replica's answer for this request, relayed

    async def try_on(self, call: Call, replica: ReplicaInfo, path: str, body: bytes) -> Reply:
        """One try (:meth:`_attempt`) under a lease on ``replica``: the lease goes with
        the reply, or is released when the try fails."""
        with ReplicaLease(replica) as lease:
            resp = await self._attempt(call, replica, path, body)
            return Reply(lease.hand_over(), resp)

    async def forward(self, call: Call, version: VersionEntry) -> Reply:
        """Try replicas of ``version`` until one answers; the reply holds the lease on
        the replica that answered (the caller closes it)."""
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
            replica = self.pick(call, version)
            if replica is None and attempt > 0:
                replica = await self._await_replica(call, version, last)
            if replica is None:
                break
            if attempt > 0:
                reason = (last.code if last is not None else None) or "error"
                self.state.metrics.retries.labels(*call.labels, reason).inc()
            call.tried.add(replica.url)
            call.attempts += 1
            try:
                reply = await self.try_on(call, replica, call.path, body)
            except TryElsewhere as exc:
                last = exc.err
                logger.info("request %s: attempt %d on %s failed: %s %s", call.rid, attempt + 1,
                            replica.url, last.status, last.code or "")  # fmt: skip
                continue
            call.replica = replica
            return reply
        if last is not None:
            raise last
        raise GatewayError(
            503, f"no ready replica of {version.model}/{version.name}", code="no_replica",
            headers=retry_after(1),
        )  # fmt: skip

    async def _await_replica(
        self, call: Call, version: VersionEntry, last: GatewayError | None
    ) -> ReplicaInfo | None:
        """A retry that finds no replica it has not tried (they all failed at once, a
        restart is on the way) waits for one, as a new request waits in the queue:
        up to ``first_byte_s``, within the request's deadline. When the last try was
        answered 429 (a live replica that is full), that answer is relayed at once
        instead: waiting would only hold the client past the replica's Retry-After."""
        if isinstance(last, Passthrough) and last.status == 429:
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
        return self.pick(call, version)

    # ---- non-streaming ----------------------------------------------------------------------
    async def _unary(self, call: Call, send: Send) -> None:
        reply = await self.forward(call, call.version)
        reply.close()  # its body is read whole: the replica is done with this request
        resp = reply.resp
        body = resp.content or b""
        status = resp.status
        ctype = resp.headers.get("content-type", "application/json")
        if status == 200:
            account_json(self.state, call, body)
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
        record(self.state, call, outcome="ok" if status == 200 else f"error_{status}",
               error=status >= 500)  # fmt: skip

    # ---- streaming ---------------------------------------------------------------------------
    async def _stream(self, call: Call, receive: Receive, send: Send) -> None:
        reply = await self.forward(call, call.version)
        # the relay closes each reply when its part of the stream ends; this ``with``
        # covers the first one until the relay has it
        with reply:
            resp = reply.resp
            if resp.status != 200:  # the replica's error answer (400 ...), read whole: relay it
                raise Passthrough(resp.status, resp.content or b"", {})
            await self.relay.serve(call, reply, receive, send)

    async def close(self) -> None:
        await self.shadows.close()
