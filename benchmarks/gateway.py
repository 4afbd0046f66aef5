"""What does the gateway cost, and what does prefix-affinity routing buy?

Everything runs against simulated replicas (``lmfleet serve sim:...`` processes) and
real ``lmfleet gateway`` processes, side by side in one run; the client is
``benchmarks/sse_client.py`` (asyncio + httptools on uvloop, one keep-alive
connection per worker), lean so that it costs the machine little and the same on
both sides:

* overhead: for each ``--streams`` N (100 and 500), N workers in a closed loop,
  each sending a streaming completion (``--prompt-words`` random words,
  ``--max-tokens`` tokens, ``ignore_eos``) a random 0..``--think-ms`` after its
  previous one has ended (without that pause, a worker's next request would reach
  its replica at the same point of the engine's step cycle every time, and any
  fixed delay, such as a gateway's, would shift which step it catches: TTFT would
  measure that phase, not the delay),
  straight to the replicas (worker i always talks to replica i mod R) and through
  the gateway (least outstanding), ``--duration-s`` seconds per side. Worker starts
  are staggered evenly over the first ``--ramp-s`` seconds; the measuring window
  opens ``--warmup-s`` after the start and closes at ``--duration-s``, when workers
  stop issuing requests (those still running are awaited). Counted: the requests
  that *started* inside the window (TTFT and end-to-end percentiles over them;
  they all run to their end). Throughput: the content chunks (= output tokens)
  received inside the window, whichever request they belong to, ÷ the window's
  length. Errors and wrong token counts (≠ ``--max-tokens``) are counted over every
  request of the round, warm-up and drain included. Each repeat runs both sides,
  alternating which goes first. Per N: ``added_ttft_ms_p50`` / ``_p99`` = gateway
  TTFT percentile − direct one over the TTFTs of all repeats pooled (targets ≤ 2 and
  ≤ 10 ms), each with a 95% bootstrap interval (``_ci95``): a continuous-batching
  replica's TTFT varies by about one engine step with the moment a request arrives,
  so the difference of two percentiles is only known to a few ms; the interval says
  how well. ``throughput_ratio`` = median gateway output tok/s ÷ median direct (≥ 0.9).
  CPU over each window, from ``/proc`` (replicas, gateways) and
  ``time.process_time()`` (the client): seconds and µs per output token of the
  client, the replicas (sum) and the gateway under test (per token on the gateway
  side only), ``cpu_utilization`` = CPU seconds of all these processes (the idle
  gateways too) ÷ (window × cpu_count) and ``machine_cpu_utilization`` (all of the
  machine, ``/proc/stat``): near 1, the run was CPU-bound and measured contention,
  not the gateway;
* affinity: a multi-turn chat workload (``--sessions`` conversations of ``--turns``
  turns, each with its own long system prompt, every turn resending the history)
  through a round-robin gateway and a prefix-affinity gateway over the same
  replicas (fresh conversations for each, so one run's cache cannot help the other).
  The prefix-cache hit rate is the growth of the replicas' ``prefix_cache_hits`` /
  ``prefix_cache_queries`` counters over the run; ``hit_rate_ratio`` (≥ 2) and
  ``ttft_p50_reduction`` (≥ 0.3) compare the two;
* ``--many`` (1,000) concurrent streams through the gateway, all sent at once:
  ``errors_1000_streams`` must be 0 (non-200, a broken stream or a wrong token
  count).

Replica speed, ``--time-scale`` (passed to the replicas as ``--sim-time-scale``, a
speed-up factor: engine steps take profile time ÷ factor). The profile is Llama-3-8B
on one H100. The default, 0.125, makes every step 8× longer, about what a model with
~8.8× the parameters (a 70B-class model) takes on the same memory-bound GPU, so
each replica is about as fast as a 70B-class model on one H100. That keeps the
token rate of 500 streams (a few thousand tokens/s over 4 replicas) within what 2
cores can serve and relay, so the overhead figures measure the gateway, not a
saturated machine; ``cpu_utilization`` shows whether that held. At 1.0 (the
8B-class speed) 500 streams make tens of thousands of tokens/s, more than the
replicas alone can emit on 2 cores.

    .venv/bin/python benchmarks/gateway.py              # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/gateway.py --streams 100 --repeats 1 --many 200 --sessions 16
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from lmfleet.engine.sim.tokenizer import synthetic_words
from sse_client import SSEClient, StreamResult, Window, run  # benchmarks/, next to this file

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sim:gwbench"
PROFILE = {"gwbench": {"base": "llama-8b-h100", "load_s": 0.1}}
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "lmfleet.cli", "--log-level", "WARNING", *args],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip


def _wait(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _median(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return float(np.median(xs)) if xs else None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


async def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


# ---- CPU accounting ----------------------------------------------------------------------
def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot (``/proc/stat``; guest time is
    already in user time)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass
class Pids:
    replicas: list[int]
    gateway: int  # the one under test
    idle_gateways: list[int]


def _cpu_sample(pids: Pids) -> dict[str, Any]:
    return {
        "t": time.perf_counter(),
        "client": time.process_time(),
        "replicas": sum(_cpu_s(p) for p in pids.replicas),
        "gateway": _cpu_s(pids.gateway),
        "idle_gateways": sum(_cpu_s(p) for p in pids.idle_gateways),
        "machine": _machine_jiffies(),
    }


def _cpu_stats(a: dict[str, Any], b: dict[str, Any], tokens: int, gateway_side: bool):
    wall = b["t"] - a["t"]
    used = {k: b[k] - a[k] for k in ("client", "replicas", "gateway", "idle_gateways")}
    cores = os.cpu_count() or 1
    busy = b["machine"][0] - a["machine"][0]
    total = b["machine"][1] - a["machine"][1]

    def per_token(seconds: float) -> float | None:
        return 1e6 * seconds / tokens if tokens else None

    return {
        "client_cpu_s": used["client"],
        "replicas_cpu_s": used["replicas"],
        "gateway_cpu_s": used["gateway"],
        "idle_gateways_cpu_s": used["idle_gateways"],
        "client_cpu_us_per_token": per_token(used["client"]),
        "replicas_cpu_us_per_token": per_token(used["replicas"]),
        "gateway_cpu_us_per_token": per_token(used["gateway"]) if gateway_side else None,
        "cpu_utilization": sum(used.values()) / (wall * cores) if wall > 0 else None,
        "machine_cpu_utilization": busy / total if total > 0 else None,
    }


_CPU_KEYS = ("client_cpu_us_per_token", "replicas_cpu_us_per_token", "gateway_cpu_us_per_token",
             "cpu_utilization", "machine_cpu_utilization")  # fmt: skip


def _cpu_line(r: dict[str, Any]) -> str:
    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    return (
        f"CPU µs/token client {f(r['client_cpu_us_per_token'], '.0f')} "
        f"replicas {f(r['replicas_cpu_us_per_token'], '.0f')} "
        f"gateway {f(r['gateway_cpu_us_per_token'], '.0f')}, "
        f"utilization {f(r['cpu_utilization'], '.0%')} "
        f"(machine {f(r['machine_cpu_utilization'], '.0%')})"
    )


# ---- request statistics ------------------------------------------------------------------
def _stats(results: list[StreamResult], max_tokens: int) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft * 1000 for r in ok if r.ttft is not None]
    e2es = [r.e2e * 1000 for r in ok if r.e2e is not None]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_kinds": sorted({r.error for r in results if r.error is not None}),
        "wrong_token_counts": sum(1 for r in ok if r.tokens != max_tokens),
        "ttft_ms_p50": _pct(ttfts, 50),
        "ttft_ms_p90": _pct(ttfts, 90),
        "ttft_ms_p99": _pct(ttfts, 99),
        "e2e_ms_p50": _pct(e2es, 50),
    }


def _completion_body(words: list[str], args: argparse.Namespace, rng: random.Random) -> bytes:
    return json.dumps({
        "model": MODEL, "prompt": " ".join(rng.choices(words, k=args.prompt_words)),
        "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
    }).encode()  # fmt: skip


def _added_with_ci(
    gateway: np.ndarray, direct: np.ndarray, q: float, resamples: int = 2000
) -> tuple[float | None, list[float] | None]:
    """Gateway − direct TTFT percentile ``q`` over the pooled samples of all repeats,
    with a 95% bootstrap interval (each side resampled on its own, fixed seed)."""
    if not len(gateway) or not len(direct):
        return None, None
    point = float(np.percentile(gateway, q) - np.percentile(direct, q))
    rng = np.random.default_rng(0)
    g = np.percentile(rng.choice(gateway, (resamples, len(gateway))), q, axis=1)
    d = np.percentile(rng.choice(direct, (resamples, len(direct))), q, axis=1)
    lo, hi = np.percentile(g - d, [2.5, 97.5])
    return point, [float(lo), float(hi)]


# ---- overhead: closed loop ----------------------------------------------------------------
async def _closed_loop(
    urls: list[str], n: int, make_body: Callable[[], bytes], pids: Pids, gateway_side: bool,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    window = Window()
    results: list[StreamResult] = []
    t0 = time.perf_counter() + 0.05
    t_open, t_close = t0 + args.warmup_s, t0 + args.duration_s
    cpu: dict[str, dict[str, Any]] = {}

    async def sampler() -> None:
        await _sleep_until(t_open)
        cpu["open"] = _cpu_sample(pids)
        window.lo = time.perf_counter()
        await _sleep_until(t_close)
        window.hi = time.perf_counter()
        cpu["close"] = _cpu_sample(pids)

    async def worker(i: int) -> None:
        await _sleep_until(t0 + args.ramp_s * i / n)
        client = SSEClient(urls[i % len(urls)], timeout=args.request_timeout_s)
        think = random.Random(i)
        try:
            while time.perf_counter() < t_close:
                r = await client.post(COMPLETIONS, make_body(), window=window)
                results.append(r)
                # a random pause, so arrivals do not lock to the replicas' step clock
                await asyncio.sleep(think.uniform(0, args.think_ms / 1000))
                if r.error is not None:
                    await asyncio.sleep(0.1)  # no hot loop against a failing server
        finally:
            client.close()

    await asyncio.gather(sampler(), *(worker(i) for i in range(n)))
    wall = time.perf_counter() - t0
    counted = [r for r in results if window.lo <= r.t_start < window.hi]
    everything = _stats(results, args.max_tokens)
    window_s = window.hi - window.lo
    return {
        **_stats(counted, args.max_tokens),
        "_ttfts_ms": [r.ttft * 1000 for r in counted if r.error is None and r.ttft is not None],
        "requests_issued": len(results),
        "errors": everything["errors"],
        "error_kinds": everything["error_kinds"],
        "wrong_token_counts": everything["wrong_token_counts"],
        "output_tok_s": window.tokens / window_s,
        "tokens_in_window": window.tokens,
        "window_s": window_s,
        "wall_s": wall,
        **_cpu_stats(cpu["open"], cpu["close"], window.tokens, gateway_side),
    }


def overhead(
    replica_urls: list[str], gw_url: str, pids: Pids, words: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rng = random.Random(1)

    def make_body() -> bytes:
        return _completion_body(words, args, rng)

    for n in args.streams:
        rounds: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
        for rep in range(args.repeats):
            order = ["direct", "gateway"] if rep % 2 == 0 else ["gateway", "direct"]
            for side in order:
                urls = replica_urls if side == "direct" else [gw_url]
                r = run(_closed_loop(urls, n, make_body, pids, side == "gateway", args))
                rounds[side].append(r)
                print(
                    f"[gateway bench] {n} streams, repeat {rep + 1}, {side}: "
                    f"TTFT p50 {r['ttft_ms_p50'] or float('nan'):.1f} "
                    f"p99 {r['ttft_ms_p99'] or float('nan'):.1f} ms, "
                    f"{r['output_tok_s']:.0f} tok/s, {r['requests']} requests counted, "
                    f"errors {r['errors'] + r['wrong_token_counts']}; {_cpu_line(r)}",
                    flush=True,
                )

        def med(side: str, key: str, rounds: dict[str, list[dict[str, Any]]] = rounds):
            return _median([r[key] for r in rounds[side]])

        medians = {
            side: {k: med(side, k) for k in ("ttft_ms_p50", "ttft_ms_p99", "output_tok_s",
                                             "requests", *_CPU_KEYS)}
            for side in rounds
        }  # fmt: skip
        direct_tok_s, gateway_tok_s = med("direct", "output_tok_s"), med("gateway", "output_tok_s")
        pooled = {side: np.concatenate([r.pop("_ttfts_ms") for r in rounds[side]])
                  for side in rounds}  # fmt: skip
        added = {q: _added_with_ci(pooled["gateway"], pooled["direct"], q) for q in (50, 99)}
        out[str(n)] = {
            "rounds": rounds,
            "medians": medians,
            "ttft_samples": {side: len(v) for side, v in pooled.items()},
            "added_ttft_ms_p50": added[50][0],
            "added_ttft_ms_p50_ci95": added[50][1],
            "added_ttft_ms_p99": added[99][0],
            "added_ttft_ms_p99_ci95": added[99][1],
            "added_ttft_ms_p50_median_of_rounds": _diff(
                med("gateway", "ttft_ms_p50"), med("direct", "ttft_ms_p50")
            ),
            "throughput_ratio": gateway_tok_s / direct_tok_s
            if gateway_tok_s is not None and direct_tok_s
            else None,
            "errors": sum(
                r["errors"] + r["wrong_token_counts"] for s in rounds.values() for r in s
            ),
            "gateway_cpu_us_per_token": med("gateway", "gateway_cpu_us_per_token"),
        }
        print(
            f"[gateway bench] {n} streams: "
            f"{json.dumps({k: v for k, v in out[str(n)].items() if k != 'rounds'})}",
            flush=True,
        )
    return out


# ---- many streams at once ------------------------------------------------------------------
async def _burst(url: str, bodies: list[bytes], pids: Pids, args) -> dict[str, Any]:
    async def one(body: bytes) -> StreamResult:
        client = SSEClient(url, timeout=args.request_timeout_s)
        try:
            return await client.post(COMPLETIONS, body, window=window)
        finally:
            client.close()

    window = Window()
    cpu0 = _cpu_sample(pids)
    window.lo = t0 = time.perf_counter()
    results = await asyncio.gather(*(one(b) for b in bodies))
    window.hi = time.perf_counter()
    wall = window.hi - t0
    return {
        **_stats(results, args.max_tokens),
        "output_tok_s": window.tokens / wall,
        "wall_s": wall,
        **_cpu_stats(cpu0, _cpu_sample(pids), window.tokens, True),
    }


# ---- prefix affinity ----------------------------------------------------------------------
def _prefix_counters(replica_urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for u in replica_urls:
        for line in httpx.get(u + "/metrics", timeout=10).text.splitlines():
            if line.startswith("lmfleet_prefix_cache_hits_total"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("lmfleet_prefix_cache_queries_total"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


AFFINITY_MAX_TOKENS = 16


async def _conversations(gw_url: str, words: list[str], seed: int, args) -> list[StreamResult]:
    rng = random.Random(seed)
    pool: asyncio.Queue[SSEClient] = asyncio.Queue()  # at most session_concurrency at once
    for _ in range(args.session_concurrency):
        pool.put_nowait(SSEClient(gw_url, timeout=args.request_timeout_s))
    results: list[StreamResult] = []

    async def session(s: int) -> None:
        messages = [
            {"role": "system", "content": " ".join(rng.choices(words, k=args.prefix_words))}
        ]
        for _ in range(args.turns):
            messages.append({"role": "user", "content": " ".join(rng.choices(words, k=24))})
            body = {"model": MODEL, "messages": messages, "max_tokens": AFFINITY_MAX_TOKENS,
                    "ignore_eos": True, "temperature": 0, "stream": True, "user": f"s{seed}-{s}"}  # fmt: skip
            client = await pool.get()
            try:
                r = await client.post(CHAT, body)
            finally:
                pool.put_nowait(client)
            results.append(r)
            answer = " ".join(rng.choices(words, k=16))
            messages.append({"role": "assistant", "content": answer})

    try:
        await asyncio.gather(*(session(s) for s in range(args.sessions)))
    finally:
        while not pool.empty():
            pool.get_nowait().close()
    return results


def affinity(replica_urls: list[str], gateways: dict[str, str], words, args) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, (policy, url) in enumerate(gateways.items()):
        h0, q0 = _prefix_counters(replica_urls)
        t0 = time.perf_counter()
        results = run(_conversations(url, words, 100 + i, args))
        wall = time.perf_counter() - t0
        h1, q1 = _prefix_counters(replica_urls)
        stats = _stats(results, AFFINITY_MAX_TOKENS)
        out[policy] = {
            "requests": stats["requests"], "errors": stats["errors"],
            "error_kinds": stats["error_kinds"], "wrong_token_counts": stats["wrong_token_counts"],
            "prefix_cache_hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0 else None,
            "ttft_ms_p50": stats["ttft_ms_p50"], "ttft_ms_p90": stats["ttft_ms_p90"],
            "wall_s": wall,
        }  # fmt: skip
        print(f"[gateway bench] {policy}: {json.dumps(out[policy])}", flush=True)
    rr, pa = out["round_robin"], out["prefix_affinity"]
    out["hit_rate_ratio"] = (
        pa["prefix_cache_hit_rate"] / rr["prefix_cache_hit_rate"]
        if rr["prefix_cache_hit_rate"] and pa["prefix_cache_hit_rate"] is not None else None
    )  # fmt: skip

    def reduction(key: str) -> float | None:
        return 1 - pa[key] / rr[key] if pa[key] is not None and rr[key] else None

    out["ttft_p50_reduction"] = reduction("ttft_ms_p50")
    out["ttft_p90_reduction"] = reduction("ttft_ms_p90")
    return out


# ---- main ----------------------------------------------------------------------------------
def _fleet(urls: list[str], policy: str) -> dict[str, Any]:
    return {
        "gateway": {"poll_interval_s": 0.5},
        "models": [{
            "name": MODEL, "balancing": {"policy": policy},
            "queue": {"max_inflight_per_replica": 1024, "max_queue": 4096},
            "versions": [{"name": "v1", "replicas": urls}],
        }],
    }  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--replicas", type=int, default=4, help="simulated replicas to start")
    p.add_argument("--streams", type=int, nargs="+", default=[100, 500], metavar="N",
                   help="overhead: concurrent streams (closed-loop workers), one run per N")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3,
                   help="overhead: rounds per side and N (sides alternate which goes first)")  # fmt: skip
    p.add_argument("--duration-s", type=float, default=15.0,
                   help="overhead: seconds per round and side, from the first worker's start "
                        "to the end of the measuring window")  # fmt: skip
    p.add_argument("--think-ms", type=float, default=200.0,
                   help="overhead: each worker pauses a random 0..THINK_MS between requests, "
                        "so that arrivals do not lock to the replicas' engine steps")  # fmt: skip
    p.add_argument("--warmup-s", type=float, default=3.0,
                   help="overhead: the measuring window opens this long after the start "
                        "(at least --ramp-s)")  # fmt: skip
    p.add_argument("--ramp-s", type=float, default=2.0,
                   help="overhead: worker starts are spread evenly over this many seconds")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=64,
                   help="overhead and --many: output tokens per completion (ignore_eos)")  # fmt: skip
    p.add_argument("--prompt-words", type=int, default=32,
                   help="overhead and --many: random words per prompt")  # fmt: skip
    p.add_argument("--many", type=int, default=1000,
                   help="concurrent streams sent at once through the gateway (error check)")  # fmt: skip
    p.add_argument("--sessions", type=int, default=64,
                   help="affinity: multi-turn chat conversations per policy")  # fmt: skip
    p.add_argument("--turns", type=int, default=4, help="affinity: turns per conversation")
    p.add_argument("--prefix-words", type=int, default=6000,
                   help="affinity: words in each conversation's system prompt")  # fmt: skip
    p.add_argument("--session-concurrency", type=int, default=16,
                   help="affinity: requests in flight at most (one connection each)")  # fmt: skip
    p.add_argument("--time-scale", type=float, default=0.125,
                   help="the replicas' --sim-time-scale (a speed-up: steps take profile time "
                        "÷ this); 0.125 = Llama-3-8B/H100 steps 8× longer, about a "
                        "70B-class model on one H100")  # fmt: skip
    p.add_argument("--request-timeout-s", type=float, default=300.0,
                   help="a request taking longer counts as a 'timeout' error")  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gateway.json"),
                   help="where the JSON results go")  # fmt: skip
    return p


def main() -> int:
    p = _parser()
    args = p.parse_args()
    if args.warmup_s < args.ramp_s:
        p.error("--warmup-s must be at least --ramp-s")
    if args.duration_s <= args.warmup_s:
        p.error("--duration-s must be longer than --warmup-s")

    tmp = Path(tempfile.mkdtemp(prefix="lmfleet-gwbench-"))
    (tmp / "profiles.json").write_text(json.dumps(PROFILE))
    env = {**os.environ, "LMFLEET_SIM_PROFILES": str(tmp / "profiles.json")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = [_port() for _ in range(args.replicas)]
        for port in ports:
            procs.append(_spawn(["serve", MODEL, "--port", str(port), "--host", "127.0.0.1",
                                 "--sim-time-scale", str(args.time_scale),
                                 "--disable-uvicorn-access-log"], env, tmp / f"r{port}.log"))  # fmt: skip
        replica_pids = [proc.pid for proc in procs]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        gateways: dict[str, str] = {}
        gateway_pids: dict[str, int] = {}
        for policy in ("least_outstanding", "round_robin", "prefix_affinity"):
            cfg = tmp / f"{policy}.yaml"
            cfg.write_text(yaml.safe_dump(_fleet(urls, policy)))
            port = _port()
            procs.append(_spawn(["gateway", "--config", str(cfg), "--host", "127.0.0.1",
                                 "--port", str(port)], env, tmp / f"gw-{policy}.log"))  # fmt: skip
            gateways[policy] = f"http://127.0.0.1:{port}"
            gateway_pids[policy] = procs[-1].pid
        for u in urls:
            _wait(u + "/health/ready")
        for u in gateways.values():
            _wait(u + "/health/ready")
        vocab = synthetic_words(20000)
        words = vocab[200:]
        load0 = os.getloadavg()
        result: dict[str, Any] = {
            "benchmark": "gateway",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": {"cpu_count": os.cpu_count(), "loadavg_at_start": load0},
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "model": MODEL,
        }
        pids = Pids(
            replicas=replica_pids,
            gateway=gateway_pids["least_outstanding"],
            idle_gateways=[gateway_pids["round_robin"], gateway_pids["prefix_affinity"]],
        )
        result["overhead"] = overhead(urls, gateways["least_outstanding"], pids, words, args)
        rng = random.Random(7)
        many = run(_burst(gateways["least_outstanding"],
                          [_completion_body(words, args, rng) for _ in range(args.many)],
                          pids, args))  # fmt: skip
        result["many_streams"] = many
        result[f"errors_{args.many}_streams"] = many["errors"] + many["wrong_token_counts"]
        print(
            f"[gateway bench] {args.many} streams at once: "
            f"errors {result[f'errors_{args.many}_streams']} {many['error_kinds']}, "
            f"TTFT p50 {many['ttft_ms_p50'] or float('nan'):.0f} ms, "
            f"{many['output_tok_s']:.0f} tok/s; {_cpu_line(many)}",
            flush=True,
        )
        result["affinity"] = affinity(
            urls, {k: gateways[k] for k in ("round_robin", "prefix_affinity")}, words, args
        )
        result["machine"]["loadavg_at_end"] = os.getloadavg()
        first = result["overhead"][str(args.streams[0])]
        result["summary"] = {
            **{f"added_ttft_ms_p50_{n}": result["overhead"][str(n)]["added_ttft_ms_p50"] for n in args.streams},
            **{f"added_ttft_ms_p50_{n}_ci95": result["overhead"][str(n)]["added_ttft_ms_p50_ci95"] for n in args.streams},
            **{f"added_ttft_ms_p99_{n}": result["overhead"][str(n)]["added_ttft_ms_p99"] for n in args.streams},
            **{f"added_ttft_ms_p99_{n}_ci95": result["overhead"][str(n)]["added_ttft_ms_p99_ci95"] for n in args.streams},
            **{f"throughput_ratio_{n}": result["overhead"][str(n)]["throughput_ratio"] for n in args.streams},
            "added_ttft_ms_p50": first["added_ttft_ms_p50"],
            "gateway_cpu_us_per_token": first["gateway_cpu_us_per_token"],
            "hit_rate_ratio": result["affinity"]["hit_rate_ratio"],
            "ttft_p50_reduction": result["affinity"]["ttft_p50_reduction"],
            f"errors_{args.many}_streams": result[f"errors_{args.many}_streams"],
        }  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["summary"], indent=2))
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
