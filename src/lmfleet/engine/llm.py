"""The offline API: ``LLM(model).generate(prompts, SamplingParams(...))``.

Runs the engine core in the calling thread until every prompt is done. Text
prompts need a tokenizer in the model directory; token-id prompts do not.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence

from tqdm import tqdm

from lmfleet.engine.config import EngineConfig, engine_config
from lmfleet.engine.core import EngineCore
from lmfleet.engine.faults import fault_injector
from lmfleet.engine.output_processor import OutputProcessor
from lmfleet.engine.request import FinishReason, Request, RequestOutput, SamplingParams
from lmfleet.engine.tokenizer import load_tokenizer
from lmfleet.errors import RequestRejected

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]


class LLM:
    def __init__(self, model: str | EngineConfig, *, progress: bool = True, **settings: object):
        self.config = model if isinstance(model, EngineConfig) else engine_config(model, **settings)
        self.core = EngineCore(self.config, progress=progress)
        self.tokenizer = load_tokenizer(self.core.model_dir, self.config.model.tokenizer)
        self.processor = OutputProcessor(
            self.tokenizer, fault_injector(self.config.model.fault_injection)
        )
        self._ids = itertools.count()

    @property
    def eos_token_ids(self) -> frozenset[int]:
        if self.tokenizer is not None:
            return self.tokenizer.eos_token_ids
        return self.core.eos_token_ids

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestRejected(
                    "text prompts need a tokenizer.json in the model directory", param="prompt"
                )
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: Sequence[int] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        n = len(prompts)
        params = sampling_params or SamplingParams()
        params_list = [params] * n if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != n:
            raise ValueError(f"{len(params_list)} sampling params for {n} prompts")
        ids: list[str] = []
        prompt_ids: dict[str, list[int]] = {}
        try:
            for i, (p, sp) in enumerate(zip(prompts, params_list, strict=True)):
                rid = self._add(p, sp, priority[i] if priority else 0)
                ids.append(rid)
                prompt_ids[rid] = self.core.scheduler.requests[rid].prompt_token_ids
        except Exception:
            self.core.abort(ids)  # all or nothing: leave no half-submitted batch behind
            for rid in ids:
                self.processor.drop(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=n, desc="generating", disable=not use_tqdm, unit="req")
        while self.core.has_unfinished():
            processed = self.processor.process(self.core.step())
            if processed.to_abort:
                self.core.abort(processed.to_abort)
            for out in processed.outputs:
                results[out.request_id] = out
                bar.update(1)
            for rid, error in processed.failed:  # the others go on
                results[rid] = _failed_output(rid, prompt_ids[rid], error)
                bar.update(1)
        bar.close()
        return [results[i] for i in ids]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        **kwargs: object,
    ) -> list[RequestOutput]:
        if self.tokenizer is None:
            raise RequestRejected("chat needs a tokenizer in the model directory", param="messages")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, **kwargs)  # type: ignore[arg-type]

    def _add(self, prompt: Prompt, params: SamplingParams, priority: int) -> str:
        rid = str(next(self._ids))
        token_ids = self.encode(prompt)
        now = time.monotonic()
        request = Request(
            rid,
            token_ids,
            params,
            eos_token_ids=self.eos_token_ids,
            priority=priority,
            arrival_time=now,
        )
        self.core.add_request(request)
        self.processor.add_request(
            rid,
            token_ids,
            params,
            arrival_time=now,
            delta=False,
            prompt=prompt if isinstance(prompt, str) else None,
        )
        return rid


def _failed_output(request_id: str, prompt_token_ids: list[int], error: str) -> RequestOutput:
    """What ``generate`` returns for a request that failed alone (see ``RequestFailed``)."""
    return RequestOutput(
        request_id=request_id,
        prompt_token_ids=prompt_token_ids,
        text="",
        token_ids=[],
        finished=True,
        finish_reason=FinishReason.ERROR,
        error=error,
    )
