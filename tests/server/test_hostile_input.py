"""Hostile input gets a 4xx naming the field, never a 500 or a dead engine: seeds
outside 64 bits, lone surrogates, null content, chat templates that loop or grow
without end. In-process (httpx over ASGI) against the tiny real model."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from tokenizers import Tokenizer as HFTokenizer

from lmfleet.engine.template_guard import RenderLimits
from lmfleet.engine.tokenizer import ChatTemplateError, ChatTemplateLimit, Tokenizer
from lmfleet.server.openai_routes import copy_seed

from .conftest import background_app, chat_body

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
#: nested loops of 99999 x 1000 iterations: 5-6 s on the event loop before the guard
LOOP_BOMB = "{% for i in range(99999) %}{% for j in range(1000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    with background_app(tiny_model_dir, api_key=None) as running:
        yield running


@pytest.fixture(scope="module")
def trusting(tiny_model_dir):
    with background_app(tiny_model_dir, api_key=None, trust_request_chat_template=True) as running:
        yield running


def _post(app, path, body):
    """POST a JSON body given as text (so lone surrogates reach the server as sent)."""
    lt, client, _ = app
    raw = body if isinstance(body, str) else json.dumps(body)
    return lt.run(
        client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    )


def _error(response, status: int = 400):
    assert response.status_code == status, response.text
    return response.json()["error"]


def _still_serving(app):
    r = _post(app, CMPL, {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    lt, client, _ = app
    assert lt.run(client.get("/health/live")).status_code == 200


# ---- seed -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [CMPL, CHAT])
@pytest.mark.parametrize("seed", [2**64, INT64_MAX + 1, INT64_MIN - 1, -(2**70)])
def test_seed_outside_int64_is_400_naming_seed(app, path, seed):
    body = {"model": "tiny", "max_tokens": 2, "seed": seed}
    body |= {"prompt": "hi"} if path == CMPL else {"messages": [{"role": "user", "content": "hi"}]}
    err = _error(_post(app, path, body))
    assert err["param"] == "seed" and "64-bit" in err["message"], err
    _still_serving(app)  # the engine never saw it


def test_copy_seeds_wrap_into_int64():
    assert copy_seed(5, 0) == 5 and copy_seed(5, 3) == 8
    assert copy_seed(INT64_MAX, 1) == INT64_MIN
    assert copy_seed(INT64_MAX, 2) == INT64_MIN + 1
    assert all(INT64_MIN <= copy_seed(INT64_MAX - 1, i) <= INT64_MAX for i in range(128))


def test_copies_at_the_top_of_int64_get_wrapped_seeds(app, monkeypatch):
    """n=3 with seed 2**63-1: the engine is given 2**63-1, -2**63, -2**63+1, and the
    second copy samples exactly as a request seeded -2**63 does."""
    replica = app[2]
    seen: list[int | None] = []
    generate = replica.engine.generate

    def recording(prompt, params, **kwargs):
        seen.append(params.seed)
        return generate(prompt, params, **kwargs)

    monkeypatch.setattr(replica.engine, "generate", recording)
    common = {"model": "tiny", "prompt": "The", "max_tokens": 8, "temperature": 1.0}
    both = _post(app, CMPL, {**common, "n": 3, "seed": INT64_MAX, "ignore_eos": True})
    assert both.status_code == 200, both.text
    assert seen == [INT64_MAX, INT64_MIN, INT64_MIN + 1]
    alone = _post(app, CMPL, {**common, "seed": INT64_MIN, "ignore_eos": True})
    assert alone.status_code == 200, alone.text
    assert both.json()["choices"][1]["text"] == alone.json()["choices"][0]["text"]
    _still_serving(app)


# ---- lone surrogates ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        (CMPL, '{"model": "tiny", "prompt": "hi \\ud800", "max_tokens": 2}', "prompt"),
        (CMPL, '{"model": "tiny", "prompt": ["ok", "\\udfff x"], "max_tokens": 2}', "prompt[1]"),
        (CMPL, '{"model": "tiny", "prompt": "hi", "stop": ["\\ud800"]}', "stop[0]"),
        (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
         "messages[0].content"),
        (CHAT, '{"model": "tiny", "messages": [{"role": "system", "content": "be"}, '
         '{"role": "user", "content": [{"type": "text", "text": "a\\udc00b"}]}]}',
         "messages[1].content[0].text"),
        (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
         '"chat_template_kwargs": {"\\ud800": 1}}', "chat_template_kwargs.\\ud800"),
        ("/tokenize", '{"model": "tiny", "prompt": "\\ud800"}', "prompt"),
    ],
)  # fmt: skip
def test_lone_surrogate_is_400_naming_the_field(app, path, raw, param):
    err = _error(_post(app, path, raw))
    assert err["param"] == param and "surrogate" in err["message"], err
    assert err["code"] == "invalid_value"


def test_surrogate_pairs_are_text(app):
    raw = '{"model": "tiny", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'
    assert _post(app, CMPL, raw).status_code == 200


# ---- content: null --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("messages", "param", "fragment"),
    [
        ([{"role": "user", "content": None}], "messages[0].content", "a user message needs"),
        ([{"role": "system"}, {"role": "user", "content": "x"}], "messages[0].content",
         "a system message needs"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}],
         "messages[1].content", "unless it has tool_calls"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "1"}],
         "messages[1].content", "a tool message needs"),
    ],
)  # fmt: skip
def test_null_content_names_the_message(app, messages, param, fragment):
    for path in (CHAT, "/tokenize"):
        err = _error(_post(app, path, {"model": "tiny", "messages": messages}))
        assert err["param"] == param and fragment in err["message"], err
        assert "jinja" not in err["message"].lower() and "undefined" not in err["message"]


def test_null_content_with_tool_calls_is_not_a_content_error(app):
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]  # fmt: skip
    r = _post(app, "/tokenize", {"model": "tiny", "messages": messages})
    if r.status_code != 200:  # the tiny model's template has no tool-call syntax
        assert r.json()["error"]["param"] != "messages[1].content"


# ---- chat templates: refused unless trusted ---------------------------------------------------
@pytest.mark.parametrize("path", [CHAT, "/tokenize"])
def test_request_chat_template_is_refused_by_default(app, path):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    err = _error(_post(app, path, {**body, "chat_template": "{{ messages[0].content }}"}))
    assert err["param"] == "chat_template" and err["code"] == "unsupported_parameter"
    assert "--trust-request-chat-template" in err["message"]
    assert _post(app, path, {**body, "chat_template": LOOP_BOMB}).status_code == 400
    # naming one of the model's own templates is no template source
    assert (
        _post(app, path, {**body, "chat_template": "default", "max_tokens": 2}).status_code == 200
    )


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        (LOOP_BOMB, "steps"),
        ("{% for i in range(99999) %}{% for j in range(1000) %}x{% endfor %}{% endfor %}",
         "steps"),
        ("{{ 'x' * 10**9 }}", "longer than"),
        ("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
         "{% endfor %}{{ ns.s }}", "longer than"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed"),
        ("{{ range(10**20) | list }}", "OverflowError"),  # 500 OverflowError before the guard
        ("{{ '%999999999s' % 'x' }}", "argument"),
    ],
)  # fmt: skip
def test_trusted_templates_that_never_end_are_stopped(trusting, template, fragment):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    for path in (CHAT, "/tokenize"):
        err = _error(_post(trusting, path, {**body, "chat_template": template}))
        assert err["param"] == "chat_template" and fragment in err["message"], err
    _still_serving(trusting)


def test_trusted_template_renders(trusting):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
        "return_token_strs": True,
    }
    r = _post(trusting, "/tokenize", body)
    assert r.status_code == 200, r.text
    replica = trusting[2]
    assert r.json()["tokens"] == replica.tokenizer.encode("<user>hi", add_special_tokens=False)


def test_render_runs_off_the_event_loop(app, monkeypatch):
    """While a render is in progress (held on an event here), the replica answers."""
    lt, client, replica = app
    tok = replica.tokenizer
    entered, release, left = threading.Event(), threading.Event(), threading.Event()
    original = tok.apply_chat_template

    def held(*args, **kwargs):
        entered.set()
        release.wait(30)  # a safety valve: on the event loop, nothing would release it
        left.set()
        return original(*args, **kwargs)

    monkeypatch.setattr(tok, "apply_chat_template", held)

    async def main():
        chat = asyncio.ensure_future(client.post(CHAT, json=chat_body(max_tokens=2)))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        live = await client.get("/health/live")
        held_meanwhile = not left.is_set()
        release.set()
        return live, held_meanwhile, await chat

    live, held_meanwhile, chat = lt.run(main())
    assert live.status_code == 200 and held_meanwhile
    assert chat.status_code == 200, chat.text


# ---- the guard itself (the model's own templates get it too) ---------------------------------
def _tokenizer_with(model_dir, template: str) -> Tokenizer:
    """The model's vocabulary with ``template`` as the model's own chat template."""
    backend = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
    return Tokenizer(backend, {}, chat_templates={"default": template})


def test_model_template_gets_the_same_guard(tiny_model_dir):
    tok = _tokenizer_with(tiny_model_dir, LOOP_BOMB)
    with pytest.raises(ChatTemplateLimit, match="steps") as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert info.value.param == "messages"  # the model's template: the input is at fault


def test_time_and_size_limits(tiny_model_dir):
    tok = _tokenizer_with(
        tiny_model_dir, "{% for i in range(50) %}{{ messages[0].content }}{% endfor %}"
    )
    msgs = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(msgs) == "hello" * 50
    with pytest.raises(ChatTemplateLimit, match="longer than 1e-09 s"):
        tok.apply_chat_template(msgs, limits=RenderLimits(timeout_s=1e-9))
    with pytest.raises(ChatTemplateLimit, match="longer than 100 characters"):
        tok.apply_chat_template(msgs, limits=RenderLimits(max_chars=100))
    with pytest.raises(ChatTemplateLimit, match="more than 10 steps"):
        tok.apply_chat_template(msgs, limits=RenderLimits(max_steps=10))


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'x'.center(10**10) }}",
        "{{ 'x' | center(10**10) }}",
        "{{ '{:999999999}'.format('x') }}",
        "{{ 2 ** (10**9) }}",
        "{% set s = 'x' * 1000000 %}{{ s.replace('', s) }}",
        "{% set s = 'x' * 1000000 %}{{ ([s] * 100000) | join }}",
        "{% set s = 'x' * 1000000 %}{{ ([s] * 100000) | map('upper') | join }}",
        "{% macro m() %}{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}{% endmacro %}"
        "{{ m() | length }}",
        "{% set ns = namespace(s='x' * 1000000) %}{% for i in range(100) %}{% set b %}{{ ns.s }}"
        "{{ ns.s }}{% endset %}{% set ns.s = b %}{% endfor %}",
        "{{ messages | tojson(indent=100000) }}",
        "{% for x in range(1000) recursive %}{% if loop.depth < 3 %}{{ loop(range(99999)) }}"
        "{% endif %}{% endfor %}",
    ],
)
def test_expansions_are_refused_before_they_run(tiny_model_dir, template):
    tok = _tokenizer_with(tiny_model_dir, template)
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
