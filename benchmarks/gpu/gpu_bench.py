"""The GPU benchmark and correctness run, sized to fit one short device lease.

Runs on a CUDA machine with only torch, triton, transformers, safetensors,
tokenizers, numpy, jinja2 and tqdm installed (``PYTHONPATH=src``; nothing is
pip-installed). Every phase is time-boxed; a phase that fails is recorded in the JSON
(``phases.<name>.error``) and the next one runs. The JSON is rewritten after every
phase, so a run killed at its limit still leaves what it measured.

Phases, in order: the headline figures first (throughput, batch 1, transformers), so
that a run that overruns its budget loses diagnostics, not them.

1. ``model``: write the random ``qwen3-0.6b`` preset (bf16) to a local directory.
2. ``throughput``: ``--num-requests`` (256) requests, prompt and output lengths
   uniform in [100, 1024], EOS ignored, greedy, all submitted at once through the
   engine (bf16, Triton attention, decode CUDA graphs) → ``out_tok_s``; KV blocks
   and how their budget was sized (``kv_sizing``: weights, profiled activation
   peak, reserve, non-torch memory); peak memory; the graphs' sizes and capture
   time. Then one request alone, 128-token prompt, 128 outputs →
   ``batch1_ms_per_token``, and again with async scheduling off →
   ``batch1_sync_ms_per_token``.
3. ``hf``: transformers continuous batching (the manager ``generate_batch`` uses) on
   the first ``--hf-requests`` requests of the same workload under ``no_grad`` →
   ``hf_out_tok_s``. transformers' reference rate on an H200 is ~744 tok/s, so the
   full 256 requests would take ~3 minutes: the subset keeps the run short.
4. ``greedy``: greedy tokens of a few short prompts, float32 on CPU against float32
   on the GPU (Triton backend): where the first mismatch is, per prompt; and bf16 on
   the GPU with decode CUDA graphs against the same engine with ``enforce_eager``,
   and against the graphs without async scheduling.
5. ``logits``: one prefill forward of the same prompts, float32 on CPU (the
   reference) against bf16 on the GPU through the Triton backend: relative error of
   the logits; and the quality cost of the fp8 KV cache (unit scales and scales from
   the prompts' own |K| and |V|), int8 weights and fp8 weights against bf16.
6. ``fp8_kv``: phase 2's workload with ``kv_cache_dtype="fp8"`` → ``out_tok_s`` and
   the KV blocks the same budget buys (scales calibrated at startup, the default;
   ``kv_scales`` says which).
7. ``fp8``: phase 2's workload with fp8 weights (``quantization="fp8"``).
8. ``batch1_eager``: the same batch-1 run with ``enforce_eager`` (no graphs), then a
   kernel-by-kernel profile of decode steps at batch 1 and at batch 64 (512-token
   contexts): device time and launches per step, the top kernels
   (``profile_batch1``, ``profile_batch64``; ``throughput`` has the same at batch 1
   through the graphs, ``profile_batch1_graphs``).
9. ``kernels``: the Triton attention kernels against the torch reference on the
   GPU (mixed prefill/decode batches over shuffled block tables), and a decode
   attention timing (GB/s over the K/V bytes read).

A workload phase that reaches its time cap stops submitting steps and reports the
tokens generated so far over the time taken (``timed_out: true``); rates from a
capped run cover the prefill-heavy start and are biased low.

    PYTHONPATH=src python3 benchmarks/gpu/gpu_bench.py --out $OUT/gpu.json
    # on CPU, to check the script itself (tiny model, Triton interpreter):
    TRITON_INTERPRET=1 PYTHONPATH=src .venv/bin/python benchmarks/gpu/gpu_bench.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import itertools
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from lmfleet.engine.kv_scales import measure_kv_amax, scales_from_amax  # noqa: E402
from lmfleet.engine.layers import triton_attention as ta  # noqa: E402
from lmfleet.engine.layers.attention import paged_attention  # noqa: E402
from lmfleet.engine.layers.attention_metadata import AttentionMetadata  # noqa: E402
from lmfleet.engine.layers.quant import quantize_model  # noqa: E402
from lmfleet.engine.layers.triton_fused import triton_fused_ops  # noqa: E402
from lmfleet.engine.llm import LLM  # noqa: E402
from lmfleet.engine.models.presets import create_model  # noqa: E402
from lmfleet.engine.request import Request, SamplingParams  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


class Run:
    """The results document and the global deadline."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path = path
        self.deadline = T0 + budget_s
        self.doc: dict = {"phases": {}}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.doc, indent=2, default=str) + "\n")

    def phase(self, name: str, fn: Callable[[float], dict], cap_s: float, min_s: float = 5) -> dict:
        """Run ``fn(time cap)``; record its result or its error; never raise."""
        cap = min(cap_s, self.left())
        rec: dict = {"cap_s": round(cap, 1)}
        if cap < min_s:
            rec["skipped"] = f"only {cap:.0f}s of the run's budget left"
            log(f"{name}: skipped ({rec['skipped']})")
        else:
            log(f"{name}: start (cap {cap:.0f}s)")
            t = time.perf_counter()
            try:
                rec.update(fn(cap))
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {exc}"
                rec["traceback"] = traceback.format_exc(limit=8)
                log(f"{name}: FAILED {rec['error']}")
            rec["seconds"] = round(time.perf_counter() - t, 2)
            log(f"{name}: done in {rec['seconds']}s")
        _free()
        if torch.cuda.is_available():  # what the phase left behind: a leak shows here
            free, total = torch.cuda.mem_get_info()
            rec["cuda_after_GiB"] = {
                "allocated": round(torch.cuda.memory_allocated() / 2**30, 2),
                "reserved": round(torch.cuda.memory_reserved() / 2**30, 2),
                "free": round(free / 2**30, 2),
                "total": round(total / 2**30, 2),
            }
        self.doc["phases"][name] = rec
        self.save()
        return rec


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- engines ---------------------------------------------------------------------------
def make_llm(model_dir: str, device: str, dtype: str, backend: str = "triton", **kw) -> LLM:
    """An engine through the real config path: the runner loads, fuses, quantizes,
    sizes the KV cache and captures the decode CUDA graphs (unless ``enforce_eager``)."""
    return LLM(
        model_dir, device=device, dtype=dtype, progress=False, attention_backend=backend, **kw
    )


