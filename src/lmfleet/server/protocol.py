"""The OpenAI-compatible wire format: pydantic request and response models.

Requests keep the fields they do not declare (:meth:`_Request.unknown_fields`): the
routes ignore them with a warning, as vLLM does, or refuse them by name under
``--strict-request-fields``. Every field of OpenAI's current request schemas is
declared (spec 2.3.0), so no client of the spec meets the strict mode's 400. An
explicit ``null`` is "not set": the field takes its default. Strings holding a lone
UTF-16 surrogate (``"\\ud800"``, valid JSON, no valid text) are refused, naming the
field. The sampling extras vLLM accepts (``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ``min_tokens`` ...) are declared, so
clients written for vLLM work unchanged (the ``openai`` client sends them through
``extra_body``). OpenAI fields lmfleet cannot honour are declared too and rejected
by name when set (:func:`unsupported_fields`). Range checks of sampling values live
in ``SamplingParams``, the one place that knows them; the models here check types
(and ``seed``'s 64 bits, which the wire format fixes).
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from lmfleet import __version__

#: the range of OpenAI's ``seed`` (format int64)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")
#: pydantic error type of a string with a lone surrogate; ``ctx["field"]`` is its path
LONE_SURROGATE = "lone_surrogate"


class _Request(BaseModel):
    # strict: "2" is not a number and 1.5 not an integer, as in OpenAI's API
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _check_raw(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        bad = lone_surrogate_path(data)
        if bad is not None:
            raise PydanticCustomError(
                LONE_SURROGATE,
                "{field} holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                "valid text; send valid UTF-8 or surrogate pairs",
                {"field": bad},
            )
        return {k: v for k, v in data.items() if v is not None}  # null means "not set"

    def unknown_fields(self) -> list[str]:
        """Dotted names of the fields sent that this model does not declare."""
        names = list(self.model_extra or ())
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, _Request):
                names += [f"{name}.{sub}" for sub in value.unknown_fields()]
        return names


def lone_surrogate_path(data: Any) -> str | None:
    """The path (``messages[0].content``) of the first string in ``data``, a key or a
    value, that holds a lone surrogate; None when there is none. Iterative, so a
    deeply nested body cannot exhaust the stack."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                return path or None
        elif isinstance(value, dict):
            items = []
            for k, v in value.items():
                if isinstance(k, str) and not k.isascii() and _SURROGATE.search(k):
                    shown = k.encode("utf-8", "backslashreplace").decode()  # printable
                    return f"{path}.{shown}" if path else shown
                items.append((f"{path}.{k}" if path else str(k), v))
            stack.extend(reversed(items))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return None


