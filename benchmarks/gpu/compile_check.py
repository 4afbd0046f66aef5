"""Compile every Triton kernel the engine launches on CUDA, ahead of time for sm_90.

No GPU is needed: the kernels go through Triton's real compiled path (Triton IR,
TritonGPU IR, LLVM, PTX, then ``ptxas`` to a cubin) for an H100/H200
(``GPUTarget("cuda", 90, 32)``) on this machine's CPUs, so a compile error that the
interpreter (``TRITON_INTERPRET=1``, what the CPU tests run) cannot see shows up here
instead of on a rare GPU lease.

Run it from the repository root (about 40 s on 2 cores; no GPU, no network):

    .venv/bin/python benchmarks/gpu/compile_check.py

It prints one row per compiled variant: kernel, the scenario that produced it,
pointer dtypes, constexprs (and integer arguments Triton specialised to 1),
``num_warps``, OK or the error, registers per thread, shared memory, local/stack
bytes and ptxas's spill stores, compile seconds; then the scalar argument types,
compiler warnings and, for each failure, the error and the compiler's output.
Exit status 1 when any variant fails to compile or exceeds the sm_90 limits
(shared memory or registers per block); spills are reported, not failed.

Options: ``--jobs N`` parallel compiles (default: the CPU count), ``--json PATH``
writes every result (with full error text), ``--only NAME`` compiles the kernels
whose name contains NAME (e.g. ``decode/split``), ``--splits 1,8`` the explicit
decode split counts, ``--graph-batches`` the decode batch sizes sent through the
layer's dispatch, ``--block-sizes 16,32``, ``--num-sms``, ``--arch 89`` another
compute capability (fp8 caches are skipped below 89), ``--cache-dir DIR`` reuses
Triton's cache between runs (by default a fresh temporary one, so everything really
compiles and ptxas reports spills), ``-v`` prints full errors and tracebacks.

How the argument types are obtained: the script calls the engine's own wrappers
(``triton_write_kv``, ``triton_attention``, ``triton_decode_attention``,
``triton_paged_attention``, ``rms_norm``, ``fused_add_rms_norm``, ``qk_norm_rope``,
``silu_and_mul``) with CPU tensors of the dtypes, shapes and strides the engine
uses (Qwen3-0.6B: hidden 1024, intermediate 3072, 16 query heads, 8 KV heads,
head_dim 128), with attention metadata packed by the runner's own ``StepPlan`` /
``PackLayout`` code. Each ``kernel[grid](...)`` launch is recorded instead of run,
then compiled through ``JITFunction.run(..., warmup=True)`` with a stand-in driver
that reports device 0 as compute capability 9.0. That is the same binder the real
launch uses, so pointer dtypes, 16-byte alignment, integers specialised to 1 or
marked divisible by 16, constexprs and options (``num_warps``,
``enable_fp_fusion=False``) are exactly those of a launch on the GPU. Launches that
specialise identically are compiled once (the table lists how many scenarios
share each variant).

Two engine facts are set for the CPU run: fp8 KV caches are allowed (compute
capability 8.9+, as on an H100) and the decode dispatch sees ``--num-sms`` SMs
(132 on an H100 SXM or H200), so ``triton_paged_attention`` picks the split counts
it picks there. Registers, stack and local memory come from ``cuobjdump
-res-usage`` on the cubin and spills from ``ptxas -v`` (both bundled with Triton);
shared memory from the kernel's metadata. What it cannot see: anything that only
happens when a kernel runs (wrong results, out-of-bounds accesses, launch failures
of a driver too old for the cubin), and a different Triton version on the GPU host.
"""

from __future__ import annotations

import os

# The compiled path only: the kernel modules build interpreter kernels when this is set.
os.environ.pop("TRITON_INTERPRET", None)

import argparse
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver as triton_driver
    from triton.runtime.jit import JITFunction
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(f"compile_check needs triton: {exc}")

