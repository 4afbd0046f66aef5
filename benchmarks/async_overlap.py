"""Async scheduling: how much of the host's per-step work hides behind the device.

A synchronous engine step is host work (schedule, pack the inputs, launch) + device
work (forward, sampling) + host work again (stop checks, outputs), one after the
other. With async scheduling the host schedules and launches step n+1 while step n
runs, so a step costs about max(host, device) instead of host + device.

No GPU is needed to measure the host side of that: the simulated accelerator
(``sim:``) stands in for the device, and its steps take the time a profile gives
while the real scheduler, KV manager, core loop and output bookkeeping run in
Python, as on a GPU machine. The device time here is an *estimate* for Qwen3-0.6B
on an H200, from bandwidth alone (weights plus the KV cache read once per step at
70% of 4.8 TB/s); the measured quantity is the wall time of the same workload with
``async_scheduling`` off and on, alternating, each run in its own process.

Workloads: the GPU benchmark's (``batch256``: 256 requests, prompt and output
lengths uniform in [100, 1024], greedy, EOS ignored, max_num_seqs 256) and its
batch-1 decode (``batch1``: one request, 128-token prompt, 128 outputs).

    .venv/bin/python benchmarks/async_overlap.py            # about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "async_overlap.json"

#: Qwen3-0.6B on an H200, estimated: 28 layers x 8 KV heads x 128 dims x K,V x bf16
KV_BYTES_PER_TOKEN = 28 * 8 * 128 * 2 * 2
WEIGHT_BYTES = 1_500_000_000  # ~0.75e9 parameters in bf16, embeddings included
BANDWIDTH = 4.8e12 * 0.7  # bytes/s: H200 HBM3e at 70%
PROFILE = {
    "base": "llama-8b-h100",
    "description": "Qwen3-0.6B bf16 on an H200, estimated from bandwidth",
    # weights read once per step, plus ~0.15 ms of LM head and sampling
    "fixed_s": WEIGHT_BYTES / BANDWIDTH + 0.00015,
    "prefill_token_s": 2 * 0.6e9 / (989e12 * 0.4),
    "decode_seq_s": 2e-6,
    "kv_token_s": KV_BYTES_PER_TOKEN / BANDWIDTH,
    "kv_capacity_tokens": 1_000_000,
    "max_model_len": 40960,
    "vocab_size": 151936,
    "kv_bytes_per_token": KV_BYTES_PER_TOKEN,
    "load_s": 0.0,
}

_CHILD = r"""
import json, random, sys, time
from lmfleet.engine.llm import LLM
from lmfleet.engine.request import Request, SamplingParams
n, lo, hi, on = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "on"
llm = LLM("sim:qwen3-0.6b-h200-est", progress=False, max_num_seqs=256,
          max_num_batched_tokens=8192, async_scheduling=on)
core = llm.core
rng = random.Random(0)
now = time.monotonic()
for i in range(n):
    prompt = [rng.randrange(4, 30000) for _ in range(rng.randint(lo, hi))]
    params = SamplingParams(max_tokens=rng.randint(lo, hi), temperature=0.0, ignore_eos=True)
    core.add_request(Request(f"r{i}", prompt, params, arrival_time=now))
tokens = 0
t = time.perf_counter()
while core.has_unfinished():
    for out in core.step():
        tokens += len(out.new_token_ids)
wall = time.perf_counter() - t
print(json.dumps({"wall_s": wall, "steps": core.steps, "tokens": tokens,
                  "device_s": core.runner.seconds_simulated}))
"""


def run_once(on: bool, workload: tuple[int, int, int], profiles: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LMFLEET_SIM_PROFILES": str(profiles)}
    argv = [*map(str, workload), "on" if on else "off"]
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, *argv], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    ms = [1000 * r["wall_s"] / r["steps"] for r in runs]
    tok_s = [r["tokens"] / r["wall_s"] for r in runs]
    first = runs[0]
    return {
        "ms_per_step_median": round(statistics.median(ms), 3),
        "ms_per_step_runs": [round(x, 3) for x in ms],
        "out_tok_s_median": round(statistics.median(tok_s), 1),
        "device_ms_per_step": round(1000 * first["device_s"] / first["steps"], 3),
        "steps": first["steps"],
        "tokens": first["tokens"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--num-requests", type=int, default=256, help="workload size (256)")
    p.add_argument("--repeats", type=int, default=3, help="runs per mode, alternating (3)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON ({DEFAULT_OUT})")
    args = p.parse_args(argv)

    profiles = args.out.with_suffix(".profile.json")
    profiles.parent.mkdir(parents=True, exist_ok=True)
    profiles.write_text(json.dumps({"qwen3-0.6b-h200-est": PROFILE}))
    workloads = {"batch256": (args.num_requests, 100, 1024), "batch1": (1, 128, 128)}
    runs: dict[str, dict[str, list[dict]]] = {w: {"sync": [], "async": []} for w in workloads}
    try:
        for i in range(args.repeats):
            for name, workload in workloads.items():
                for mode in ("sync", "async"):
                    t0 = time.perf_counter()
                    r = run_once(mode == "async", workload, profiles)
                    runs[name][mode].append(r)
                    print(
                        f"[{i + 1}/{args.repeats}] {name} {mode:5s}: "
                        f"{r['tokens'] / r['wall_s']:8.0f} tok/s, "
                        f"{1000 * r['wall_s'] / r['steps']:.3f} ms/step "
                        f"(device {1000 * r['device_s'] / r['steps']:.3f}), "
                        f"{time.perf_counter() - t0:.0f}s",
                        flush=True,
                    )
    finally:
        profiles.unlink(missing_ok=True)
    result: dict = {}
    for name in workloads:
        sync, asyn = summarize(runs[name]["sync"]), summarize(runs[name]["async"])
        result[name] = {
            "sync": sync,
            "async": asyn,
            "ratio_out_tok_s_async_vs_sync": round(
                asyn["out_tok_s_median"] / sync["out_tok_s_median"], 3
            ),
            # what the host adds per step beyond the device time, in each mode
            "host_ms_beyond_device": {
                "sync": round(sync["ms_per_step_median"] - sync["device_ms_per_step"], 3),
                "async": round(asyn["ms_per_step_median"] - asyn["device_ms_per_step"], 3),
            },
        }
    result["profile"] = PROFILE
    result["workloads"] = {
        "batch256": f"{args.num_requests} requests, prompt and output lengths uniform in "
        "[100, 1024], greedy, ignore_eos, max_num_seqs 256, max_num_batched_tokens 8192",
        "batch1": "1 request, 128-token prompt, 128 outputs, greedy, ignore_eos",
    }
    result["machine"] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name in workloads:
        keys = ("ratio_out_tok_s_async_vs_sync", "host_ms_beyond_device")
        print(name, json.dumps({k: result[name][k] for k in keys}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
