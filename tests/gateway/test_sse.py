"""StreamTracker: what it forwards and what it remembers, whichever events it parses
eagerly and whichever it keeps raw for later."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmfleet.gateway import sse
from lmfleet.gateway.sse import DONE, StreamTracker


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _chunk(chat: bool, text: str | None, finish: str | None = None, usage=None) -> dict:
    if chat:
        delta = {} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": "x-1", "object": obj, "created": 7, "model": "m", "choices": [choice],
            "usage": usage}  # fmt: skip


# token texts, including ones that look like the keys and markers the tracker
# searches for (inside a JSON string they are escaped, so they must not confuse it)
_piece = st.one_of(
    st.text(alphabet='ab "\\{}:[]é\n', max_size=6),
    st.sampled_from(['"usage":{', "[DONE]", '"error": 1', "data: x\n\n"]),
)
texts = st.lists(_piece, min_size=0, max_size=40)


@settings(max_examples=150, deadline=None)
@given(
    chat=st.booleans(),
    pieces=texts,
    client_usage=st.booleans(),
    cuts=st.lists(st.integers(0, 60), max_size=8),
    small_limit=st.booleans(),
)
def test_tracker_relays_and_remembers_exactly(chat, pieces, client_usage, cuts, small_limit):
    usage = {"prompt_tokens": 3, "completion_tokens": len(pieces), "total_tokens": 3}
    events = []
    if chat:
        events.append(_chunk(True, ""))  # the role chunk: no content
    events += [_chunk(chat, t) for t in pieces]
    events.append(_chunk(chat, None, finish="length"))
    usage_chunk = {"id": "x-1", "object": "x", "created": 7, "model": "m", "choices": [],
                   "usage": usage}  # fmt: skip
    raw = [_event(e) for e in events] + [_event(usage_chunk), DONE]
    expected = b"".join(raw[:-2]) + (raw[-2] if client_usage else b"") + DONE

    old = sse.LAZY_LIMIT
    sse.LAZY_LIMIT = 64 if small_limit else old
    try:
        tracker = StreamTracker(chat=chat, client_usage=client_usage, fallback_id="f")
        out = b""
        bounds = sorted({min(c, len(raw)) for c in cuts} | {0, len(raw)})
        for a, b in itertools.pairwise(bounds):
            out += tracker.feed(b"".join(raw[a:b]))
    finally:
        sse.LAZY_LIMIT = old
    assert out == expected
    assert tracker.done
    assert tracker.usage == usage
    assert tracker.text == "".join(pieces)
    assert tracker.content_chunks == sum(1 for t in pieces if t)
    assert tracker.finish_reason == "length"
    assert (tracker.t_first is not None) == any(pieces)
    assert tracker.response_id == "x-1"


def test_gateway_only_usage_is_dropped_and_usage_nulled_in_content_chunks():
    tracker = StreamTracker(chat=False, client_usage=False, fallback_id="f")
    first = _chunk(False, "a")
    both = _chunk(False, "b", finish="stop", usage={"prompt_tokens": 1, "completion_tokens": 2})
    out = tracker.feed(_event(first) + _event(both) + DONE)
    events = [json.loads(e[6:]) for e in out.split(b"\n\n") if e and e != b"data: [DONE]"]
    assert [e["choices"][0]["text"] for e in events] == ["a", "b"]
    assert events[1]["usage"] is None
    assert tracker.usage == {"prompt_tokens": 1, "completion_tokens": 2}
    assert tracker.text == "ab"


def test_error_event_is_recorded_after_the_first_token():
    tracker = StreamTracker(chat=True, client_usage=False, fallback_id="f")
    tracker.feed(_event(_chunk(True, "hi")))
    err = {"error": {"message": "engine died", "type": "server_error", "code": 500}}
    out = tracker.feed(_event(err))
    assert out == _event(err)
    assert tracker.upstream_error == err


@pytest.mark.parametrize("chat", [True, False])
def test_continuation_chunks_are_rewritten_after_kept_ones(chat):
    tracker = StreamTracker(chat=chat, client_usage=False, fallback_id="f")
    tracker.feed(_event(_chunk(chat, "one")) + _event(_chunk(chat, " two")))
    assert tracker.text == "one two"
    tracker.begin_continuation(2, via_completions=True)
    cont = {"id": "cmpl-other", "object": "text_completion", "created": 99, "model": "m2",
            "choices": [{"index": 0, "text": " three", "finish_reason": None}]}  # fmt: skip
    out = tracker.feed(_event(cont))
    obj = json.loads(out[6:])
    assert obj["id"] == "x-1" and obj["created"] == 7
    if chat:
        assert obj["choices"][0]["delta"] == {"content": " three"}
    assert tracker.text == "one two three"
