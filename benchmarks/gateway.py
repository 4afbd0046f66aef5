"""What does the gateway cost, and what does prefix-affinity routing buy?

Everything runs against simulated replicas (``lmfleet serve sim:...`` processes) and
real ``lmfleet gateway`` processes, side by side in one run:

* overhead: ``--streams`` (100 and 500) concurrent streaming completions, sent
  straight to the replicas (spread round-robin by the client) and through the
  gateway (least outstanding); rounds alternate between the sides. Reported:
  ``added_ttft_ms_p50`` / ``_p99`` = gateway TTFT percentile − direct one (targets
  ≤ 2 and ≤ 10 ms) and ``throughput_ratio`` = gateway output tok/s / direct (≥ 0.9);
* affinity: a multi-turn chat workload (``--sessions`` conversations of ``--turns``
  turns, each with its own long system prompt, every turn resending the history)
  through a round-robin gateway and a prefix-affinity gateway over the same 4
  replicas (fresh conversations for each, so one run's cache cannot help the other).
  The prefix-cache hit rate is the growth of the replicas' ``prefix_cache_hits`` /
  ``prefix_cache_queries`` counters over the run; ``hit_rate_ratio`` (≥ 2) and
  ``ttft_p50_reduction`` (≥ 0.3) compare the two;
* ``--many`` (1,000) concurrent streams through the gateway: ``errors_1000_streams``
  must be 0 (non-200, a broken stream or a wrong token count).

On a small shared machine the client, the gateway and the replicas compete for the
same cores, so the overhead figures include that contention: read them with the
``cpu_count`` and the load average recorded in the JSON.

    .venv/bin/python benchmarks/gateway.py              # a few minutes on 2 cores
    .venv/bin/python benchmarks/gateway.py --streams 100 --many 200 --sessions 16
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
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from lmfleet.engine.sim.tokenizer import synthetic_words
from lmfleet.gateway.state import upstream_client

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sim:gwbench"
PROFILE = {"gwbench": {"base": "llama-8b-h100", "load_s": 0.1}}


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


# ---- one stream -------------------------------------------------------------------------
async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    done = False
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return {"error": f"http_{r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": "stream_error"}
                for c in chunk.get("choices") or []:
                    if c.get("text") or (c.get("delta") or {}).get("content"):
                        tokens += 1
                        if ttft is None:
                            ttft = time.perf_counter() - t0
    except httpx.HTTPError as exc:
        return {"error": type(exc).__name__}
    if not done:
        return {"error": "no_done"}
    return {"ttft": ttft, "tokens": tokens, "e2e": time.perf_counter() - t0}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def _round(urls: list[str], bodies: list[dict[str, Any]]) -> dict[str, Any]:
    async with upstream_client(httpx.Timeout(300.0), 4096) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(_one(client, urls[i % len(urls)], b) for i, b in enumerate(bodies))
        )
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttfts = [r["ttft"] * 1000 for r in ok if r["ttft"] is not None]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_kinds": sorted({r["error"] for r in results if "error" in r}),
        "ttft_ms_p50": _pct(ttfts, 50),
        "ttft_ms_p90": _pct(ttfts, 90),
        "ttft_ms_p99": _pct(ttfts, 99),
        "output_tok_s": sum(r["tokens"] for r in ok) / wall,
        "wall_s": wall,
        "wrong_token_counts": sum(
            1 for r in ok if r["tokens"] != bodies[0].get("max_tokens", r["tokens"])
        ),
    }


# ---- overhead --------------------------------------------------------------------------
def _completion_bodies(n: int, words: list[str], args: argparse.Namespace, rng: random.Random):
    return [
        {
            "model": MODEL, "prompt": " ".join(rng.choices(words, k=args.prompt_words)),
            "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True,
        }
        for _ in range(n)
    ]  # fmt: skip


def overhead(
    replica_urls: list[str], gw_url: str, gw_pid: int, words: list[str], args
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rng = random.Random(1)
    direct_urls = [u + "/v1/completions" for u in replica_urls]
    for n in args.streams:
        rounds: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
        for rep in range(args.repeats):
            order = ["direct", "gateway"] if rep % 2 == 0 else ["gateway", "direct"]
            for side in order:
                bodies = _completion_bodies(n, words, args, rng)
                urls = direct_urls if side == "direct" else [gw_url + "/v1/completions"]
                cpu0 = _cpu_s(gw_pid)
                result = asyncio.run(_round(urls, bodies))
                if side == "gateway":  # the gateway's own cost, whatever the machine's load
                    tokens = result["output_tok_s"] * result["wall_s"]
                    result["gateway_cpu_s"] = _cpu_s(gw_pid) - cpu0
                    result["gateway_cpu_us_per_token"] = 1e6 * result["gateway_cpu_s"] / tokens
                rounds[side].append(result)

        def med(side: str, key: str, rounds: dict[str, list[dict[str, Any]]] = rounds) -> float:
            return float(np.median([r[key] for r in rounds[side] if r[key] is not None]))

        out[str(n)] = {
            "rounds": rounds,
            "added_ttft_ms_p50": med("gateway", "ttft_ms_p50") - med("direct", "ttft_ms_p50"),
            "added_ttft_ms_p99": med("gateway", "ttft_ms_p99") - med("direct", "ttft_ms_p99"),
            "throughput_ratio": med("gateway", "output_tok_s") / med("direct", "output_tok_s"),
            "errors": sum(r["errors"] for side in rounds.values() for r in side),
            "gateway_cpu_us_per_token": float(
                np.median([r["gateway_cpu_us_per_token"] for r in rounds["gateway"]])
            ),
        }
        print(
            f"[gateway bench] {n} streams: {json.dumps({k: v for k, v in out[str(n)].items() if k != 'rounds'})}",
            flush=True,
        )
    return out


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


async def _conversations(gw_url: str, words: list[str], seed: int, args) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    sem = asyncio.Semaphore(args.session_concurrency)
    results: list[dict[str, Any]] = []

    async def session(client: httpx.AsyncClient, s: int) -> None:
        messages = [
            {"role": "system", "content": " ".join(rng.choices(words, k=args.prefix_words))}
        ]
        for _ in range(args.turns):
            messages.append({"role": "user", "content": " ".join(rng.choices(words, k=24))})
            body = {"model": MODEL, "messages": messages, "max_tokens": 16, "ignore_eos": True,
                    "temperature": 0, "stream": True, "user": f"s{seed}-{s}"}  # fmt: skip
            async with sem:
                r = await _one(client, gw_url + "/v1/chat/completions", body)
            results.append(r)
            answer = " ".join(rng.choices(words, k=16))
            messages.append({"role": "assistant", "content": answer})

    async with upstream_client(httpx.Timeout(300.0), 1024) as client:
        await asyncio.gather(*(session(client, s) for s in range(args.sessions)))
    return results


def affinity(replica_urls: list[str], gateways: dict[str, str], words, args) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, (policy, url) in enumerate(gateways.items()):
        h0, q0 = _prefix_counters(replica_urls)
        t0 = time.perf_counter()
        results = asyncio.run(_conversations(url, words, 100 + i, args))
        wall = time.perf_counter() - t0
        h1, q1 = _prefix_counters(replica_urls)
        ok = [r for r in results if "error" not in r]
        ttfts = [r["ttft"] * 1000 for r in ok if r["ttft"] is not None]
        out[policy] = {
            "requests": len(results), "errors": len(results) - len(ok),
            "prefix_cache_hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0 else None,
            "ttft_ms_p50": _pct(ttfts, 50), "ttft_ms_p90": _pct(ttfts, 90), "wall_s": wall,
        }  # fmt: skip
        print(f"[gateway bench] {policy}: {json.dumps(out[policy])}", flush=True)
    rr, pa = out["round_robin"], out["prefix_affinity"]
    out["hit_rate_ratio"] = (
        pa["prefix_cache_hit_rate"] / rr["prefix_cache_hit_rate"]
        if rr["prefix_cache_hit_rate"] else None
    )  # fmt: skip
    out["ttft_p50_reduction"] = 1 - pa["ttft_ms_p50"] / rr["ttft_ms_p50"]
    out["ttft_p90_reduction"] = 1 - pa["ttft_ms_p90"] / rr["ttft_ms_p90"]
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--streams", type=int, nargs="+", default=[100, 500])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--many", type=int, default=1000)
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--prefix-words", type=int, default=6000)
    p.add_argument("--session-concurrency", type=int, default=16)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gateway.json"))
    args = p.parse_args()

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
        result["overhead"] = overhead(
            urls, gateways["least_outstanding"], gateway_pids["least_outstanding"], words, args
        )
        many = asyncio.run(_round([gateways["least_outstanding"] + "/v1/completions"],
                                  _completion_bodies(args.many, words, args, random.Random(7))))  # fmt: skip
        result["many_streams"] = many
        result[f"errors_{args.many}_streams"] = many["errors"] + many["wrong_token_counts"]
        print(
            f"[gateway bench] {args.many} streams: errors {result[f'errors_{args.many}_streams']}",
            flush=True,
        )
        result["affinity"] = affinity(
            urls, {k: gateways[k] for k in ("round_robin", "prefix_affinity")}, words, args
        )
        result["machine"]["loadavg_at_end"] = os.getloadavg()
        first = result["overhead"][str(args.streams[0])]
        result["summary"] = {
            **{f"added_ttft_ms_p50_{n}": result["overhead"][str(n)]["added_ttft_ms_p50"] for n in args.streams},
            **{f"added_ttft_ms_p99_{n}": result["overhead"][str(n)]["added_ttft_ms_p99"] for n in args.streams},
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
