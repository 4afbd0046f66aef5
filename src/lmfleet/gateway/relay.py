"""The stream relay: a streamed answer from its replica to the client, and on to
another replica when the one serving it dies.

It owns a stream from the moment its first replica answered 200: the SSE head to
the client, every event through a :class:`~lmfleet.gateway.sse.StreamTracker`, the
client going away (a watcher cancels the relay), and the resume: a stream whose
replica dies mid-way (connection lost, or silent for ``idle_s``) continues on
another replica of the same version (:mod:`lmfleet.gateway.resume`), and the client
sees one uninterrupted stream. Each replica's :class:`~lmfleet.gateway.call.Reply`
(its lease) is closed when its part of the stream ends, before the next replica is
chosen. Choosing and trying a replica is the pipeline's
(:class:`~lmfleet.gateway.call.Sender`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from starlette.types import Receive, Send

from lmfleet.gateway import resume
from lmfleet.gateway.answers import BROKE_CODES, RETRY_STATUSES, error_code
from lmfleet.gateway.call import (
    COMPLETIONS_PATH,
    VERSION_HEADER,
    Call,
    Reply,
    Sender,
    TryElsewhere,
    record,
)
from lmfleet.gateway.errors import GatewayError, sse_error_event
from lmfleet.gateway.registry import ReplicaInfo
from lmfleet.gateway.sse import StreamTracker
from lmfleet.gateway.state import GatewayState
from lmfleet.gateway.upstream import UpstreamError, UpstreamResponse

logger = logging.getLogger(__name__)

#: seconds to wait, after ``[DONE]``, for the end of the replica's response
_FINISH_S = 1.0
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def pump(
    resp: UpstreamResponse, tracker: StreamTracker, send: Send, idle_s: float
) -> str | None:
    """Relay events until ``[DONE]``; the failure, or None."""
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


class StreamRelay:
    """Streams of one gateway, relayed and resumed."""

    def __init__(self, state: GatewayState, sender: Sender) -> None:
        self.state = state
        self._sender = sender

    async def serve(self, call: Call, reply: Reply, receive: Receive, send: Send) -> None:
        """Relay ``reply`` (a 200 stream's head) to the client, to the end of the
        stream or of the client; ``reply`` and every later one are closed by then."""
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
        watcher = asyncio.get_running_loop().create_task(_watch(receive, gone, task))
        try:
            await self._relay(call, reply, tracker, send)
        except asyncio.CancelledError:
            if not gone.is_set() or task is None:
                raise
            task.uncancel()
            self._finish(call, tracker, "client_disconnect")
            return
        finally:
            watcher.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay(self, call: Call, reply: Reply, tracker: StreamTracker, send: Send) -> None:
        max_resumes = self.state.config.gateway.retries.max_resumes
        idle_s = self.state.config.gateway.timeouts.idle_s
        resumes = 0
        while True:
            with reply:  # this replica's part of the stream ends here, however it ends
                failure = await pump(reply.resp, tracker, send, idle_s)
                if failure is None:
                    await reply.resp.finish(_FINISH_S)  # keep the connection for the next call
            replica = reply.replica
            if failure is None:
                err = tracker.upstream_error
                if err is not None and error_code(json.dumps(err).encode()) in BROKE_CODES:
                    self.state.registry.mark_dead(replica, "its stream reported engine_dead")
                    self._finish(call, tracker, "error_stream", error=True)
                    return
                self._finish(call, tracker, "ok" if err is None else "error_stream",
                             error=err is not None)  # fmt: skip
                return
            if tracker.finished:  # everything arrived but the closing [DONE]
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                            "more_body": True})  # fmt: skip
                self._finish(call, tracker, "ok")
                return
            logger.warning("request %s: stream from %s broke after %d chunks: %s", call.rid,
                           replica.url, tracker.content_chunks, failure)  # fmt: skip
            why_not = resume.resumable(call.payload, call.chat)
            if why_not is None and resumes >= max_resumes:
                why_not = f"already resumed {resumes} times"
            if why_not is not None:
                self.state.metrics.resumes.labels(*call.labels, "impossible").inc()
                await self._fail(call, tracker, send, f"the replica failed mid-stream "
                                 f"and the stream cannot be resumed ({why_not})")  # fmt: skip
                return
            resumes += 1
            try:
                nxt = await self._resume(call, tracker, send)
            except (GatewayError, resume.CannotResume) as exc:
                self.state.metrics.resumes.labels(*call.labels, "failed").inc()
                await self._fail(call, tracker, send, f"resuming the stream failed: {exc}")
                return
            if nxt is None:  # no token was left to generate
                self._finish(call, tracker, "ok")
                return
            self.state.metrics.resumes.labels(*call.labels, "ok").inc()
            reply = nxt

    async def _resume(self, call: Call, tracker: StreamTracker, send: Send) -> Reply | None:
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
            replica = self._sender.pick(call, version)
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
    ) -> Reply | None:
        """The continuation's reply from ``replica`` (its lease held for the relay),
        or None when no token was left to generate (the stream is then ended)."""
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
        try:
            reply = await self._sender.try_on(call, replica, COMPLETIONS_PATH,
                                              json.dumps(body).encode())  # fmt: skip
        except TryElsewhere as exc:
            raise resume.ReplicaUnavailable(f"{exc.err.status} {exc.err.code or ''}") from None
        try:
            _check_continuation(reply.resp)
            if call.chat and not tracker.sent_any:
                await send({"type": "http.response.body", "body": tracker.role_chunk(),
                            "more_body": True})  # fmt: skip
        except BaseException:
            reply.close()
            raise
        tracker.begin_continuation(sent_tokens, via_completions=True)
        logger.info("request %s: resuming on %s after %d tokens", call.rid, replica.url,
                    sent_tokens)  # fmt: skip
        call.replica = replica
        return reply

    async def _fail(self, call: Call, tracker: StreamTracker, send: Send, message: str) -> None:
        err = GatewayError(502, message, code="upstream_failed", type="upstream_error")
        await send({"type": "http.response.body", "body": sse_error_event(err), "more_body": True})
        self._finish(call, tracker, "error_stream", error=True)

    def _finish(
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
        record(self.state, call, outcome=outcome, error=error)


def _check_continuation(resp: UpstreamResponse) -> None:
    """A continuation that did not answer 200: another replica may try (429, 503),
    or the stream fails."""
    if resp.status == 200:
        return
    detail = (resp.content or b"")[:200].decode(errors="replace")
    if resp.status in RETRY_STATUSES:
        raise resume.ReplicaUnavailable(f"continuation answered {resp.status}")
    raise GatewayError(502, f"continuation answered {resp.status}: {detail}")


async def _watch(receive: Receive, gone: asyncio.Event, task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` when the client disconnects."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            if task is not None:
                task.cancel()
            return
