"""What a replica's answer means to the proxy, as plain functions and constants: a
"not now" that another replica may take (429, 503), a replica that broke while
serving the request (``engine_dead``), a late error after early headers, and which
request bodies are JSON. See docs/gateway.md, "A request's way through" and
"Non-streaming answers and first_byte_s".
"""

from __future__ import annotations

import json

#: replica answers that mean "not now" (drain, backpressure): safe to try elsewhere
RETRY_STATUSES = frozenset({429, 503})
#: error codes with which a replica says it broke while serving the request
BROKE_CODES = frozenset({"engine_dead"})
#: asks the replica for its response headers before a non-streaming answer is done
#: (see docs/gateway.md, "Non-streaming answers and first_byte_s"); a replica that
#: does so echoes it in its response headers
EARLY_HEADERS = "x-lmfleet-early-headers"
#: a replica's answer header: "0" when the request never reached its engine (refused
#: at admission), so even an ``engine_dead`` answer is safe to try elsewhere
ADMITTED_HEADER = "x-lmfleet-admitted"
JSON_ONLY = "The request body must be a JSON object, sent with 'Content-Type: application/json'"


def error_code(body: bytes) -> str | None:
    """``error.code`` of an OpenAI-format error body, if it is one."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    err = obj.get("error") if isinstance(obj, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return code if isinstance(code, str) else None


def late_status(body: bytes) -> tuple[int, bytes] | None:
    """An error a replica reported after sending early headers (status 200): the
    body ``{"error": {...}, "status": 500}`` → (500, the error body without
    ``status``); None for an answer that is not such an error."""
    if not body.lstrip().startswith(b'{"error"'):
        return None
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    status = obj.get("status") if isinstance(obj, dict) else None
    if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
        return None
    return status, json.dumps({"error": obj.get("error")}).encode()


def is_json(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and
                                          mime.endswith("+json"))  # fmt: skip
