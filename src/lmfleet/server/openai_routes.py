"""The OpenAI-compatible routes: chat completions, completions, models, tokenize.

Each generation route does the same five things: check the model name and the
fields lmfleet cannot honour (400/404), build the prompt token ids and the sampling
parameters (400 naming the field), admit the request (503/429, synchronous), fan it
out (:class:`~lmfleet.server.generation.Generation`), then either collect the
choices or stream them as server-sent events ending in ``data: [DONE]``.

Fields a request carries that lmfleet does not know are ignored, with one warning
per name and a counter (:class:`UnknownFields`), or refused under
``--strict-request-fields``. Chat prompts are rendered off the event loop, in the
app's template pool, within the render limits; ``/tokenize`` renders them with the
same function, so its count is the chat route's ``prompt_tokens``. A request the
server cuts short (the drain deadline aborts it) is an error, never a finish reason
outside the spec: a 503, or mid-stream an error event before ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from lmfleet.engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprobs
from lmfleet.engine.template_guard import RenderLimits
from lmfleet.engine.tokenizer import Tokenizer
from lmfleet.errors import InvalidSamplingParams, LmfleetError, RequestRejected
from lmfleet.server import early_headers
from lmfleet.server.errors import ApiError, answer_for, from_lmfleet, rename_param
from lmfleet.server.generation import (
    Choice,
    ClientDisconnected,
    Generation,
    Job,
    ready_batches,
    send_within,
    unless_disconnected,
)
from lmfleet.server.metrics import ReplicaMetrics
from lmfleet.server.protocol import (
    INT64_MIN,
    SYSTEM_FINGERPRINT,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerationRequest,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
    message_error,
    unsupported_fields,
)
from lmfleet.server.replica import Replica

logger = logging.getLogger(__name__)

router = APIRouter()

#: HTTP status a server logs when the client closed the connection first (nginx's)
_CLIENT_CLOSED = 499
#: JSON has no -inf; vLLM clamps the same way
_MIN_LOGPROB = -9999.0
#: template variables a client's chat_template_kwargs may not override ("limits" is
#: apply_chat_template's own keyword)
_RESERVED_TEMPLATE_KEYS = frozenset(
    {"messages", "tools", "add_generation_prompt", "chat_template", "documents", "limits"}
)
#: distinct unknown field names warned about and counted by name; later ones are "other"
_MAX_UNKNOWN_NAMES = 64


def _replica(request: Request) -> Replica:
    return request.app.state.replica


class UnknownFields:
    """Request fields lmfleet does not know: a warning the first time each name is
    seen and a counter per name. Names come from clients, so at most
    ``_MAX_UNKNOWN_NAMES`` get their own warning and label; later ones count as
    ``other``."""

    def __init__(self, metrics: ReplicaMetrics) -> None:
        self._metrics = metrics
        self._seen: set[str] = set()

    def note(self, names: Sequence[str], path: str) -> None:
        for name in dict.fromkeys(names):
            if name not in self._seen:
                if len(self._seen) >= _MAX_UNKNOWN_NAMES:
                    self._metrics.record_unknown_field("other")
                    continue
                self._seen.add(name)
                logger.warning(
                    "%s: ignoring the unknown request field %r (warned once; "
                    "lmfleet_request_unknown_fields_total counts it; "
                    "--strict-request-fields refuses such requests)",
                    path,
                    name,
                )
            self._metrics.record_unknown_field(name)


def _check_fields(request: Request, body: Any) -> None:
    """Ignore (and report) fields lmfleet does not know, or refuse them when strict."""
    unknown = body.unknown_fields()
    if not unknown:
        return
    if _replica(request).settings.strict_request_fields:
        name = unknown[0]
        raise ApiError(400, f"Unrecognized request argument supplied: {name}", param=name)
    request.app.state.unknown_fields.note(unknown, request.url.path)


# ---- models ---------------------------------------------------------------------------
def _card(replica: Replica, name: str) -> ModelCard:
    return ModelCard(id=name, root=replica.settings.model, max_model_len=replica.max_model_len)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    replica = _replica(request)
    return ModelList(data=[_card(replica, n) for n in replica.settings.served_model_names])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    replica = _replica(request)
    return _card(replica, replica.check_model(model_id))


# ---- chat completions -------------------------------------------------------------------
@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    replica = _replica(request)
    model = _check_request(request, replica, body)
    tok = replica.tokenizer
    prompt_ids = await _chat_prompt_ids(request, tok, body)
    aliases = {
        "max_tokens": body.max_tokens_field,
        "logprobs": "top_logprobs",
        "prompt": "messages",
    }
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    params = _sampling_params(body, body.max_new_tokens, logprobs, aliases)
    rid = _request_id(request, body, "chatcmpl")
    echo_id = request.headers.get("x-request-id", rid)
    gen = _start(replica, body, rid, [prompt_ids], params)
    fmt = _ChatFormat(rid, model, tok, gen)
    if body.stream:
        return await _stream(request, gen, fmt, body, aliases, echo_id)
    return await _answer(request, gen, fmt, aliases, echo_id)


async def _chat_prompt_ids(
    request: Request,
    tok: Tokenizer,
    body: ChatCompletionRequest | TokenizeRequest,
    *,
    add_special_tokens: bool = False,
) -> list[int]:
    """The conversation's prompt ids, the same for ``/v1/chat/completions`` and
    ``/tokenize``: the messages checked, the template rendered in the app's template
    pool (never on the event loop) within the render limits, then encoded (without
    BOS/EOS unless ``add_special_tokens``: the template writes its own).

    Tools are rendered whenever they are given: with ``tool_choice: "none"`` (the
    only choice a chat request may pair with tools) the model sees them, as in vLLM,
    but is not asked to call them."""
    if body.messages is None:  # TokenizeRequest's validator makes this unreachable
        raise ApiError(400, "messages is required", param="messages")
    bad = message_error(body.messages)
    if bad is not None:
        field, why = bad
        raise ApiError(400, why, param=field, code="invalid_value")
    template = body.chat_template
    sent = template is not None and not tok.is_named_template(template)
    if sent and not _replica(request).settings.trust_request_chat_template:
        names = ", ".join(repr(n) for n in tok.chat_template_names) or "none"
        raise ApiError(
            400,
            "chat templates sent in requests are refused: start the replica with "
            "--trust-request-chat-template to render them, or name one of the "
            f"model's own templates ({names})",
            param="chat_template",
            code="unsupported_parameter",
        )
    kwargs = {
        k: v for k, v in (body.chat_template_kwargs or {}).items()
        if k not in _RESERVED_TEMPLATE_KEYS
    }  # fmt: skip
    if body.documents is not None:
        kwargs["documents"] = body.documents
    work = functools.partial(
        _render_and_encode,
        tok,
        [m.for_template() for m in body.messages],
        add_special_tokens,
        add_generation_prompt=body.add_generation_prompt,
        tools=body.tools or None,
        chat_template=template,
        limits=request.app.state.template_limits,
        **kwargs,
    )
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app.state.template_pool, work)


def _render_and_encode(
    tok: Tokenizer, messages: list[dict[str, Any]], add_special_tokens: bool, **kwargs: Any
) -> list[int]:
    text = tok.apply_chat_template(messages, **kwargs)
    return tok.encode(text, add_special_tokens=add_special_tokens)


def template_limits(timeout_s: float, max_chars: int) -> RenderLimits:
    """The render limits of a replica's chat templates (``ConfigError`` if invalid)."""
    return RenderLimits(timeout_s=timeout_s, max_chars=max_chars)


