"""The model runner: the only code that builds device tensors and calls the model.

It owns the weights, the KV cache tensors and the per-request random generators.
It turns a ``SchedulerOutput`` into one flat batch of tokens, runs the model, and
samples a token for every request whose step reached the end of its known tokens.

On an accelerator it also sizes the KV cache: after the weights are loaded it runs
one dummy forward at the full token budget and gives the KV cache what is left of
``gpu_memory_utilization`` once weights, that forward's activation peak, a reserve
and other processes' memory are taken out (:class:`KVSizing`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lmfleet.engine.config import CacheConfig, ModelConfig, SchedulerConfig
from lmfleet.engine.cuda_graphs import DecodeGraphs, capture_sizes
from lmfleet.engine.faults import SAMPLE, fault_injector
from lmfleet.engine.kv_scales import (
    CALIBRATION_RANDOM_TOKENS,
    CALIBRATION_TEXT,
    KVScales,
    measure_kv_amax,
    scales_from_amax,
)
from lmfleet.engine.kv_sizing import (
    CudaMemoryProbe,
    KVSizing,
    MemoryProbe,
    human_bytes,
    kv_budget_bytes,
)
from lmfleet.engine.layers.quant import quantize_model
from lmfleet.engine.layers.sampler import PendingSample, Sampler, SamplingBatch
from lmfleet.engine.layers.triton_attention import (
    attend_only,
    attention_backend,
    fp8_kv_supported,
    triton_paged_attention,
)
from lmfleet.engine.layers.triton_fused import triton_fused_ops
from lmfleet.engine.models.loader import load_model
from lmfleet.engine.outputs import (
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    describe_error,
)
from lmfleet.engine.request import Request, SamplingParams
from lmfleet.engine.runner_base import KVCacheLayout
from lmfleet.engine.step_inputs import StagingBuffer, StepInputs, StepPlan, pack_capacity
from lmfleet.errors import ConfigError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_DEFAULT_KV_BYTES = 1 << 30


#: how every sequence of the KV-sizing profile samples: each costly sampler path at
#: once (penalties over the prompt, top-k, top-p and min-p, 20 logprobs; half the rows
#: seeded), so the profiled peak covers what requests ask for later
PROFILE_SAMPLING = SamplingParams(
    max_tokens=1,
    temperature=1.0,
    top_k=50,
    top_p=0.9,
    min_p=0.01,
    repetition_penalty=1.1,
    presence_penalty=0.5,
    frequency_penalty=0.5,
    logprobs=20,
)


def bind_device(device: torch.device) -> None:
    """Make ``device`` the calling thread's current CUDA device (no-op elsewhere).

    Triton launches on the thread's current device and stream whatever device its
    tensors are on, and ``torch.cuda.graph`` captures there too: with ``--device
    cuda:1`` and nothing else, kernels would go to GPU 0 with GPU 1's pointers. The
    current device is per thread, so every thread that runs the model calls this
    (the loading thread in :class:`ModelRunner`, the engine loop). A device without
    an index (``cuda``) is left alone: :class:`ModelRunner` gives it the current one's
    index first."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    """``auto``: float32 on CPU; the checkpoint's half type on an accelerator."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    if checkpoint_dtype in ("bfloat16", "float16"):
        return _DTYPES[checkpoint_dtype]
    return torch.bfloat16


