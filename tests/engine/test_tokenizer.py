"""Tokenizer, chat templates, streaming detokenization and stop strings.

transformers is the reference for chat rendering and encode/decode; every tokenizer
here is built offline (the synthetic byte-level BPE, and SentencePiece-style BPEs with
byte fallback built in this file).
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import (
    AddedToken,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers import Tokenizer as HFTokenizer

from lmfleet.engine.tokenizer import (
    ChatTemplateError,
    IncrementalDetokenizer,
    StopChecker,
    Tokenizer,
)
from lmfleet.engine.tokenizer_synthetic import write_synthetic_tokenizer
from lmfleet.errors import ModelLoadError, RequestRejected

transformers = pytest.importorskip("transformers")

MULTILINGUAL = (
    "Hello, world! The quick brown fox jumps over the lazy dog. "
    "Ça va très bien, merci. Grüße aus Köln. Привет, мир! "
    "你好，世界！東京は日本の首都です。안녕하세요. 🚀🎉 👍🏽 🧑‍💻 ∑ ≠ € — done.\n"
    "def f(x):\n    return x ** 2  # ok\n"
)

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("synth")
    write_synthetic_tokenizer(d, vocab_size=1000)
    return d


@pytest.fixture(scope="module")
def synth(synth_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(synth_dir)


def _hf(path: Path) -> Any:
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))


_SP_CORPUS = """\
The lighthouse keeper climbed the stairs every evening and wrote in his notebook.
Engineers measure first and optimize later; the queue stays short and the batches full.
Hello world, hello there, the weather is fine and the river is quiet in the winter.
She read the first line aloud, and the students listened while the snow kept falling.
"""


def _sentencepiece_like(style: str) -> HFTokenizer:
    """A Llama-2-like BPE: ▁ for spaces, <0xNN> byte fallback for characters outside the
    (English-only) vocabulary. ``style`` picks how spaces are handled: "llama2" (normalizer
    plus Strip decoder) or "metaspace" (Metaspace pre-tokenizer and decoder)."""
    trainer_tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    trainer_tok.train_from_iterator(_SP_CORPUS.splitlines(), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
    )
    if style == "llama2":
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always")]
        )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _write_sp_dir(d: Path, style: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    _sentencepiece_like(style).save(str(d / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def tokenizers_by_style(
    tmp_path_factory: pytest.TempPathFactory, synth: Tokenizer
) -> dict[str, Tokenizer]:
    base = tmp_path_factory.mktemp("sp")
    out = {"bytelevel": synth}
    for style in ("llama2", "metaspace"):
        out[style] = Tokenizer.from_dir(_write_sp_dir(base / style, style))
    return out


STYLES = ("bytelevel", "llama2", "metaspace")

# ----------------------------------------------------------------------------- loading


def test_synthetic_properties(synth: Tokenizer) -> None:
    assert synth.vocab_size == 1000
    assert synth.bos_token_id == 0
    assert synth.eos_token_id == 1
    assert synth.eos_token_ids == frozenset({1, 3})  # end_of_text + im_end (generation_config)
    assert synth.all_special_ids == frozenset({0, 1, 2, 3, 4})
    assert synth.pad_token_id == 4
    assert synth.model_max_length == 131072


def test_bos_is_not_doubled(synth: Tokenizer) -> None:
    # tokenizer.json's post-processor adds BOS and tokenizer_config says add_bos_token
    ids = synth.encode("hi")
    assert ids[0] == synth.bos_token_id and ids.count(synth.bos_token_id) == 1
    assert synth.encode("hi", add_special_tokens=False)[0] != synth.bos_token_id


def test_add_bos_token_false_in_config_wins(synth_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(synth_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token_id not in tok.encode("hi")


def test_eos_ids_from_config_json_and_added_token_dicts(synth_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(synth_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = {"__type": "AddedToken", "content": "<|im_end|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_id == 3
    assert tok.eos_token_ids == frozenset({1, 2, 3})


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
)
def test_corrupt_file_is_named(synth_dir: Path, tmp_path: Path, name: str) -> None:
    shutil.copytree(synth_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / name).write_text("{not json")
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        Tokenizer.from_dir(tmp_path)


def test_chat_template_syntax_error_is_a_load_error(synth_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(synth_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ModelLoadError, match="chat template"):
        Tokenizer.from_dir(tmp_path)


# ----------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("style", ["synthetic", "llama2", "metaspace"])
def test_encode_decode_match_transformers(synth_dir: Path, tmp_path: Path, style: str) -> None:
    d = synth_dir if style == "synthetic" else _write_sp_dir(tmp_path / style, style)
    ours, ref = Tokenizer.from_dir(d), _hf(d)
    for text in (MULTILINGUAL, " leading space", "", "<|im_start|>user\nhi<|im_end|>"):
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == ref.encode(text, add_special_tokens=add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                    ids, skip_special_tokens=skip
                )
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert ours.vocab_size == len(ref)


def test_padded_vocab_decodes_every_id(tmp_path: Path) -> None:
    n = write_synthetic_tokenizer(tmp_path, vocab_size=32000)
    tok = Tokenizer.from_dir(tmp_path)
    assert n == tok.vocab_size == 32000
    (last,) = tok.convert_ids_to_tokens([31999])
    assert last.startswith("<|extra_")
    assert tok.decode([31999]) == last  # plain added tokens decode as text
    assert all(tok.decode([i]) for i in range(5, 32000, 997))


def test_token_text(tokenizers_by_style: dict[str, Tokenizer]) -> None:
    synth = tokenizers_by_style["bytelevel"]
    (the,) = synth.encode(" the", add_special_tokens=False)
    assert synth.token_text(the) == " the"
    assert synth.token_text(3) == "<|im_end|>"
    for style in ("llama2", "metaspace"):
        tok = tokenizers_by_style[style]
        (river,) = tok.encode("river", add_special_tokens=False)
        assert tok.convert_ids_to_tokens([river]) == ["▁river"]
        assert tok.decode([river]) == "river"  # decoded alone it loses its space
        assert tok.token_text(river) == " river"


# ----------------------------------------------------------------------------- chat templates

LLAMA_STYLE = """\
{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "You are a helpful assistant." %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You may call these functions. Answer with JSON {\\"name\\": ..., \\"parameters\\": ...}.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception("Conversation roles must be user, assistant or tool, got " + message['role']) }}
    {%- endif %}
    {%- if message['role'] == 'assistant' and message.tool_calls is defined %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {%- for tc in message.tool_calls %}
            {{- '{"name": "' + tc.function.name + '", "parameters": ' }}
            {{- tc.function.arguments | tojson }}
            {{- "}" }}
            {%- if not loop.last %}{{- "; " }}{%- endif %}
        {%- endfor %}
        {{- "<|eot_id|>" }}
    {%- elif message['role'] == 'tool' %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message['content'] | trim + "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN_STYLE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
        {%- continue %}
    {%- endif %}
    {%- if message.role == 'user' or message.role == 'system' %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- generation %}
        {%- if message.reasoning_content and loop.index0 > ns.last_user %}
            {{- '\\n<think>\\n' + message.reasoning_content.strip() + '\\n</think>\\n' }}
        {%- endif %}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls | default([]) %}
            {%- set tc = tool_call.function if tool_call.function is defined else tool_call %}
            {{- '\\n<tool_call>\\n{"name": "' + tc.name + '", "arguments": ' }}
            {{- tc.arguments if tc.arguments is string else tc.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {%- endgeneration %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city — °C, with “quotes” & <tags>",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]

SIMPLE = [
    {"role": "system", "content": "You are terse. Ты краток."},
    {"role": "user", "content": "Bonjour! 你好 🚀"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "What's 2+2?"},
]

TOOL_CHAT = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,  # OpenAI clients send null content with tool calls
        "reasoning": "Need the weather tool.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "12°C, rain"},
    {"role": "tool", "tool_call_id": "call_2", "content": "13°C, sun"},
]


def _with_templates(synth_dir: Path, tmp_path: Path, chat_template: Any) -> Path:
    shutil.copytree(synth_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = chat_template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


CASES = [
    pytest.param("synthetic", SIMPLE[1:], None, {}, id="synthetic"),
    pytest.param("synthetic", SIMPLE, None, {}, id="synthetic-system"),
    pytest.param(LLAMA_STYLE, SIMPLE, None, {}, id="llama"),
    pytest.param(LLAMA_STYLE, TOOL_CHAT, TOOLS, {}, id="llama-tools"),
    pytest.param(LLAMA_STYLE, SIMPLE[1:], None, {"date_string": "01 Jan 2030"}, id="llama-extra"),
    pytest.param(QWEN_STYLE, SIMPLE, None, {}, id="qwen"),
    pytest.param(QWEN_STYLE, TOOL_CHAT, TOOLS, {}, id="qwen-tools"),
    pytest.param(QWEN_STYLE, SIMPLE[1:], None, {"enable_thinking": False}, id="qwen-nothink"),
    pytest.param(
        [
            {"name": "default", "template": QWEN_STYLE},
            {"name": "tool_use", "template": LLAMA_STYLE},
        ],
        TOOL_CHAT,
        TOOLS,
        {},
        id="named-tool_use",
    ),
    pytest.param(
        [
            {"name": "default", "template": QWEN_STYLE},
            {"name": "tool_use", "template": LLAMA_STYLE},
        ],
        SIMPLE,
        None,
        {},
        id="named-default",
    ),
]


@pytest.mark.parametrize(("template", "messages", "tools", "extra"), CASES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    synth_dir: Path,
    tmp_path: Path,
    template: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    extra: dict[str, Any],
    add_generation_prompt: bool,
) -> None:
    d = synth_dir if template == "synthetic" else _with_templates(synth_dir, tmp_path, template)
    ours, ref = Tokenizer.from_dir(d), _hf(d)
    kwargs: dict[str, Any] = {
        "add_generation_prompt": add_generation_prompt,
        "tools": tools,
        **extra,
    }
    text = ours.apply_chat_template(messages, **kwargs)
    assert text == ref.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = ours.encode_chat(messages, **kwargs)
    ref_ids = ref.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert ids == list(ref_ids)
    assert ours.decode(ids, skip_special_tokens=False) == text


def test_synthetic_template_shape(synth: Tokenizer) -> None:
    text = synth.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|begin_of_text|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = synth.encode_chat([{"role": "user", "content": "hi"}])
    assert ids.count(synth.bos_token_id) == 1 and ids[0] == synth.bos_token_id


def test_raise_exception_becomes_request_rejected(synth_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_with_templates(synth_dir, tmp_path, QWEN_STYLE))
    with pytest.raises(ChatTemplateError, match="Unknown role: robot") as info:
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    assert isinstance(info.value, RequestRejected)
    assert info.value.param == "messages"


def test_chat_request_errors(synth: Tokenizer, synth_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match="empty"):
        synth.apply_chat_template([])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        synth.apply_chat_template(SIMPLE, chat_template="{% if %}")
    shutil.copytree(synth_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    bare = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.apply_chat_template(SIMPLE)
    # an explicit template works without a model template
    assert bare.apply_chat_template(SIMPLE, chat_template="{{ messages | length }}") == "4"


def test_sandbox_blocks_internals(synth: Tokenizer) -> None:
    for source in (
        "{{ ''.__class__.__mro__ }}",
        "{% set ns = namespace(_y=2) %}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{{ messages.append(1) }}",
    ):
        with pytest.raises(ChatTemplateError):
            synth.apply_chat_template(SIMPLE, chat_template=source)


def test_tojson_options(synth: Tokenizer) -> None:
    source = "{{ tools | tojson }}|{{ tools | tojson(indent=2) }}|{{ tools | tojson(separators=(',', ':')) }}"
    out = synth.apply_chat_template(SIMPLE, tools=[{"a": "é<>&", "b": [1]}], chat_template=source)
    assert (
        out
        == '[{"a": "é<>&", "b": [1]}]|'
        + json.dumps([{"a": "é<>&", "b": [1]}], indent=2, ensure_ascii=False)
        + '|[{"a":"é<>&","b":[1]}]'
    )


# ----------------------------------------------------------------------------- detokenizer


def _stream(
    tok: Tokenizer, prompt: list[int], ids: list[int], chunks: list[int], skip: bool = True
) -> str:
    detok = IncrementalDetokenizer(tok, prompt, skip)
    out, i = [], 0
    for n in chunks:
        out.append(detok.add(ids[i : i + n]))
        i += n
    out.append(detok.add(ids[i:]))
    out.append(detok.finish())
    return "".join(out)


@pytest.mark.parametrize("style", STYLES)
def test_stream_one_token_at_a_time(tokenizers_by_style: dict[str, Tokenizer], style: str) -> None:
    tok = tokenizers_by_style[style]
    ids = tok.encode(MULTILINGUAL, add_special_tokens=False)
    assert _stream(tok, [], ids, [1] * len(ids)) == tok.decode(ids) == MULTILINGUAL


@pytest.mark.parametrize("style", STYLES)
def test_stream_never_emits_half_characters(
    tokenizers_by_style: dict[str, Tokenizer], style: str
) -> None:
    tok = tokenizers_by_style[style]
    detok = IncrementalDetokenizer(tok, [])
    for token_id in tok.encode("中文 🧑‍💻 ünï", add_special_tokens=False):
        assert "\ufffd" not in detok.add([token_id])


def test_metaspace_text_depends_on_the_previous_token(
    tokenizers_by_style: dict[str, Tokenizer],
) -> None:
    tok = tokenizers_by_style["metaspace"]
    ids = tok.encode("hello world the river", add_special_tokens=False)
    naive = "".join(tok.decode([i]) for i in ids)
    assert naive != tok.decode(ids)  # decoding token by token loses the spaces
    assert _stream(tok, [], ids, [1] * len(ids)) == "hello world the river"


@pytest.mark.parametrize("style", STYLES)
def test_stream_keeps_the_leading_space_after_a_prompt(
    tokenizers_by_style: dict[str, Tokenizer], style: str
) -> None:
    tok = tokenizers_by_style[style]
    prompt = tok.encode("the river is")
    out = tok.encode("the river is quiet", add_special_tokens=False)[len(prompt) - 1 :]
    assert tok.decode(out).strip() == "quiet"
    assert _stream(tok, prompt, out, [1] * len(out)) == " quiet"


def test_byte_fallback_prompt_ending_inside_a_character_run(
    tokenizers_by_style: dict[str, Tokenizer],
) -> None:
    tok = tokenizers_by_style["llama2"]
    prompt = tok.encode(
        "say 你好世界"
    )  # byte-fallback pieces; the context window starts mid-character
    out = tok.encode("x中文", add_special_tokens=False)[2:]  # only byte pieces, no ▁
    assert all(t.startswith("<0x") for t in tok.convert_ids_to_tokens(out))
    full, head = tok.decode(prompt + out), tok.decode(prompt)
    assert _stream(tok, prompt, out, [1] * len(out)) == full[len(head) :] == "中文"


TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from("abc xyz the river.\n"),
        st.characters(min_codepoint=0xA0, max_codepoint=0x2FFF),
        st.characters(min_codepoint=0x4E00, max_codepoint=0x4FFF),
        st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),
    ),
    max_size=40,
)
_HYP = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.parametrize("style", STYLES)
@_HYP
@given(text=TEXT, seed=st.integers(0, 2**32 - 1))
def test_stream_of_text_equals_one_shot_decode(
    tokenizers_by_style: dict[str, Tokenizer], style: str, text: str, seed: int
) -> None:
    tok = tokenizers_by_style[style]
    ids = tok.encode(text, add_special_tokens=False)
    rng = random.Random(seed)
    chunks = [rng.randint(0, 4) for _ in range(len(ids))]
    assert _stream(tok, [], ids, chunks) == tok.decode(ids)


@_HYP
@given(
    prompt=st.lists(st.integers(0, 999), max_size=12),
    ids=st.lists(st.integers(0, 999), max_size=40),
    seed=st.integers(0, 2**32 - 1),
    skip=st.booleans(),
)
def test_stream_of_random_ids_equals_one_shot_decode(
    synth: Tokenizer, prompt: list[int], ids: list[int], seed: int, skip: bool
) -> None:
    # byte-level BPE: any id sequence, special and <|extra_N|> tokens included
    rng = random.Random(seed)
    chunks = [rng.randint(0, 3) for _ in range(len(ids))]
    head, full = synth.decode(prompt, skip), synth.decode(prompt + ids, skip)
    assume(full.startswith(head))  # a prompt ending inside a character has no clean split
    assert _stream(synth, prompt, ids, chunks, skip) == full[len(head) :]
    if not prompt:
        assert _stream(synth, [], ids, chunks, skip) == synth.decode(ids, skip)


@pytest.mark.parametrize("style", ["llama2", "metaspace"])
@_HYP
@given(prompt=TEXT, text=TEXT, seed=st.integers(0, 2**32 - 1))
def test_sentencepiece_stream_after_prompt(
    tokenizers_by_style: dict[str, Tokenizer], style: str, prompt: str, text: str, seed: int
) -> None:
    tok = tokenizers_by_style[style]
    prompt_ids = tok.encode(prompt)
    ids = tok.encode(text, add_special_tokens=False)
    rng = random.Random(seed)
    chunks = [rng.randint(0, 3) for _ in range(len(ids))]
    head, full = tok.decode(prompt_ids), tok.decode(prompt_ids + ids)
    assert full.startswith(head)
    assert _stream(tok, prompt_ids, ids, chunks) == full[len(head) :]


# ----------------------------------------------------------------------------- stop strings


def _run_stop(stops: list[str], include: bool, pieces: list[str]) -> tuple[str, str | None]:
    checker = StopChecker(stops, include)
    out = []
    for piece in pieces:
        emit, matched = checker.feed(piece)
        out.append(emit)
        if matched is not None:
            return "".join(out), matched
    return "".join(out) + checker.flush(), None


def _first_stop(text: str, stops: list[str]) -> tuple[int, int, str] | None:
    """Reference: the occurrence that ends first (ties: the longest)."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s and s in text]
    return min(found, key=lambda f: (f[0], f[1])) if found else None


def test_stop_examples() -> None:
    assert _run_stop(["STOP"], False, ["hello S", "TO", "P world"]) == ("hello ", "STOP")
    assert _run_stop(["STOP"], True, ["hello S", "TO", "P world"]) == ("hello STOP", "STOP")
    assert _run_stop(["STOP"], False, ["hello S", "TOX"]) == ("hello STOX", None)
    assert _run_stop(["\n\n", "END"], False, ["a\n", "b\n", "\nc"]) == ("a\nb", "\n\n")
    assert _run_stop(["abcd", "bc"], False, ["abcd"]) == ("a", "bc")  # "bc" ends first
    assert _run_stop(["bc", "abc"], True, ["xabc"]) == ("xabc", "abc")  # same end: longest
    assert _run_stop([""], False, ["a", "b"]) == ("ab", None)


def test_stop_holds_back_only_possible_prefixes() -> None:
    checker = StopChecker(["<|end|>"], False)
    assert checker.feed("abc<|e") == ("abc", None)
    assert checker.feed("x") == ("<|ex", None)
    assert checker.feed("<|end|>tail") == ("", "<|end|>")
    assert checker.feed("more") == ("", None)
    assert checker.flush() == ""
    assert checker.matched == "<|end|>"


STOP_ALPHABET = st.text(alphabet="abé中\n", min_size=1, max_size=4)


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="abé中\n", max_size=40),
    stops=st.lists(STOP_ALPHABET, min_size=1, max_size=3),
    include=st.booleans(),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_stop_properties(text: str, stops: list[str], include: bool, cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    out, matched = _run_stop(stops, include, pieces)
    first = _first_stop(text, stops)
    if first is None:
        assert (out, matched) == (text, None)
        return
    end, start, stop = first
    assert matched == stop
    assert out == text[: end if include else start]
    if not include:
        assert not any(s in out for s in stops)
