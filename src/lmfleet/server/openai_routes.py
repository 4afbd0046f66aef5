"""The OpenAI-compatible routes: chat completions, completions, models, tokenize.

Each generation route does the same five things: check the model name and the
fields lmfleet cannot honour (400/404), build the prompt token ids and the sampling
parameters (400 naming the field), admit the request (503/429, synchronous), fan it
out (:class:`~lmfleet.server.generation.Generation`), then either collect the
choices or stream them as server-sent events ending in ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
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

from lmfleet.engine.request import RequestOutput, SamplingParams, TokenLogprobs
from lmfleet.engine.tokenizer import Tokenizer
from lmfleet.errors import InvalidSamplingParams, LmfleetError, RequestRejected
from lmfleet.server.errors import ApiError, from_lmfleet, rename_param
from lmfleet.server.generation import (
    Choice,
    ClientDisconnected,
    Generation,
    Job,
    ready_batches,
    unless_disconnected,
)
from lmfleet.server.protocol import (
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
    unsupported_fields,
)
from lmfleet.server.replica import Replica

logger = logging.getLogger(__name__)

router = APIRouter()

#: HTTP status a server logs when the client closed the connection first (nginx's)
_CLIENT_CLOSED = 499
#: JSON has no -inf; vLLM clamps the same way
_MIN_LOGPROB = -9999.0
#: template variables a client's chat_template_kwargs may not override
_RESERVED_TEMPLATE_KEYS = frozenset(
    {"messages", "tools", "add_generation_prompt", "chat_template", "documents"}
)


def _replica(request: Request) -> Replica:
    return request.app.state.replica


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
    model = _check_request(replica, body)
    tok = replica.tokenizer
    messages = [m.for_template() for m in body.messages]
    kwargs = {
        k: v for k, v in (body.chat_template_kwargs or {}).items()
        if k not in _RESERVED_TEMPLATE_KEYS
    }  # fmt: skip
    if body.documents is not None:
        kwargs["documents"] = body.documents
    prompt_ids = tok.encode_chat(
        messages,
        add_generation_prompt=body.add_generation_prompt,
        tools=body.tools if body.tool_choice != "none" else None,
        chat_template=body.chat_template,
        **kwargs,
    )
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
    await _collect(request, gen, aliases)
    return _json(fmt.response(), echo_id)


# ---- completions ---------------------------------------------------------------------------
@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    replica = _replica(request)
    model = _check_request(replica, body)
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
    await _collect(request, gen, aliases)
    return _json(fmt.response(), echo_id)


# ---- tokenize / detokenize ------------------------------------------------------------------
@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    replica = _replica(request)
    replica.check_model(body.model)
    tok = replica.tokenizer
    if body.messages is not None:
        kwargs = {
            k: v for k, v in (body.chat_template_kwargs or {}).items()
            if k not in _RESERVED_TEMPLATE_KEYS
        }  # fmt: skip
        text = tok.apply_chat_template(
            [m.for_template() for m in body.messages],
            add_generation_prompt=body.add_generation_prompt,
            tools=body.tools,
            chat_template=body.chat_template,
            **kwargs,
        )
        ids = tok.encode(text, add_special_tokens=bool(body.add_special_tokens))
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
def _check_request(replica: Replica, body: GenerationRequest) -> str:
    model = replica.check_model(body.model)
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
                params if params.seed is None or i == 0 else _with_seed(params, params.seed + i)
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


async def _collect(request: Request, gen: Generation, aliases: dict[str, str]) -> None:
    try:
        await unless_disconnected(request, gen.run_to_end())
    except ClientDisconnected:
        logger.info("client disconnected; request aborted")
        raise _Gone from None
    except RequestRejected as exc:
        raise rename_param(exc, aliases) from None
    finally:
        gen.close()


def _json(model: BaseModel, rid: str) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), headers={"X-Request-Id": rid})


class _Gone(ApiError):
    def __init__(self) -> None:
        super().__init__(_CLIENT_CLOSED, "the client closed the connection", code="client_closed")


# ---- streaming ------------------------------------------------------------------------------
class _SSEResponse(Response):
    """Server-sent events from ``chunks``, as lean as ASGI allows: no task group and
    one ``send`` per batch of chunks. A watcher task cancels the stream when the
    client disconnects (uvicorn drops writes to a closed connection silently, so
    nothing else would stop it). ``on_close`` runs synchronously however the stream
    ends (complete, client gone, server shutting down)."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[str], on_close: Callable[[], None], rid: str):
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Request-Id": rid})
        self._chunks = chunks
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            if task is not None and not gone:
                gone = True
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for text in self._chunks:
                await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
            gone = True  # complete: the disconnect that follows is not the client leaving
            await send({"type": "http.response.body", "body": b"", "more_body": False})
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

    def emit(choice: Choice, out: RequestOutput) -> str | None:
        if not continuous:
            return fmt.sse(choice, out)
        chunk = fmt.chunk(choice, out)
        if chunk is None:
            return None
        chunk.usage = _usage(gen)  # vLLM's extra: usage so far on every chunk
        return _sse(chunk)

    def closing() -> str:
        usage = _sse(fmt.usage_chunk()) if body_req.include_usage else ""
        return f"{usage}data: [DONE]\n\n"

    async def body() -> AsyncIterator[str]:
        # one write per batch of ready deltas; the last one carries usage and [DONE]
        try:
            head = "".join([*(_sse(c) for c in fmt.opening()), emit(*first) or ""])
            if gen.done:
                yield head + closing()
                return
            if head:
                yield head
            async for batch in ready_batches(events):
                text = "".join([t for t in (emit(c, o) for c, o in batch) if t is not None])
                if gen.done:
                    text += closing()
                if text:
                    yield text
            if not gen.done:  # not expected: the engine ends a stream with a finished output
                yield "data: [DONE]\n\n"
        except LmfleetError as exc:  # mid-stream: the status line is already sent
            logger.warning("stream %s failed: %s", fmt.rid, exc)
            yield _sse(from_lmfleet(exc).body()) + "data: [DONE]\n\n"

    return _SSEResponse(body(), gen.close, echo_id)


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
            '}],"usage":null,"system_fingerprint":null}\n\n'
        )


class _ChatFormat(_StreamFormat):
    def __init__(self, rid: str, model: str, tok: Tokenizer, gen: Generation) -> None:
        self.rid, self.model, self.tok, self.gen = rid, model, tok, gen
        self.created = int(time.time())
        self._head = _chunk_head(rid, "chat.completion.chunk", self.created, model)

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