@dataclass(slots=True)
class LaunchedStep:
    """A step queued on the device: which requests sample, and their tokens, still
    pending (None: nothing samples); and the requests whose own sampling setup
    failed (request id -> error), which the core ends alone."""

    request_ids: list[str] = field(default_factory=list)
    pending: PendingSample | None = None
    failed: dict[str, str] = field(default_factory=dict)
    _rows: dict[str, int] | None = None

    def rows(self) -> dict[str, int]:
        """Request id -> row of the pending token ids."""
        if self._rows is None:
            self._rows = {rid: i for i, rid in enumerate(self.request_ids)}
        return self._rows


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig | None = None,
        *,
        progress: bool = True,
        memory_probe: MemoryProbe | None = None,
    ):
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.device = torch.device(model_config.device)
        if self.device.type == "cuda" and self.device.index is None:
            # "cuda" is the current device: name it, so other threads bind the same one
            self.device = torch.device("cuda", torch.cuda.current_device())
        bind_device(self.device)
        self.model_dir = model_config.model
        from lmfleet.engine.models.config import ArchConfig

        arch = ArchConfig.from_dir(model_config.model)
        fp8_kept = arch.quantization is not None and arch.quantization.strategy != "block"
        if fp8_kept and model_config.quantization not in (None, "fp8"):
            raise ConfigError(
                f"quantization: {model_config.model} already holds fp8 weights; "
                f"--quantization {model_config.quantization} cannot requantize them (drop "
                "the flag, or load the unquantized checkpoint)"
            )
        self.dtype = resolve_dtype(model_config.dtype, self.device, arch.torch_dtype)
        self.kv_dtype = torch.float8_e4m3fn if cache_config.kv_cache_dtype == "fp8" else self.dtype
        loaded = load_model(
            model_config.model, dtype=self.dtype, device=self.device, progress=progress
        )
        self.loaded = loaded
        self.model = loaded.model.eval()
        # q/k/v and gate/up as one GEMM each (before quantizing: the fused weights
        # get their own per-channel scales, the same ones as separately)
        self.model.fuse_projections()
        self.attn_fn = attention_backend(self.device, model_config.attention_backend)
        # with the Triton attention, the K/V write moves into the q/k norm + rotary
        # kernel, one of the fused norm, rotary and silu kernels that come with it
        self.model.set_attention_backend(self.attn_fn, attend_only(self.attn_fn))
        if self.attn_fn is triton_paged_attention:
            self.model.set_fused_ops(triton_fused_ops())
        #: the weights' quantization: the checkpoint's own, or --quantization's
        self.quantization = loaded.quantization or model_config.quantization
        if loaded.quantization is None and model_config.quantization is not None:
            count = quantize_model(self.model, model_config.quantization)
            logger.info("quantized %d linear layers to %s", count, model_config.quantization)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # freed full-precision weights count as free memory
        self.arch = loaded.arch
        self.block_size = cache_config.block_size
        self.kv_caches: list[torch.Tensor] = []
        self._staging: StagingBuffer | None = None
        #: decode CUDA graphs over the current KV cache (None: every step eager)
        self.graphs: DecodeGraphs | None = None
        self.sampler = Sampler(seed=model_config.seed, device=self.device)
        self.layout: KVCacheLayout | None = None
        #: how the KV budget was derived, when it was profiled (accelerators only)
        self.kv_sizing: KVSizing | None = None
        if memory_probe is None and self.device.type == "cuda":
            memory_probe = CudaMemoryProbe(self.device)
        self.memory_probe = memory_probe
        self._generators: dict[str, torch.Generator] = {}
        self.faults = fault_injector(model_config.fault_injection)
        self.asleep = False
        #: each layer's fp8 KV scales (all 1.0 for a cache in the model dtype)
        self.kv_scales = self._resolve_kv_scales(loaded.kv_scales)
        self.model.set_kv_scales(self.kv_scales.k, self.kv_scales.v)

    @property
    def prefers_async_scheduling(self) -> bool:
        """On CUDA the host work of one step can overlap the device work of another."""
        return self.device.type == "cuda"

    def bind_thread(self) -> None:
        bind_device(self.device)

    @property
    def max_seq_len(self) -> int:
        """The longest sequence a step may hold (the rotary tables' length bounds it)."""
        limit = self.arch.max_position_embeddings
        return min(self.model_config.max_model_len or limit, limit)

    # ---- fp8 KV scales --------------------------------------------------------------
    def _resolve_kv_scales(self, checkpoint: KVScales | None) -> KVScales:
        """The scales ``--kv-cache-scales`` asks for (see :mod:`lmfleet.engine.kv_scales`)."""
        num_layers = self.arch.num_hidden_layers
        cfg = self.cache_config
        if cfg.kv_cache_dtype != "fp8":
            if checkpoint is not None:
                logger.info(
                    "the checkpoint's fp8 KV scales go unused: the KV cache is %s", self.kv_dtype
                )
            return KVScales.unit(num_layers)
        if cfg.kv_cache_scales == "unit":
            scales = KVScales.unit(num_layers)
        elif cfg.kv_cache_scales == "auto" and checkpoint is not None:
            scales = checkpoint
        else:
            scales = self.calibrate_kv_scales(self._calibration_tokens())
        logger.info("fp8 KV cache scales, %s", scales.describe())
        return scales

    def _calibration_tokens(self) -> list[int]:
        """:data:`CALIBRATION_TEXT` in the model's tokenizer, cut to one step's budget.
        A model directory without a tokenizer gets :data:`CALIBRATION_RANDOM_TOKENS`
        token ids drawn with a fixed seed instead (and a warning)."""
        from lmfleet.engine.tokenizer import load_tokenizer

        limit = min(self.scheduler_config.max_num_batched_tokens, self.max_seq_len)
        tokenizer = load_tokenizer(self.model_dir, self.model_config.tokenizer)
        if tokenizer is not None:
            return tokenizer.encode(CALIBRATION_TEXT)[:limit]
        logger.warning(
            "%s has no tokenizer.json: calibrating the fp8 KV scales on random token ids, "
            "which may miss the ranges real text produces (--kv-cache-scales unit keeps "
            "scale 1.0)",
            self.model_dir,
        )
        gen = torch.Generator().manual_seed(0)
        count = min(CALIBRATION_RANDOM_TOKENS, limit)
        return torch.randint(0, self.arch.vocab_size, (count,), generator=gen).tolist()

    @torch.inference_mode()
    def calibrate_kv_scales(self, token_ids: list[int]) -> KVScales:
        """Scales from one prefill of ``token_ids`` over a scratch cache in the model
        dtype (so no layer sees another's fp8 rounding): each layer's largest |K| and
        |V|, through :func:`~lmfleet.engine.kv_scales.scales_from_amax`."""
        if not token_ids:
            raise ValueError("calibrating KV scales needs at least one token")
        num_tokens = len(token_ids)
        blocks = -(-num_tokens // self.block_size)
        request = Request("kv-scale-calibration", list(token_ids), SamplingParams(max_tokens=1))
        sched = SchedulerOutput(
            scheduled=[ScheduledRequest(request, num_tokens, list(range(blocks)))],
            num_batched_tokens=num_tokens,
        )
        attns = [layer.self_attn for layer in self.model.model.layers]
        saved_caches, saved_graphs = self.kv_caches, self.graphs
        self.kv_caches = self._new_kv_caches(blocks, torch.zeros, dtype=self.dtype)
        self.graphs = None

        def prefill() -> None:
            step = self._prepare(sched)
            self.model(step.input_ids, step.positions, self.kv_caches, step.meta)

        try:
            k_amax, v_amax = measure_kv_amax(attns, prefill)
        finally:
            self.kv_caches, self.graphs = saved_caches, saved_graphs
        return scales_from_amax(k_amax, v_amax, num_tokens)

    # ---- KV cache ------------------------------------------------------------------
    def plan_kv_cache(self) -> KVCacheLayout:
        """How many blocks the KV budget buys. On an accelerator with no explicit
        budget this profiles a forward first (see :meth:`profile_kv_sizing`)."""
        cfg = self.cache_config
        if (
            cfg.kv_cache_dtype == "fp8"
            and self.device.type == "cuda"
            and self.attn_fn is triton_paged_attention  # the backend __init__ resolved
            and not fp8_kv_supported(self.device)
        ):
            raise ConfigError(
                "kv_cache_dtype: fp8 with the Triton kernels needs compute capability 8.9+ "
                f"(H100/H200 class) and {self.device} has less; use --attention-backend "
                "torch or --kv-cache-dtype auto"
            )
        bytes_per_block = self.arch.kv_bytes_per_token(self.kv_dtype) * self.block_size
        if cfg.num_blocks_override is not None:
            num_blocks = cfg.num_blocks_override
        elif cfg.kv_cache_memory_bytes is not None:
            num_blocks = cfg.kv_cache_memory_bytes // bytes_per_block
        elif self.memory_probe is not None:
            self.kv_sizing = self.profile_kv_sizing(self.memory_probe, bytes_per_block)
            logger.info("KV cache sizing (%s): %s", self.kv_dtype, self.kv_sizing.describe())
            num_blocks = self.kv_sizing.num_blocks
            if num_blocks < 2:
                raise ConfigError(_too_small_message(self.kv_sizing))
        else:
            num_blocks = CPU_DEFAULT_KV_BYTES // bytes_per_block
        if num_blocks < 2:
            raise ConfigError(
                f"kv_cache_memory_bytes: the KV budget holds {num_blocks} blocks of "
                f"{bytes_per_block} bytes ({self.kv_dtype}); give at least "
                f"{2 * bytes_per_block} bytes"
            )
        return KVCacheLayout(num_blocks, self.block_size, bytes_per_block)

    def profile_kv_sizing(self, probe: MemoryProbe, bytes_per_block: int) -> KVSizing:
        """Measure weights, the activation peak of a dummy forward at the full token
        budget, and memory outside torch; derive the KV budget from them.

        Non-torch memory is read after the forward, so libraries that the first
        forward loads (cuBLAS workspaces, Triton modules) are counted too.
        """
        weights = probe.memory_allocated()
        sched = self._profile_schedule()
        activation_peak = self._activation_peak(probe, sched)
        free, total = probe.mem_get_info()
        non_torch = max(total - free - probe.memory_reserved(), 0)
        reserve = self.cache_config.memory_reserve_bytes
        util = self.cache_config.gpu_memory_utilization
        budget = kv_budget_bytes(total, util, weights, activation_peak, reserve, non_torch)
        return KVSizing(
            total_bytes=total,
            gpu_memory_utilization=util,
            weights_bytes=weights,
            activation_peak_bytes=activation_peak,
            reserve_bytes=reserve,
            non_torch_bytes=non_torch,
            budget_bytes=budget,
            bytes_per_block=bytes_per_block,
            num_blocks=budget // bytes_per_block,
            profile_tokens=sched.num_batched_tokens,
            profile_seqs=len(sched.scheduled),
        )

    def _profile_schedule(self) -> SchedulerOutput:
        """The step that needs the most activation memory: ``max_num_batched_tokens``
        prompt tokens over ``min(max_num_seqs, tokens)`` sequences (none longer than
        ``max_seq_len``), every one sampling with :data:`PROFILE_SAMPLING`. All share
        the same few KV blocks."""
        cfg = self.scheduler_config
        num_seqs = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
        num_tokens = min(cfg.max_num_batched_tokens, num_seqs * self.max_seq_len)
        base, extra = divmod(num_tokens, num_seqs)
        params = PROFILE_SAMPLING
        scheduled = []
        for i in range(num_seqs):
            n = base + (i < extra)
            request = Request(f"kv-profile-{i}", [0] * n, params)
            scheduled.append(ScheduledRequest(request, n, list(range(-(-n // self.block_size)))))
        return SchedulerOutput(scheduled=scheduled, num_batched_tokens=num_tokens)

    @torch.inference_mode()
    def _activation_peak(self, probe: MemoryProbe, sched: SchedulerOutput) -> int:
        """Bytes the forward, logits and sampling of ``sched`` allocate at their peak,
        above what was allocated before (weights and a scratch KV cache of a few
        blocks). The sampler's working copies of the logits (penalties, sorting for
        top-p, logprobs) take several times the logits themselves, so they count."""
        num_blocks = max(len(item.block_ids) for item in sched.scheduled)
        saved, self.kv_caches = self.kv_caches, self._new_kv_caches(num_blocks, torch.zeros)
        try:
            baseline = probe.memory_allocated()
            peak = probe.peak_allocated_during(lambda: self._profile_step(sched))
        finally:
            self.kv_caches = saved
        return max(peak - baseline, 0)

    def _profile_step(self, sched: SchedulerOutput) -> None:
        """Forward, logits and sampling of the profile step, waited for. Every other
        row has its own generator (seeded and unseeded rows together keep the most
        noise buffers alive); the sampler's own generator is left as it was, so
        unseeded tokens do not depend on whether the profile ran."""
        logits = self._logits(self._prepare(sched))
        if logits is None:
            return
        requests = [item.request for item in sched.scheduled if item.samples]
        generators = [
            torch.Generator(device=self.device).manual_seed(i) if i % 2 else None
            for i in range(len(requests))
        ]
        batch = SamplingBatch.from_requests(requests, generators)
        state = self.sampler.generator.get_state()
        try:
            self.sampler.sample(logits, batch).result()
        finally:
            self.sampler.generator.set_state(state)

    def _new_kv_caches(
        self,
        num_blocks: int,
        factory: Callable[..., torch.Tensor] = torch.empty,
        dtype: torch.dtype | None = None,
    ) -> list[torch.Tensor]:
        arch = self.arch
        shape = (2, num_blocks, self.block_size, arch.num_key_value_heads, arch.head_dim)
        return [
            factory(shape, dtype=dtype or self.kv_dtype, device=self.device)
            for _ in range(arch.num_hidden_layers)
        ]

    def allocate_kv_cache(self, layout: KVCacheLayout) -> None:
        self.kv_caches = self._new_kv_caches(layout.num_blocks)
        self.layout = layout
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB)",
            layout.num_blocks,
            layout.block_size,
            layout.num_tokens,
            layout.num_bytes / 2**20,
        )
        if self._graphs_wanted():
            try:
                self.use_decode_graphs(capture=True)
            except Exception:  # a capture bug must not take the replica down
                self.graphs = None
                logger.exception(
                    "CUDA graph capture failed; decode steps run eagerly (slower at small "
                    "batches). Pass --enforce-eager to skip the capture"
                )

    # ---- CUDA graphs ---------------------------------------------------------------
    def _graphs_wanted(self) -> bool:
        """Graphs on CUDA with the Triton backend (the torch backend reads host-side
        lists every step, which a graph cannot replay) unless ``enforce_eager``."""
        return (
            self.device.type == "cuda"
            and not self.model_config.enforce_eager
            and self.attn_fn is triton_paged_attention
        )

    @torch.inference_mode()
    def use_decode_graphs(self, *, capture: bool) -> None:
        """Run decode steps through :class:`DecodeGraphs` over the current KV cache:
        recorded CUDA graphs (``capture=True``), or the same padded fixed-address
        forward run eagerly (``capture=False``: tests the padding on CPU)."""
        max_len = min(self.model_config.max_seq_len_to_capture, self.max_seq_len)
        self.graphs = DecodeGraphs(
            lambda ids, pos, meta: self.model(ids, pos, self.kv_caches, meta),
            device=self.device,
            sizes=capture_sizes(self.scheduler_config.max_num_seqs),
            width=-(-max_len // self.block_size),
            block_size=self.block_size,
            capture=capture,
        )
        if capture:
            seconds = self.graphs.capture()
            logger.info(
                "captured CUDA graphs for decode batch sizes %s in %.1fs (%s kept; the "
                "KV budget left %s in reserve)",
                self.graphs.sizes,
                seconds,
                human_bytes(self.graphs.capture_bytes),
                human_bytes(self.cache_config.memory_reserve_bytes),
            )
            if self.graphs.capture_bytes > self.cache_config.memory_reserve_bytes:
                logger.warning(
                    "the CUDA graphs keep more memory than the KV budget reserved for "
                    "them: lower --max-num-seqs or --gpu-memory-utilization if the "
                    "device runs out of memory"
                )

    # ---- one step ------------------------------------------------------------------
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one step and wait for its tokens."""
        return self.collect(self.launch(sched))

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, prev: LaunchedStep | None = None) -> LaunchedStep:
        """Queue one step on the device (forward and sampling) without waiting for its
        tokens. ``prev`` is the step before, still running: a request whose input is
        the token ``prev`` samples (``input_in_flight``) gets it from ``prev``'s
        device output."""
        for rid in sched.finished_request_ids:
            self._generators.pop(rid, None)
        if sched.is_empty:
            return LaunchedStep()
        logits = self._logits(self._prepare(sched, prev))  # (S, V)
        if logits is None:
            return LaunchedStep()
        sampling, generators, failed = self._sampling_setup(sched)
        if failed:  # their rows still ran the forward (their KV is written), unsampled
            keep = [
                i for i, it in enumerate(_samplers(sched)) if it.request.request_id not in failed
            ]
            logits = logits.index_select(0, torch.tensor(keep, device=logits.device))
            if not sampling:
                return LaunchedStep(failed=failed)
        requests = [it.request for it in sampling]
        pending_tokens, pending_index = None, None
        if (
            prev is not None
            and prev.pending is not None
            and any(
                it.input_in_flight and it.request.sampling_params.has_penalties for it in sampling
            )
        ):
            rows = prev.rows()  # penalties count the in-flight token on the device
            pending_tokens = prev.pending.token_ids
            pending_index = [
                rows[it.request.request_id] if it.input_in_flight else None for it in sampling
            ]
        batch = SamplingBatch.from_requests(
            requests,
            generators,
            [it.output_index for it in sampling],
            pending_tokens,
            pending_index,
        )
        pending = self.sampler.sample(logits, batch)
        return LaunchedStep([r.request_id for r in requests], pending, failed)

    def _sampling_setup(
        self, sched: SchedulerOutput
    ) -> tuple[list[ScheduledRequest], list[torch.Generator | None], dict[str, str]]:
        """Each sampling request's own setup (its seeded generator, fault injection),
        one request at a time: one whose setup raises is left out of the sampling
        batch and reported (request id -> error) instead of failing the step."""
        ok: list[ScheduledRequest] = []
        generators: list[torch.Generator | None] = []
        failed: dict[str, str] = {}
        for it in _samplers(sched):
            r = it.request
            try:
                if self.faults is not None:
                    self.faults.check(SAMPLE, r.request_id, it.output_index)
                generators.append(self._generator(r))
            except Exception as exc:
                logger.exception("request %s: sampling setup failed", r.request_id)
                failed[r.request_id] = describe_error(exc)
                self._generators.pop(r.request_id, None)
                continue
            ok.append(it)
        return ok, generators, failed

    def collect(self, step: LaunchedStep) -> RunnerOutput:
        """Wait for a launched step's tokens (the step's one host sync)."""
        out = RunnerOutput()
        if step.pending is None:
            return out
        result = step.pending.result()
        for rid, token, lp in zip(step.request_ids, result.token_ids, result.logprobs, strict=True):
            out.sampled[rid] = token
            if lp is not None:
                out.logprobs[rid] = lp
        return out

    def _logits(self, step: StepInputs) -> torch.Tensor | None:
        """Run the model over the step; float32 logits (S, V) of the sampled rows,
        or None when no request samples this step."""
        if step.meta is not None:  # (T, hidden)
            hidden = self.model(step.input_ids, step.positions, self.kv_caches, step.meta)
        elif self.graphs is not None and step.graph_size is not None:
            hidden = self.graphs.run(step.graph_size)  # (padded B, hidden)
        else:
            raise RuntimeError("a step needs attention metadata or a decode graph to run it")
        if step.sample_rows.numel() == 0:
            return None
        return self.model.compute_logits(hidden.index_select(0, step.sample_rows))  # (S, V)

    def _staging_buffer(self, needed: int) -> StagingBuffer:
        if self._staging is None:
            cfg = self.scheduler_config
            max_blocks = -(-self.max_seq_len // self.block_size)
            capacity = pack_capacity(cfg.max_num_batched_tokens, cfg.max_num_seqs, max_blocks)
            self._staging = StagingBuffer(self.device, max(capacity, needed))
        return self._staging

    @torch.inference_mode()
    def _prepare(self, sched: SchedulerOutput, prev: LaunchedStep | None = None) -> StepInputs:
        """Pack the step's inputs into the staging buffer and move them in one copy:
        into the decode graphs' input buffer, padded to a captured batch size, when
        a graph can run the step; else into the staging buffer's device side. Input
        tokens still in flight are then gathered from ``prev``'s sampled tokens on
        the device."""
        step = StepPlan.gather(sched)
        fill_src = None
        if step.fill_requests:
            fill_src = self._in_flight_rows(step.fill_requests, prev)
        num_fills = len(step.fill_requests)
        graph_size = self.graphs.size_for(step) if self.graphs is not None else None
        if graph_size is not None and self.graphs is not None:
            lay = self.graphs.layout(graph_size, int(step.samples.sum()), num_fills)
            into: torch.Tensor | None = self.graphs.inputs
        else:
            lay, into = step.layout(), None
        staging = self._staging_buffer(lay.size)
        qsl, seq_lens = step.write(staging.host_view(lay.size), lay, self.block_size, fill_src)
        dev = staging.to_device(lay.size, into=into)
        if num_fills and prev is not None and prev.pending is not None:
            fills = dev[lay.fills]  # destination token rows, then source rows
            tokens = prev.pending.token_ids.index_select(0, fills[num_fills:])
            dev[lay.ids].index_copy_(0, fills[:num_fills], tokens)
        if graph_size is not None:  # the graph reads its own views of the same buffer
            return StepInputs(
                dev[lay.ids], dev[lay.positions], None, dev[lay.sample_rows], graph_size
            )
        meta = lay.metadata(
            dev,
            qsl,
            seq_lens,
            block_size=self.block_size,
            max_query_len=int(step.count.max()),
            max_seq_len=max(seq_lens),
        )
        return StepInputs(dev[lay.ids], dev[lay.positions], meta, dev[lay.sample_rows])

    @staticmethod
    def _in_flight_rows(request_ids: list[str], prev: LaunchedStep | None) -> np.ndarray:
        """Where each request's in-flight token sits in ``prev``'s sampled tokens."""
        rows = prev.rows() if prev is not None else {}
        try:
            return np.fromiter((rows[rid] for rid in request_ids), np.int64, len(request_ids))
        except KeyError as e:
            raise RuntimeError(
                f"request {e.args[0]!r} takes a token in flight, but the previous step "
                "given did not sample it"
            ) from None

    def _generator(self, request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        gen = self._generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self._generators[request.request_id] = gen
        return gen

    # ---- sleep / wake --------------------------------------------------------------
    def sleep(self) -> float:
        """Weights to (pinned) host memory, KV cache freed. Returns seconds taken."""
        t0 = time.perf_counter()
        if self.device.type != "cpu":
            for p in self.model.parameters():
                p.data = p.data.to("cpu").pin_memory()
            for b in self.model.buffers():
                b.data = b.data.to("cpu")
        self.kv_caches = []
        self.graphs = None  # they point at the freed cache; captured again on wake
        self._staging = None  # reallocated at the next step
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        self.asleep = True
        return time.perf_counter() - t0

    def wake(self) -> float:
        """Weights back on the device, KV cache allocated again. Returns seconds."""
        t0 = time.perf_counter()
        if self.device.type != "cpu":
            for p in self.model.parameters():
                p.data = p.data.to(self.device, non_blocking=True)
            for b in self.model.buffers():
                b.data = b.data.to(self.device, non_blocking=True)
        if self.layout is not None:
            self.allocate_kv_cache(self.layout)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.asleep = False
        return time.perf_counter() - t0


def _samplers(sched: SchedulerOutput) -> list[ScheduledRequest]:
    """The step's requests that sample, in logits row order."""
    return [item for item in sched.scheduled if item.samples]


def _too_small_message(s: KVSizing) -> str:
    """Why a profiled budget buys fewer than two blocks, and what to change."""
    return (
        f"gpu_memory_utilization: the KV cache gets {human_bytes(s.budget_bytes)} but needs at "
        f"least {human_bytes(2 * s.bytes_per_block)} for 2 blocks ({s.describe()}). "
        "Raise --gpu-memory-utilization, lower --max-num-batched-tokens or --max-num-seqs "
        "(smaller activation peak), quantize the weights (--quantization int8 or fp8), "
        "free the GPU from other processes, or set --kv-cache-memory explicitly"
    )