# ---- completions ---------------------------------------------------------------------------
@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    replica = _replica(request)
    model = _check_request(request, replica, body)
    tok = replica.tokenizer
    prompts = body.prompts
    if not prompts:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    prompt_ids: list[list[int]] = []
    for i, p in enumerate(prompts):
        ids = tok.encode(p, add_special_tokens=body.add_special_tokens) if isinstance(p, str) else p
        if not ids:
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise ApiError(400, f"{where} must not be empty", param=where)
        prompt_ids.append(list(ids))
    aliases = {"messages": "prompt"}
    params = _sampling_params(body, body.max_tokens, body.logprobs, aliases)
    rid = _request_id(request, body, "cmpl")
    echo_id = request.headers.get("x-request-id", rid)
    gen = _start(replica, body, rid, prompt_ids, params)
    echo = [p if isinstance(p, str) else tok.decode(p) for p in prompts] if body.echo else None
    fmt = _CompletionFormat(rid, model, tok, gen, echo)
    if body.stream:
        return await _stream(request, gen, fmt, body, aliases, echo_id)
    return await _answer(request, gen, fmt, aliases, echo_id)


# ---- tokenize / detokenize ------------------------------------------------------------------
@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    replica = _replica(request)
    replica.check_model(body.model)
    _check_fields(request, body)
    tok = replica.tokenizer
    if body.messages is not None:
        ids = await _chat_prompt_ids(
            request, tok, body, add_special_tokens=bool(body.add_special_tokens)
        )
    else:
        add = True if body.add_special_tokens is None else body.add_special_tokens
        ids = tok.encode(body.prompt or "", add_special_tokens=add)
    return TokenizeResponse(
        count=len(ids),
        max_model_len=replica.max_model_len or 0,
        tokens=ids,
        token_strs=tok.convert_ids_to_tokens(ids) if body.return_token_strs else None,
    )


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    replica = _replica(request)
    replica.check_model(body.model)
    _check_fields(request, body)
    tok = replica.tokenizer
    for i, t in enumerate(body.tokens):
        if not 0 <= t < tok.vocab_size:
            raise ApiError(
                400,
                f"token id {t} is outside the vocabulary [0, {tok.vocab_size})",
                param=f"tokens[{i}]",
                code="invalid_value",
            )
    return DetokenizeResponse(prompt=tok.decode(body.tokens))


