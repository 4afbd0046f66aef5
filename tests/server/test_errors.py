"""Bad input: exact status and OpenAI-format error body, naming the field; the
replica keeps serving everyone else. In-process (httpx over ASGI)."""

from __future__ import annotations

import asyncio
import json

import pytest

from lmfleet.server.errors import field_path, from_validation

from .conftest import background_app, chat_body

MAX_BODY = 4096


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    # strict: unknown fields are refused by name (the default ignores them, see
    # test_openai_conformance.py)
    with background_app(
        tiny_model_dir,
        max_body_bytes=MAX_BODY,
        api_key=None,
        max_model_len=128,
        strict_request_fields=True,
    ) as running:
        yield running


def _msgs(content="Hi"):
    return [{"role": "user", "content": content}]


CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"

# (path, body, status, param, code, message fragment)
CASES = [
    (CHAT, {"model": "tiny", "messages": _msgs(), "foo": 1}, 400, "foo", None,
     "Unrecognized request argument supplied: foo"),
    (CMPL, {"model": "tiny", "prompt": "x", "best_off": 2}, 400, "best_off", None,
     "Unrecognized request argument supplied: best_off"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "stream_options": {"include_usage": True, "x": 1}},
     400, "stream_options.x", None, "Unrecognized request argument supplied: stream_options.x"),
    (CHAT, {"model": "tiny"}, 400, "messages", "missing_required_parameter", "Field required"),
    (CHAT, {"model": "tiny", "messages": []}, 400, "messages", "invalid_value", "at least 1"),
    (CHAT, {"model": "tiny", "messages": "hi"}, 400, "messages", "invalid_value", "valid list"),
    (CHAT, {"model": "tiny", "messages": [{"role": "bot", "content": "x"}]}, 400,
     "messages[0].role", "invalid_value", "'user'"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages[0].content", "invalid_value", "only text content parts"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "temperature": "hot"}, 400, "temperature",
     "invalid_value", "valid number"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "n": "2"}, 400, "n", "invalid_value",
     "valid integer"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "n": 0}, 400, "n", "invalid_value",
     "greater than or equal to 1"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "max_tokens": 1.5}, 400, "max_tokens",
     "invalid_value", "valid integer"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "stream": "yes"}, 400, "stream",
     "invalid_value", "valid boolean"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "stop": 5}, 400, "stop", "invalid_value", None),
    (CHAT, {"model": "gpt-9", "messages": _msgs()}, 404, "model", "model_not_found",
     "The model `gpt-9` does not exist"),
    (CMPL, {"model": "gpt-9", "prompt": "x"}, 404, "model", "model_not_found", "gpt-9"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "max_tokens": 0}, 400, "max_tokens",
     "invalid_parameter", "at least 1"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "max_completion_tokens": -3}, 400,
     "max_completion_tokens", "invalid_parameter", "at least 1"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "max_tokens": 500}, 400, "max_tokens",
     "invalid_parameter", "maximum context length is 128"),
    (CHAT, {"model": "tiny", "messages": _msgs("word " * 200)}, 400, "messages",
     "context_length_exceeded", "maximum context length is 128"),
    (CMPL, {"model": "tiny", "prompt": "word " * 200}, 400, "prompt", "context_length_exceeded",
     "maximum context length is 128"),
    (CMPL, {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens",
     "invalid_parameter", "at least 1"),
    (CMPL, {"model": "tiny", "prompt": "x", "max_tokens": 1000}, 400, "max_tokens",
     "invalid_parameter", "at most"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "temperature": -1}, 400, "temperature",
     "invalid_parameter", "at least 0"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "top_p": 1.5}, 400, "top_p",
     "invalid_parameter", "(0, 1]"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "presence_penalty": 3}, 400,
     "presence_penalty", "invalid_parameter", "[-2, 2]"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "frequency_penalty": -3}, 400,
     "frequency_penalty", "invalid_parameter", "[-2, 2]"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "logprobs": True, "top_logprobs": 30}, 400,
     "top_logprobs", "invalid_parameter", "[0, 20]"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "top_logprobs": 2}, 400, "top_logprobs",
     None, "needs logprobs"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "min_p": 2}, 400, "min_p",
     "invalid_parameter", "[0, 1]"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "repetition_penalty": 0}, 400,
     "repetition_penalty", "invalid_parameter", "greater than 0"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "max_tokens": 4, "min_tokens": 8}, 400,
     "min_tokens", "invalid_parameter", "must not exceed"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "stream_options": {"include_usage": True}},
     400, "stream_options", "unsupported_parameter", "only allowed when stream is true"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "logit_bias": {"5": 10}}, 400, "logit_bias",
     "unsupported_parameter", "not supported"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "response_format": {"type": "json_object"}},
     400, "response_format", "unsupported_parameter", "text"),
    (CHAT, {"model": "tiny", "messages": _msgs(), "tool_choice": "required", "tools": []}, 400,
     "tool_choice", "unsupported_parameter", "tool calls are not supported"),
    (CMPL, {"model": "tiny"}, 400, "prompt", "missing_required_parameter", "Field required"),
    (CMPL, {"model": "tiny", "prompt": []}, 400, "prompt", None, "must not be empty"),
    (CMPL, {"model": "tiny", "prompt": {"text": "x"}}, 400, "prompt", "invalid_value", None),
    (CMPL, {"model": "tiny", "prompt": [5, 99999]}, 400, "prompt", "invalid_request",
     "outside the vocabulary"),
    (CMPL, {"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "suffix",
     "unsupported_parameter", "not supported"),
    (CMPL, {"model": "tiny", "prompt": "x", "echo": True, "logprobs": 1}, 400, "echo",
     "unsupported_parameter", "not supported"),
    (CMPL, {"model": "tiny", "prompt": "x", "logprobs": 21}, 400, "logprobs",
     "invalid_parameter", "[0, 20]"),
    ("/tokenize", {"model": "tiny"}, 400, None, "invalid_value", "exactly one of"),
    ("/tokenize", {"model": "tiny", "prompt": "x", "bogus": True}, 400, "bogus", None,
     "Unrecognized request argument supplied: bogus"),
    ("/detokenize", {"model": "tiny", "tokens": [1, 99999]}, 400, "tokens[1]", "invalid_value",
     "outside the vocabulary"),
    ("/detokenize", {"model": "tiny", "tokens": ["a"]}, 400, "tokens[0]", "invalid_value",
     "valid integer"),
]  # fmt: skip