class StreamOptions(_Request):
    include_usage: bool = False
    #: OpenAI pads chunks with random characters unless false; lmfleet never pads
    include_obfuscation: bool = True
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class GenerationRequest(_Request):
    """Fields shared by chat completions and completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # sampling extras vLLM accepts
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0
    request_id: str | None = None

    @field_validator("seed")
    @classmethod
    def _seed_is_int64(cls, value: int | None) -> int | None:
        if value is not None and not INT64_MIN <= value <= INT64_MAX:
            raise PydanticCustomError(
                "int64",
                "seed must be a signed 64-bit integer, in [-2**63, 2**63 - 1]; got {value}",
                {"value": value},
            )
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


# ---- chat completions ------------------------------------------------------------------
class ChatMessage(BaseModel):
    """One message. Extra keys (``reasoning_content`` ...) are passed to the template."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(
        cls, value: str | list[dict[str, Any]] | None
    ) -> str | list[dict[str, Any]] | None:
        if isinstance(value, list):
            for part in value:
                kind = part.get("type")
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(
                        f"only text content parts ({{'type': 'text', 'text': ...}}) are "
                        f"supported; got type {kind!r}"
                    )
        return value

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: text parts joined into one string."""
        out = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            out["content"] = "\n".join(part["text"] for part in self.content)
        return out


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    # accepted and ignored, as a single replica has no use for them
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    # OpenAI fields lmfleet does not implement: rejected by name when set
    moderation: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    # chat-template extras vLLM accepts
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    @property
    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


def unsupported_fields(req: GenerationRequest) -> tuple[str, str] | None:
    """The first field set to something lmfleet cannot do: (field, why)."""
    if req.stream_options is not None and not req.stream:
        return "stream_options", "stream_options is only allowed when stream is true"
    if req.logit_bias:
        return "logit_bias", "logit_bias is not supported"
    if isinstance(req, ChatCompletionRequest):
        for name in (
            "audio", "prediction", "web_search_options", "functions", "function_call",
            "moderation",
        ):  # fmt: skip
            if getattr(req, name) is not None:
                return name, f"{name} is not supported"
        if req.modalities is not None and req.modalities != ["text"]:
            return "modalities", "only the 'text' modality is supported"
        if req.response_format is not None and req.response_format.get("type") != "text":
            return "response_format", "only response_format {'type': 'text'} is supported"
        bad_tools = _unsupported_tools(req)
        if bad_tools is not None:
            return bad_tools
    if isinstance(req, CompletionRequest):
        if req.suffix is not None:
            return "suffix", "suffix is not supported"
        if req.best_of is not None and req.best_of != req.n:
            return "best_of", "best_of is not supported (it may only equal n)"
        if req.echo and req.logprobs is not None:
            return "echo", "echo together with logprobs is not supported"
    return None


_NO_TOOL_CALLS = (
    "lmfleet does not parse tool calls out of the model's output yet, so the model "
    "cannot call tools. Send tool_choice 'none' to render the tools into the prompt "
    "without calls, or leave tools out"
)


def _unsupported_tools(req: ChatCompletionRequest) -> tuple[str, str] | None:
    """Tools the model could call (tool_choice 'auto', the default with tools, or
    'required' or a named tool) are refused rather than silently never called."""
    choice = req.tool_choice
    if req.tools:
        if choice is None:
            return "tools", f"tools without tool_choice 'none' are not supported: {_NO_TOOL_CALLS}"
        if choice != "none":
            return (
                "tool_choice",
                f"tool_choice {_describe(choice)} is not supported: {_NO_TOOL_CALLS}",
            )
    elif choice not in (None, "none", "auto"):
        return (
            "tool_choice",
            f"tool_choice {_describe(choice)} needs tools, and tool calls are not supported",
        )
    return None


def _describe(choice: str | dict[str, Any]) -> str:
    return repr(choice) if isinstance(choice, str) else f"of type {choice.get('type')!r}"


def message_error(messages: list[ChatMessage]) -> tuple[str, str] | None:
    """(field, why) of the first message without the content its role needs: OpenAI
    lets ``content`` be null or absent only for an assistant message that carries
    ``tool_calls`` (or ``function_call``), and for a ``function`` message."""
    for i, m in enumerate(messages):
        if m.content is not None or m.role == "function":
            continue
        if m.role == "assistant":
            if m.tool_calls or (m.model_extra or {}).get("function_call") is not None:
                continue
            why = "an assistant message needs content unless it has tool_calls"
        else:
            why = f"a {m.role} message needs content (a string or a list of text parts)"
        return f"messages[{i}].content", f"messages[{i}].content is null or missing: {why}"
    return None


# ---- responses ---------------------------------------------------------------------------
def _now() -> int:
    return int(time.time())


#: OpenAI's ``system_fingerprint`` (a string): the serving software and its version
SYSTEM_FINGERPRINT = f"lmfleet-{__version__}"


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None  # required by the spec; lmfleet never refuses


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str = SYSTEM_FINGERPRINT


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _without_nulls(self) -> dict[str, Any]:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str = SYSTEM_FINGERPRINT


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    """A completion or one chunk of a completions stream (the same shape in the spec,
    where ``usage`` is an object when present, never null)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str = SYSTEM_FINGERPRINT

    @model_serializer(mode="wrap")
    def _usage_when_set(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("usage") is None:
            data.pop("usage", None)
        return data


# ---- models, tokenize, detokenize --------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "lmfleet"
    root: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Request):
    """vLLM's ``/tokenize``: either ``prompt`` (text) or ``messages`` (chat)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _exactly_one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