# ---- shared steps ---------------------------------------------------------------------------
def _check_request(request: Request, replica: Replica, body: GenerationRequest) -> str:
    model = replica.check_model(body.model)
    _check_fields(request, body)
    bad = unsupported_fields(body)
    if bad is not None:
        field, why = bad
        raise ApiError(400, why, param=field, code="unsupported_parameter")
    replica.check_accepting()
    return model


def _sampling_params(
    body: GenerationRequest,
    max_tokens: int | None,
    logprobs: int | None,
    aliases: dict[str, str],
) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=0 if body.top_k is None else body.top_k,
            min_p=0.0 if body.min_p is None else body.min_p,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=body.seed,
            stop=body.stop_list,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            include_stop_str_in_output=body.include_stop_str_in_output,
            logprobs=logprobs,
            skip_special_tokens=body.skip_special_tokens,
        )
    except InvalidSamplingParams as exc:
        raise rename_param(exc, aliases) from None


def _request_id(request: Request, body: GenerationRequest, prefix: str) -> str:
    """The response id (engine request ids add ``-{choice}``). A client's
    ``X-Request-Id`` is only echoed back: a retry carrying the same one must not clash."""
    return body.request_id or f"{prefix}-{uuid.uuid4().hex}"


def _start(
    replica: Replica,
    body: GenerationRequest,
    rid: str,
    prompts: list[list[int]],
    params: SamplingParams,
) -> Generation:
    """Admit (synchronously) and fan out: ``len(prompts) × n`` engine requests."""
    jobs = []
    for p, ids in enumerate(prompts):
        for i in range(body.n):
            index = p * body.n + i
            seeded = (
                params
                if params.seed is None or i == 0
                else _with_seed(params, copy_seed(params.seed, i))
            )
            jobs.append(Job(index, p, ids, seeded, f"{rid}-{index}"))
    ticket = replica.admit(len(jobs))
    engine = replica.engine
    if engine is None:  # admit() succeeds only when READY, so the engine exists
        ticket.release()
        raise ApiError(503, "the engine is not running", code="loading")
    return Generation(engine, jobs, ticket, replica.metrics, priority=body.priority)


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return replace(params, seed=seed)


