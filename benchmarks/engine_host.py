"""Host time per engine step: what the GPU waits for between two forwards.

On a GPU the forward of a decode step runs in a few milliseconds (one CUDA-graph
replay); the Python around it (scheduler, KV manager, output bookkeeping, packing
the inputs) runs on the host before the next forward can start. This measures it on
CPU, where it is the same code:

1. ``core``: ``EngineCore.step()`` on the GPU benchmark's workload (256 requests,
   prompt and output lengths uniform in [100, 1024], greedy, EOS ignored) with the
   simulated accelerator made 10^6 times faster than its profile, so a step is
   almost all host time: scheduler + KV manager + runner bookkeeping + update.
   Reported as milliseconds per step (wall / steps). With ``--baseline-src DIR``
   (the ``src`` of another checkout, e.g. a ``git worktree``) the same workload also
   runs on that code, alternating runs, each in its own process.
2. ``pack``: packing one decode step of 256 sequences (contexts of 100-1500 tokens)
   into the runner's input buffer, for the eager layout and for a CUDA graph's
   padded, fixed-width layout (``StepPlan.gather`` + ``StepPlan.write``).

    .venv/bin/python benchmarks/engine_host.py                       # ~1 min
    git worktree add /tmp/base <commit>
    .venv/bin/python benchmarks/engine_host.py --baseline-src /tmp/base/src
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "engine_host.json"

_CORE_CHILD = r"""
import json, random, sys, time
from lmfleet.engine.llm import LLM
from lmfleet.engine.request import Request, SamplingParams
n, lo, hi = (int(a) for a in sys.argv[1:4])
llm = LLM("sim:llama-8b-h100", progress=False, sim_time_scale=1e6, max_num_seqs=256,
          max_num_batched_tokens=8192)
core = llm.core
rng = random.Random(0)
now = time.monotonic()
for i in range(n):
    prompt = [rng.randrange(4, 30000) for _ in range(rng.randint(lo, hi))]
    params = SamplingParams(max_tokens=rng.randint(lo, hi), temperature=0.0, ignore_eos=True)
    core.add_request(Request(f"r{i}", prompt, params, arrival_time=now))
steps = tokens = 0
t = time.perf_counter()
while core.has_unfinished():
    for out in core.step():
        tokens += len(out.new_token_ids)
    steps += 1
wall = time.perf_counter() - t
print(json.dumps({"steps": steps, "tokens": tokens, "wall_s": wall,
                  "ms_per_step": 1000 * wall / steps}))
"""


def run_core(src: Path, args: argparse.Namespace) -> dict:
    """One measured run of the core workload on the code under ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-c", _CORE_CHILD, str(args.num_requests), "100", "1024"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_pack(repeats: int) -> dict:
    """Packing time of one 256-sequence decode step, eager and graph layouts."""
    import numpy as np

    from lmfleet.engine.cuda_graphs import DecodeGraphs
    from lmfleet.engine.outputs import ScheduledRequest, SchedulerOutput
    from lmfleet.engine.request import Request, SamplingParams
    from lmfleet.engine.step_inputs import StepPlan

    rng = random.Random(0)
    items, next_block = [], 0
    for i in range(256):
        prompt, out = rng.randint(100, 1024), rng.randint(1, 500)
        r = Request(f"r{i}", [rng.randrange(100) for _ in range(prompt)], SamplingParams())
        r.output_token_ids = [1] * out
        r.num_computed_tokens = prompt + out - 1
        blocks = list(range(next_block, next_block + -(-(prompt + out) // 16)))
        next_block += len(blocks)
        items.append(ScheduledRequest(r, 1, blocks))
    sched = SchedulerOutput(scheduled=items, num_batched_tokens=256)
    import torch

    graphs = DecodeGraphs(
        lambda *a: torch.empty(0),
        device=torch.device("cpu"),
        sizes=[256],
        width=8192 // 16,
        block_size=16,
        capture=False,
    )
    buf = np.zeros(graphs.layout(256, 256).size * 2, dtype=np.int64)
    result: dict = {"sequences": 256}
    for name in ("eager", "graph"):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            plan = StepPlan.gather(sched)
            lay = plan.layout() if name == "eager" else graphs.layout(256, 256)
            plan.write(buf[: lay.size], lay, 16)
            times.append(time.perf_counter() - t)
        result[f"{name}_ms"] = round(1000 * statistics.median(times), 3)
    result["block_ids"] = len(plan.block_ids)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--num-requests", type=int, default=256, help="core workload size (256)")
    p.add_argument("--repeats", type=int, default=3, help="core runs per side (3)")
    p.add_argument("--pack-repeats", type=int, default=200, help="packing repeats (200)")
    p.add_argument(
        "--baseline-src", type=Path, default=None, help="another checkout's src/ to compare"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON ({DEFAULT_OUT})")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))

    sides = {"head": ROOT / "src"}
    if args.baseline_src is not None:
        sides["baseline"] = args.baseline_src.resolve()
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for i in range(args.repeats):
        for name, src in sides.items():
            rec = run_core(src, args)
            runs[name].append(rec)
            print(
                f"[core {i + 1}/{args.repeats}] {name}: {rec['ms_per_step']:.2f} ms/step",
                flush=True,
            )
    core = {
        name: {
            "ms_per_step_median": round(statistics.median(r["ms_per_step"] for r in rs), 3),
            "ms_per_step_runs": [round(r["ms_per_step"], 3) for r in rs],
            "steps": rs[0]["steps"],
            "tokens": rs[0]["tokens"],
        }
        for name, rs in runs.items()
    }
    if "baseline" in core:
        core["ratio_head_vs_baseline"] = round(
            core["head"]["ms_per_step_median"] / core["baseline"]["ms_per_step_median"], 3
        )
    pack = bench_pack(args.pack_repeats)
    print(f"[pack] {pack}", flush=True)
    doc = {
        "core": core,
        "pack": pack,
        "workload": f"{args.num_requests} requests, prompt and output lengths uniform in "
        "[100, 1024], greedy, ignore_eos, sim:llama-8b-h100 at sim_time_scale 1e6, "
        "max_num_seqs 256, max_num_batched_tokens 8192",
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "processor": platform.processor(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", "benchmarks/engine_host.py", *(argv or sys.argv[1:])]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
