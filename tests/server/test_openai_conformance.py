"""OpenAI conformance, checked against the published spec (the schema subsets in
openai_schemas.json, spec 2.3.0) and with the official ``openai`` client: nullable
fields, unknown fields, every response body and stream chunk of a parameter
matrix, a stream cut by the drain deadline, tools."""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from lmfleet.server.protocol import ChatCompletionRequest, CompletionRequest, StreamOptions

from .conftest import background_app
from .live import live_app, poll

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
SPEC = json.loads((Path(__file__).parent / "openai_schemas.json").read_text())
MSGS = [{"role": "user", "content": "Hello there"}]


def _validator(name: str, *, nullable_finish: bool = False) -> jsonschema.Draft202012Validator:
    defs = SPEC["$defs"]
    if nullable_finish:
        # The spec gives streamed completions the shape of a completion, whose
        # finish_reason is a string, yet OpenAI (and every server) sends null until
        # the choice's last chunk, as it does for chat chunks, whose schema says so.
        defs = json.loads(json.dumps(defs))
        choice = defs[name]["properties"]["choices"]["items"]
        choice["properties"]["finish_reason"] = {
            "anyOf": [choice["properties"]["finish_reason"], {"type": "null"}]
        }
    schema = {"$defs": defs, "$ref": f"#/$defs/{name}"}
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


CHAT_RESPONSE = _validator("CreateChatCompletionResponse")
CHAT_CHUNK = _validator("CreateChatCompletionStreamResponse")
COMPLETION = _validator("CreateCompletionResponse")
COMPLETION_CHUNK = _validator("CreateCompletionResponse", nullable_finish=True)


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    with background_app(tiny_model_dir, api_key=None) as running:
        yield running


@pytest.fixture(scope="module")
def strict(tiny_model_dir):
    with background_app(
        tiny_model_dir, api_key=None, strict_request_fields=True, trust_request_chat_template=True
    ) as running:
        yield running


def _post(app, path: str, body: dict[str, Any]) -> httpx.Response:
    lt, client, _ = app
    return lt.run(client.post(path, json=body))


def _events(text: str) -> list[Any]:
    """The data of each server-sent event; ``[DONE]`` as the string."""
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _errors(validator: jsonschema.Draft202012Validator, obj: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)
    ]


# ---- nullable fields --------------------------------------------------------------------
NULLS = {"n": None, "stream": None, "stream_options": None, "stop": None, "seed": None,
         "temperature": None, "top_p": None, "presence_penalty": None, "user": None,
         "frequency_penalty": None, "logit_bias": None}  # fmt: skip


def test_explicit_null_means_not_set(app):
    chat = _post(app, CHAT, {"model": "tiny", "messages": MSGS, "max_tokens": 2, **NULLS,
                             "logprobs": None, "top_logprobs": None, "max_completion_tokens": None,
                             "tools": None, "tool_choice": None, "store": None})  # fmt: skip
    assert chat.status_code == 200, chat.text
    assert len(chat.json()["choices"]) == 1 and chat.json()["choices"][0]["logprobs"] is None
    cmpl = _post(app, CMPL, {"model": "tiny", "prompt": "hi", "max_tokens": 2, **NULLS,
                             "logprobs": None, "echo": None, "best_of": None, "suffix": None})  # fmt: skip
    assert cmpl.status_code == 200, cmpl.text
    assert cmpl.json()["choices"][0]["text"] and not cmpl.json()["choices"][0]["logprobs"]
    usage = _post(app, CHAT, {"model": "tiny", "messages": MSGS, "max_tokens": 2, "stream": True,
                              "stream_options": {"include_usage": None}})  # fmt: skip
    assert usage.status_code == 200, usage.text


# ---- unknown and current-spec fields ---------------------------------------------------------
def _counter(app, field: str) -> float:
    lt, client, _ = app
    text = lt.run(client.get("/metrics")).text
    match = re.search(rf'^lmfleet_request_unknown_fields_total{{[^}}]*field="{field}"[^}}]*}} (\S+)$',
                      text, re.MULTILINE)  # fmt: skip
    return float(match.group(1)) if match else 0.0