def copy_seed(seed: int, i: int) -> int:
    """The seed of copy ``i`` of ``n``: ``seed + i``, wrapped into the signed 64-bit
    range (``2**63 - 1`` is followed by ``-2**63``), so every copy's seed is valid."""
    return (seed + i - INT64_MIN) % 2**64 + INT64_MIN


async def _answer(
    request: Request,
    gen: Generation,
    fmt: _ChatFormat | _CompletionFormat,
    aliases: dict[str, str],
    echo_id: str,
) -> Response:
    """A non-streaming answer: held until complete, or with early headers when the
    request asks for them (``server/early_headers.py``)."""
    replica = _replica(request)
    retry_after_s = replica.settings.retry_after_s

    async def response() -> dict[str, Any]:
        await _run_to_end(gen, aliases, retry_after_s)
        return fmt.response().model_dump(mode="json")

    if not early_headers.requested(request):
        try:
            content = await unless_disconnected(request, response())
        except ClientDisconnected:
            logger.info("client disconnected; request aborted")
            raise _Gone from None
        finally:
            gen.close()
        return JSONResponse(content, headers={"X-Request-Id": echo_id})
    try:
        work = await early_headers.started(response())
    except BaseException:
        gen.close()
        raise

    def fail(exc: Exception) -> ApiError:
        err = answer_for(exc, retry_after_s=retry_after_s)
        if err.status >= 500:
            unexpected = not isinstance(exc, LmfleetError | ApiError)
            where = f"{request.method} {request.url.path}"
            logger.error("%s failed after early headers: %s", where, exc, exc_info=unexpected)
        elif err.status != 429:
            replica.metrics.record_rejected("invalid")
        return err

    keepalive_s = replica.settings.early_headers_keepalive_s
    return early_headers.EarlyJSONResponse(work, fail, gen.close, echo_id, keepalive_s)


async def _run_to_end(gen: Generation, aliases: dict[str, str], retry_after_s: int) -> None:
    """Every choice to its end; raises what the request failed with (503 ``aborted``
    when the server cut it short)."""
    try:
        await gen.run_to_end()
    except RequestRejected as exc:
        raise rename_param(exc, aliases) from None
    if any(c.finish_reason is FinishReason.ABORT for c in gen.choices):
        raise _cut_short(retry_after_s)


def _cut_short(retry_after_s: int) -> ApiError:
    """A request the server aborted before it finished (the drain deadline)."""
    return ApiError(
        503,
        "the server aborted this request before it finished (the replica is shutting "
        "down); retry it, on another replica if need be",
        code="aborted",
        headers={"Retry-After": str(retry_after_s)},
    )


def _is_cut(out: RequestOutput) -> bool:
    return out.finished and out.finish_reason is FinishReason.ABORT


class _Gone(ApiError):
    def __init__(self) -> None:
        super().__init__(_CLIENT_CLOSED, "the client closed the connection", code="client_closed")


