"""The load generator: ``lmfleet bench serve`` drives any OpenAI-compatible endpoint
(ours, vLLM, TGI, a gateway in front of them) and ``lmfleet bench offline`` drives the
engine in-process.

Boundary: ``arrivals`` and ``metrics`` are pure arithmetic; ``workloads`` makes the
requests; ``client`` speaks HTTP; ``monitor`` polls the target's gauges; ``runner``
and ``offline`` put them together; ``report`` turns results into a table, JSON and
plots. Only ``offline`` imports the engine, and only when it runs.
"""

from __future__ import annotations
