"""What the replica server and the gateway share, and neither may import from the
other (the gateway never imports the engine, which the server's modules do): the
uvicorn settings of the hot path and the latency histogram buckets, so that a
replica's and the gateway's TTFT, TPOT and end-to-end histograms line up bucket for
bucket.
"""

from __future__ import annotations

import importlib.util


def fastest(native: str, fallback: str) -> str:
    """``native`` (uvloop, httptools: C implementations, several times cheaper per
    streamed token than the pure-Python defaults) when it is installed."""
    return native if importlib.util.find_spec(native) is not None else fallback


def uvicorn_loop() -> str:
    return fastest("uvloop", "asyncio")


def uvicorn_http() -> str | type:
    """httptools when installed, in :mod:`lmfleet.http10`'s variant that streams to
    HTTP/1.0 clients without chunked encoding; else h11 (which does so itself)."""
    if fastest("httptools", "h11") == "h11":
        return "h11"
    from lmfleet.http10 import HttpToolsProtocol

    return HttpToolsProtocol


# Bucket upper bounds in seconds (+Inf is added by the client library).
# Time to first token: a prefix-cache hit on a GPU answers in ~1 ms, a long prompt
# queued behind a busy batch or a CPU replica can take a minute.
TTFT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
    0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
)  # fmt: skip
# Time per output token and inter-token gaps: ~1 ms (small model, fast GPU) to
# seconds (CPU replica, or a gap stretched by a long prefill in the same batch).
TOKEN_GAP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Whole requests: tens of milliseconds to the ten minutes of a long generation.
E2E_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0,
    30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0,
)  # fmt: skip
