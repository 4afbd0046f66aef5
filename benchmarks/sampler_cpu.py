"""Per-call time of the sampler on CPU: the working tree's against a git revision's.

A batch of ``--batch`` rows (256) over ``--vocab`` tokens (151936, Qwen2's), one
float32 logits tensor reused for every call, in three mixes:

* ``greedy``: every row greedy (the fast path).
* ``random``: temperature 0.8, unseeded.
* ``mixed``: a quarter greedy; the rest top-k 50, top-p 0.9, min-p 0.05, half of them
  with repetition, presence and frequency penalties over a 512-token prompt and a
  128-token output, one row in eight seeded, one in eight asking for 5 logprobs,
  one in four with 2 blocked tokens.

Each (mix, sampler) pair is timed ``--repeats`` times over ``--calls`` calls after a
warm-up call, alternating the samplers so drifting load hits both alike; the figure
is the median per-call time. The old sampler is loaded from ``git show
REF:src/lmfleet/engine/layers/sampler.py`` (``--ref``, default ``HEAD``).

    nice -n 19 .venv/bin/python benchmarks/sampler_cpu.py
    nice -n 19 .venv/bin/python benchmarks/sampler_cpu.py --batch 64 --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from lmfleet.engine.layers import sampler as new_sampler
from lmfleet.engine.request import SamplingParams

SAMPLER_PATH = "src/lmfleet/engine/layers/sampler.py"


def load_revision(ref: str) -> ModuleType:
    """The sampler module as it is at git ``ref``."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{ref}:{SAMPLER_PATH}"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "sampler_at_ref.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("sampler_at_ref", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def mix(name: str, batch: int, vocab: int) -> dict:
    """Params, prompts, outputs, blocked tokens and seeds for one mix."""
    g = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    params, prompts, outputs, blocked, seeds = [], [], [], [], []
    for i in range(batch):
        kw: dict = {}
        if name == "greedy":
            kw["temperature"] = 0.0
        elif name == "random":
            kw["temperature"] = 0.8
        elif i % 4 == 0:
            kw["temperature"] = 0.0
        else:
            kw.update(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05)
            if i % 2:
                kw.update(repetition_penalty=1.1, presence_penalty=0.3, frequency_penalty=0.2)
            if i % 8 == 1:
                kw["seed"] = i
            if i % 8 == 3:
                kw["logprobs"] = 5
        params.append(SamplingParams(**kw))
        has_history = name == "mixed"
        prompts.append(tokens(512) if has_history else [])
        outputs.append(tokens(128) if has_history else [])
        blocked.append(tuple(tokens(2)) if has_history and i % 4 == 2 else ())
        seeds.append(kw.get("seed"))
    return {
        "params": params,
        "prompts": prompts,
        "outputs": outputs,
        "blocked": blocked,
        "seeds": seeds,
    }


def make_batch(module: ModuleType, spec: dict):  # type: ignore[no-untyped-def]
    gens = [None if s is None else torch.Generator().manual_seed(s) for s in spec["seeds"]]
    return module.SamplingBatch(
        params=spec["params"],
        generators=gens,
        prompt_token_ids=spec["prompts"],
        output_token_ids=spec["outputs"],
        blocked_token_ids=spec["blocked"],
    )


def time_calls(module: ModuleType, logits: torch.Tensor, spec: dict, calls: int) -> float:
    sampler = module.Sampler(seed=0)
    batch = make_batch(module, spec)
    sampler(logits, batch)  # warm-up
    t0 = time.perf_counter()
    for _ in range(calls):
        sampler(logits, batch)
    return (time.perf_counter() - t0) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--ref", default="HEAD", help="git revision of the old sampler")
    parser.add_argument("--mixes", default="greedy,random,mixed")
    args = parser.parse_args()

    old = load_revision(args.ref)
    logits = torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(1)) * 3
    results = {}
    for name in args.mixes.split(","):
        spec = mix(name, args.batch, args.vocab)
        times: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.repeats):
            times["old"].append(time_calls(old, logits, spec, args.calls))
            times["new"].append(time_calls(new_sampler, logits, spec, args.calls))
        old_ms = 1e3 * statistics.median(times["old"])
        new_ms = 1e3 * statistics.median(times["new"])
        results[name] = {"old_ms": round(old_ms, 2), "new_ms": round(new_ms, 2)}
        print(f"{name:>7}: {args.ref} {old_ms:9.2f} ms   working tree {new_ms:9.2f} ms", flush=True)
    print(
        json.dumps(
            {
                "batch": args.batch,
                "vocab": args.vocab,
                "threads": torch.get_num_threads(),
                "ref": args.ref,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
