"""Results as a table for the terminal, a JSON document and PNG plots.

Plots use matplotlib's Agg backend (no display needed): latency CDFs, throughput and
requests in flight over time, and, where the target exposed them, queue depth,
running requests and replica count over time.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmfleet.bench.metrics import BenchSummary, RequestRecord, Stats, Timeline
from lmfleet.bench.monitor import MonitorSample

_WIDTH = 50
_LATENCIES = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)


# ---- the table --------------------------------------------------------------------------
def _line(label: str, value: object) -> str:
    if isinstance(value, float):
        text = "n/a" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.2f}")
    else:
        text = str(value)
    return f"{label + ':':<42}{text:>{_WIDTH - 42}}" if len(label) < 41 else f"{label}: {text}"


def format_table(
    summary: BenchSummary,
    *,
    title: str = "Serving Benchmark Result",
    info: Mapping[str, object] | None = None,
    metrics: Sequence[str] = ("ttft", "tpot", "itl", "e2el"),
) -> str:
    s = summary
    out = [f" {title} ".center(_WIDTH, "=")]
    for k, v in (info or {}).items():
        out.append(_line(k, v))
    out.append(_line("Successful requests", s.completed))
    out.append(_line("Failed requests", s.failed))
    for kind, n in s.errors.items():
        out.append(_line(f"  {kind}", n))
    if not math.isinf(s.requested_rate):
        out.append(_line("Request rate requested (req/s)", s.requested_rate))
    if not math.isinf(s.scheduled_rate):
        out.append(_line("Request rate scheduled (req/s)", s.scheduled_rate))
        out.append(_line("Request rate achieved (req/s)", s.achieved_rate))
        out.append(_line("Achieved / scheduled rate", s.achieved_rate_ratio))
    out.append(_line("Max concurrency (observed)", s.max_concurrency))
    out.append(_line("Benchmark duration (s)", s.duration_s))
    out.append(_line("Total input tokens", s.total_input_tokens))
    out.append(_line("Total generated tokens", s.total_output_tokens))
    out.append(_line("Request throughput (req/s)", s.request_throughput))
    out.append(_line("Output token throughput (tok/s)", s.output_throughput))
    out.append(_line("Total token throughput (tok/s)", s.total_token_throughput))
    if s.goodput is not None:
        slo = ", ".join(f"{k}≤{v * 1000:g}ms" for k, v in s.slos.items())
        out.append(_line(f"Goodput (req/s) [{slo}]", s.goodput))
    if s.short_outputs:
        out.append(_line("Requests with fewer tokens than asked", s.short_outputs))
    for key, short, long in _LATENCIES:
        st: Stats = getattr(s, key)
        if key not in metrics or st.count == 0:
            continue
        out.append(f" {long} ".center(_WIDTH, "-"))
        out.append(_line(f"Mean {short} (ms)", st.mean * 1000))
        out.append(_line(f"Median {short} (ms)", st.median * 1000))
        for q, v in st.percentiles.items():
            if q == 50:
                continue  # the median, just above
            out.append(_line(f"P{q:g} {short} (ms)", v * 1000))
    if s.send_lag.count and not math.isinf(s.scheduled_rate):
        out.append(" Send lag (actual − scheduled) ".center(_WIDTH, "-"))
        out.append(_line("Mean send lag (ms)", s.send_lag.mean * 1000))
        out.append(_line("Max send lag (ms)", s.send_lag.max * 1000))
    out.append("=" * _WIDTH)
    return "\n".join(out)


# ---- JSON ---------------------------------------------------------------------------------
def _finite(x: float | None) -> float | str | None:
    """JSON has no inf or nan: write them as strings."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return x


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def summary_dict(s: BenchSummary) -> dict[str, Any]:
    """The summary with latencies in milliseconds, ready for JSON."""
    d: dict[str, Any] = {
        k: getattr(s, k)
        for k in (
            "num_requests", "completed", "failed", "errors", "duration_s",
            "total_input_tokens", "total_output_tokens", "request_throughput",
            "output_throughput", "total_token_throughput", "good_requests", "goodput",
            "requested_rate", "scheduled_rate", "achieved_rate", "achieved_rate_ratio",
            "max_concurrency", "short_outputs",
        )
    }  # fmt: skip
    d["slos_ms"] = {k: v * 1000 for k, v in s.slos.items()}
    for key in ("ttft", "tpot", "itl", "e2el", "send_lag"):
        d[f"{key}_ms"] = getattr(s, key).to_dict(1000.0)
    return _clean(d)


