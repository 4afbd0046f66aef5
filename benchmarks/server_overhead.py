"""What does the HTTP server add on top of the engine?

The same requests, side by side in one run:

* ``inproc``: an ``AsyncEngine`` in this process, built from the same
  ``ServerSettings`` as the server, driven by ``--clients`` concurrent ``generate``
  streams (what the server's routes do, minus HTTP);
* ``http``: a real ``lmfleet serve`` subprocess with those settings, driven by
  ``--clients`` concurrent streaming ``POST /v1/completions`` (httpx, SSE parsed
  here: each ``data:`` line is one JSON chunk).

Every request: a prompt of ``--prompt-len`` random token ids (different per request
and per round, so the prefix cache never helps), greedy, ``ignore_eos``,
``--max-tokens`` output tokens. TTFT is measured from sending the request to the
first token the client can see: the first SSE chunk over HTTP (the server skips
deltas with no text), the first output with text in-process (the same rule).
Throughput is output tokens / the round's wall time (first send to last token).
Rounds alternate between the sides (``--repeats`` each, the first side switching
every round) so drifting machine load hits both alike; figures are medians over
rounds. ``ttft_added_ms_p50`` = median HTTP TTFT p50 − median in-process TTFT p50
(target ≤ 5 ms); ``throughput_ratio`` = HTTP tok/s / in-process tok/s (target ≥ 0.9).
Then ``--many-clients`` (200) streams at once over HTTP: ``errors_200_clients``
must be 0 (an error: a non-200 status, a broken stream, a wrong token count).

One run measures each of ``--presets`` (random models, CPU) with its own server.
The first, ``llama-50m`` (the ~50M model of the engine benchmark, whose steps cost
what a small real model's do: "the small random model" of the targets), fills the
top-level keys; every other gets a section named after it, by default ``tiny``
(2 layers, ~1M parameters: steps cost almost nothing, so what differs between the
sides is the server's own cost per request and per token, the worst case for the
ratio). The 200-client round runs on ``--many-clients-preset`` (``tiny``), and its
``errors_200_clients`` is also copied to the top level.

    .venv/bin/python benchmarks/server_overhead.py            # ~5 min on 2 cores
    .venv/bin/python benchmarks/server_overhead.py --presets tiny --repeats 1
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "server_overhead.json"
SERVED_NAME = "bench"
TARGET_TTFT_ADDED_MS = 5.0
TARGET_THROUGHPUT_RATIO = 0.9
PRESETS = ("llama-50m", "tiny")
NOTES = (
    "Top-level figures: the first preset of --presets (default llama-50m, the ~50M "
    "random model of the engine benchmark: 'the small random model', steps cost what a "
    "small real model's do). Each other preset has a section of the same shape named "
    "after it; 'tiny' (~1M parameters, a step is almost free) shows the server's own "
    "cost per token, the worst case for throughput_ratio. errors_200_clients at the top "
    "level comes from the run of --many-clients-preset. Figures are medians over "
    "rounds; loadavg_1m_5m_15m is read at the end of each preset's run. "
    "cpu_us_per_token: CPU time of the serving process per output token (in-process: "
    "this process, engine + consumers; http: the server process, engine + event loop; "
    "client_cpu_us_per_token: this process as the HTTP client), far less sensitive to "
    "other load on the machine than the wall-clock figures; cpu_added_us_per_token = "
    "http - inproc."
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(slots=True)
class Round:
    """One round: ``clients`` requests sent at once to one side."""

    side: str
    clients: int
    wall_s: float = 0.0
    cpu_s: float | None = None  # the serving process's CPU time (engine + loop)
    client_cpu_s: float | None = None  # this process's, when it is only the HTTP client
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float | int | str | list[str]]:
        ttft = sorted(self.ttft_s)
        return {
            "side": self.side,
            "clients": self.clients,
            "ok": len(self.e2e_s),
            "errors": len(self.errors),
            "wall_s": round(self.wall_s, 4),
            "cpu_us_per_token": _per_token(self.cpu_s, self.output_tokens),
            "client_cpu_us_per_token": _per_token(self.client_cpu_s, self.output_tokens),
            "output_tokens": self.output_tokens,
            "output_tok_s": round(self.tok_s, 1),
            "ttft_ms_p50": round(1e3 * _pct(ttft, 50), 2),
            "ttft_ms_p90": round(1e3 * _pct(ttft, 90), 2),
            "e2e_s_p50": round(_pct(sorted(self.e2e_s), 50), 4),
            "error_samples": self.errors[:5],
        }

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0


def _per_token(cpu_s: float | None, tokens: int) -> float | None:
    return round(1e6 * cpu_s / tokens, 1) if cpu_s is not None and tokens else None


def _process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), all its threads."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(sorted_xs: list[float], p: float) -> float:
    if not sorted_xs:
        return float("nan")
    k = (len(sorted_xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (k - lo)


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token ids clear of the first ids (where the special tokens live)."""
    rng = random.Random(seed)
    return [[rng.randrange(16, vocab) for _ in range(length)] for _ in range(n)]


