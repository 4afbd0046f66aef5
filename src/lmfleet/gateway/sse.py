"""Following an OpenAI server-sent-event stream on its way through the gateway.

:class:`StreamTracker` remembers what the client has been sent (response id, text of
choice 0, finish reason, usage, first token time) and decides what to forward. It
parses (``json.loads``) only what it must: the events up to the first token (id,
``created``, model, first-token time), and events that carry ``usage`` or an
``error``. Every other event is relayed as it came and kept raw; the text and finish
reason are read from those only when needed (a resume, a stream without usage) or
when more than ``LAZY_LIMIT`` bytes are waiting. The checks are byte searches for
JSON keys, which are exact: inside a JSON string every ``"`` is escaped, so
``"usage":`` can only be a key. What it forwards:

- normally the replica's bytes, unchanged;
- without the ``usage`` chunk the gateway asked for on the client's behalf (it
  always asks, for token accounting) unless the client asked too;
- after a resume, the continuation's chunks rewritten so the client sees one
  stream: the original id, ``created`` and model, chat chunks for a chat stream
  (the continuation is a completions stream over token ids), usage counted against
  the original prompt.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

DONE = b"data: [DONE]\n\n"
#: raw events kept unparsed per stream before they are read for their text
LAZY_LIMIT = 256 * 1024


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(slots=True)
class StreamTracker:
    chat: bool
    #: the client asked for ``stream_options.include_usage``
    client_usage: bool
    fallback_id: str
    t_first: float | None = None
    response_id: str | None = None
    created: int | None = None
    model: str | None = None
    parts: list[str] = field(default_factory=list)
    _content_chunks: int = 0
    _finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False
    sent_any: bool = False
    upstream_error: dict[str, Any] | None = None
    #: set on a resume: tokens the client already has (continuation mode)
    resumed_tokens: int | None = None
    continuation_chat: bool = False
    #: relayed events not yet read for their text, in order (raw JSON or parsed)
    _pending: list[bytes | dict[str, Any]] = field(default_factory=list)
    _pending_bytes: int = 0

    @property
    def text(self) -> str:
        self._drain()
        return "".join(self.parts)

    @property
    def content_chunks(self) -> int:
        self._drain()
        return self._content_chunks

    @property
    def finish_reason(self) -> str | None:
        self._drain()
        return self._finish_reason

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def begin_continuation(self, generated_tokens: int, *, via_completions: bool) -> None:
        self._drain()
        self.resumed_tokens = generated_tokens
        self.continuation_chat = self.chat and via_completions

    def feed(self, events: bytes) -> bytes:
        """Complete events (ending in a blank line) in, bytes for the client out."""
        if self.t_first is not None and self.resumed_tokens is None:
            fast = self._feed_fast(events)
            if fast is not None:
                return fast
        out: list[bytes] = []
        for raw in events.split(b"\n\n"):
            if not raw.strip():
                continue
            if not raw.startswith(b"data:"):
                out.append(raw + b"\n\n")  # comments, named events: pass through
                continue
            data = raw[5:].strip()
            if data == b"[DONE]":
                self.done = True
                out.append(DONE)
                continue
            if self.t_first is not None and self.resumed_tokens is None and not _special(data):
                self._keep(data)
                out.append(raw + b"\n\n")
                continue
            try:
                obj = json.loads(data)
            except ValueError:
                out.append(raw + b"\n\n")
                continue
            if not isinstance(obj, dict):
                out.append(raw + b"\n\n")
                continue
            if "error" in obj:
                self.upstream_error = obj
                out.append(raw + b"\n\n")
                continue
            chunk = self._observe(obj)
            if chunk is None:
                continue
            out.append(raw + b"\n\n" if chunk is obj and self.resumed_tokens is None else
                       b"data: " + _dumps(chunk) + b"\n\n")  # fmt: skip
        if out:
            self.sent_any = True
        return b"".join(out)

    def _feed_fast(self, events: bytes) -> bytes | None:
        """The common case after the first token: every event is a plain ``data:``
        chunk without usage or error, relayed as it came. None: take the slow path."""
        if _special(events) or b"[DONE]" in events:
            return None
        kept: list[bytes] = []
        for raw in events.split(b"\n\n"):
            if not raw:
                continue
            if not raw.startswith(b"data:"):
                return None
            kept.append(raw[5:])
        for data in kept:
            self._keep(data)
        if kept:
            self.sent_any = True
        return events

    def _keep(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > LAZY_LIMIT:
            self._drain()

    def _drain(self) -> None:
        """Read the text and finish reason of the events kept raw."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        for data in pending:
            if isinstance(data, dict):
                self._content(data)
                continue
            try:
                obj = json.loads(data)
            except ValueError:
                continue
            if isinstance(obj, dict):
                self._content(obj)

    def _content(self, obj: dict[str, Any]) -> None:
        for c in obj.get("choices") or []:
            if c.get("index", 0) != 0:
                continue
            text = (c.get("delta") or {}).get("content") if self.chat else c.get("text")
            if text:
                self.parts.append(text)
                self._content_chunks += 1
                if self.t_first is None:
                    self.t_first = time.perf_counter()
            if c.get("finish_reason"):
                self._finish_reason = c["finish_reason"]

    def _observe(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        if self.resumed_tokens is not None:
            obj = self._rewrite(obj)
        elif self.response_id is None:
            self.response_id = obj.get("id")
            self.created = obj.get("created")
            self.model = obj.get("model")
        choices = obj.get("choices") or []
        if self._pending:
            self._pending.append(obj)  # read after the raw ones before it, in order
        else:
            self._content(obj)
        if obj.get("usage"):
            self.usage = obj["usage"]
            if not choices and not self.client_usage:
                return None  # the usage chunk only the gateway asked for
            if not self.client_usage:
                obj = {**obj, "usage": None}
        return obj

    def _rewrite(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A continuation chunk as the original stream would have sent it."""
        usage = obj.get("usage")
        if usage and self.resumed_tokens:
            g = self.resumed_tokens
            usage = {
                **usage,
                "prompt_tokens": max(0, usage.get("prompt_tokens", 0) - g),
                "completion_tokens": usage.get("completion_tokens", 0) + g,
            }
        rid = self.response_id or self.fallback_id
        created = self.created if self.created is not None else obj.get("created")
        model = self.model or obj.get("model")
        if not self.continuation_chat:
            return {**obj, "id": rid, "created": created, "model": model, "usage": usage}
        choices = []
        for c in obj.get("choices") or []:
            text = c.get("text")
            choices.append({
                "index": c.get("index", 0),
                "delta": {"content": text} if text else {},
                "logprobs": None,
                "finish_reason": c.get("finish_reason"),
                "stop_reason": c.get("stop_reason"),
            })  # fmt: skip
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": None,
        }

    def role_chunk(self) -> bytes:
        """The opening chat chunk, for a chat stream that failed before sending it."""
        return b"data: " + _dumps({
            "id": self.response_id or self.fallback_id,
            "object": "chat.completion.chunk",
            "created": self.created or int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}],
            "usage": None,
        }) + b"\n\n"  # fmt: skip

    def finish_chunk(self, reason: str) -> bytes:
        """A closing chunk, when the budget of tokens ran out exactly at a failure."""
        rid = self.response_id or self.fallback_id
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "delta": {}, "logprobs": None,
                                      "finish_reason": reason}  # fmt: skip
            obj: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk"}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}
            obj = {"id": rid, "object": "text_completion"}
        obj.update(created=self.created, model=self.model, choices=[choice], usage=None)
        self._drain()
        self._finish_reason = reason
        return b"data: " + _dumps(obj) + b"\n\n"


def _special(data: bytes) -> bool:
    """Does it carry a usage object or an error (compact or spaced JSON)?"""
    return b'"usage":{' in data or b'"usage": {' in data or b'"error":' in data
