"""Can one ``lmfleet bench serve`` process drive 500+ concurrent streams without
being the bottleneck?

Setup: a simulated replica (``lmfleet serve``) whose every engine step takes
``--step-s`` seconds whatever the batch (a profile ``bench-client`` registered in
the replica process: ``fixed_s = step``, no per-token costs, 0.1 s load), so a
request of ``--output-len`` tokens takes about ``(output_len + 1) × step`` seconds
and Poisson arrivals at ``rate = concurrency / that`` keep about ``--concurrency``
streams in flight. The streams are slow (2 tokens/s at the default 0.5 s step) so
that the replica, on the same small machine, keeps its pace too.

Recorded (``benchmarks/results/bench_client.json``): the most and the median
requests in flight, the requested, scheduled and achieved request rates
(``achieved_rate_ratio`` = achieved / scheduled; target ≥ 0.95), the send lag
(how late requests left against their schedule), the client's and the replica's
CPU use in cores over the run, and TTFT / TPOT against the step time (the replica
keeping pace).

    .venv/bin/python benchmarks/bench_client.py                  # ~90 s
    .venv/bin/python benchmarks/bench_client.py --url http://host:8000 --step-s 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lmfleet.bench.client import Target
from lmfleet.bench.metrics import summarize, timeline
from lmfleet.bench.monitor import MonitorSettings
from lmfleet.bench.report import summary_dict
from lmfleet.bench.runner import ServeSettings, run_serve
from lmfleet.bench.workloads import WordRenderer, WorkloadSpec, random_workload

RESULT = Path(__file__).parent / "results" / "bench_client.json"

# Runs in the replica process: register a profile with a fixed step, then the CLI.
_LAUNCHER = """
import dataclasses, sys
from lmfleet.engine.sim import PROFILES
step = float(sys.argv[1])
PROFILES["bench-client"] = dataclasses.replace(
    PROFILES["llama-8b-h100"], name="bench-client", description="fixed-step replica",
    fixed_s=step, prefill_token_s=0.0, decode_seq_s=0.0, kv_token_s=0.0,
    load_s=0.1, sleep_s=0.01, wake_s=0.01, vocab_size=32000, max_model_len=4096,
)
from lmfleet.cli import main
sys.exit(main(["--log-level", "WARNING", "serve", "sim:bench-client", *sys.argv[2:]]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_replica(step_s: float, max_seqs: int) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    cmd = [
        sys.executable, "-c", _LAUNCHER, str(step_s),
        "--host", "127.0.0.1", "--port", str(port),
        "--max-num-seqs", str(max_seqs), "--max-concurrent-requests", str(4 * max_seqs),
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the replica exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the replica did not become ready in 120 s")


def stop_replica(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), from /proc; None
    where there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(url: str, args: argparse.Namespace) -> dict:
    latency = (args.output_len + 1) * args.step_s
    rate = args.concurrency / latency
    n = round(rate * args.duration)
    spec = WorkloadSpec(
        num_prompts=n, input_len=args.input_len, output_len=args.output_len, seed=args.seed
    )
    settings = ServeSettings(
        target=Target(url, ""),
        request_rate=rate,
        seed=args.seed,
        monitor=MonitorSettings(url),
        progress=not args.quiet,
    )
    result = asyncio.run(run_serve(settings, random_workload(spec), WordRenderer.sim()))
    s = summarize(result.records, result.duration_s, requested_rate=rate)
    tl = timeline(result.records, result.duration_s, 1.0)
    # steady state: from one request latency after the start to the last send
    steady = [c for t, c in zip(tl.t, tl.in_flight, strict=True) if latency <= t <= args.duration]
    return {
        "concurrency": s.max_concurrency,
        "concurrency_median_steady": statistics.median(steady) if steady else None,
        "requested_rate": rate,
        "scheduled_rate": s.scheduled_rate,
        "achieved_rate": s.achieved_rate,
        "achieved_rate_ratio": s.achieved_rate_ratio,
        "send_lag_ms": {
            "median": s.send_lag.median * 1e3,
            "p99": s.send_lag.p(99) * 1e3,
            "max": s.send_lag.max * 1e3,
        },
        "client_cpu_cores": result.client_cpu_fraction,
        "client_cpu_s": result.client_cpu_s,
        "duration_s": result.duration_s,
        "requests": s.num_requests,
        "completed": s.completed,
        "failed": s.failed,
        "errors": s.errors,
        "error_examples": sorted(
            {f"{r.error}: {r.error_detail}" for r in result.records if r.error}
        )[:5],
        "output_chunks_per_s": sum(len(r.chunk_times) for r in result.records) / result.duration_s,
        "step_s": args.step_s,
        "ttft_ms_median": s.ttft.median * 1e3,
        "tpot_ms_median": s.tpot.median * 1e3,
        "tpot_ms_p99": s.tpot.p(99) * 1e3,
        "replica_running_max": max((x.running or 0 for x in result.samples), default=None),
        "summary": summary_dict(s),
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="drive this endpoint instead of starting a sim replica")
    p.add_argument(
        "--concurrency",
        type=int,
        default=560,
        help="streams to keep in flight (default: %(default)s)",
    )
    p.add_argument(
        "--duration", type=float, default=60.0, help="seconds of arrivals (default: %(default)s)"
    )
    p.add_argument(
        "--step-s",
        type=float,
        default=0.5,
        help="the replica's step time, seconds (default: %(default)s)",
    )
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens (default: %(default)s)")
    p.add_argument(
        "--output-len", type=int, default=32, help="output tokens (default: %(default)s)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="workload and arrival seed (default: %(default)s)"
    )
    p.add_argument("--out", type=Path, default=RESULT, help="result JSON (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args()
    proc = None
    url = args.url
    if url is None:
        proc, url = start_replica(args.step_s, max_seqs=2 * args.concurrency)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    cpu0 = cpu_seconds(proc.pid) if proc else None
    try:
        result = run(url, args)
        cpu1 = cpu_seconds(proc.pid) if proc else None
        if cpu0 is not None and cpu1 is not None:
            result["replica_cpu_cores"] = (cpu1 - cpu0) / (time.perf_counter() - t0)
    finally:
        if proc is not None:
            stop_replica(proc)
    doc = {
        "benchmark": "bench_client",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            # other work on the machine (1-minute load average) skews every figure
            "loadavg_1m_before": load_before[0],
            "loadavg_1m_after": os.getloadavg()[0],
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "target": url
        if args.url
        else f"lmfleet serve sim:bench-client (fixed step {args.step_s} s), same machine",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "quiet")}
        | {"out": None},
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    keys = (
        "concurrency",
        "concurrency_median_steady",
        "requested_rate",
        "achieved_rate_ratio",
        "client_cpu_cores",
        "replica_cpu_cores",
        "completed",
        "failed",
        "ttft_ms_median",
        "tpot_ms_median",
    )
    for k in keys:
        print(f"{k:>28}: {result.get(k)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
