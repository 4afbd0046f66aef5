"""Turns the core's token outputs into user-facing ``RequestOutput``s.

Detokenization and stop strings live here, outside the engine core, so the core
stays "token ids in, token ids out". When a stop string matches, the processor
reports the request id so the caller aborts it in the core.

Each request is processed on its own: one whose detokenization or stop matching
raises (or whose core output says it failed) is reported in
:attr:`ProcessedOutputs.failed` and dropped, and the others go on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from lmfleet.engine.faults import OUTPUT, FaultInjector
from lmfleet.engine.outputs import EngineCoreOutput, describe_error
from lmfleet.engine.request import (
    FinishReason,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    TokenLogprobs,
)
from lmfleet.engine.tokenizer import IncrementalDetokenizer, StopChecker, Tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _State:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    delta: bool
    metrics: RequestMetrics
    prompt: str | None
    detok: IncrementalDetokenizer | None
    stop: StopChecker | None
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    # what was already handed out in delta mode (text counts list entries)
    sent_tokens: int = 0
    sent_text: int = 0
    sent_logprobs: int = 0


@dataclass(slots=True)
class ProcessedOutputs:
    outputs: list[RequestOutput]
    #: requests that ended on a stop string, or failed here: abort them in the core
    to_abort: list[str]
    #: requests that failed (request id, error): here, or in the core
    failed: list[tuple[str, str]] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, faults: FaultInjector | None = None) -> None:
        self.tokenizer = tokenizer
        self.faults = faults
        self._states: dict[str, _State] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        arrival_time: float,
        delta: bool,
        prompt: str | None = None,
    ) -> None:
        tok = self.tokenizer
        if params.stop and tok is None:
            raise ValueError("stop strings need a tokenizer")
        detok = (
            IncrementalDetokenizer(tok, prompt_token_ids, params.skip_special_tokens)
            if tok is not None
            else None
        )
        stop = StopChecker(params.stop, params.include_stop_str_in_output) if params.stop else None
        self._states[request_id] = _State(
            request_id,
            prompt_token_ids,
            params,
            delta,
            RequestMetrics(arrival_time=arrival_time),
            prompt,
            detok,
            stop,
            logprobs=[] if params.logprobs is not None else None,
        )

    def drop(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def process(self, core_outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        now = time.monotonic()
        result = ProcessedOutputs([], [])
        for co in core_outputs:
            state = self._states.get(co.request_id)
            if state is None:
                continue  # dropped by the caller (e.g. a stop string already ended it)
            if co.error is not None:  # it failed in the core, which has ended it
                del self._states[co.request_id]
                result.failed.append((co.request_id, co.error))
                continue
            try:
                out = self._process_one(state, co, now)
            except Exception as exc:
                logger.exception("request %s: output processing failed", co.request_id)
                self._states.pop(co.request_id, None)
                result.failed.append((co.request_id, describe_error(exc)))
                if not co.finished:
                    result.to_abort.append(co.request_id)
                continue
            if out is None:
                continue
            if out.finished and not co.finished:
                result.to_abort.append(co.request_id)
            result.outputs.append(out)
        return result

    def _process_one(self, state: _State, co: EngineCoreOutput, now: float) -> RequestOutput | None:
        """One request's core output as a ``RequestOutput`` (None while a non-delta
        request runs); the state is dropped once the request finishes."""
        if self.faults is not None:
            self.faults.check(OUTPUT, co.request_id, len(state.token_ids))
        finish, stop_reason = self._absorb(state, co, now)
        if finish is None and not state.delta:
            return None
        out = self._emit(state, co, finish, stop_reason)
        if finish is not None:
            state.metrics.finished_time = now
            del self._states[co.request_id]
        return out

    def _absorb(self, state: _State, co: EngineCoreOutput, now: float):
        """Add one core output to the state; returns (finish reason, stop reason)."""
        if co.first_scheduled_time is not None:
            state.metrics.first_scheduled_time = co.first_scheduled_time
        if co.new_token_ids:
            m = state.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            state.token_ids.extend(co.new_token_ids)
            if state.logprobs is not None and co.new_logprobs:
                state.logprobs.extend(co.new_logprobs)
        finish: FinishReason | None = co.finish_reason
        stop_reason: str | int | None = co.stop_reason
        if state.detok is None:
            return finish, stop_reason
        piece = state.detok.add(co.new_token_ids) if co.new_token_ids else ""
        if finish is not None:
            piece += state.detok.finish()
        if state.stop is not None:
            emit, matched = state.stop.feed(piece)
            if matched is not None:
                state.text.append(emit)
                return FinishReason.STOP, matched
            if finish is not None:
                emit += state.stop.flush()
            piece = emit
        state.text.append(piece)
        return finish, stop_reason

    def _emit(self, state: _State, co: EngineCoreOutput, finish, stop_reason) -> RequestOutput:
        tokens = state.token_ids
        logprobs = state.logprobs
        if state.delta:
            text_out = "".join(state.text[state.sent_text :])
            tokens_out = tokens[state.sent_tokens :]
            lp_out = logprobs[state.sent_logprobs :] if logprobs is not None else None
            state.sent_text = len(state.text)
            state.sent_tokens = len(tokens)
            state.sent_logprobs = len(logprobs) if logprobs is not None else 0
        else:
            text_out, tokens_out, lp_out = "".join(state.text), list(tokens), logprobs
        return RequestOutput(
            request_id=state.request_id,
            prompt_token_ids=state.prompt_token_ids,
            text=text_out,
            token_ids=tokens_out,
            finished=finish is not None,
            delta=state.delta,
            logprobs=lp_out,
            finish_reason=finish,
            stop_reason=stop_reason,
            num_cached_tokens=co.num_cached_tokens,
            metrics=state.metrics,
        )