def graph_info(llm: LLM) -> dict | None:
    graphs = llm.core.runner.graphs
    if graphs is None:
        return None
    return {
        "sizes": graphs.sizes,
        "captured": graphs.capture_enabled,
        "capture_s": round(graphs.capture_seconds, 2),
        "capture_MiB": round(graphs.capture_bytes / 2**20, 1),
        "max_context": graphs.max_context,
    }


# ---- workload --------------------------------------------------------------------------
def workload(n: int, vocab: int, lo: int, hi: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    out_lens = [rng.randint(lo, hi) for _ in range(n)]
    return prompts, out_lens


def drive(llm: LLM, prompts, out_lens, cap_s: float, tag: str) -> dict:
    """Submit everything, step the core until done or ``cap_s``; count output tokens."""
    core = llm.core
    now = time.monotonic()
    for i, (p, n) in enumerate(zip(prompts, out_lens, strict=True)):
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        core.add_request(Request(f"{tag}-{i}", p, sp, arrival_time=now))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    end = t + cap_s
    generated = finished = steps = 0
    timed_out = False
    last_log = t
    while core.has_unfinished():
        if time.perf_counter() > end:
            timed_out = True
            break
        for out in core.step():
            generated += len(out.new_token_ids)
            finished += out.finished
        steps += 1
        if time.perf_counter() - last_log > 15:
            last_log = time.perf_counter()
            log(f"  {tag}: {generated} tokens, {finished}/{len(prompts)} done, {steps} steps")
    seconds = time.perf_counter() - t
    if timed_out:
        core.abort([f"{tag}-{i}" for i in range(len(prompts))])
        while core.has_unfinished():
            core.step()
    return {
        "requests": len(prompts),
        "finished": finished,
        "prompt_tokens": sum(map(len, prompts)),
        "output_tokens": generated,
        "requested_output_tokens": sum(out_lens),
        "steps": steps,
        "wall_s": round(seconds, 3),
        "out_tok_s": round(generated / seconds, 1) if generated and seconds > 0 else None,
        "timed_out": timed_out,
        "async_scheduling": core.async_scheduling,
    }


def warm_up(llm: LLM) -> None:
    """Compile the kernels (decode and prefill variants) outside the timings."""
    drive(llm, [[5] * 40, [6] * 70, [7] * 3], [6, 6, 6], 300, "warm")


# ---- phases --------------------------------------------------------------------------
def prefill_logits(
    model,
    prompts: list[list[int]],
    dtype: torch.dtype,
    device: str,
    fn,
    kv_dtype: torch.dtype | None = None,
):
    """One prefill of ``prompts`` from position 0 over a KV cache of ``kv_dtype``
    (default ``dtype``); float32 logits (T, V) on CPU."""
    cfg = model.config
    block = 16
    lens = [len(p) for p in prompts]
    blocks_per = [-(-n // block) for n in lens]
    caches = [
        torch.zeros(
            2,
            sum(blocks_per),
            block,
            cfg.num_key_value_heads,
            cfg.head_dim,
            dtype=kv_dtype or dtype,
            device=device,
        )
        for _ in range(cfg.num_hidden_layers)
    ]
    tables = torch.zeros(len(prompts), max(blocks_per), dtype=torch.int32)
    slots, start = [], 0
    for i, (n, nb) in enumerate(zip(lens, blocks_per, strict=True)):
        tables[i, :nb] = torch.arange(start, start + nb, dtype=torch.int32)
        slots += [start * block + j for j in range(n)]
        start += nb
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        query_start_loc=torch.tensor(qsl, device=device),
        query_start_loc_cpu=qsl,
        seq_lens=torch.tensor(lens, device=device),
        seq_lens_cpu=lens,
        block_tables=tables.to(device),
        block_size=block,
        max_query_len=max(lens),
        max_seq_len=max(lens),
    )
    ids = torch.tensor([t for p in prompts for t in p], device=device)
    pos = torch.cat([torch.arange(n) for n in lens]).to(device)
    if fn is not None:  # None: keep each layer's attention function as it is
        # as the runner sets it: with fused ops the q/k norm + rotary kernel writes K/V
        model.set_attention_backend(fn, ta.attend_only(fn))
    with torch.inference_mode():
        hidden = model(ids, pos, caches, meta)
        return model.compute_logits(hidden).float().cpu()


def phase_logits(args, model_dir: str, prompts) -> Callable[[float], dict]:
    def run(cap: float) -> dict:
        from lmfleet.engine.models.loader import load_model

        cpu = load_model(model_dir, dtype=torch.float32, device="cpu", progress=False).model
        ref = prefill_logits(cpu, prompts, torch.float32, "cpu", paged_attention)
        del cpu
        _free()

        def gpu_model(fused: bool, quant: str | None = None):
            model = load_model(model_dir, dtype=bf16, device=args.device, progress=False).model
            if fused:  # what the engine's runner does with the Triton backend
                model.fuse_projections()
                model.set_fused_ops(triton_fused_ops())
            if quant is not None:
                quantize_model(model, quant)
            return model

        def logits(model, kv_dtype=None):
            return prefill_logits(
                model, prompts, bf16, args.device, ta.triton_paged_attention, kv_dtype
            )

        def compare(got: torch.Tensor, base: torch.Tensor) -> dict:
            return {
                "rel_err": ((got - base).norm() / base.norm()).item(),
                "top1_agreement": (got.argmax(-1) == base.argmax(-1)).float().mean().item(),
                "finite": bool(torch.isfinite(got).all()),
            }

        def amax_scales(model):
            """fp8 KV scales from these prompts' largest |K| and |V| per layer, over a
            bf16 cache (the runner calibrates on its built-in text instead)."""
            model.set_attention_backend(ta.triton_paged_attention)
            attns = [layer.self_attn for layer in model.model.layers]
            k_amax, v_amax = measure_kv_amax(
                attns, lambda: prefill_logits(model, prompts, bf16, args.device, None)
            )
            return scales_from_amax(k_amax, v_amax, ref.shape[0])

        bf16 = torch.bfloat16
        plain = logits(gpu_model(fused=False))
        _free()
        fused_model = gpu_model(fused=True)
        fused = logits(fused_model)
        fp8_kv = logits(fused_model, torch.float8_e4m3fn)
        scales = amax_scales(fused_model)
        fused_model.set_kv_scales(scales.k, scales.v)
        fp8_kv_scaled = logits(fused_model, torch.float8_e4m3fn)
        del fused_model
        _free()
        quality = {
            "fp8_kv_vs_bf16_kv": compare(fp8_kv, fused),
            "fp8_kv_scaled_vs_bf16_kv": {
                **compare(fp8_kv_scaled, fused),
                "scales": scales.describe(),
            },
        }
        for quant in ("int8", "fp8"):
            quality[f"{quant}_weights_vs_bf16"] = compare(logits(gpu_model(True, quant)), fused)
            _free()
        rel = ((plain - ref).norm() / ref.norm()).item()
        top1 = (plain.argmax(-1) == ref.argmax(-1)).float().mean().item()
        fused_vs = compare(fused, ref)
        return {
            "tokens": ref.shape[0],
            "logits_rel_err_bf16_vs_fp32": rel,
            "top1_agreement": top1,
            "fused_kernels_bf16_vs_fp32": fused_vs,
            "fused_vs_unfused_bf16": compare(fused, plain),
            "quality_vs_bf16": quality,
            "ok": bool(rel < 5e-2 and fused_vs["rel_err"] < 5e-2 and torch.isfinite(plain).all()),
        }

    return run


def phase_greedy(args, model_dir: str, prompts) -> Callable[[float], dict]:
    def run(cap: float) -> dict:
        sp = SamplingParams(max_tokens=args.greedy_tokens, temperature=0.0, ignore_eos=True)
        cpu = LLM(model_dir, device="cpu", dtype="float32", progress=False)
        ref = [o.token_ids for o in cpu.generate(prompts, sp)]
        del cpu
        _free()
        gpu = make_llm(model_dir, args.device, "float32", kv_cache_memory_bytes=1 << 30)
        got = [o.token_ids for o in gpu.generate(prompts, sp)]
        graphs = graph_info(gpu)
        del gpu
        _free()
        first_diff = _first_diffs(ref, got)
        # bf16 on the GPU: decode through CUDA graphs against the same engine eager
        bf16 = {}
        for eager in (True, False):
            llm = make_llm(
                model_dir,
                args.device,
                args.dtype,
                kv_cache_memory_bytes=1 << 30,
                enforce_eager=eager,
                async_scheduling=True,  # the CUDA default, forced so a CPU smoke run checks it too
            )
            bf16[eager] = [o.token_ids for o in llm.generate(prompts, sp)]
            del llm
            _free()
        graph_diff = _first_diffs(bf16[True], bf16[False])
        # the same graphs without async scheduling (the engines above use it on CUDA)
        llm = make_llm(
            model_dir,
            args.device,
            args.dtype,
            kv_cache_memory_bytes=1 << 30,
            max_num_seqs=8,
            async_scheduling=False,
        )
        sync = [o.token_ids for o in llm.generate(prompts, sp)]
        del llm
        _free()
        async_diff = _first_diffs(sync, bf16[False])
        return {
            "prompts": len(prompts),
            "tokens_each": args.greedy_tokens,
            "identical": all(d is None for d in first_diff),
            "first_mismatch_index": first_diff,
            "cuda_graphs_fp32": graphs,
            "graphs_vs_eager_bf16_identical": all(d is None for d in graph_diff),
            "graphs_vs_eager_bf16_first_mismatch": graph_diff,
            "async_vs_sync_bf16_identical": all(d is None for d in async_diff),
            "async_vs_sync_bf16_first_mismatch": async_diff,
        }

    return run


def _first_diffs(ref: list[list[int]], got: list[list[int]]) -> list[int | None]:
    """Per prompt, the index of the first differing token (None: identical)."""
    out = []
    for a, b in zip(ref, got, strict=True):
        out.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None))
    return out


