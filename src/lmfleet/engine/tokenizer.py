"""Text in, token ids out, and back: the engine's only contact with tokenization.

:class:`Tokenizer` wraps a Hugging Face ``tokenizers`` tokenizer loaded from a model
directory and renders chat templates the way ``transformers`` does (sandboxed jinja2,
same globals and filters), without depending on ``transformers``, every render within
time, step and size limits (:mod:`lmfleet.engine.template_guard`).
:class:`IncrementalDetokenizer` turns a stream of sampled ids into text deltas, and
:class:`StopChecker` cuts that text at stop strings. None of this knows about models,
scheduling or HTTP.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as HFTokenizer

from lmfleet.engine.template_guard import (
    RenderLimitExceeded,
    RenderLimits,
    compile_guarded,
    render,
)
from lmfleet.errors import ModelLoadError, RequestRejected

logger = logging.getLogger(__name__)

#: the named special tokens of a tokenizer_config, passed to chat templates by name
_NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
#: transformers writes this "unset" sentinel (1e30) as model_max_length
_UNSET_MAX_LENGTH = 10**29
#: names a message's reasoning goes by; templates read the first (and gpt-oss "thinking")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(RequestRejected):
    """The chat template refused the messages (``raise_exception``), failed on them, or
    the model has no chat template. Recoverable: only this request fails."""

    code = "invalid_request"
    param = "messages"


class ChatTemplateLimit(ChatTemplateError):
    """The render passed its time, step or size limit (:class:`RenderLimits`)."""

    code = "chat_template_limit"


# --------------------------------------------------------------------------- loading


def _read_json(path: Path, *, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path.name} not found in {path.parent}")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path.name} in {path.parent} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path.name} in {path.parent} must hold a JSON object")
    return data


def _load_backend(path: Path) -> HFTokenizer:
    if not path.is_file():
        raise ModelLoadError(
            f"{path.name} not found in {path.parent}; lmfleet needs a fast-tokenizer "
            "tokenizer.json (convert slow tokenizers with transformers first)"
        )
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception on any parse error
        raise ModelLoadError(f"{path.name} in {path.parent} could not be parsed: {e}") from e


def _token_content(value: object) -> str | None:
    """A special token as tokenizer_config writes it: a string, an AddedToken dict, or null."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _int_ids(value: object) -> list[int]:
    """An ``eos_token_id`` field: an int, a list of ints, or absent."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _named_special_tokens(config: Mapping[str, Any], fallback: Mapping[str, Any]) -> dict[str, str]:
    """Special tokens by name (bos_token ...), from tokenizer_config then special_tokens_map."""
    out: dict[str, str] = {}
    for name in _NAMED_SPECIAL_TOKENS:
        raw = config[name] if name in config else fallback.get(name)
        content = _token_content(raw)
        if content is not None:
            out[name] = content
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):  # transformers 5: named extras such as image_token
        for name, raw in extra.items():
            content = _token_content(raw)
            if isinstance(name, str) and content is not None:
                out.setdefault(name, content)
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path.name} in {path.parent} could not be read: {e}") from e


def _chat_templates(model_dir: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named chat templates; template files win over tokenizer_config entries."""
    files: dict[str, str] = {}
    single = model_dir / "chat_template.jinja"
    if single.is_file():
        files["default"] = _read_text(single)
    extra_dir = model_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            files[f.name.removesuffix(".jinja")] = _read_text(f)
    if files:
        return files
    raw = config.get("chat_template")
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list):
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, Mapping)}
        return {k: v for k, v in named.items() if isinstance(k, str) and isinstance(v, str)}
    return {}


def _apply_bos_eos_flags(
    backend: HFTokenizer, config: Mapping[str, Any], bos: str | None, eos: str | None
) -> None:
    """When tokenizer_config says add_bos_token/add_eos_token, it decides which specials
    ``encode`` adds: the post-processor is rebuilt from those flags, replacing whatever
    tokenizer.json had, so a BOS is never added twice nor silently dropped."""
    if "add_bos_token" not in config and "add_eos_token" not in config:
        return
    add_bos = bool(config.get("add_bos_token")) and bos is not None
    add_eos = bool(config.get("add_eos_token")) and eos is not None
    single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
    pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
    wanted = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on and t is not None]
    specials = [(t, i) for t in dict.fromkeys(wanted) if (i := backend.token_to_id(t)) is not None]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )


# --------------------------------------------------------------------------- chat templates