def test_unknown_fields_are_ignored_with_one_warning_per_name_and_a_counter(app, caplog):
    caplog.set_level(logging.WARNING, logger="lmfleet.server.openai_routes")
    before = _counter(app, "no_stop_trim")
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 2, "no_stop_trim": False,
            "stream_options": {"include_usage": True, "lmfleet_test_option": 1}, "stream": True}  # fmt: skip
    for _ in range(3):
        assert _post(app, CHAT, body).status_code == 200
    assert _post(app, CMPL, {"model": "tiny", "prompt": "x", "max_tokens": 1,
                             "no_stop_trim": True}).status_code == 200  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if "unknown request field" in r.getMessage()]
    assert sum("'no_stop_trim'" in m for m in warned) <= 1  # once per process, maybe earlier
    assert sum("'stream_options.lmfleet_test_option'" in m for m in warned) == 1
    assert _counter(app, "no_stop_trim") == before + 4
    assert _counter(app, "stream_options.lmfleet_test_option") == 3


def test_strict_mode_refuses_unknown_fields_by_name(strict):
    r = _post(strict, CHAT, {"model": "tiny", "messages": MSGS, "no_stop_trim": False})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "no_stop_trim"
    assert err["message"] == "Unrecognized request argument supplied: no_stop_trim"
    r = _post(strict, "/tokenize", {"model": "tiny", "prompt": "x", "bogus": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "bogus"


@pytest.mark.parametrize(
    ("model", "schema"),
    [
        (ChatCompletionRequest, "CreateChatCompletionRequest"),
        (CompletionRequest, "CreateCompletionRequest"),
        (StreamOptions, "ChatCompletionStreamOptions"),
    ],
)
def test_every_spec_field_is_declared(model, schema):
    """So even --strict-request-fields refuses no field of the spec by name as unknown."""
    assert set(SPEC["request_fields"][schema]) - set(model.model_fields) == set()


def test_current_spec_fields_are_accepted_even_when_strict(strict):
    r = _post(strict, CHAT, {
        "model": "tiny", "messages": MSGS, "max_completion_tokens": 2, "stream": True,
        "stream_options": {"include_usage": True, "include_obfuscation": False},
        "prompt_cache_retention": "24h", "prompt_cache_key": "k", "safety_identifier": "s",
        "prompt_cache_options": {"ttl": "1h"}, "verbosity": "low", "store": False,
        "metadata": {"a": "b"}, "service_tier": "auto", "parallel_tool_calls": False,
    })  # fmt: skip
    assert r.status_code == 200, r.text
    assert _events(r.text)[-1] == "[DONE]"


def test_vllm_router_requests_are_served(app):
    """vllm-router adds no_stop_trim to every body; the official client sends it so."""
    lt, client, _ = app
    with openai.OpenAI(
        base_url="http://replica/v1",
        api_key="none",
        http_client=_SyncOverLoop(lt, client),
        max_retries=0,
    ) as oai:
        resp = oai.chat.completions.create(
            model="tiny", messages=MSGS, max_tokens=3, extra_body={"no_stop_trim": False}
        )
        assert resp.choices[0].finish_reason in ("stop", "length")
        text = oai.completions.create(
            model="tiny", prompt="x", max_tokens=2, extra_body={"no_stop_trim": True}
        )
        assert text.choices[0].text is not None


class _SyncOverLoop(httpx.Client):
    """A synchronous httpx client whose requests run on the app's loop thread over ASGI
    (the official client is synchronous; the app is served in-process)."""

    def __init__(self, lt, client: httpx.AsyncClient) -> None:
        super().__init__(base_url="http://replica")
        self._lt, self._async = lt, client

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            r = await self._async.send(
                self._async.build_request(
                    request.method, str(request.url), headers=request.headers,
                    content=request.read(),
                )
            )  # fmt: skip
            await r.aread()
            return r

        r = self._lt.run(go())
        return httpx.Response(r.status_code, headers=r.headers, content=r.content, request=request)


# ---- every body and chunk against the spec ---------------------------------------------------
CHAT_CASES = {
    "plain": {},
    "n": {"n": 2, "seed": 7},
    "stop": {"stop": ["e", "a"], "temperature": 0},
    "logprobs": {"logprobs": True, "top_logprobs": 3},
    "logprobs0": {"logprobs": True},
    "usage": {"max_completion_tokens": 3},
    "nulls": {"n": None, "logprobs": None, "stop": None},
    "everything": {"n": 2, "stop": "x", "logprobs": True, "top_logprobs": 2, "seed": 1},
}
COMPLETION_CASES = {
    "plain": {},
    "n": {"n": 2, "seed": 7},
    "prompts": {"prompt": ["one", "two three"], "n": 2},
    "stop": {"stop": ["e", "a"], "temperature": 0},
    "logprobs": {"logprobs": 3},
    "logprobs0": {"logprobs": 0},
    "echo": {"echo": True},
    "nulls": {"n": None, "logprobs": None, "echo": None, "stop": None},
    "everything": {"n": 2, "stop": "x", "logprobs": 2, "seed": 1},
}
STREAMS = {
    "no-stream": None,
    "stream": {},
    "stream-usage": {"include_usage": True},
    "stream-continuous": {"include_usage": True, "continuous_usage_stats": True},
}


@pytest.mark.parametrize("stream", list(STREAMS))
@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_chat_responses_match_the_spec(app, case, stream):
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 5, **CHAT_CASES[case]}
    _check_matrix(app, CHAT, body, stream, CHAT_RESPONSE, CHAT_CHUNK)


@pytest.mark.parametrize("stream", list(STREAMS))
@pytest.mark.parametrize("case", list(COMPLETION_CASES))
def test_completion_responses_match_the_spec(app, case, stream):
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 5, **COMPLETION_CASES[case]}
    _check_matrix(app, CMPL, body, stream, COMPLETION, COMPLETION_CHUNK)