def _check(response, status, param, code, fragment):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["code"] == code
    if fragment is not None:
        assert fragment in err["message"], err["message"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code", "fragment"),
    CASES,
    ids=[f"{c[0].rsplit('/', 1)[-1]}-{c[3]}-{i}" for i, c in enumerate(CASES)],
)
def test_bad_input(app, path, body, status, param, code, fragment):
    lt, client, _ = app
    _check(lt.run(client.post(path, json=body)), status, param, code, fragment)


def test_malformed_json(app):
    lt, client, _ = app
    r = lt.run(
        client.post(CHAT, content=b'{"model": "tiny", "messages": [', headers=_json_headers())
    )
    _check(r, 400, None, "invalid_json", "not valid JSON")


def test_body_not_an_object(app):
    lt, client, _ = app
    r = lt.run(client.post(CHAT, content=b"[1, 2]", headers=_json_headers()))
    _check(r, 400, None, "invalid_json", "must be a JSON object")


def test_body_over_the_limit_is_413(app):
    lt, client, _ = app
    big = json.dumps(chat_body("x" * MAX_BODY)).encode()
    r = lt.run(client.post(CHAT, content=big, headers=_json_headers()))
    _check(r, 413, None, "request_too_large", f"limit of {MAX_BODY} bytes")

    async def chunks():  # no Content-Length: caught while the body is read
        for _ in range(8):
            yield b" " * 1024

    r = lt.run(client.post(CHAT, content=chunks(), headers=_json_headers()))
    _check(r, 413, None, "request_too_large", f"limit of {MAX_BODY} bytes")


def test_unknown_route_and_method(app):
    lt, client, _ = app
    r = lt.run(client.get("/v1/nothing"))
    _check(r, 404, None, "not_found", "no such endpoint")
    r = lt.run(client.get(CHAT))
    _check(r, 405, None, "method_not_allowed", None)


def test_admin_query_validation(app):
    lt, client, _ = app
    r = lt.run(client.post("/admin/drain", params={"timeout": "-1"}))
    _check(r, 400, "timeout", "invalid_value", None)


def test_everyone_else_keeps_being_served(app):
    """Good and bad requests at once: the bad ones fail alone."""
    lt, client, replica = app
    good = chat_body(max_tokens=6, temperature=0, ignore_eos=True)
    bad = [
        chat_body(max_tokens=0),
        chat_body("word " * 200),
        {**chat_body(), "foo": 1},
        {"model": "nope", "messages": _msgs()},
    ]

    async def main():
        return await asyncio.gather(
            *(client.post(CHAT, json=good) for _ in range(4)),
            *(client.post(CHAT, json=b) for b in bad),
            *(client.post(CMPL, json={"model": "tiny", "prompt": "a b", "max_tokens": 3})
              for _ in range(2)),
        )  # fmt: skip

    results = lt.run(main())
    statuses = [r.status_code for r in results]
    assert statuses == [200] * 4 + [400, 400, 400, 404] + [200, 200]
    texts = {r.json()["choices"][0]["message"]["content"] for r in results[:4]}
    assert len(texts) == 1  # greedy: the same answer for all four
    assert all(r.json()["usage"]["completion_tokens"] == 6 for r in results[:4])
    assert replica.in_flight_requests == 0


def test_field_path_and_union_grouping():
    assert field_path(("body", "messages", 0, "content")) == "messages[0].content"
    assert field_path(("query", "timeout")) == "timeout"
    assert field_path(("body",)) is None
    err = from_validation(
        [
            {"type": "string_type", "loc": ("body", "prompt", "str"), "msg": "a"},
            {"type": "list_type", "loc": ("body", "prompt", "list[int]"), "msg": "b"},
        ]
    )
    assert (err.status, err.param, err.message) == (
        400,
        "prompt",
        "Invalid value for 'prompt': a; b",
    )


def _json_headers():
    return {"content-type": "application/json"}