def check_chat_templates(templates: Mapping[str, str], where: str | Path) -> None:
    """Raise :class:`ModelLoadError` unless every template compiles."""
    for name, source in templates.items():
        try:
            _compile_template(source)
        except jinja2.TemplateSyntaxError as e:
            raise ModelLoadError(f"chat template {name!r} in {where} does not compile: {e}") from e


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): renders the body."""

    tags = {"generation"}  # noqa: RUF012  (jinja2 reads a class attribute)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateDict:
    """``dict`` inside templates: builds dicts, without exposing the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Iterable[Any], value: Any = None) -> dict[Any, Any]:
        return dict.fromkeys(keys, value)


def _namespace(*args: Any, **kwargs: Any) -> jinja2.utils.Namespace:
    """``namespace`` inside templates, refusing underscore names (no reach into internals)."""
    ns = _SafeNamespace()
    for name, value in dict(*args, **kwargs).items():
        ns[name] = value
    return ns


class _SafeNamespace(jinja2.utils.Namespace):
    def __setitem__(self, name: str, value: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set underscore attributes on a namespace: {name!r}"
            )
        super().__setitem__(name, value)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # unlike jinja2's own tojson: no HTML escaping, and the json.dumps options exposed
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _setup_environment(env: jinja2.Environment) -> None:
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _namespace


@functools.lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    """A sandboxed template whose renders :func:`render` keeps within limits."""
    return compile_guarded(
        source,
        setup=_setup_environment,
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )


