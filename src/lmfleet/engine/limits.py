"""What a request may ask of one engine, and the check of it.

The check reads only limits fixed at load time, so the async engine runs it in the
caller's task (a rejection is raised before anything is queued, in thread and
process mode alike) and the core runs it again on arrival.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmfleet.engine.request import Request
from lmfleet.errors import InvalidSamplingParams, PromptTooLong, RequestRejected


@dataclass(frozen=True, slots=True)
class EngineLimits:
    max_model_len: int
    vocab_size: int
    #: tokens the whole KV cache holds
    kv_capacity_tokens: int


def check_request(request: Request, limits: EngineLimits) -> None:
    """Raise a ``RequestRejected`` subclass if the request can never be served."""
    n = request.num_prompt_tokens
    max_len = limits.max_model_len
    if n == 0:
        raise RequestRejected("the prompt is empty", param="prompt")
    if n >= max_len:
        raise PromptTooLong(
            f"This model's maximum context length is {max_len} tokens; "
            f"the prompt has {n} tokens. Shorten the prompt."
        )
    max_tokens = request.sampling_params.max_tokens
    if max_tokens is not None and n + max_tokens > max_len:
        raise InvalidSamplingParams(
            f"max_tokens is too large: the prompt has {n} tokens and this model's "
            f"maximum context length is {max_len}, so at most "
            f"{max_len - n} tokens can be generated",
            param="max_tokens",
        )
    capacity = limits.kv_capacity_tokens
    needed = n + (max_tokens if max_tokens is not None else 1)
    if needed > capacity:
        raise PromptTooLong(
            f"the request needs {needed} tokens of KV cache but the whole cache holds "
            f"{capacity}; shorten the prompt, lower max_tokens or raise the KV cache budget"
        )
    vocab = limits.vocab_size
    bad = next((t for t in request.prompt_token_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise RequestRejected(
            f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt"
        )