# ---- in-process ----------------------------------------------------------------------------
async def run_inproc(engine, prompts: list[list[int]], max_tokens: int) -> Round:
    from lmfleet.engine.request import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    rnd = Round("inproc", len(prompts))

    async def one(prompt: list[int]) -> None:
        t0 = time.perf_counter()
        first: float | None = None
        tokens = 0
        try:
            async for out in engine.generate(prompt, params):
                tokens += len(out.token_ids)
                if first is None and (out.text or out.finished):
                    first = time.perf_counter()
        except Exception as exc:  # counted, like an HTTP error
            rnd.errors.append(f"{type(exc).__name__}: {exc}")
            return
        _finish(rnd, t0, first, tokens, max_tokens)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    rnd.wall_s = time.perf_counter() - t0
    return rnd


# ---- over HTTP -------------------------------------------------------------------------------
async def run_http(
    client: httpx.AsyncClient, url: str, prompts: list[list[int]], max_tokens: int
) -> Round:
    rnd = Round("http", len(prompts))

    async def one(prompt: list[int]) -> None:
        body = {
            "model": SERVED_NAME,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0 = time.perf_counter()
        first: float | None = None
        tokens, done = 0, False
        try:
            async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:200]
                    rnd.errors.append(f"HTTP {resp.status_code}: {text}")
                    return
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if first is None:
                        first = time.perf_counter()
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    # token chunks carry "usage":null; only the last has usage, and an
                    # error chunk starts with {"error" (a text's quotes are escaped)
                    if '"usage":{' not in data and not data.startswith('{"error"'):
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        rnd.errors.append(f"stream error: {chunk['error']}")
                        return
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
        except (httpx.HTTPError, OSError, ValueError) as exc:
            rnd.errors.append(f"{type(exc).__name__}: {exc}")
            return
        if not done:
            rnd.errors.append("stream ended without [DONE]")
            return
        _finish(rnd, t0, first, tokens, max_tokens)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    rnd.wall_s = time.perf_counter() - t0
    return rnd


def _finish(rnd: Round, t0: float, first: float | None, tokens: int, want: int) -> None:
    if tokens != want or first is None:
        rnd.errors.append(f"got {tokens} tokens, wanted {want}")
        return
    rnd.ttft_s.append(first - t0)
    rnd.e2e_s.append(time.perf_counter() - t0)
    rnd.output_tokens += tokens


# ---- the server process -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model_dir: Path, port: int, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "lmfleet.cli", "serve", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
        "--served-model-name", SERVED_NAME, *extra,
    ]  # fmt: skip