from lmfleet.engine.layers import triton_attention as ta
from lmfleet.engine.layers import triton_decode as td
from lmfleet.engine.layers import triton_fused as tf
from lmfleet.engine.layers.attention_metadata import AttentionMetadata
from lmfleet.engine.step_inputs import PackLayout, StepPlan

#: Qwen3-0.6B
HIDDEN, INTER, N_HEADS, N_KV, HEAD_DIM = 1024, 3072, 16, 8, 128
EPS = 1e-6
#: max_seq_len_to_capture 8192 over block size 16: the decode graphs' block-table width
GRAPH_WIDTH = 8192 // 16
#: per-block opt-in shared memory limit by compute capability (bytes)
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
#: 32-bit registers per block
MAX_REGS_PER_BLOCK = 65536

DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": torch.float8_e4m3fn,
}


# ---- a driver that compiles for sm_90 and launches nothing --------------------------


class _CompileOnlyDriver:
    """The part of Triton's active driver that ``JITFunction.run(warmup=True)`` uses:
    the current device (0), its stream and its target. Nothing is loaded or launched,
    so no CUDA is needed."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_capability(self, device: int = 0) -> tuple[int, int]:
        return divmod(self.arch, 10)

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)


# ---- recording the engine's launches -------------------------------------------------


@dataclass
class Launch:
    kernel: str  # e.g. "attention/write_kv"
    fn: Any  # the JITFunction
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    scenario: str


class _Recorder:
    """Stands in for a JITFunction in a module's kernel dict: ``rec[grid](...)``
    records the launch."""

    def __init__(self, capture: Capture, name: str, fn: Any) -> None:
        self.capture, self.name, self.fn = capture, name, fn

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.capture.launches.append(
                Launch(self.name, self.fn, tuple(grid), args, kwargs, self.capture.scenario)
            )

        return launch


@dataclass
class Capture:
    launches: list[Launch] = field(default_factory=list)
    scenario: str = ""

    @contextlib.contextmanager
    def installed(self, arch: int, num_sms: int) -> Iterator[None]:
        """Replace every module's jitted kernels by recorders; allow fp8 caches when
        ``arch`` >= 89 and report ``num_sms`` SMs to the decode dispatch."""
        saved: list[tuple[dict[str, Any], str, Any]] = []
        patched = [
            (ta, "fp8_kv_supported", lambda device: arch >= 89),
            (td, "_num_sms", lambda device: num_sms),
        ]
        originals = [(mod, name, getattr(mod, name)) for mod, name, _ in patched]
        try:
            for prefix, mod in (("attention", ta), ("decode", td), ("fused", tf)):
                kern = mod._kernels()
                for key, value in list(kern.items()):
                    if isinstance(value, JITFunction):
                        saved.append((kern, key, value))
                        kern[key] = _Recorder(self, f"{prefix}/{key}", value)
            if not isinstance(tf._round_to, JITFunction):
                raise RuntimeError("triton_fused._round_to is not jitted: TRITON_INTERPRET set?")
            for mod, name, value in patched:
                setattr(mod, name, value)
            yield
        finally:
            for kern, key, value in saved:
                kern[key] = value
            for mod, name, value in originals:
                setattr(mod, name, value)


# ---- inputs as the engine builds them --------------------------------------------------


def make_step(
    starts: list[int], counts: list[int], block_size: int, graph_width: int | None = None
) -> tuple[AttentionMetadata, torch.Tensor]:
    """Attention metadata and positions for sequences with ``starts[i]`` cached tokens
    bringing ``counts[i]`` new ones, packed by the runner's code into one int64
    buffer (the views the kernels get on the GPU). ``graph_width``: a decode graph's
    layout (fixed block-table width)."""
    num_blocks = [-(-(s + c) // block_size) for s, c in zip(starts, counts, strict=True)]
    block_ids = list(range(1, 1 + sum(num_blocks)))
    plan = StepPlan(
        tokens=[0] * sum(counts),
        block_ids=block_ids,
        start=np.array(starts, dtype=np.int64),
        count=np.array(counts, dtype=np.int64),
        num_blocks=np.array(num_blocks, dtype=np.int64),
        samples=np.ones(len(counts), dtype=bool),
    )
    if graph_width is None:
        lay = plan.layout()
    else:
        lay = PackLayout(len(counts), len(counts), len(counts), graph_width)
    buf = torch.zeros(lay.size, dtype=torch.int64)
    qsl, seq_lens = plan.write(buf.numpy(), lay, block_size)
    meta = lay.metadata(
        buf,
        qsl,
        seq_lens,
        block_size=block_size,
        max_query_len=int(plan.count.max()),
        max_seq_len=max(seq_lens),
    )
    return meta, buf[lay.positions]


def qkv(num_tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k as ``qk_norm_rope`` returns them (new, contiguous) and v as a view of
    the fused qkv projection's output, as the attention layer passes them."""
    q_size, kv_size = N_HEADS * HEAD_DIM, N_KV * HEAD_DIM
    fused = torch.zeros(num_tokens, q_size + 2 * kv_size, dtype=dtype)
    v = fused[:, q_size + kv_size :].view(num_tokens, N_KV, HEAD_DIM)
    q = torch.zeros(num_tokens, N_HEADS, HEAD_DIM, dtype=dtype)
    k = torch.zeros(num_tokens, N_KV, HEAD_DIM, dtype=dtype)
    return q, k, v