def _check_matrix(app, path, body, stream, whole, chunk) -> None:
    options = STREAMS[stream]
    if options is not None:
        body = {**body, "stream": True, **({"stream_options": options} if options else {})}
    r = _post(app, path, body)
    assert r.status_code == 200, r.text
    if options is None:
        obj = r.json()
        assert _errors(whole, obj) == [], obj
        _check_facts(obj, path)
        return
    events = _events(r.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    for c in chunks:
        assert _errors(chunk, c) == [], c
        _check_facts(c, path)
    if options.get("include_usage"):
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def _check_facts(obj: dict[str, Any], path: str) -> None:
    """What the schemas allow but the spec's prose and the clients expect."""
    assert isinstance(obj["system_fingerprint"], str) and obj["system_fingerprint"]
    for choice in obj["choices"]:
        assert choice.get("finish_reason") in (None, "stop", "length")
        lp = choice.get("logprobs")
        if path == CHAT and lp is not None:
            assert "refusal" in lp and lp["refusal"] is None


# ---- a stream cut by the drain deadline ----------------------------------------------------------
LONG = {"max_tokens": 480, "temperature": 0, "extra_body": {"ignore_eos": True}}


def test_stream_cut_by_the_drain_deadline_raises_in_the_client(tiny_model_dir):
    with live_app(tiny_model_dir, api_key=None) as live, live.client() as client:
        stream = client.chat.completions.create(model="tiny", messages=MSGS, stream=True, **LONG)
        reasons = []
        with pytest.raises(openai.APIError) as info:
            for i, chunk in enumerate(stream):
                reasons += [c.finish_reason for c in chunk.choices]
                if i == 1:  # the request runs: drain with no time to finish
                    httpx.post(f"{live.url}/admin/drain", params={"timeout": 0}, timeout=30)
        assert info.value.code == "aborted" and "aborted" in info.value.message
        assert "abort" not in reasons and "length" not in reasons
        poll(lambda: live.replica.in_flight_requests == 0)


def test_completion_cut_by_the_drain_deadline_is_a_503(tiny_model_dir):
    with live_app(tiny_model_dir, api_key=None) as live, live.client() as client:
        stream = client.completions.create(model="tiny", prompt="Go", stream=True, **LONG)
        with pytest.raises(openai.APIError) as info:
            for i, _ in enumerate(stream):
                if i == 1:
                    httpx.post(f"{live.url}/admin/drain", params={"timeout": 0}, timeout=30)
        assert info.value.code == "aborted"


def test_request_cut_before_its_answer_is_a_503(tiny_model_dir):
    """Not streamed: the client gets a retryable 503 instead of finish_reason 'abort'."""
    with live_app(tiny_model_dir, api_key=None) as live, live.client() as client:
        outcome: dict[str, Any] = {}

        def call() -> None:
            try:
                client.chat.completions.create(model="tiny", messages=MSGS, **LONG)
            except openai.APIStatusError as exc:
                outcome["error"] = exc

        t = threading.Thread(target=call)
        t.start()
        poll(lambda: live.state()["running"] >= 1)
        httpx.post(f"{live.url}/admin/drain", params={"timeout": 0}, timeout=30)
        t.join(60)
        err = outcome["error"]
        assert err.status_code == 503 and err.code == "aborted"
        assert err.response.headers["retry-after"] == "1"


# ---- tools -------------------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}}]  # fmt: skip
TOOL_TEMPLATE = (
    "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
)


def test_tool_choice_none_renders_the_same_prompt_for_chat_and_tokenize(strict):
    common = {"model": "tiny", "messages": MSGS, "chat_template": TOOL_TEMPLATE}
    chat = _post(strict, CHAT, {**common, "tools": TOOLS, "tool_choice": "none", "max_tokens": 1})
    assert chat.status_code == 200, chat.text
    tok = _post(strict, "/tokenize", {**common, "tools": TOOLS})
    bare = _post(strict, "/tokenize", common)
    prompt_tokens = chat.json()["usage"]["prompt_tokens"]
    assert prompt_tokens == tok.json()["count"]
    assert prompt_tokens > bare.json()["count"]  # the tools are in the prompt


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": TOOLS}, "tools"),  # tool_choice defaults to auto with tools
        ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)  # fmt: skip