def _twin_check(device: str, dtype: torch.dtype, block_size: int, seed: int) -> float:
    """Relative error of the Triton kernels against the torch reference over a
    prefill, a mixed chunk+decode step and a decode step (Qwen3-0.6B's heads)."""
    n_heads, n_kv, hd, num_blocks = 16, 8, 128, 160
    gen = torch.Generator().manual_seed(seed)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables: dict[int, list[int]] = {}
    done: dict[int, int] = {}
    shape = (2, num_blocks, block_size, n_kv, hd)
    ref_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    cache = ref_cache.clone()
    worst = 0.0
    for entries in (
        [(0, 300), (1, 17), (2, 1)],
        [(0, 1), (1, 250), (3, 129), (2, 1)],
        [(s, 1) for s in range(4)],
    ):
        slots, qsl, lens = [], [0], []
        for s, n in entries:
            start = done.get(s, 0)
            end = start + n
            table = tables.setdefault(s, [])
            while len(table) * block_size < end:
                table.append(free.pop())
            slots += [
                table[p // block_size] * block_size + p % block_size for p in range(start, end)
            ]
            qsl.append(qsl[-1] + n)
            lens.append(end)
            done[s] = end
        width = max(len(tables[s]) for s, _ in entries)
        bt = torch.zeros(len(entries), width, dtype=torch.int32)
        for r, (s, _) in enumerate(entries):
            bt[r, : len(tables[s])] = torch.tensor(tables[s], dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=device),
            query_start_loc=torch.tensor(qsl, device=device),
            query_start_loc_cpu=qsl,
            seq_lens=torch.tensor(lens, device=device),
            seq_lens_cpu=lens,
            block_tables=bt.to(device),
            block_size=block_size,
            max_query_len=max(n for _, n in entries),
            max_seq_len=max(lens),
        )
        t = qsl[-1]
        q = torch.randn(t, n_heads, hd, generator=gen).to(device, dtype)
        k = torch.randn(t, n_kv, hd, generator=gen).to(device, dtype)
        v = torch.randn(t, n_kv, hd, generator=gen).to(device, dtype)
        ref = paged_attention(q, k, v, ref_cache, meta, hd**-0.5).double()
        out = ta.triton_paged_attention(q, k, v, cache, meta, hd**-0.5).double()
        if not torch.isfinite(out).all():
            return float("inf")
        worst = max(worst, ((out - ref).norm() / ref.norm()).item())
    return worst