def kv_cache(num_blocks: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    # torch.empty: the pages of a large cache are never touched
    return torch.empty(2, num_blocks, block_size, N_KV, HEAD_DIM, dtype=dtype)


def act_dtype(cache: str) -> torch.dtype:
    """The query dtype that goes with a cache dtype: fp8 caches run under bf16 models."""
    return torch.bfloat16 if cache == "fp8" else DTYPES[cache]


#: (label, cached tokens per sequence, new tokens per sequence)
ATTENTION_STEPS = [
    ("decode B=1", [40], [1]),
    ("decode B=20", [17 + 13 * i for i in range(20)], [1] * 20),
    ("prefill B=1, one block", [0], [9]),
    ("prefill B=2", [0, 0], [37, 200]),
    ("mixed B=3", [64, 300, 16], [50, 1, 1]),
]


def attention_scenarios(cap: Capture, caches: list[str], block_sizes: list[int]) -> None:
    """``triton_write_kv`` and ``triton_attention`` directly: decode (max_query_len 1)
    and prefill launch configurations."""
    scale = HEAD_DIM**-0.5
    for cache_name in caches:
        for bs in block_sizes:
            for label, starts, counts in ATTENTION_STEPS:
                meta, _ = make_step(starts, counts, bs)
                q, k, v = qkv(sum(counts), act_dtype(cache_name))
                cache = kv_cache(
                    sum(-(-(s + c) // bs) for s, c in zip(starts, counts, strict=True)) + 1,
                    bs,
                    DTYPES[cache_name],
                )
                cap.scenario = f"{label} cache={cache_name} bs={bs}"
                ta.triton_write_kv(k, v, cache, meta.slot_mapping)
                ta.triton_attention(q, cache, meta, scale)
    if "fp8" not in caches:
        return
    # a cache over 2^31 elements (fp8 on an H200: ~137k blocks for Qwen3-0.6B) makes
    # the KV-plane stride a 64-bit argument
    big = kv_cache(137_000, 16, torch.float8_e4m3fn)
    for label, starts, counts in ATTENTION_STEPS[::3]:
        meta, _ = make_step(starts, counts, 16)
        q, k, v = qkv(sum(counts), torch.bfloat16)
        cap.scenario = f"{label} cache=fp8 bs=16, 137k blocks (i64 strides)"
        ta.triton_write_kv(k, v, big, meta.slot_mapping)
        ta.triton_attention(q, big, meta, scale)


def decode_batch_for(splits: int, num_sms: int) -> int:
    """A batch size whose decode dispatch picks ``splits`` (4 when none does)."""
    for b in range(1, 513):
        if td.decode_num_splits(b, N_KV, num_sms) == splits:
            return b
    return 4


def decode_scenarios(cap: Capture, caches: list[str], splits: list[int], num_sms: int) -> None:
    """``triton_decode_attention`` with explicit split counts (graph layout)."""
    scale = HEAD_DIM**-0.5
    for cache_name in caches:
        for s in splits:
            b = decode_batch_for(s, num_sms)
            starts = [100 + 37 * i for i in range(b)]
            meta, _ = make_step(starts, [1] * b, 16, graph_width=GRAPH_WIDTH)
            q, _, _ = qkv(b, act_dtype(cache_name))
            cache = kv_cache(
                sum(meta.block_tables.count_nonzero(1).tolist()) + 1, 16, DTYPES[cache_name]
            )
            cap.scenario = f"decode B={b} splits={s} cache={cache_name}"
            td.triton_decode_attention(q, cache, meta, scale, num_splits=s)


def dispatch_scenarios(cap: Capture, caches: list[str], batches: list[int], num_sms: int) -> None:
    """``triton_paged_attention`` (what the layer calls) for decode steps at the CUDA
    graph sizes: the engine's own choice between the split and the varlen kernel."""
    scale = HEAD_DIM**-0.5
    for cache_name in caches:
        for b in batches:
            starts = [200 + 53 * i for i in range(b)]
            meta, _ = make_step(starts, [1] * b, 16, graph_width=GRAPH_WIDTH)
            q, k, v = qkv(b, act_dtype(cache_name))
            cache = kv_cache(
                sum(meta.block_tables.count_nonzero(1).tolist()) + 1, 16, DTYPES[cache_name]
            )
            splits = td.decode_num_splits(b, N_KV, num_sms)
            cap.scenario = f"layer decode graph B={b} (splits={splits}) cache={cache_name}"
            ta.triton_paged_attention(q, k, v, cache, meta, scale)


def fused_scenarios(cap: Capture, dtypes: list[str]) -> None:
    """The fused elementwise kernels as the decoder layer calls them."""
    t = 5
    meta, positions = make_step([0], [t], 16)
    for name in dtypes:
        dtype = DTYPES[name]
        weight = torch.ones(HIDDEN, dtype=dtype)  # RMSNorm weights are in the model dtype
        x = torch.zeros(t, HIDDEN, dtype=dtype)
        cap.scenario = f"rms_norm {name}"
        tf.rms_norm(x, weight, EPS)
        cap.scenario = f"fused_add_rms_norm {name}"
        tf.fused_add_rms_norm(x, torch.zeros_like(x), weight, EPS)
        # q and k are views of the fused qkv projection; fp32 rotary tables
        q_size, kv_size = N_HEADS * HEAD_DIM, N_KV * HEAD_DIM
        fused = torch.zeros(t, q_size + 2 * kv_size, dtype=dtype)
        q, k, _ = fused.split((q_size, kv_size, kv_size), dim=-1)
        q, k = q.view(t, N_HEADS, HEAD_DIM), k.view(t, N_KV, HEAD_DIM)
        cos = torch.zeros(8192, HEAD_DIM // 2, dtype=torch.float32)
        sin = torch.zeros_like(cos)
        norm_w = torch.ones(HEAD_DIM, dtype=dtype)
        cap.scenario = f"qk_norm_rope {name} (Qwen3 q/k norm)"
        tf.qk_norm_rope(q, k, positions, cos, sin, norm_w, norm_w, EPS)
        cap.scenario = f"qk_norm_rope {name} (no norm, Llama)"
        tf.qk_norm_rope(q, k, positions, cos, sin, None, None, EPS)
        # the layer's K/V write in the same launch: a cache in the model dtype, and fp8
        # under bf16 (v a view of the fused projection too)
        v = fused[:, q_size + kv_size :].view(t, N_KV, HEAD_DIM)
        for cache_name in [name] + (["fp8"] if name == "bf16" else []):
            cache = kv_cache(4, 16, DTYPES[cache_name])
            scales = (0.5, 0.25) if cache_name == "fp8" else (1.0, 1.0)
            for label, w in (("Qwen3 q/k norm", norm_w), ("no norm, Llama", None)):
                cap.scenario = f"qk_norm_rope_write_kv {name} cache={cache_name} ({label})"
                tf.qk_norm_rope_write_kv(
                    q, k, v, positions, cos, sin, w, w, EPS, cache, meta.slot_mapping, *scales
                )
        cap.scenario = f"silu_and_mul {name}"
        tf.silu_and_mul(torch.zeros(t, 2 * INTER, dtype=dtype))
        # fp8 weights: the activations of every projection (inputs 1024, 2048, 3072 wide)
        for width in (HIDDEN, N_HEADS * HEAD_DIM, INTER):
            cap.scenario = f"quantize_fp8_rows {name} K={width}"
            tf.quantize_fp8_rows(torch.zeros(t, width, dtype=dtype), 448.0, 1e-12)


# ---- variants ------------------------------------------------------------------------------


@dataclass
class Variant:
    launch: Launch
    scenarios: list[str]
    signature: list[tuple[str, str, Any]]  # (param, type, specialisation) per parameter

    @property
    def kernel(self) -> str:
        return self.launch.kernel

    def pointer_types(self) -> str:
        return " ".join(
            f"{n.removesuffix('_ptr')}:{t[1:]}" for n, t, _ in self.signature if t.startswith("*")
        )

    def scalar_types(self) -> str:
        parts = []
        for n, t, spec in self.signature:
            if t.startswith("*") or t == "constexpr":
                continue
            parts.append(f"{n}:{t}" + ("/16" if spec == "D" else ""))
        return " ".join(parts)

    def constexprs(self) -> str:
        params = {p.name: p for p in self.launch.fn.params}
        parts = []
        for n, t, spec in self.signature:
            if t != "constexpr":
                continue
            if params[n].is_constexpr:
                parts.append(f"{n}={_short(spec)}")
            else:
                parts.append(f"{n}==1")  # an integer argument specialised to 1
        return " ".join(parts)

    def options(self) -> str:
        opts = {k: v for k, v in self.launch.kwargs.items() if k not in self.constexpr_names()}
        return " ".join(f"{k}={_short(v)}" for k, v in opts.items())

    def constexpr_names(self) -> set[str]:
        return {p.name for p in self.launch.fn.params if p.is_constexpr}


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def variants_of(launches: list[Launch]) -> list[Variant]:
    """Group launches by their specialisation, as Triton's kernel cache does."""
    by_key: dict[tuple[str, str], Variant] = {}
    for launch in launches:
        binder = launch.fn.device_caches[0][4]
        bound, specialization, options = binder(*launch.args, **launch.kwargs)
        names = [p.name for p in launch.fn.params]
        sig = []
        for name, spec in zip(names, specialization, strict=True):
            kind, attr = spec[0], spec[1]
            sig.append((name, kind, bound[name] if kind == "constexpr" else attr))
        key = (launch.kernel, repr(sig) + repr(sorted(options.items())))
        if key in by_key:
            by_key[key].scenarios.append(launch.scenario)
        else:
            by_key[key] = Variant(launch, [launch.scenario], sig)
    return list(by_key.values())


# ---- compiling -------------------------------------------------------------------------------


@contextlib.contextmanager
def _fd_output_to(path: str) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, where MLIR
    diagnostics and ptxas failures print) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


_RES_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin: bytes, workdir: str) -> dict[str, int] | None:
    """Registers per thread, stack, static shared and local memory per thread from
    ``cuobjdump -res-usage``; None when cuobjdump is unavailable."""
    tool = triton.knobs.nvidia.cuobjdump
    if tool is None:
        return None
    path = os.path.join(workdir, f"k{os.getpid()}.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool.path, "-res-usage", path], capture_output=True, text=True)
    finally:
        os.remove(path)
    m = _RES_RE.search(out.stdout)
    if m is None:
        return None
    reg, stack, shared, local = map(int, m.groups())
    return {"regs": reg, "stack": stack, "static_shared": shared, "local": local}


_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
#: compiler output lines that are ptxas's own report (parsed) or the kernel's PTX
_PTXAS_INFO = ("ptxas", "    ")


def compiler_messages(log: str) -> list[str]:
    """The lines of a compile's output other than ptxas's -v report (warnings)."""
    return [
        ln
        for ln in log.splitlines()
        if ln.strip() and not ln.startswith(_PTXAS_INFO) and "warn_once(" not in ln
    ]


def compile_variant(v: Variant, arch: int, workdir: str) -> dict[str, Any]:
    """Compile one variant through ``JITFunction.run(warmup=True)``; a result dict."""
    launch = v.launch
    log_path = os.path.join(workdir, f"log{os.getpid()}.txt")
    t0 = time.perf_counter()
    result: dict[str, Any] = {"ok": False}
    try:
        with _fd_output_to(log_path):
            kernel = launch.fn.run(*launch.args, grid=launch.grid, warmup=True, **launch.kwargs)
        md = kernel.metadata
        result.update(
            ok=True,
            name=md.name,
            num_warps=md.num_warps,
            num_stages=md.num_stages,
            shared=md.shared,
            ptx_bytes=len(kernel.asm.get("ptx", "")),
        )
        usage = resource_usage(kernel.asm["cubin"], workdir)
        if usage is not None:
            result.update(usage)
        problems = []
        if md.shared > MAX_SHARED.get(arch, MAX_SHARED[90]):
            problems.append(f"shared memory {md.shared} B > {MAX_SHARED.get(arch)} B per block")
        if usage is not None and usage["regs"] * 32 * md.num_warps > MAX_REGS_PER_BLOCK:
            problems.append(f"{usage['regs']} regs x {32 * md.num_warps} threads > 64K per block")
        if problems:
            result.update(ok=False, error="; ".join(problems))
    except Exception as exc:  # every failure is a result to report
        result["error"] = "".join(traceback.format_exception_only(exc)).strip()
        result["traceback"] = traceback.format_exc()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    with contextlib.suppress(OSError):
        with open(log_path) as f:
            log = f.read()
        os.remove(log_path)
        if not result["ok"] and log.strip():
            result["log"] = log
        elif result["ok"]:
            # ptxas -v (TRITON_DUMP_PTXAS_LOG): absent when the kernel came from the cache
            m = _SPILL_RE.search(log)
            if m is not None:
                result["spill_stores"], result["spill_loads"] = map(int, m.groups())
            result["messages"] = compiler_messages(log)
    return result


#: the longest compiler output kept per failure (a ptxas failure prints the whole PTX)
_MAX_LOG = 20000


def _child(v: Variant, arch: int, workdir: str, conn: Any) -> None:
    """Compile in a forked process, so that a compiler that aborts (an LLVM fatal
    error, a crash) fails its own variant instead of the whole check."""
    conn.send(compile_variant(v, arch, workdir))
    conn.close()


def _crashed(proc: Any, workdir: str, seconds: float) -> dict[str, Any]:
    code = proc.exitcode
    how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
    result: dict[str, Any] = {
        "ok": False,
        "error": f"the compiling process died ({how})",
        "seconds": round(seconds, 2),
    }
    with contextlib.suppress(OSError), open(os.path.join(workdir, f"log{proc.pid}.txt")) as f:
        result["log"] = f.read()[-_MAX_LOG:]
    return result


def _warm_up(arch: int) -> None:
    """Fill Triton's per-process caches that every compile needs (the hash of the
    Triton installation, about 0.4 s; the NVIDIA tools' versions) before forking."""
    from triton.backends.nvidia.compiler import get_ptxas_version
    from triton.runtime.cache import triton_key

    triton_key()
    get_ptxas_version(arch)
    _ = triton.knobs.nvidia.cuobjdump


def compile_all(variants: list[Variant], arch: int, jobs: int, workdir: str) -> list[dict]:
    """Compile every variant, ``jobs`` forked processes at a time."""
    _warm_up(arch)
    ctx = multiprocessing.get_context("fork")
    results: list[dict[str, Any]] = [{} for _ in variants]
    # slowest (attention) first so the tail is short
    pending = sorted(range(len(variants)), key=lambda i: not variants[i].kernel.startswith("att"))
    pending.reverse()  # popped from the end
    running: dict[Any, tuple[int, Any, float]] = {}  # parent end of the pipe -> (i, proc, t0)
    done = 0
    while pending or running:
        while pending and len(running) < max(1, jobs):
            i = pending.pop()
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(variants[i], arch, workdir, child))
            proc.start()
            child.close()
            running[parent] = (i, proc, time.perf_counter())
        ready = multiprocessing.connection.wait(
            [*running, *(proc.sentinel for _, proc, _ in running.values())]
        )
        for conn in list(running):
            i, proc, t0 = running[conn]
            if conn not in ready and proc.sentinel not in ready:
                continue
            try:
                res = conn.recv()
            except EOFError:  # died before sending its result
                proc.join()
                res = _crashed(proc, workdir, time.perf_counter() - t0)
            else:
                proc.join()
            conn.close()
            del running[conn]
            if "log" in res:
                res["log"] = res["log"][:_MAX_LOG]
            results[i] = res
            done += 1
            status = "ok" if res["ok"] else "FAIL"
            print(
                f"  [{done}/{len(variants)}] {variants[i].kernel} #{i + 1}: {status} "
                f"({res['seconds']:.1f} s)",
                flush=True,
            )
    return results


# ---- report -------------------------------------------------------------------------------


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _headline(error: str) -> str:
    """One line of an error for the table: a CompilationError's last line says what
    is wrong (its first only where)."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()] or ["?"]
    return (lines[-1] if lines[0].endswith(":") else lines[0])[:70]


def _first_lines(text: str, n: int) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[:n]) + ("\n..." if len(lines) > n else "")


def print_report(variants: list[Variant], results: list[dict], verbose: bool) -> None:
    rows = []
    for i, (v, r) in enumerate(zip(variants, results, strict=True)):
        if not r["ok"]:
            status = "FAIL: " + _headline(r.get("error", "?"))
        else:
            status = "OK, spills" if r.get("spill_stores") or r.get("local") else "OK"
        scen = v.scenarios[0] + (f" (+{len(v.scenarios) - 1})" if len(v.scenarios) > 1 else "")
        rows.append(
            [
                str(i + 1),
                v.kernel,
                scen,
                v.pointer_types(),
                v.constexprs(),
                str(r.get("num_warps", v.launch.kwargs.get("num_warps", "-"))),
                status,
                str(r.get("regs", "-")),
                str(r.get("shared", "-")),
                str(r.get("local", "-")) + "/" + str(r.get("stack", "-")),
                str(r.get("spill_stores", "-")),
                f"{r['seconds']:.1f}",
            ]
        )
    header = [
        "#",
        "kernel",
        "scenario",
        "pointers",
        "constexprs",
        "warps",
        "status",
        "regs",
        "smem B",
        "local/stack B",
        "spill B",
        "s",
    ]
    print(_table(rows, header))
    print("\nscalar arguments per variant ('/16': specialised as divisible by 16):")
    for i, v in enumerate(variants):
        print(f"  #{i + 1} {v.kernel}: {v.scalar_types()}   [{v.options()}]")
    messages: dict[str, list[int]] = {}
    for i, r in enumerate(results):
        for msg in r.get("messages", []):
            messages.setdefault(msg, []).append(i + 1)
    if messages:
        print("\ncompiler messages (variant numbers; a warning prints once per process):")
        for msg, where in messages.items():
            more = " ..." if len(where) > 8 else ""
            print(f"  {msg}  [{', '.join(map(str, where[:8]))}{more}]")
    spilled = [i + 1 for i, r in enumerate(results) if r.get("spill_stores") or r.get("local")]
    if spilled:
        print(f"\nregister spills (slow, not an error): variants {', '.join(map(str, spilled))}")
    failed = [
        (i, v, r) for i, (v, r) in enumerate(zip(variants, results, strict=True)) if not r["ok"]
    ]
    for i, v, r in failed:
        print(f"\n==== #{i + 1} {v.kernel} FAILED ({'; '.join(v.scenarios)})")
        print(f"constexprs: {v.constexprs()}\npointers: {v.pointer_types()}")
        print(r.get("error", "?") if verbose else _first_lines(r.get("error", "?"), 25))
        if "log" in r:
            print("-- compiler output:")
            print(r["log"] if verbose else _first_lines(r["log"], 15))
        if verbose and "traceback" in r:
            print(r["traceback"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    p.add_argument("--num-sms", type=int, default=132, help="SMs the decode dispatch sees")
    p.add_argument("--splits", default="1,8", help="explicit decode split counts")
    p.add_argument("--block-sizes", default="16", help="KV block sizes for the varlen kernel")
    p.add_argument(
        "--graph-batches",
        default="1,2,4,8,16,24,32",
        help="decode graph batch sizes for the layer's dispatch",
    )
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache-dir", help="Triton cache to use (default: a fresh temporary one)")
    p.add_argument("--json", help="write every result here")
    p.add_argument("--only", help="compile only kernels whose name contains this")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="compile_check_")
    triton.knobs.cache.dir = args.cache_dir or os.path.join(workdir, "cache")
    triton_driver.set_active(_CompileOnlyDriver(args.arch))
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v: spill counts
    try:
        cap = Capture()
        ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
        with cap.installed(args.arch, args.num_sms):
            # fp8 caches need compute capability 8.9+ (the wrappers refuse them below)
            all_caches = ["fp32", "bf16", "fp16"] + (["fp8"] if args.arch >= 89 else [])
            attention_scenarios(cap, all_caches, ints(args.block_sizes))
            decode_scenarios(cap, all_caches, ints(args.splits), args.num_sms)
            dispatch_scenarios(cap, all_caches, ints(args.graph_batches), args.num_sms)
            fused_scenarios(cap, ["bf16", "fp32", "fp16"])
        variants = variants_of(cap.launches)
        if args.only:
            variants = [v for v in variants if args.only in v.kernel]
        for v in variants:
            if v.launch.kwargs.get("UPCAST"):
                raise RuntimeError(f"{v.kernel}: UPCAST=True is the interpreter's variant")
        t_capture = time.perf_counter() - t_start
        print(
            f"triton {triton.__version__}, target cuda sm_{args.arch}: {len(cap.launches)} "
            f"launches recorded, {len(variants)} distinct variants "
            f"({t_capture:.1f} s); compiling with {args.jobs} job(s)",
            flush=True,
        )
        t0 = time.perf_counter()
        results = compile_all(variants, args.arch, args.jobs, workdir)
        t_compile = time.perf_counter() - t0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print_report(variants, results, args.verbose)
    n_fail = sum(not r["ok"] for r in results)
    total = time.perf_counter() - t_start
    print(
        f"\n{len(variants) - n_fail}/{len(variants)} variants OK, {n_fail} failed; "
        f"compile {t_compile:.1f} s wall ({sum(r['seconds'] for r in results):.1f} s summed), "
        f"total {total:.1f} s"
    )
    if args.json:
        out = [
            {
                "kernel": v.kernel,
                "scenarios": v.scenarios,
                "pointers": v.pointer_types(),
                "scalars": v.scalar_types(),
                "constexprs": v.constexprs(),
                "options": v.options(),
                **r,
            }
            for v, r in zip(variants, results, strict=True)
        ]
        with open(args.json, "w") as f:
            json.dump(
                {"arch": args.arch, "triton": triton.__version__, "results": out}, f, indent=1
            )
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