def record_dict(r: RequestRecord) -> dict[str, Any]:
    d = asdict(r)
    d["tpot"] = r.tpot
    return _clean(d)


def result_document(
    *,
    kind: str,
    config: Mapping[str, Any],
    summary: BenchSummary,
    timeline: Timeline | None = None,
    samples: Sequence[MonitorSample] = (),
    records: Sequence[RequestRecord] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "kind": kind,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": _clean(dict(config)),
        "summary": summary_dict(summary),
    }
    if extra:
        doc.update(_clean(dict(extra)))
    if timeline is not None:
        doc["timeline"] = _clean(asdict(timeline))
    if samples:
        doc["monitor"] = [_clean(asdict(x)) for x in samples]
    if records is not None:
        doc["requests"] = [record_dict(r) for r in records]
    return doc


def write_json(doc: Mapping[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return p


# ---- plots --------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(records: Sequence[RequestRecord], path: str | Path, title: str = "") -> Path:
    import numpy as np

    plt = _pyplot()
    ok = [r for r in records if r.success]
    series = {
        "TTFT": [r.ttft for r in ok if r.ttft is not None],
        "TPOT": [t for r in ok if (t := r.tpot) is not None],
        "ITL": [g for r in ok for g in r.itls],
        "E2EL": [r.latency for r in ok if r.latency is not None],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, values) in zip(axes.flat, series.items(), strict=True):
        ax.set_title(name)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of " + ("gaps" if name == "ITL" else "requests"))
        ax.grid(True, alpha=0.3)
        if not values:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        x = np.sort(np.asarray(values)) * 1000
        y = np.arange(1, len(x) + 1) / len(x)
        ax.plot(x, y, drawstyle="steps-post")
        for q in (50, 90, 99):
            v = float(np.percentile(x, q))
            ax.axvline(v, color="grey", ls=":", lw=0.8)
            ax.annotate(
                f"p{q} {v:.1f}",
                (v, q / 100),
                fontsize=7,
                xytext=(3, -10),
                textcoords="offset points",
            )
    fig.suptitle(title or "Latency CDFs")
    fig.tight_layout()
    return _save(fig, path)


def plot_throughput(tl: Timeline, path: str | Path, title: str = "") -> Path:
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    mid = [t + tl.bin_s / 2 for t in tl.t]  # each bin's rate, drawn at its middle
    top.plot(mid, tl.output_tokens_per_s, label="output tok/s", color="tab:blue")
    top.set_ylabel("output tokens/s", color="tab:blue")
    right = top.twinx()
    right.plot(mid, tl.completed_per_s, label="completed req/s", color="tab:orange")
    right.set_ylabel("completed requests/s", color="tab:orange")
    top.grid(True, alpha=0.3)
    bottom.plot(mid, tl.in_flight, color="tab:green", marker=".")
    bottom.set_ylabel("requests in flight")
    bottom.set_xlabel("time since start (s)")
    bottom.grid(True, alpha=0.3)
    fig.suptitle(title or "Throughput over time")
    fig.tight_layout()
    return _save(fig, path)


def plot_monitor(
    samples: Sequence[MonitorSample], path: str | Path, title: str = ""
) -> Path | None:
    """Queue depth, running requests (and KV usage) and replicas over time; None when
    the target exposed none of them."""
    if not samples:
        return None
    plt = _pyplot()
    t = [s.t for s in samples]
    have = {
        q: any(getattr(s, q) is not None for s in samples)
        for q in ("waiting", "running", "replicas", "kv_cache_usage")
    }
    if not any(have.values()):
        return None
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for q, color in (("waiting", "tab:red"), ("running", "tab:blue")):
        if have[q]:
            ax.plot(t, [_nan(getattr(s, q)) for s in samples], label=f"requests {q}", color=color)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("requests")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if have["replicas"]:
        right = ax.twinx()
        right.step(
            t,
            [_nan(s.replicas) for s in samples],
            where="post",
            color="tab:green",
            label="replicas",
        )
        right.set_ylabel("replicas")
        right.set_ylim(bottom=0)
        h, lab = right.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    if handles:
        ax.legend(handles, labels, loc="upper left")
    fig.suptitle(title or "Queue depth and replicas over time")
    fig.tight_layout()
    return _save(fig, path)


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _save(fig: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return p