async def wait_ready(client: httpx.AsyncClient, url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lmfleet serve exited with {proc.returncode}")
        try:
            if (await client.get(f"{url}/health", timeout=1)).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("lmfleet serve not ready after 120 s")


# ---- the run ----------------------------------------------------------------------------------
def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _median_of(xs) -> float | None:
    kept = [x for x in xs if x is not None]
    return round(statistics.median(kept), 1) if kept else None


async def run(args: argparse.Namespace, preset: str, many_clients: int) -> dict:
    """Both sides for one preset: its own server process and in-process engine."""
    from lmfleet.engine.async_engine import AsyncEngine
    from lmfleet.engine.models.presets import ensure_model
    from lmfleet.server.settings import ServerSettings

    model_dir = Path(args.model_dir or tempfile.gettempdir()) / f"lmfleet-{preset}"
    ensure_model(model_dir, preset, seed=0)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    settings = ServerSettings(model=str(model_dir), device="cpu", progress=False)
    log(f"model {preset} at {model_dir} (vocab {vocab})")

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = serve_command(model_dir, port, shlex.split(args.serve_args))
    server_log = Path(args.server_log or tempfile.gettempdir()) / f"lmfleet-serve-{port}.log"
    with open(server_log, "wb") as out:  # the child keeps its own handle
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    log(f"started: {shlex.join(cmd)} (pid {proc.pid}, log {server_log})")

    engine = AsyncEngine(settings.engine_config(), progress=False)
    await engine.start()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(600.0, connect=60.0)
    rounds: list[Round] = []
    try:
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            await wait_ready(client, url, proc)
            log("server ready; warm-up round on each side")
            warm = make_prompts(args.clients, args.prompt_len, vocab, seed=10_000)
            await run_inproc(engine, warm, args.max_tokens)
            await run_http(client, url, warm, args.max_tokens)

            for r in range(args.repeats):
                prompts = make_prompts(args.clients, args.prompt_len, vocab, seed=r)
                order = ("inproc", "http") if r % 2 == 0 else ("http", "inproc")
                for side in order:
                    own, server = time.process_time(), _process_cpu_s(proc.pid)
                    if side == "inproc":
                        rnd = await run_inproc(engine, prompts, args.max_tokens)
                        rnd.cpu_s = time.process_time() - own
                    else:
                        rnd = await run_http(client, url, prompts, args.max_tokens)
                        after = _process_cpu_s(proc.pid)
                        if server is not None and after is not None:
                            rnd.cpu_s = after - server
                        rnd.client_cpu_s = time.process_time() - own
                    rounds.append(rnd)
                    s = rnd.summary()
                    log(
                        f"{preset} round {r + 1}/{args.repeats} {side:6s}: "
                        f"TTFT p50 {s['ttft_ms_p50']} ms "
                        f"p90 {s['ttft_ms_p90']} ms, {s['output_tok_s']} tok/s, "
                        f"{s['cpu_us_per_token']} CPU us/token, {s['errors']} errors"
                    )

            many: dict[str, Round] = {}
            if many_clients:
                prompts = make_prompts(many_clients, args.prompt_len, vocab, seed=20_000)
                for side in ("inproc", "http"):
                    log(f"{preset}: {many_clients} concurrent streams, {side}")
                    if side == "inproc":
                        many[side] = await run_inproc(engine, prompts, args.max_tokens)
                    else:
                        many[side] = await run_http(client, url, prompts, args.max_tokens)
                    s = many[side].summary()
                    log(
                        f"  {s['ok']} ok, {s['errors']} errors, TTFT p50 {s['ttft_ms_p50']} ms, "
                        f"{s['output_tok_s']} tok/s"
                    )
            server_state = (await client.get(f"{url}/state")).json()
    finally:
        await engine.shutdown()
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return _report(args, preset, cmd, settings, rounds, many, server_state)


def _report(args, preset, cmd, settings, rounds, many, server_state) -> dict:
    def side_stats(side: str) -> dict[str, float]:
        rs = [r for r in rounds if r.side == side]
        return {
            "ttft_ms_p50": round(_median([1e3 * _pct(sorted(r.ttft_s), 50) for r in rs]), 2),
            "ttft_ms_p90": round(_median([1e3 * _pct(sorted(r.ttft_s), 90) for r in rs]), 2),
            "output_tok_s": round(_median([r.tok_s for r in rs]), 1),
            "e2e_s_p50": round(_median([_pct(sorted(r.e2e_s), 50) for r in rs]), 4),
            "cpu_us_per_token": _median_of(r.summary()["cpu_us_per_token"] for r in rs),
            "errors": sum(len(r.errors) for r in rs),
        }

    inproc, http = side_stats("inproc"), side_stats("http")
    http["client_cpu_us_per_token"] = _median_of(
        r.summary()["client_cpu_us_per_token"] for r in rounds if r.side == "http"
    )
    added = round(http["ttft_ms_p50"] - inproc["ttft_ms_p50"], 2)
    ratio = round(http["output_tok_s"] / inproc["output_tok_s"], 3) if inproc["output_tok_s"] else 0
    result = {
        "machine": _machine(),
        "workload": {
            "preset": preset,
            "clients": args.clients,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "sampling": "greedy, ignore_eos",
            "repeats": args.repeats,
            "serve_command": shlex.join(cmd),
            "engine": {
                "max_num_seqs": settings.max_num_seqs,
                "max_num_batched_tokens": settings.max_num_batched_tokens,
                "block_size": settings.block_size,
                "enable_prefix_caching": settings.enable_prefix_caching,
            },
        },
        "ttft_added_ms_p50": added,
        "throughput_ratio": ratio,
        "cpu_added_us_per_token": (
            round(http["cpu_us_per_token"] - inproc["cpu_us_per_token"], 1)
            if http["cpu_us_per_token"] is not None and inproc["cpu_us_per_token"] is not None
            else None
        ),
        "errors_200_clients": len(many["http"].errors) if "http" in many else None,
        "clients_per_round": args.clients,
        "targets": {
            "ttft_added_ms_p50": f"<= {TARGET_TTFT_ADDED_MS}",
            "throughput_ratio": f">= {TARGET_THROUGHPUT_RATIO}",
            "errors_200_clients": "== 0",
        },
        "met": {
            "ttft_added_ms_p50": added <= TARGET_TTFT_ADDED_MS,
            "throughput_ratio": ratio >= TARGET_THROUGHPUT_RATIO,
            "errors_200_clients": (not many["http"].errors) if "http" in many else None,
        },
        "inproc": inproc,
        "http": http,
        "many_clients": {side: r.summary() for side, r in many.items()},
        "rounds": [r.summary() for r in rounds],
        "server_state_at_end": {
            k: server_state.get(k) for k in ("kv_blocks_total", "num_preemptions", "max_model_len")
        },
    }
    return result


def _machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="HTTP server overhead: the same streaming requests in-process "
        "(AsyncEngine) and through a real `lmfleet serve`, side by side; then many "
        "concurrent clients over HTTP.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--presets",
        default="llama-50m,tiny",
        help="comma-separated random model presets (tiny, llama-50m), each measured with "
        "its own server; the first fills the top-level keys, the others a section each",
    )
    p.add_argument(
        "--model-dir",
        help="folder where each preset is created as lmfleet-PRESET (default: the temp dir)",
    )
    p.add_argument("--clients", type=int, default=32, help="concurrent streams per round")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    p.add_argument("--repeats", type=int, default=5, help="measured rounds on each side")
    p.add_argument(
        "--many-clients",
        type=int,
        default=200,
        help="concurrent streams of the final round (0: skip it)",
    )
    p.add_argument(
        "--many-clients-preset",
        default="tiny",
        help="the preset whose run ends with the --many-clients round",
    )
    p.add_argument(
        "--serve-args",
        default="",
        help="extra flags for `lmfleet serve`, one string (e.g. '--max-num-seqs 64')",
    )
    p.add_argument(
        "--server-log",
        help="folder for the servers' output, lmfleet-serve-PORT.log (default: the temp dir)",
    )
    p.add_argument(
        "--note",
        default="",
        help="a remark stored in the JSON (e.g. what else ran on the machine)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    args = p.parse_args(argv)
    args.presets = [x.strip() for x in args.presets.split(",") if x.strip()]
    for preset in args.presets:
        if preset not in PRESETS:
            p.error(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if not args.presets:
        p.error("--presets must name at least one preset")
    for name in ("clients", "prompt_len", "max_tokens", "repeats"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs: dict[str, dict] = {}
    for preset in args.presets:
        many = args.many_clients if preset == args.many_clients_preset else 0
        runs[preset] = asyncio.run(run(args, preset, many))
        r = runs[preset]
        log(
            f"{preset}: TTFT added p50 {r['ttft_added_ms_p50']} ms "
            f"(target <= {TARGET_TTFT_ADDED_MS}), throughput ratio {r['throughput_ratio']} "
            f"(target >= {TARGET_THROUGHPUT_RATIO}), errors with {args.many_clients} "
            f"clients: {r['errors_200_clients']}"
        )
    headline = runs[args.presets[0]]
    result = {
        "benchmark": "server_overhead",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "notes": NOTES,
        **headline,
    }
    many_run = runs.get(args.many_clients_preset)
    if many_run is not None and many_run["errors_200_clients"] is not None:
        result["errors_200_clients"] = many_run["errors_200_clients"]
        result["met"] = {
            **result["met"],
            "errors_200_clients": many_run["met"]["errors_200_clients"],
        }
    for preset in args.presets[1:]:
        result[preset] = runs[preset]
    if args.note:
        result["note"] = args.note
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