# ---- streaming ------------------------------------------------------------------------------
class _SSEResponse(Response):
    """Server-sent events from ``chunks``, as lean as ASGI allows: no task group and
    one ``send`` per batch of chunks. A watcher task cancels the stream when the
    client disconnects (uvicorn drops writes to a closed connection silently, so
    nothing else would stop it). ``on_close`` runs synchronously however the stream
    ends (complete, client gone, stalled, server shutting down).

    A client that stops reading makes the server's ``send`` wait (uvicorn's write
    flow control) and the stream stops pulling outputs. If a write waits longer
    than ``write_timeout_s``, the request is aborted (its engine slot and admission
    ticket freed) and the connection closed unfinished: what a stalled stream holds
    is bounded by the socket buffers plus that many seconds of output."""

    media_type = "text/event-stream"

    def __init__(
        self,
        chunks: AsyncIterator[str],
        on_close: Callable[[], None],
        rid: str,
        write_timeout_s: float,
    ):
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Request-Id": rid})
        self._chunks = chunks
        self._on_close = on_close
        self._rid = rid
        self._write_timeout_s = write_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        gone = False
        timeout = self._write_timeout_s

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            if task is not None and not gone:
                gone = True
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
            sent = await send_within(send, start, timeout)
            if sent:
                async for text in self._chunks:
                    body = {"type": "http.response.body", "body": text.encode(), "more_body": True}
                    sent = await send_within(send, body, timeout)
                    if not sent:
                        break
            if sent:
                gone = True  # complete: the disconnect that follows is not the client leaving
                end = {"type": "http.response.body", "body": b"", "more_body": False}
                sent = await send_within(send, end, timeout)
            if not sent:
                logger.warning(
                    "stream %s: the client took no data for %g s; request aborted",
                    self._rid,
                    timeout,
                )
        except asyncio.CancelledError:
            if not gone or task is None or task.uncancel() > 0:
                raise
            logger.info("client disconnected; request aborted")
        finally:
            watcher.cancel()
            self._on_close()


def _sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else _dumps(payload)
    return f"data: {data}\n\n"


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"))


async def _stream(
    request: Request,
    gen: Generation,
    fmt: _ChatFormat | _CompletionFormat,
    body_req: GenerationRequest,
    aliases: dict[str, str],
    echo_id: str,
) -> Response:
    """Wait for the first output (so a request the engine refuses is a plain HTTP
    error), then stream the rest."""
    events = gen.events()
    try:
        first = await unless_disconnected(request, anext(events))
    except ClientDisconnected:
        gen.close()
        raise _Gone from None
    except RequestRejected as exc:
        gen.close()
        raise rename_param(exc, aliases) from None
    except BaseException:
        gen.close()
        raise

    options = body_req.stream_options
    continuous = bool(options and options.continuous_usage_stats)
    settings = _replica(request).settings

    def emit(choice: Choice, out: RequestOutput) -> str | None:
        if not continuous:
            return fmt.sse(choice, out)
        chunk = fmt.chunk(choice, out)
        if chunk is None:
            return None
        chunk.usage = _usage(gen)  # vLLM's extra: usage so far on every chunk
        return _sse(chunk)

    def emit_all(batch: Sequence[tuple[Choice, RequestOutput]]) -> tuple[str, bool]:
        """The batch's events, and whether the server cut the stream short: then its
        last delta is sent unfinished, followed by an error event (which the openai
        client raises as ``APIError``) and ``[DONE]``."""
        parts: list[str] = []
        for choice, out in batch:
            if _is_cut(out):
                text = emit(choice, replace(out, finished=False, finish_reason=None))
                cut = _cut_short(settings.retry_after_s)
                logger.warning("stream %s: %s", fmt.rid, cut.message)
                parts += [text or "", _sse(cut.body()), "data: [DONE]\n\n"]
                return "".join(parts), True
            text = emit(choice, out)
            if text is not None:
                parts.append(text)
        return "".join(parts), False

    def closing() -> str:
        usage = _sse(fmt.usage_chunk()) if body_req.include_usage else ""
        return f"{usage}data: [DONE]\n\n"

    async def body() -> AsyncIterator[str]:
        # one write per batch of ready deltas; the last one carries usage and [DONE]
        try:
            text, cut = emit_all([first])
            head = "".join([*(_sse(c) for c in fmt.opening()), text])
            if cut or gen.done:
                yield head if cut else head + closing()
                return
            if head:
                yield head
            async for batch in ready_batches(events):
                text, cut = emit_all(batch)
                if cut:
                    yield text
                    return
                if gen.done:
                    text += closing()
                if text:
                    yield text
            if not gen.done:  # not expected: the engine ends a stream with a finished output
                yield "data: [DONE]\n\n"
        except LmfleetError as exc:  # mid-stream: the status line is already sent
            logger.warning("stream %s failed: %s", fmt.rid, exc)
            yield _sse(from_lmfleet(exc).body()) + "data: [DONE]\n\n"

    return _SSEResponse(body(), gen.close, echo_id, settings.stream_write_timeout_s)


