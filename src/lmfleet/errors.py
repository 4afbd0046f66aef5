"""One error hierarchy for the whole package.

Every exception lmfleet raises on purpose derives from :class:`LmfleetError`. Each
server maps these to HTTP status codes in one place. The docstring of each class
says whether the condition is recoverable (the process keeps serving others).
"""

from __future__ import annotations


class LmfleetError(Exception):
    """Base class of lmfleet's own errors."""


class ConfigError(LmfleetError):
    """A configuration value is invalid. Not recoverable for the component being built."""


class ModelLoadError(LmfleetError):
    """A model directory is missing a file, has a corrupt file, or an unsupported
    architecture. The message names the file. Not recoverable for that model."""


class RequestRejected(LmfleetError):
    """A single request cannot be served as asked. Recoverable: only this request fails."""

    #: machine-readable error code, used in OpenAI-format error bodies
    code: str = "invalid_request"
    #: the offending parameter, when there is one
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class PromptTooLong(RequestRejected):
    """The prompt (plus the tokens asked for) exceeds the model's context length."""

    code = "context_length_exceeded"
    param = "messages"


class InvalidSamplingParams(RequestRejected):
    """A sampling parameter is out of range or of the wrong kind."""

    code = "invalid_parameter"


class QueueFull(RequestRejected):
    """Too many requests are waiting or running; retry later."""

    code = "queue_full"


class DuplicateRequestId(RequestRejected):
    """A request id that is already in flight was submitted again."""

    code = "duplicate_request_id"


class RequestFailed(LmfleetError):
    """The engine hit an error while handling one request's own inputs (sampler setup,
    penalties, logprobs, stop checks, detokenization): that request ends, its KV blocks
    are freed. Recoverable: the engine keeps serving every other request. Servers map
    it to 500 for this request alone."""

    code: str = "request_failed"


class EngineBusy(LmfleetError):
    """An operation that needs an idle engine (sleep) found requests in flight.
    Recoverable: retry after draining."""


class EngineDead(LmfleetError):
    """The engine loop stopped after an unexpected error. Not recoverable: the
    process should be restarted (readiness turns false)."""