def _decode_timing(device: str, batch: int, ctx: int, kv_dtype: torch.dtype) -> dict:
    """Median time of one decode attention call (Qwen3-0.6B's heads, bf16 queries,
    blocks shuffled) through the varlen kernel and through the split-K decode kernel
    (its split count for this batch); GB/s over the K/V bytes each must read."""
    import triton.testing

    from lmfleet.engine.layers.triton_decode import decode_splits_for, triton_decode_attention

    n_heads, n_kv, hd, bs = 16, 8, 128, 16
    nb_seq = -(-ctx // bs)
    num_blocks = batch * nb_seq
    cache = torch.randn(2, num_blocks, bs, n_kv, hd, device=device).to(kv_dtype)
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(batch, dtype=torch.int64, device=device),
        query_start_loc=torch.arange(batch + 1, device=device),
        query_start_loc_cpu=list(range(batch + 1)),
        seq_lens=torch.full((batch,), ctx, device=device),
        seq_lens_cpu=[ctx] * batch,
        block_tables=perm.view(batch, nb_seq),
        block_size=bs,
        max_query_len=1,
        max_seq_len=ctx,
    )
    q = torch.randn(batch, n_heads, hd, dtype=torch.bfloat16, device=device)
    splits = decode_splits_for(batch, n_kv, q.device)
    kv_bytes = 2 * batch * ctx * n_kv * hd * cache.element_size()
    rec: dict = {"batch": batch, "ctx": ctx, "kv_dtype": str(kv_dtype), "splits": splits}
    calls = {
        "varlen": lambda: ta.triton_attention(q, cache, meta, hd**-0.5),
        "split_k": lambda: triton_decode_attention(q, cache, meta, hd**-0.5, num_splits=splits),
    }
    for name, fn in calls.items():
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        rec[f"{name}_ms"] = round(ms, 4)
        rec[f"{name}_GB_per_s"] = round(kv_bytes / ms / 1e6, 1)
    return rec