# ---- formatting -------------------------------------------------------------------------------
def _chunk_head(rid: str, obj: str, created: int, model: str) -> str:
    """``data: {"id":...,"choices":[{"index":`` — the fixed start of a request's
    one-choice stream chunks, in the field order of the pydantic chunk models."""
    fields = _dumps({"id": rid, "object": obj, "created": created, "model": model})
    return f'data: {fields[:-1]},"choices":[{{"index":'


def _finish(out: RequestOutput) -> str:
    """``"finish_reason":...,"stop_reason":...`` of a delta (null until the last)."""
    if not out.finished:
        return '"finish_reason":null,"stop_reason":null'
    reason, stop = json.dumps(str(out.finish_reason)), json.dumps(out.stop_reason)
    return f'"finish_reason":{reason},"stop_reason":{stop}'


def _finite(x: float) -> float:
    return x if math.isfinite(x) else _MIN_LOGPROB


def _usage(gen: Generation) -> Usage:
    prompt = gen.prompt_tokens()
    completion = gen.completion_tokens()
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=gen.cached_tokens()),
    )


class _StreamFormat:
    """What both stream formats share: one delta's event from a template."""

    _head: str
    _tail: str  # what follows the choice: usage (chat only) and system_fingerprint

    def chunk(self, choice: Choice, out: RequestOutput) -> BaseModel | None:
        raise NotImplementedError

    def _content(self, out: RequestOutput) -> str:
        """The choice's content field, e.g. ``"text":"..."``."""
        raise NotImplementedError

    def sse(self, choice: Choice, out: RequestOutput) -> str | None:
        """The event of one delta: :meth:`chunk` serialized, from a template unless
        it carries logprobs."""
        if out.logprobs:
            chunk = self.chunk(choice, out)
            return None if chunk is None else _sse(chunk)
        if not out.text and not out.finished:
            return None
        return (
            f'{self._head}{choice.index},{self._content(out)},"logprobs":null,{_finish(out)}'
            f"{self._tail}"
        )


class _ChatFormat(_StreamFormat):
    def __init__(self, rid: str, model: str, tok: Tokenizer, gen: Generation) -> None:
        self.rid, self.model, self.tok, self.gen = rid, model, tok, gen
        self.created = int(time.time())
        self._head = _chunk_head(rid, "chat.completion.chunk", self.created, model)
        self._tail = f'}}],"usage":null,"system_fingerprint":{json.dumps(SYSTEM_FINGERPRINT)}}}\n\n'

    def _content(self, out: RequestOutput) -> str:
        delta = f'{{"content":{json.dumps(out.text)}}}' if out.text else "{}"
        return f'"delta":{delta}'

    def _logprobs(self, items: Sequence[TokenLogprobs] | None) -> ChoiceLogprobs | None:
        if items is None:
            return None
        return ChoiceLogprobs(content=[self._token(t) for t in items])

    def _token(self, t: TokenLogprobs) -> TokenLogprob:
        text = self.tok.token_text(t.sampled.token_id)
        return TokenLogprob(
            token=text,
            logprob=_finite(t.sampled.logprob),
            bytes=list(text.encode()),
            top_logprobs=[self._top(lp.token_id, lp.logprob) for lp in t.top],
        )

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.tok.token_text(token_id)
        return TopLogprob(token=text, logprob=_finite(logprob), bytes=list(text.encode()))

    def response(self) -> ChatCompletionResponse:
        wants_lp = self.gen.choices[0].job.params.logprobs is not None
        return ChatCompletionResponse(
            id=self.rid,
            model=self.model,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=AssistantMessage(content="".join(c.text)),
                    logprobs=self._logprobs(c.logprobs if wants_lp else None),
                    finish_reason=str(c.finish_reason),
                    stop_reason=c.stop_reason,
                )
                for c in self.gen.choices
            ],
            usage=_usage(self.gen),
        )

    def opening(self) -> list[ChatCompletionChunk]:
        return [
            ChatCompletionChunk(
                id=self.rid,
                created=self.created,
                model=self.model,
                choices=[ChatChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))],
            )
            for c in self.gen.choices
        ]  # fmt: skip

    def chunk(self, choice: Choice, out: RequestOutput) -> ChatCompletionChunk | None:
        if not out.text and not out.finished and not out.logprobs:
            return None
        return ChatCompletionChunk(
            id=self.rid,
            created=self.created,
            model=self.model,
            choices=[
                ChatChunkChoice(
                    index=choice.index,
                    delta=DeltaMessage(content=out.text or None),
                    logprobs=self._logprobs(out.logprobs),
                    finish_reason=str(out.finish_reason) if out.finished else None,
                    stop_reason=out.stop_reason if out.finished else None,
                )
            ],
        )

    def usage_chunk(self) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.rid, created=self.created, model=self.model, choices=[], usage=_usage(self.gen)
        )


