"""Following an OpenAI server-sent-event stream on its way through the gateway.

:class:`StreamTracker` reads each event once (one ``json.loads``), remembers what the
client has been sent (response id, text of choice 0, finish reason, usage, first
token time) and decides what to forward:

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
    content_chunks: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False
    sent_any: bool = False
    upstream_error: dict[str, Any] | None = None
    #: set on a resume: tokens the client already has (continuation mode)
    resumed_tokens: int | None = None
    continuation_chat: bool = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def begin_continuation(self, generated_tokens: int, *, via_completions: bool) -> None:
        self.resumed_tokens = generated_tokens
        self.continuation_chat = self.chat and via_completions

    def feed(self, events: bytes) -> bytes:
        """Complete events (ending in a blank line) in, bytes for the client out."""
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

    def _observe(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        if self.resumed_tokens is not None:
            obj = self._rewrite(obj)
        elif self.response_id is None:
            self.response_id = obj.get("id")
            self.created = obj.get("created")
            self.model = obj.get("model")
        choices = obj.get("choices") or []
        for c in choices:
            if c.get("index", 0) != 0:
                continue
            text = (c.get("delta") or {}).get("content") if self.chat else c.get("text")
            if text:
                self.parts.append(text)
                self.content_chunks += 1
                if self.t_first is None:
                    self.t_first = time.perf_counter()
            if c.get("finish_reason"):
                self.finish_reason = c["finish_reason"]
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
        self.finish_reason = reason
        return b"data: " + _dumps(obj) + b"\n\n"