def phase_kernels(args) -> Callable[[float], dict]:
    def run(cap: float) -> dict:
        checks = {}
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for bs in (16, 32):
                name = f"{str(dtype).removeprefix('torch.')}_bs{bs}"
                checks[name] = _twin_check(args.device, dtype, bs, seed=bs)
        tol = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 2e-3}
        ok = all(err < tol[name.split("_")[0]] for name, err in checks.items())
        timings = [
            _decode_timing(args.device, b, c, dt)
            for b, c in ((256, 1024), (32, 2048), (4, 2048), (1, 1024))
            for dt in (torch.bfloat16, torch.float8_e4m3fn)
        ]
        return {"rel_err": checks, "ok": ok, "decode_attention": timings}

    return run


def phase_throughput(
    args,
    model_dir: str,
    prompts,
    out_lens,
    quant: str | None = None,
    kv_cache_dtype: str = "auto",
    batch1: bool = False,
) -> Callable[[float], dict]:
    def run(cap: float) -> dict:
        t = time.perf_counter()
        llm = make_llm(
            model_dir,
            args.device,
            args.dtype,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            gpu_memory_utilization=args.gpu_memory_utilization,
            quantization=quant,
            kv_cache_dtype=kv_cache_dtype,
        )
        rec: dict = {
            "engine_start_s": round(time.perf_counter() - t, 2),
            "quantization": quant,
            "kv_cache_dtype": kv_cache_dtype,
            "cuda_graphs": graph_info(llm),
        }
        warm_up(llm)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        rec.update(drive(llm, prompts, out_lens, cap - 15, "tp"))
        log(f"  tp: out_tok_s {rec['out_tok_s']} ({rec['output_tokens']} tokens)")
        stats = llm.core.stats()
        rec["kv_blocks"] = stats.num_blocks
        # how the KV budget was derived (profiled forward); null on CPU or a fixed budget
        sizing = llm.core.runner.kv_sizing
        rec["kv_sizing"] = dataclasses.asdict(sizing) if sizing is not None else None
        rec["kv_block_size"] = llm.config.cache.block_size
        rec["kv_scales"] = llm.core.runner.kv_scales.describe()
        rec["num_preemptions"] = stats.num_preemptions
        if torch.cuda.is_available():
            rec["peak_memory_allocated_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            layout = llm.core.runner.layout
            rec["kv_cache_GiB"] = round(layout.num_bytes / 2**30, 2) if layout else None
        if batch1:  # each part on its own: a failure here keeps out_tok_s above
            vocab = llm.core.vocab_size
            _part(rec, "batch1", functools.partial(_batch1, llm, vocab))
            _part(rec, "batch1_sync", functools.partial(_batch1_sync, llm, vocab))
            # the GPU time of a batch-1 decode step replayed from a CUDA graph
            _part(
                rec,
                "profile_batch1_graphs",
                functools.partial(_profile_decode, llm, 1, args.profile_context, 8),
            )
        del llm
        return rec

    return run


def _part(rec: dict, key: str, fn: Callable[[], dict]) -> None:
    """``rec[key] = fn()``, or the error and its traceback under ``rec[key]``."""
    try:
        rec[key] = fn()
        if "batch1_ms_per_token" in rec[key]:
            log(f"  {key}: {rec[key]['batch1_ms_per_token']} ms/token")
    except Exception as exc:
        rec[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(8)}
        log(f"  {key}: FAILED {rec[key]['error']}")


def phase_batch1_eager(args, model_dir: str) -> Callable[[float], dict]:
    """Batch-1 decode without CUDA graphs: what the graphs save. Then where the GPU
    time of a decode step goes, kernel by kernel (eager, so every launch is its own
    event), at batch 1 and at batch 64 with 512-token contexts."""

    def run(cap: float) -> dict:
        # the batch profile's sequences must all fit at once: 64 x ~520 tokens of
        # Qwen3-0.6B's 112 KiB per token is ~3.7 GiB (1 GiB would run them in waves)
        kv_bytes = (1 << 30) if args.smoke else (8 << 30)
        llm = make_llm(
            model_dir, args.device, args.dtype, kv_cache_memory_bytes=kv_bytes, enforce_eager=True
        )
        warm_up(llm)
        rec = _batch1(llm, llm.core.vocab_size)
        rec["profile_batch1"] = _profile_decode(llm, 1, args.profile_context, 8)
        batch = args.profile_batch
        rec[f"profile_batch{batch}"] = _profile_decode(llm, batch, args.profile_context * 4, 4)
        return rec

    return run


def _profile_decode(llm: LLM, batch: int, prompt_len: int, steps: int) -> dict:
    """Device time per decode step by kernel (``torch.profiler``), over ``steps``
    decode steps of ``batch`` sequences with ``prompt_len``-token prompts. On CPU the
    times are the ops' CPU times."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    core = llm.core
    rng = random.Random(3)
    vocab = core.vocab_size
    # the prompts prefill over several steps, and decodes run beside them: enough
    # tokens that the first sequences are still running when the last prefill ends
    prefill_steps = -(-batch * prompt_len // core.config.scheduler.max_num_batched_tokens)
    sp = SamplingParams(max_tokens=steps + prefill_steps + 4, temperature=0.0, ignore_eos=True)
    now = time.monotonic()
    for i in range(batch):
        prompt = [rng.randrange(4, vocab) for _ in range(prompt_len)]
        core.add_request(Request(f"prof{batch}-{i}", prompt, sp, arrival_time=now))
    while any(
        r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.requests.values()
    ):
        core.step()  # prefill (and the first decode steps of early finishers)
    core.step()
    running = core.scheduler.num_running  # what the steps below really decode
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # one cycle, so acc_events changes nothing but torch 2.11's warning that it is off
    with profile(activities=activities, acc_events=True) as prof:
        for _ in range(steps):
            core.step()
        if cuda:
            torch.cuda.synchronize()
    while core.has_unfinished():
        core.step()
    rows = []
    for e in prof.key_averages():
        if cuda:
            # kernels and copies only: a CPU op's self device time is its kernels'
            # (counted again by their own rows), as in torch's own table
            if e.device_type != DeviceType.CUDA or e.is_user_annotation:
                continue
            t = e.self_device_time_total
        else:
            t = e.self_cpu_time_total
        if t > 0:
            rows.append((e.key, e.count, t))
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    return {
        "batch": batch,
        "running": running,
        "context": prompt_len,
        "steps": steps,
        "device_us_per_step" if cuda else "cpu_us_per_step": round(total / steps, 1),
        "launches_per_step": round(sum(r[1] for r in rows) / steps, 1) if cuda else None,
        "top": [
            {
                "name": k[:90],
                "calls_per_step": round(c / steps, 2),
                "us_per_step": round(t / steps, 1),
            }
            for k, c, t in rows[:15]
        ],
    }


def _batch1(llm: LLM, vocab: int) -> dict:
    """One request alone: 128-token prompt, 128 outputs; ms per output token after
    the first."""
    core = llm.core
    rng = random.Random(1)
    prompt = [rng.randrange(4, vocab) for _ in range(128)]
    sp = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    core.add_request(Request("b1", prompt, sp, arrival_time=time.monotonic()))
    times = []
    while core.has_unfinished():
        outs = core.step()  # a token is returned once it is on the host: no sync needed
        if outs and outs[0].new_token_ids:
            times.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    gaps.sort()
    return {
        "tokens": len(times),
        "batch1_ms_per_token": round(1000 * (times[-1] - times[0]) / (len(times) - 1), 3),
        "median_ms": round(1000 * gaps[len(gaps) // 2], 3),
        "async_scheduling": core.async_scheduling,
    }


def _batch1_sync(llm: LLM, vocab: int) -> dict:
    """:func:`_batch1` on the same engine with async scheduling off (nothing is in
    flight between requests, so the switch is safe)."""
    core = llm.core
    was, core.async_scheduling = core.async_scheduling, False
    try:
        return _batch1(llm, vocab)
    finally:
        core.async_scheduling = was


def phase_hf(args, model_dir: str, prompts, out_lens) -> Callable[[float], dict]:
    def run(cap: float) -> dict:
        import transformers
        from transformers import AutoModelForCausalLM, GenerationConfig

        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16, attn_implementation="sdpa"
        ).to(args.device)
        model.eval()
        n = min(args.hf_requests, len(prompts))
        ps, ls = prompts[:n], out_lens[:n]
        config = GenerationConfig(
            do_sample=False, max_new_tokens=max(ls), eos_token_id=-1, pad_token_id=0
        )
        rec: dict = {"transformers": transformers.__version__, "requests": n}

        def manager_run(model, ps, ls, deadline: float) -> tuple[int, int, bool, float]:
            """(output tokens of finished requests, finished, timed out, end time): the
            end is taken before the manager's exit, which joins its thread."""
            kwargs = {"generation_config": config, "block": True, "timeout": 5}
            try:
                from transformers.generation.continuous_batching.utils import WorkloadHints

                kwargs["workload_hints"] = WorkloadHints(
                    max_prompt_length=max(map(len, ps)),
                    max_generated_length=max(ls),
                    num_requests=len(ps),
                )
            except ImportError:
                pass
            done: dict[str, int] = {}
            with model.continuous_batching_context_manager(**kwargs) as manager:
                ids = [
                    manager.add_request(p, max_new_tokens=k, eos_token_id=-1)
                    for p, k in zip(ps, ls, strict=True)
                ]
                while len(done) < len(ids):
                    if time.perf_counter() > deadline:
                        return sum(done.values()), len(done), True, time.perf_counter()
                    result = manager.get_result(timeout=1)
                    if result is not None and result.is_finished():
                        if result.error is not None:
                            raise RuntimeError(f"transformers request failed: {result.error}")
                        done[result.request_id] = len(result.generated_tokens)
                    elif result is None and not manager.is_running():
                        raise RuntimeError("transformers' continuous batching loop died")
                end = time.perf_counter()
            return sum(done.values()), len(done), False, end

        with torch.no_grad():
            manager_run(model, [[7] * 48, [8] * 40], [8, 8], time.perf_counter() + 120)
            t = time.perf_counter()
            got, finished, timed_out, end = manager_run(model, ps, ls, t + cap - 20)
            seconds = end - t
        rec.update(
            {
                "finished": finished,
                "output_tokens_of_finished": got,
                "requested_output_tokens": sum(ls),
                "wall_s": round(seconds, 2),
                "hf_out_tok_s": round(got / seconds, 1),
                "timed_out": timed_out,
                "note": "unfinished requests' tokens are not counted when timed out (biased low)",
            }
        )
        del model
        return rec

    return run


# ---- main --------------------------------------------------------------------------
#: seconds a phase needs to measure anything (engine start, warm-up and graph capture
#: come out of its cap before the timed part); with less budget left it is skipped
MIN_S = {"throughput": 45, "hf": 45, "fp8_kv": 45, "fp8": 45, "greedy": 30, "batch1_eager": 30}
#: transformers generate_batch on this workload on an H200, output tok/s (REFERENCE.md)
HF_REFERENCE_H200 = 744.0


def _ratio(out_tok_s: float | None, base: float | None) -> float | None:
    """``out_tok_s / base``, or None when either is missing (or zero)."""
    if not out_tok_s or not base:
        return None
    return round(out_tok_s / base, 2)


def _device_tag(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device).lower()
        m = re.search(r"(h100|h200|a100|l40s|l4|a10g|b200|gh200)", name)
        return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON path (default: $OUT or benchmarks/results)"
    )
    ap.add_argument(
        "--model-dir", default=None, help="where to write the model (default: a temp dir)"
    )
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget-s", type=float, default=450, help="the whole run's time budget")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--greedy-tokens", type=int, default=24)
    ap.add_argument("--hf-requests", type=int, default=64)
    ap.add_argument("--cap-throughput-s", type=float, default=120)
    ap.add_argument("--cap-fp8-s", type=float, default=90)
    ap.add_argument("--cap-hf-s", type=float, default=100)
    ap.add_argument(
        "--profile-batch", type=int, default=64, help="the larger profiled decode batch"
    )
    ap.add_argument(
        "--profile-context",
        type=int,
        default=128,
        help="prompt length of the batch-1 profiles (4x for the larger batch)",
    )
    ap.add_argument("--skip", default="", help="comma-separated phases to skip")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script")
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.device, args.dtype = "tiny", "cpu", "float32"
        args.num_requests, args.min_len, args.max_len = 6, 8, 40
        args.hf_requests, args.greedy_tokens = 4, 6
        args.max_num_batched_tokens = 256
        args.profile_batch, args.profile_context = 4, 8
    skip = set(filter(None, args.skip.split(",")))
    tag = _device_tag(args.device)
    out = (
        args.out
        or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results") / f"gpu_{tag}.json"
    )
    run = Run(out, args.budget_s)
    run.doc.update(
        {
            "device": torch.cuda.get_device_name(args.device)
            if tag != "cpu"
            else platform.processor(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "preset": args.preset,
            "args": {k: str(v) for k, v in vars(args).items()},
            "triton_available": ta.triton_available(),
        }
    )
    try:
        import triton

        run.doc["triton"] = triton.__version__
    except ImportError:
        run.doc["triton"] = None
    log(
        f"writing {out}; device {run.doc['device']}, torch {torch.__version__}, triton {run.doc['triton']}"
    )

    model_dir = args.model_dir or tempfile.mkdtemp(prefix="lmfleet-gpu-")
    rec = run.phase("model", lambda cap: {"dir": str(create_model(model_dir, args.preset))}, 240)
    if "error" in rec:
        return 1
    from lmfleet.engine.models.config import ArchConfig

    vocab = ArchConfig.from_dir(model_dir).vocab_size
    rng = random.Random(7)
    short = [[rng.randrange(4, vocab) for _ in range(n)] for n in (5, 17, 33, 64)]
    prompts, out_lens = workload(args.num_requests, vocab, args.min_len, args.max_len)

    # headline figures first: a run past its budget skips the diagnostics at the end
    phases = [
        (
            "throughput",
            phase_throughput(args, model_dir, prompts, out_lens, batch1=True),
            args.cap_throughput_s,
        ),
        ("hf", phase_hf(args, model_dir, prompts, out_lens), args.cap_hf_s),
        ("greedy", phase_greedy(args, model_dir, short), 90),
        ("logits", phase_logits(args, model_dir, short), 90),
        (
            "fp8_kv",
            phase_throughput(args, model_dir, prompts, out_lens, kv_cache_dtype="fp8"),
            args.cap_fp8_s,
        ),
        ("fp8", phase_throughput(args, model_dir, prompts, out_lens, "fp8"), args.cap_fp8_s),
        ("batch1_eager", phase_batch1_eager(args, model_dir), 60),
        ("kernels", phase_kernels(args), 60),
    ]
    for name, fn, cap in phases:
        if name in skip or (args.smoke and name == "kernels"):
            run.doc["phases"][name] = {"skipped": "--skip" if name in skip else "--smoke"}
            continue
        run.phase(name, fn, cap, min_s=MIN_S.get(name, 5))

    ph = run.doc["phases"]
    out_tok_s = ph.get("throughput", {}).get("out_tok_s")
    hf_out_tok_s = ph.get("hf", {}).get("hf_out_tok_s")
    summary = {
        "out_tok_s": out_tok_s,
        "batch1_ms_per_token": ph.get("throughput", {})
        .get("batch1", {})
        .get("batch1_ms_per_token"),
        "kv_blocks": ph.get("throughput", {}).get("kv_blocks"),
        "peak_memory_allocated_GiB": ph.get("throughput", {}).get("peak_memory_allocated_GiB"),
        "batch1_eager_ms_per_token": ph.get("batch1_eager", {}).get("batch1_ms_per_token"),
        "batch1_sync_ms_per_token": ph.get("throughput", {})
        .get("batch1_sync", {})
        .get("batch1_ms_per_token"),
        "cuda_graphs": ph.get("throughput", {}).get("cuda_graphs"),
        "fp8_kv_out_tok_s": ph.get("fp8_kv", {}).get("out_tok_s"),
        "fp8_kv_blocks": ph.get("fp8_kv", {}).get("kv_blocks"),
        "fp8_out_tok_s": ph.get("fp8", {}).get("out_tok_s"),
        "hf_out_tok_s": hf_out_tok_s,
        "ratio_vs_hf": _ratio(out_tok_s, hf_out_tok_s),
        # transformers' rate on the full workload, measured on an H200 (REFERENCE.md):
        # the measured subset above is time-capped and may be biased low
        "ratio_vs_hf_reference_744": _ratio(out_tok_s, HF_REFERENCE_H200),
        "logits_rel_err": ph.get("logits", {}).get("logits_rel_err_bf16_vs_fp32"),
        "quality_vs_bf16": ph.get("logits", {}).get("quality_vs_bf16"),
        "greedy_identical_fp32": ph.get("greedy", {}).get("identical"),
        "graphs_vs_eager_bf16_identical": ph.get("greedy", {}).get(
            "graphs_vs_eager_bf16_identical"
        ),
        "async_vs_sync_bf16_identical": ph.get("greedy", {}).get("async_vs_sync_bf16_identical"),
        "kernels_ok": ph.get("kernels", {}).get("ok"),
        "failed_phases": [k for k, v in ph.items() if "error" in v],
        "total_s": round(time.perf_counter() - T0, 1),
    }
    run.doc["summary"] = summary
    run.save()
    log("summary:")
    for k, v in summary.items():
        print(f"  {k:28s} {v}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