def _plain(value: Any) -> Any:
    """Template inputs rebuilt from plain JSON-like types (pydantic models are dumped)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _plain(dump())
    for base in (bool, int, float, str):  # str/int subclasses such as enums
        if isinstance(value, base):
            return base(value)
    return f"<{type(value).__name__}>"


def _normalize_message(message: Any) -> dict[str, Any]:
    """Drop None-valued keys (OpenAI's ``content: null``) and alias the reasoning fields."""
    plain = _plain(message)
    if not isinstance(plain, dict):
        raise ChatTemplateError(f"each message must be an object with a role, got {message!r}")
    out = {k: v for k, v in plain.items() if v is not None}
    reasoning = next((out[k] for k in _REASONING_KEYS if k in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


# --------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """A model directory's tokenizer: encode, decode and chat-template rendering."""

    def __init__(
        self,
        backend: HFTokenizer,
        config: Mapping[str, Any],
        *,
        special_tokens_map: Mapping[str, Any] | None = None,
        extra_eos_ids: Iterable[int] = (),
        chat_templates: Mapping[str, str] | None = None,
    ) -> None:
        self._backend = backend
        self._special = _named_special_tokens(config, special_tokens_map or {})
        self._add_missing_special_tokens()
        _apply_bos_eos_flags(
            backend, config, self._special.get("bos_token"), self._special.get("eos_token")
        )
        self._templates = dict(chat_templates or {})
        max_len = config.get("model_max_length")
        self._model_max_length = (
            int(max_len)
            if isinstance(max_len, int | float) and max_len < _UNSET_MAX_LENGTH
            else None
        )
        eos = self.eos_token_id
        self._eos_ids = frozenset(([eos] if eos is not None else []) + list(extra_eos_ids))
        added = backend.get_added_tokens_decoder()
        self._vocab_size = max(
            backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1
        )
        named = (backend.token_to_id(t) for t in self._special.values())
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special) | {
            i for i in named if i is not None
        }
        self._anchor = self._find_anchor()
        # byte-fallback pieces <0x80>..<0xBF>: UTF-8 continuation bytes, never a character start
        names = (f"<0x{b:02X}>" for b in range(0x80, 0xC0))
        self._continuation_ids = frozenset(
            i for i in map(backend.token_to_id, names) if i is not None
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and the optional generation_config.json,
        config.json, special_tokens_map.json and chat_template.jinja files."""
        model_dir = Path(path)
        backend = _load_backend(model_dir / "tokenizer.json")
        config = _read_json(model_dir / "tokenizer_config.json", required=False)
        if config is None:
            logger.warning(
                "no tokenizer_config.json in %s: no special tokens or chat template", model_dir
            )
            config = {}
        special_map = _read_json(model_dir / "special_tokens_map.json", required=False) or {}
        extra_eos: list[int] = []
        for name in ("generation_config.json", "config.json"):
            data = _read_json(model_dir / name, required=False) or {}
            extra_eos += _int_ids(data.get("eos_token_id"))
        templates = _chat_templates(model_dir, config)
        check_chat_templates(templates, model_dir)
        return cls(
            backend,
            config,
            special_tokens_map=special_map,
            extra_eos_ids=extra_eos,
            chat_templates=templates,
        )

    def _add_missing_special_tokens(self) -> None:
        """Named special tokens that tokenizer.json lacks are added (as transformers does)."""
        missing = [t for t in self._special.values() if self._backend.token_to_id(t) is None]
        if missing:
            self._backend.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)]
            )

    # ---- vocabulary and special tokens

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (largest id + 1)."""
        return self._vocab_size

    def _special_id(self, name: str) -> int | None:
        token = self._special.get(name)
        return self._backend.token_to_id(token) if token is not None else None

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: tokenizer_config's eos plus generation_config's list."""
        return self._eos_ids

    @property
    def all_special_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens (bos_token, eos_token ...) as strings."""
        return dict(self._special)

    @property
    def model_max_length(self) -> int | None:
        return self._model_max_length

    # ---- encode and decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids to text. ``clean_up_tokenization_spaces`` is ignored (it corrupts BPE output)."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Vocabulary strings (e.g. ``Ġthe``); ids outside the vocabulary give ``""``."""
        return [self._backend.id_to_token(i) or "" for i in ids]

    def is_continuation_byte(self, token_id: int) -> bool:
        """Whether the id is a byte-fallback piece that continues a UTF-8 character."""
        return token_id in self._continuation_ids

    def token_text(self, token_id: int) -> str:
        """The text one token adds after ordinary text, for logprob display: ``" the"`` for
        a SentencePiece ``▁the`` (decoded alone it would lose its space)."""
        if self._anchor is not None:
            anchor_id, anchor_text = self._anchor
            both = self._backend.decode([anchor_id, token_id], skip_special_tokens=False)
            if both.startswith(anchor_text):
                return both[len(anchor_text) :]
        return self._backend.decode([token_id], skip_special_tokens=False)

    def _find_anchor(self) -> tuple[int, str] | None:
        """A one-token plain word that :meth:`token_text` decodes in front of a token."""
        ids = self.encode("a", add_special_tokens=False)
        if len(ids) != 1:
            return None
        return ids[0], self._backend.decode(ids, skip_special_tokens=False)

    # ---- chat

    @property
    def chat_template_names(self) -> tuple[str, ...]:
        return tuple(self._templates)

    def _select_template(self, chat_template: str | None, has_tools: bool) -> str:
        if chat_template is not None:
            return self._templates.get(chat_template, chat_template)
        if has_tools and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        if not self._templates:
            raise ChatTemplateError(
                "this model has no chat template (none in tokenizer_config.json, no "
                "chat_template.jinja): pass chat_template explicitly or send a plain prompt "
                "to the completions API",
                param="chat_template",
            )
        raise ChatTemplateError(
            f"this model has several chat templates and none named 'default': pass one of "
            f"{sorted(self._templates)} as chat_template",
            param="chat_template",
        )

    def is_named_template(self, chat_template: str) -> bool:
        """Whether ``chat_template`` names one of the model's own templates (rather
        than being a template source)."""
        return chat_template in self._templates

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        limits: RenderLimits | None = None,
        **extra: Any,
    ) -> str:
        """Render ``messages`` with the model's chat template (or ``chat_template``: a name
        or a template source), exactly as transformers' ``apply_chat_template(tokenize=False)``,
        within ``limits`` (time, steps, size; the defaults when None) whichever template it is.
        A failure names ``chat_template`` when the source came with the call, else ``messages``."""
        if not messages:
            raise ChatTemplateError("messages must not be empty")
        source = self._select_template(chat_template, tools is not None)
        given = chat_template is not None and not self.is_named_template(chat_template)
        param = "chat_template" if given else "messages"
        try:
            template = _compile_template(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"chat_template does not compile: {e}", param="chat_template"
            ) from e
        variables = {
            **self._special,
            **_plain(extra),
            "messages": [_normalize_message(m) for m in messages],
            "tools": _plain(list(tools)) if tools is not None else None,
            "documents": _plain(extra.get("documents")),
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return render(template, variables, limits or RenderLimits())
        except RenderLimitExceeded as e:
            raise ChatTemplateLimit(f"{e}; the render was stopped", param=param) from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(str(e) or type(e).__name__, param=param) from e
        except RecursionError:
            raise ChatTemplateError("the chat template recursed too deeply", param=param) from None
        except Exception as e:  # the template's code failed, e.g. OverflowError, TypeError
            raise ChatTemplateError(
                f"the chat template failed on these messages: {type(e).__name__}: {e}",
                param=param,
            ) from e

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """Render then encode without adding specials (the template writes its own BOS)."""
        text = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **kwargs
        )
        return self.encode(text, add_special_tokens=False)


# --------------------------------------------------------------------------- streaming

#: prompt tokens kept as left context, so the first output token decodes as in context
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns output ids, as they arrive, into text deltas.

    Each step decodes a short window of already-emitted ids plus the new ones and emits
    the difference with the window alone, so tokens whose text depends on their
    neighbour (SentencePiece leading spaces, byte fallback) come out right. While the
    decoded tail ends in U+FFFD (an incomplete UTF-8 character) the text is held back.
    All deltas plus :meth:`finish` equal ``decode(prompt + output)`` minus
    ``decode(prompt)``, i.e. ``decode(output)`` for an empty prompt.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        # byte-fallback decoders decode a run of byte pieces as a whole: a window that
        # starts inside a character would turn the whole run into U+FFFD
        start = 0
        while start < len(context) and tokenizer.is_continuation_byte(context[start]):
            start += 1
        self._ids: list[int] = context[start:]
        self._prefix = 0  # window start: left context for the next decode
        self._read = len(self._ids)  # everything before this is already emitted

    def _pending_text(self) -> tuple[str, str]:
        window = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        full = self._tok.decode(self._ids[self._prefix :], self._skip)
        return window, full

    def _advance(self) -> None:
        self._prefix, self._read = self._read, len(self._ids)

    def add(self, new_ids: Sequence[int]) -> str:
        """Append ids; return the text that is now final."""
        self._ids.extend(new_ids)
        window, full = self._pending_text()
        if len(full) <= len(window) or full.endswith(_REPLACEMENT):
            return ""
        self._advance()
        return full[len(window) :]

    def finish(self) -> str:
        """End of stream: return whatever was held back."""
        if self._read == len(self._ids):
            return ""
        window, full = self._pending_text()
        self._advance()
        return full[len(window) :]


class StopChecker:
    """Cuts streamed text at the first stop string.

    "First" is the occurrence that ends earliest (ties: the longest), which is what a
    character-by-character stream sees first, so the result does not depend on how the
    text is chunked. Empty stop strings are ignored.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stop if s))
        self._include = include_stop_str_in_output
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self._matched: str | None = None

    @property
    def matched(self) -> str | None:
        return self._matched

    def _first_match(self, text: str) -> tuple[int, int, str] | None:
        best: tuple[int, int, str] | None = None
        for s in self._stops:
            start = text.find(s)
            if start >= 0:
                cand = (start + len(s), start, s)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        return best

    def _holdback(self, text: str) -> int:
        """Length of the longest tail of ``text`` that could begin a stop string."""
        for k in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Add text; return (text safe to emit now, the stop string matched or None).
        After a match every further call returns ``("", None)``."""
        if self._matched is not None:
            return "", None
        text = self._held + delta
        match = self._first_match(text)
        if match is not None:
            end, start, stop = match
            self._matched, self._held = stop, ""
            return text[: end if self._include else start], stop
        keep = self._holdback(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], None

    def flush(self) -> str:
        """End of stream without a match: return the held-back text."""
        held, self._held = self._held, ""
        return held


def load_tokenizer(model_dir: str | Path, tokenizer: str | Path | None = None) -> Tokenizer | None:
    """The model's tokenizer, or None when it has none: ``tokenizer`` (a Hugging Face
    tokenizer directory) when given, else the model directory's ``tokenizer.json``,
    else, for a GGUF checkpoint (a ``.gguf`` file, a directory holding one, a built-in
    model name), the tokenizer its metadata describes."""
    if tokenizer is not None:
        if not (Path(tokenizer) / "tokenizer.json").is_file():
            raise ModelLoadError(f"tokenizer.json not found in {tokenizer} (--tokenizer)")
        return Tokenizer.from_dir(tokenizer)
    if (Path(model_dir) / "tokenizer.json").exists():
        return Tokenizer.from_dir(model_dir)
    from lmfleet.engine.models.gguf_file import find_gguf

    gguf = find_gguf(model_dir)
    if gguf is None:
        return None
    from lmfleet.engine.gguf_tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(gguf)
