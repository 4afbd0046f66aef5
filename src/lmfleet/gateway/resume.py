"""Continuing a stream on another replica after the one serving it died.

The continuation is a ``/v1/completions`` stream over token ids: the original prompt
(for chat, the messages through the replica's chat template, as ``/tokenize``
renders them) followed by the tokens of the text the client already has, with
``max_tokens`` (and ``min_tokens``) reduced by those tokens and the same seed and
sampling settings. For a greedy stream, or a seeded one on an engine whose sampling
depends only on the seed and the sequence (lmfleet's simulator does), the client
gets exactly the text an undisturbed run would have produced. Going through token
ids rather than concatenated text keeps the boundary between prompt and generated
text where the model saw it. ``/tokenize`` with ``prompt`` or ``messages`` is
vLLM's API too, so this works in front of vLLM as well.

What cannot be resumed (``n > 1``, several prompts, ``echo``, chat ``logprobs``,
tools) ends with an error event instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lmfleet.gateway.upstream import UpstreamError, UpstreamPool

#: request fields copied to the continuation as they are
_CARRIED = (
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos",
    "include_stop_str_in_output", "skip_special_tokens", "priority", "user",
)  # fmt: skip
#: the completions API's default max_tokens
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class CannotResume(Exception):
    """The stream cannot be continued elsewhere; the message says why."""


class ReplicaUnavailable(CannotResume):
    """The replica chosen to continue the stream did not answer (connection failed,
    timed out, answered 5xx): another replica may continue it."""


def resumable(payload: dict[str, Any], chat: bool) -> str | None:
    """None if a stream of this request can be resumed, else why not."""
    if payload.get("n") not in (None, 1):
        return "n > 1"
    if chat:
        if payload.get("logprobs"):
            return "chat logprobs"
        if payload.get("tools") and payload.get("tool_choice") != "none":
            return "tools"
        return None
    prompt = payload.get("prompt")
    if not (isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)
    )):  # fmt: skip
        return "several prompts"
    if payload.get("echo"):
        return "echo"
    if payload.get("best_of") not in (None, 1):
        return "best_of"
    return None


def max_new_tokens(payload: dict[str, Any], chat: bool) -> int | None:
    if chat:
        v = payload.get("max_completion_tokens")
        return v if v is not None else payload.get("max_tokens")
    return payload.get("max_tokens", _COMPLETIONS_DEFAULT_MAX_TOKENS)


async def _tokenize(
    pool: UpstreamPool, url: str, body: dict[str, Any], timeout: float,
    headers: list[tuple[str, str]],
) -> list[int]:  # fmt: skip
    try:
        status, raw = await pool.fetch(url, "/tokenize", json.dumps(body).encode(),
                                       timeout=timeout, connect_timeout=timeout,
                                       headers=headers)  # fmt: skip
    except (UpstreamError, TimeoutError) as exc:
        raise ReplicaUnavailable(f"/tokenize failed: {type(exc).__name__}") from None
    if status == 429 or status >= 500:
        raise ReplicaUnavailable(f"/tokenize answered {status}")
    if status != 200:
        raise CannotResume(f"/tokenize answered {status}")
    try:
        tokens = json.loads(raw).get("tokens")
    except (ValueError, AttributeError):
        tokens = None
    if not isinstance(tokens, list):
        raise CannotResume("/tokenize gave no tokens")
    return tokens


async def continuation(
    pool: UpstreamPool,
    replica_url: str,
    payload: dict[str, Any],
    *,
    chat: bool,
    upstream_model: str,
    sent_text: str,
    timeout: float,
    headers: Sequence[tuple[str, str]] = (),
) -> tuple[dict[str, Any] | None, int]:
    """The continuation's ``/v1/completions`` body and the number of tokens already
    sent. The body is None when no token is left to generate."""
    if chat:
        tok_req: dict[str, Any] = {
            "model": upstream_model,
            "messages": payload["messages"],
            "add_generation_prompt": payload.get("add_generation_prompt", True),
        }
        for k in ("chat_template", "chat_template_kwargs", "tools"):
            if payload.get(k) is not None:
                tok_req[k] = payload[k]
        prompt_ids = await _tokenize(pool, replica_url, tok_req, timeout, list(headers))
    elif isinstance(payload["prompt"], str):
        prompt_ids = await _tokenize(
            pool, replica_url,
            {"model": upstream_model, "prompt": payload["prompt"],
             "add_special_tokens": payload.get("add_special_tokens", True)},
            timeout, list(headers),
        )  # fmt: skip
    else:
        prompt_ids = list(payload["prompt"])
    generated: list[int] = []
    if sent_text:
        generated = await _tokenize(
            pool, replica_url,
            {"model": upstream_model, "prompt": sent_text, "add_special_tokens": False},
            timeout, list(headers),
        )  # fmt: skip
    body: dict[str, Any] = {k: payload[k] for k in _CARRIED if k in payload}
    if not chat and payload.get("logprobs") is not None:
        body["logprobs"] = payload["logprobs"]
    limit = max_new_tokens(payload, chat)
    if limit is not None:
        if limit - len(generated) <= 0:
            return None, len(generated)
        body["max_tokens"] = limit - len(generated)
    else:
        body["max_tokens"] = None
    if payload.get("min_tokens"):
        body["min_tokens"] = max(0, int(payload["min_tokens"]) - len(generated))
    body.update(
        model=upstream_model,
        prompt=prompt_ids + generated,
        stream=True,
        stream_options={"include_usage": True},
    )
    return body, len(generated)
