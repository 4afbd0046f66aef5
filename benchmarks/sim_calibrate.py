"""Fit the simulator's step-time coefficients to lmfleet's own engine.

Runs a model through ``EngineCore`` with a mix of batch sizes and prompt lengths,
times every step, and fits ``seconds = fixed + a·prefill_tokens + b·decode_seqs +
c·kv_tokens`` by non-negative least squares. The result (coefficients, fit error,
the raw step samples' summary) goes to ``benchmarks/results/sim_calibrate.json``; the
``llama-50m-cpu`` profile in ``src/lmfleet/engine/sim/profile.py`` quotes it.

    .venv/bin/python benchmarks/sim_calibrate.py            # llama-50m preset, ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from lmfleet.engine.config import engine_config
from lmfleet.engine.core import EngineCore
from lmfleet.engine.models.presets import ensure_model
from lmfleet.engine.request import Request, SamplingParams


def measure(core: EngineCore, rng: random.Random, rounds: int) -> list[tuple[int, int, int, float]]:
    """(prefill tokens, decode sequences, kv tokens, seconds) for every step."""
    samples = []
    n = 0
    for r in range(rounds):
        batch = rng.choice([1, 2, 4, 8, 16, 32, 64])
        for _ in range(batch):
            prompt = [rng.randrange(10, 30000) for _ in range(rng.randint(16, 512))]
            params = SamplingParams(temperature=0, max_tokens=rng.randint(8, 64), ignore_eos=True)
            core.add_request(Request(f"c{n}", prompt, params))
            n += 1
        while core.has_unfinished():
            sched = core.scheduler.schedule()
            prefill = decode = kv = 0
            for it in sched.scheduled:
                req = it.request
                if it.num_new_tokens == 1 and req.num_computed_tokens >= req.num_prompt_tokens:
                    decode += 1
                else:
                    prefill += it.num_new_tokens
                kv += req.num_computed_tokens + it.num_new_tokens
            t0 = time.perf_counter()
            result = core.runner.execute(sched)
            dt = time.perf_counter() - t0
            core.scheduler.update(sched, result)
            if not sched.is_empty:
                samples.append((prefill, decode, kv, dt))
        print(
            f"[calibrate] round {r + 1}/{rounds}: batch {batch}, {len(samples)} steps",
            file=sys.stderr,
        )
    return samples


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients ≥ 0: drop columns that come out negative."""
    active = list(range(x.shape[1]))
    while True:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef = np.zeros(x.shape[1])
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))


def fit(samples: list[tuple[int, int, int, float]]) -> dict[str, float]:
    x = np.array([[1.0, p, d, k] for p, d, k, _ in samples])
    y = np.array([s for *_, s in samples])
    coef = _nonnegative_lstsq(x, y)
    pred = x @ coef
    rel = np.abs(pred - y) / y
    return {
        "fixed_s": float(coef[0]),
        "prefill_token_s": float(coef[1]),
        "decode_seq_s": float(coef[2]),
        "kv_token_s": float(coef[3]),
        "median_relative_error": float(np.median(rel)),
        "p90_relative_error": float(np.percentile(rel, 90)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--preset", default="llama-50m", help="model preset to measure (default: %(default)s)"
    )
    ap.add_argument(
        "--rounds", type=int, default=12, help="batches of requests to run (default: %(default)s)"
    )
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)"
    )
    ap.add_argument("--seed", type=int, default=0, help="workload seed (default: %(default)s)")
    ap.add_argument(
        "--out",
        default="benchmarks/results/sim_calibrate.json",
        help="result file (default: %(default)s)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = ensure_model(Path(tempfile.gettempdir()) / f"lmfleet-{args.preset}", args.preset)
    core = EngineCore(engine_config(str(model), max_num_batched_tokens=2048), progress=True)
    rng = random.Random(args.seed)
    measure(core, random.Random(args.seed + 1), 1)  # warm-up
    samples = measure(core, rng, args.rounds)
    result = {
        "preset": args.preset,
        "fit": fit(samples),
        "num_steps": len(samples),
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["fit"], indent=2))


if __name__ == "__main__":
    main()