def test_tools_that_could_be_called_are_a_clear_400(app, extra, param):
    lt, client, _ = app
    oai = openai.OpenAI(
        base_url="http://replica/v1", api_key="none", http_client=_SyncOverLoop(lt, client),
        max_retries=0,
    )  # fmt: skip
    with oai, pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2, **extra)
    assert info.value.param == param and "tool calls" in info.value.message
    assert "tool_choice 'none'" in info.value.message or "needs tools" in info.value.message


# ---- the serve flags ---------------------------------------------------------------------------
def test_request_handling_flags_reach_the_settings(tmp_path):
    from lmfleet.cli import build_parser
    from lmfleet.server.settings import ServerSettings

    args = build_parser().parse_args(["serve", str(tmp_path)])
    default = ServerSettings.from_args(args)
    assert not default.strict_request_fields and not default.trust_request_chat_template
    assert default.chat_template_timeout_s == 2.0 and default.stream_write_timeout_s == 30.0
    args = build_parser().parse_args([
        "serve", str(tmp_path), "--strict-request-fields", "--trust-request-chat-template",
        "--chat-template-timeout", "0.5", "--stream-write-timeout", "7",
    ])  # fmt: skip
    s = ServerSettings.from_args(args)
    assert s.strict_request_fields and s.trust_request_chat_template
    assert (s.chat_template_timeout_s, s.stream_write_timeout_s) == (0.5, 7.0)
