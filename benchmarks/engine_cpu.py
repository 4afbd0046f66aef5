"""The engine's CPU benchmark: lmfleet against transformers on one workload.

Workload (the issue's): ``--num-requests`` requests (64), prompt lengths uniform in
[32, 512], output lengths uniform in [32, 256] with EOS ignored, random token-id
prompts with a fixed seed, the random ``llama-50m`` preset (hidden 512, 8 layers,
8 heads, 4 KV heads, vocab 32000) in float32 on CPU.

Contenders, all with the same ``torch.set_num_threads``:

* ``lmfleet``: the offline ``LLM.generate``, every request submitted at once.
* ``hf_static``: transformers ``generate`` in left-padded static batches of
  ``--hf-batch`` (16) requests, greedy, each batch run to its longest requested
  output. Only each request's own requested length counts as output; the extra
  tokens a batch generates for its longest member are the waste static batching pays.
* ``hf_cb``: transformers continuous batching. ``generate_batch`` takes a single
  ``max_new_tokens`` for all prompts, so this drives the same manager that
  ``generate_batch`` uses (``continuous_batching_context_manager``, with the same
  workload hints) and passes each request's own ``max_new_tokens`` to
  ``add_request``; EOS is disabled (``eos_token_id=-1``).

Each (contender, repeat) runs in its own child process, round-robin over the
contenders so drifting machine load hits all of them alike; the child loads the
model, warms up, runs the workload once, and reports its wall time and its peak
RSS (``ru_maxrss``: the whole process, torch and weights included). Figures are
medians over ``--repeats``.

The prefix workload runs lmfleet alone: the same requests, each prompt a shared
``--prefix-len`` (256) token system prefix followed by its own random suffix.

    .venv/bin/python benchmarks/engine_cpu.py            # ~7 min a repeat on 2 idle cores
    .venv/bin/python benchmarks/engine_cpu.py --quick    # 8 requests, 1 repeat
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "engine_cpu.json"
CONTENDERS = ("lmfleet", "hf_static", "hf_cb")
PRESET = "llama-50m"


@dataclass(frozen=True, slots=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def make_workload(
    num_requests: int, seed: int, vocab: int, prefix_len: int = 0, suffix_range=(32, 512)
) -> Workload:
    """Random token-id prompts (ids >= 4, clear of the special tokens) and lengths.

    With ``prefix_len`` every prompt starts with the same ``prefix_len`` tokens and
    its own suffix length is drawn from ``suffix_range``."""
    rng = random.Random(seed)
    plens = [rng.randint(*suffix_range) for _ in range(num_requests)]
    olens = [rng.randint(32, 256) for _ in range(num_requests)]
    prefix = [rng.randrange(4, vocab) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randrange(4, vocab) for _ in range(n)] for n in plens]
    return Workload(prompts, olens)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- contenders (each runs inside its own child process) --------------------------------
def run_lmfleet(model_dir: str, work: Workload, settings: dict) -> dict:
    from lmfleet.engine.llm import LLM
    from lmfleet.engine.request import SamplingParams

    llm = LLM(model_dir, progress=False, **settings)
    warm = [[7 + i] * 48 for i in range(4)]
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    llm.core.kv.reset_prefix_cache()
    before = llm.core.stats()
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in work.output_lens
    ]
    t0 = time.perf_counter()
    outs = llm.generate(work.prompts, params)
    seconds = time.perf_counter() - t0
    after = llm.core.stats()
    got = sum(len(o.token_ids) for o in outs)
    if got != work.output_tokens:
        raise RuntimeError(f"lmfleet produced {got} tokens, expected {work.output_tokens}")
    return {
        "seconds": seconds,
        "output_tokens": got,
        "prefix_queries": after.prefix_queries - before.prefix_queries,
        "prefix_hits": after.prefix_hits - before.prefix_hits,
        "steps": after.steps - before.steps,
        "preemptions": after.num_preemptions - before.num_preemptions,
    }


def _load_hf(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # lengths are honoured, as with ignore_eos
    model.generation_config.pad_token_id = 0
    return model


def run_hf_static(model_dir: str, work: Workload, batch_size: int) -> dict:
    import torch

    model = _load_hf(model_dir)

    def run_batch(prompts: list[list[int]], lens: list[int]) -> int:
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)  # left-padded with 0
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        n = max(lens)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        return (out.shape[1] - width) * len(prompts)

    with torch.no_grad():
        run_batch([[7] * 48, [8] * 40], [8, 8])
        t0 = time.perf_counter()
        generated = 0
        for i in range(0, len(work.prompts), batch_size):
            lens = work.output_lens[i : i + batch_size]
            generated += run_batch(work.prompts[i : i + batch_size], lens)
            if generated < sum(lens):
                raise RuntimeError("transformers generate stopped early")
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "output_tokens": work.output_tokens, "generated_tokens": generated}


def run_hf_cb(model_dir: str, work: Workload) -> dict:
    from hf_continuous import time_continuous_batching

    model = _load_hf(model_dir)
    return time_continuous_batching(
        model, work.prompts, work.output_lens, pad_token_id=0, warmup_token=7
    )


def _child(name: str, args: dict, queue) -> None:
    import torch

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    work = Workload(args["prompts"], args["output_lens"])
    try:
        if name == "hf_static":
            res = run_hf_static(args["model_dir"], work, args["hf_batch"])
        elif name == "hf_cb":
            res = run_hf_cb(args["model_dir"], work)
        else:
            res = run_lmfleet(args["model_dir"], work, args["settings"])
        res["peak_rss_mb"] = _peak_rss_mb()
        queue.put(res)
    except BaseException as exc:  # reported to the parent, which stops the run
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_in_child(name: str, args: dict, timeout: float) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, args, queue))
    proc.start()
    try:
        res = queue.get(timeout=timeout)
    except Exception:
        proc.kill()
        proc.join()
        return {"error": f"no result within {timeout:.0f} s"}
    proc.join()
    return res


# ---- driver ------------------------------------------------------------------------
def _model_dir(cache: str | None) -> str:
    from lmfleet.engine.models.presets import create_model

    base = Path(cache) if cache else Path(tempfile.gettempdir()) / "lmfleet-bench"
    path = base / PRESET
    if not (path / "model.safetensors").exists():
        print(f"creating the {PRESET} model in {path}", flush=True)
        create_model(str(path), PRESET)
    return str(path)


def _summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"] if runs else "not run"}
    tok_s = [r["output_tokens"] / r["seconds"] for r in ok]
    return {
        "tok_s": statistics.median(tok_s),
        "tok_s_runs": [round(x, 2) for x in tok_s],
        "seconds_runs": [round(r["seconds"], 2) for r in ok],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
        "runs": ok,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-requests", type=int, default=64, help="requests in the workload (64)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and lengths (0)")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per contender (3)")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch.set_num_threads for every contender (all cores)",
    )
    p.add_argument("--hf-batch", type=int, default=16, help="static batch size for hf_static (16)")
    p.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)}",
    )
    p.add_argument("--skip-hf", action="store_true", help="run lmfleet only (no ratios)")
    p.add_argument("--skip-prefix", action="store_true", help="skip the shared-prefix workload")
    p.add_argument("--prefix-len", type=int, default=256, help="shared system prefix (256)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="lmfleet max_num_seqs (64)")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="lmfleet max_num_batched_tokens (2048)",
    )
    p.add_argument("--block-size", type=int, default=16, help="lmfleet block_size (16)")
    p.add_argument("--model-cache", default=None, help="where the model is created (a temp dir)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per child run")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 8 requests, 1 repeat, not saved"
    )
    p.add_argument("--out", default=None, help=f"result JSON (default {DEFAULT_OUT})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.num_requests, args.repeats = 8, 1
    contenders = ["lmfleet"] if args.skip_hf else args.contenders.split(",")
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"--contenders: unknown {sorted(unknown)}; choose from {CONTENDERS}")
    import torch

    model_dir = _model_dir(args.model_cache)
    from lmfleet.engine.models.config import ArchConfig

    vocab = ArchConfig.from_dir(model_dir).vocab_size
    work = make_workload(args.num_requests, args.seed, vocab)
    settings = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "block_size": args.block_size,
    }
    child_args = {
        "model_dir": model_dir,
        "threads": args.threads,
        "hf_batch": args.hf_batch,
        "settings": settings,
        "prompts": work.prompts,
        "output_lens": work.output_lens,
    }
    print(
        f"workload: {args.num_requests} requests, {work.prompt_tokens} prompt tokens, "
        f"{work.output_tokens} output tokens; {args.threads} threads; {args.repeats} repeats",
        flush=True,
    )
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    for rep in range(args.repeats):
        for name in contenders:  # round-robin: drifting load hits every contender alike
            res = run_in_child(name, child_args, args.timeout)
            runs[name].append(res)
            if "error" in res:
                print(f"  [{rep + 1}/{args.repeats}] {name:9s} FAILED: {res['error']}", flush=True)
            else:
                print(
                    f"  [{rep + 1}/{args.repeats}] {name:9s} {res['seconds']:8.1f} s "
                    f"{res['output_tokens'] / res['seconds']:8.1f} tok/s "
                    f"peak RSS {res['peak_rss_mb']:.0f} MiB",
                    flush=True,
                )
    summary = {name: _summary(r) for name, r in runs.items()}

    prefix: dict = {}
    if not args.skip_prefix:
        pwork = make_workload(
            args.num_requests, args.seed + 1, vocab, args.prefix_len, suffix_range=(16, 256)
        )
        pargs = dict(child_args, prompts=pwork.prompts, output_lens=pwork.output_lens)
        res = run_in_child("lmfleet", pargs, args.timeout)
        if "error" in res:
            print(f"  prefix workload FAILED: {res['error']}", flush=True)
            prefix = {"error": res["error"]}
        else:
            full_blocks = args.prefix_len // args.block_size
            shareable = (args.num_requests - 1) * full_blocks * args.block_size
            prefix = {
                "prefix_hit_rate": res["prefix_hits"] / shareable if shareable else 0.0,
                "prefix_hits_tokens": res["prefix_hits"],
                "shareable_tokens": shareable,
                "prefix_queries_tokens": res["prefix_queries"],
                "tok_s": res["output_tokens"] / res["seconds"],
                "seconds": res["seconds"],
                "peak_rss_mb": res["peak_rss_mb"],
                "preemptions": res["preemptions"],
                "definition": (
                    "prefix_hit_rate = prefix cache hits (tokens, from EngineCore.stats()) / "
                    "shareable tokens, where shareable = the full blocks of the shared prefix "
                    f"({full_blocks} blocks of {args.block_size} = "
                    f"{full_blocks * args.block_size} tokens) for every request but the first "
                    f"({args.num_requests - 1} requests). Suffixes are random, so any hit is "
                    "a prefix hit."
                ),
                "workload": (
                    f"{args.num_requests} requests, a shared {args.prefix_len}-token prefix + "
                    "a random suffix of 16-256 tokens, outputs 32-256 tokens (ignore_eos), "
                    "all submitted at once to one LLM.generate"
                ),
            }
            print(
                f"  prefix workload: hit rate {prefix['prefix_hit_rate']:.3f} "
                f"({res['prefix_hits']}/{shareable} tokens), {prefix['tok_s']:.1f} tok/s",
                flush=True,
            )

    def tok_s(name: str) -> float | None:
        return summary.get(name, {}).get("tok_s")

    lm, st, cb = tok_s("lmfleet"), tok_s("hf_static"), tok_s("hf_cb")
    result = {
        "lmfleet_tok_s": lm,
        "hf_static_tok_s": st,
        "hf_cb_tok_s": cb,
        "ratio_vs_static": lm / st if lm and st else None,
        "ratio_vs_cb": lm / cb if lm and cb else None,
        "targets": {"ratio_vs_static": 1.5, "ratio_vs_cb": 3.0, "prefix_hit_rate": 0.9},
        "peak_rss_mb": {name: s.get("peak_rss_mb") for name, s in summary.items()},
        "peak_rss_note": (
            "ru_maxrss of the child process that ran the contender (Python, torch, the "
            "model's weights, warm-up and one measured run), max over repeats"
        ),
        "prefix_hit_rate": prefix.get("prefix_hit_rate"),
        "prefix": prefix,
        "workload": {
            "num_requests": args.num_requests,
            "prompt_len": "uniform [32, 512], random token ids",
            "output_len": "uniform [32, 256], ignore_eos / EOS disabled",
            "seed": args.seed,
            "prompt_tokens": work.prompt_tokens,
            "output_tokens": work.output_tokens,
            "model": f"{PRESET} preset, random weights, float32, CPU",
            "tok_s": "requested output tokens / wall seconds of the measured run, median",
            "lmfleet": f"LLM.generate, all requests at once, settings {settings}",
            "hf_static": (
                f"generate, left-padded batches of {args.hf_batch} in submission order, greedy, "
                "max_new_tokens = min_new_tokens = the batch's longest requested output; "
                "tokens beyond a request's own length are generated but not counted"
            ),
            "hf_cb": (
                "continuous_batching_context_manager (the manager generate_batch uses, same "
                "WorkloadHints) with add_request(max_new_tokens=<each request's own length>, "
                "eos_token_id=-1), greedy, all requests added at once"
            ),
        },
        "contenders": summary,
        "repeats": args.repeats,
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": _cpu_name(),
        },
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }
    _print_table(result, summary)
    if not args.quick or args.out:
        out = Path(args.out) if args.out else DEFAULT_OUT
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _print_table(result: dict, summary: dict) -> None:
    print()
    print(f"{'contender':10s} {'tok/s':>9s} {'runs (tok/s)':>28s} {'peak RSS MiB':>13s}")
    for name, s in summary.items():
        if "error" in s:
            print(f"{name:10s} {'failed':>9s}  {s['error']}")
            continue
        runs = ", ".join(f"{x:.1f}" for x in s["tok_s_runs"])
        print(f"{name:10s} {s['tok_s']:9.1f} {runs:>28s} {s['peak_rss_mb']:13.0f}")
    for key in ("ratio_vs_static", "ratio_vs_cb", "prefix_hit_rate"):
        value = result[key]
        target = result["targets"][key]
        shown = "n/a" if value is None else f"{value:.2f}"
        print(f"{key:16s} {shown:>6s}  (target >= {target})")


if __name__ == "__main__":
    raise SystemExit(main())
