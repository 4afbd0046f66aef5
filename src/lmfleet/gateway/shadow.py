"""Shadow copies: a share of a model's requests (``shadow.percent``) sent again to
its shadow version, timed and thrown away.

A copy uses spare capacity only (a free slot of the shadow version's admission
queue that nobody waits for, at most ``shadow.max_inflight`` copies at once) and
never touches the client's answer. Its reply holds a lease on the shadow replica
until the copy's answer is read, like any request's. Sending is the pipeline's
(:class:`~lmfleet.gateway.call.Sender`); reading a stream is the relay's
:func:`~lmfleet.gateway.relay.pump`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from lmfleet.gateway.auth import ClientKey
from lmfleet.gateway.call import VERSION_HEADER, Call, Sender, account_json, record
from lmfleet.gateway.relay import pump
from lmfleet.gateway.sse import StreamTracker
from lmfleet.gateway.state import GatewayState

logger = logging.getLogger(__name__)

_SHADOW_KEY = ClientKey("shadow", None, None)


class Shadows:
    """The shadow copies of one gateway's requests."""

    def __init__(self, state: GatewayState, sender: Sender) -> None:
        self.state = state
        self._sender = sender
        self._tasks: set[asyncio.Task[None]] = set()
        self._copies = 0  # copies sent and not finished, against shadow.max_inflight

    @property
    def in_flight(self) -> int:
        """Copies sent whose task has not ended."""
        return len(self._tasks)

    def maybe_mirror(self, call: Call, headers: dict[str, str]) -> None:
        """Send a copy of ``call`` to its model's shadow version, if one is due and a
        slot is free; returns at once."""
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
            "max_inflight" if self._copies >= shadow.max_inflight
            else None if version.queue.try_admit() else "no_capacity"
        )  # fmt: skip
        if skip is not None:
            self.state.metrics.shadow.labels(version.model, version.name, "skipped").inc()
            self.state.metrics.shadow_skipped.labels(version.model, version.name, skip).inc()
            return
        self._copies += 1
        # a copy sent is real load on the shadow version's replicas: an arrival there
        self.state.version_stats.record_arrival(version.model, version.name)
        copy = Call(
            rid=call.rid + "-shadow", path=call.path, chat=call.chat, payload=call.payload,
            model=call.model, version=version, stream=call.stream, key=_SHADOW_KEY,
            t0=time.perf_counter(), route=call.route, source="shadow",
        )  # fmt: skip
        task = asyncio.get_running_loop().create_task(self._run(copy))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, call: Call) -> None:
        """Send the copy, read the answer (timing it), throw it away."""
        labels = call.labels
        outcome = "ok"
        try:
            reply = await self._sender.forward(call, call.version)
            with reply:
                resp = reply.resp
                if call.stream:
                    tracker = StreamTracker(chat=call.chat, client_usage=False, fallback_id="")
                    idle_s = self.state.config.gateway.timeouts.idle_s
                    failure = await pump(resp, tracker, _discard, idle_s)
                    call.t_first = tracker.t_first
                    usage = tracker.usage or {}
                    call.completion_tokens = int(usage.get("completion_tokens") or 0)
                    call.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    if failure is not None:
                        outcome = "error"
                else:
                    account_json(self.state, call, resp.content or b"")
                    if resp.status != 200:
                        outcome = "error"
        except Exception as exc:
            outcome = "error"
            logger.debug("shadow copy %s failed: %s", call.rid, exc)
        finally:
            self._copies -= 1
            call.version.queue.release()
        self.state.metrics.shadow.labels(*labels, outcome).inc()
        record(self.state, call, outcome=f"shadow_{outcome}", error=outcome != "ok")

    async def close(self) -> None:
        """Cancel the copies in flight and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _discard(message: Any) -> None:
    return None