class _CompletionFormat(_StreamFormat):
    def __init__(
        self, rid: str, model: str, tok: Tokenizer, gen: Generation, echo: list[str] | None
    ) -> None:
        self.rid, self.model, self.tok, self.gen, self.echo = rid, model, tok, gen, echo
        self._offsets: dict[int, int] = {}  # choice index -> text offset of the next token
        self.created = int(time.time())
        self._head = _chunk_head(rid, "text_completion", self.created, model)
        self._tail = f'}}],"system_fingerprint":{json.dumps(SYSTEM_FINGERPRINT)}}}\n\n'

    def _content(self, out: RequestOutput) -> str:
        return f'"text":{json.dumps(out.text)}'

    def _prefix(self, choice: Choice) -> str:
        return self.echo[choice.job.prompt_index] if self.echo is not None else ""

    def _logprobs(
        self, choice: Choice, items: Sequence[TokenLogprobs] | None
    ) -> CompletionLogprobs | None:
        if items is None:
            return None
        out = CompletionLogprobs()
        offset = self._offsets.get(choice.index, len(self._prefix(choice)))
        for t in items:
            text = self.tok.token_text(t.sampled.token_id)
            top = {self.tok.token_text(lp.token_id): _finite(lp.logprob) for lp in t.top}
            top.setdefault(text, _finite(t.sampled.logprob))
            out.tokens.append(text)
            out.token_logprobs.append(_finite(t.sampled.logprob))
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(text)
        self._offsets[choice.index] = offset
        return out

    def response(self) -> CompletionResponse:
        choices = []
        for c in self.gen.choices:
            lp = self._logprobs(c, c.logprobs) if c.job.params.logprobs is not None else None
            choices.append(
                CompletionChoice(
                    index=c.index,
                    text=self._prefix(c) + "".join(c.text),
                    logprobs=lp,
                    finish_reason=str(c.finish_reason),
                    stop_reason=c.stop_reason,
                )
            )
        return CompletionResponse(
            id=self.rid, model=self.model, choices=choices, usage=_usage(self.gen)
        )

    def opening(self) -> list[CompletionResponse]:
        if self.echo is None:
            return []
        return [
            CompletionResponse(
                id=self.rid,
                created=self.created,
                model=self.model,
                choices=[CompletionChoice(index=c.index, text=self._prefix(c))],
            )
            for c in self.gen.choices
        ]

    def chunk(self, choice: Choice, out: RequestOutput) -> CompletionResponse | None:
        if not out.text and not out.finished and not out.logprobs:
            return None
        return CompletionResponse(
            id=self.rid,
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(
                    index=choice.index,
                    text=out.text,
                    logprobs=self._logprobs(choice, out.logprobs),
                    finish_reason=str(out.finish_reason) if out.finished else None,
                    stop_reason=out.stop_reason if out.finished else None,
                )
            ],
        )

    def usage_chunk(self) -> CompletionResponse:
        return CompletionResponse(
            id=self.rid, created=self.created, model=self.model, choices=[], usage=_usage(self.gen)
        )
