"""Engine configuration: frozen dataclasses validated on construction.

``EngineConfig`` gathers the model, cache and scheduler settings. The TGI-style
environment variables users know (``MAX_BATCH_SIZE``, ``MAX_WAITING_TOKENS`` ...)
map onto these settings in :func:`scheduler_overrides_from_env`; docs/engine.md
documents the mapping.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from lmfleet.errors import ConfigError

_DTYPES = ("auto", "float32", "bfloat16", "float16")
#: model names starting with this select the simulated accelerator (``sim:PROFILE``)
SIM_PREFIX = "sim:"
#: paged-attention implementations and when to pick each; both CLIs show these
ATTENTION_BACKENDS: dict[str, str] = {
    "auto": "Triton on a CUDA device when triton is installed, else torch",
    "triton": "the Triton kernels (needs a CUDA GPU and the triton package)",
    "torch": "the plain-PyTorch reference (runs anywhere, slow on a GPU)",
}
#: weight quantization methods and what each costs; ``none`` is ``quantization=None``
QUANTIZATIONS: dict[str, str] = {
    "none": "weights stay in --dtype",
    "int8": "weight-only int8 with per-channel scales (half the weight memory of bf16, "
    "activations stay in --dtype, works on CPU and GPU)",
    "fp8": "float8 e4m3 weights, multiplied on fp8 tensor cores with per-token fp8 "
    "activations (needs an H100/H200-class GPU, compute capability 8.9+; elsewhere "
    "the weights are dequantized on the fly: less memory, slower)",
}
#: KV cache storage dtypes (vLLM's ``--kv-cache-dtype`` names) and their trade-offs
KV_CACHE_DTYPES: dict[str, str] = {
    "auto": "the model's --dtype (no rounding of K/V)",
    "fp8": "float8 e4m3 with a per-layer scale for K and one for V (--kv-cache-scales), "
    "values saturated at +-448 times the scale: half the KV bytes of bf16 (a quarter of "
    "fp32), so twice the cached tokens in the same memory and half the bytes decode "
    "attention reads; each K/V element keeps 3 mantissa bits (rounding error up to 1/16 "
    "of its value; magnitudes below 2^-6 times the scale lose more), so logits drift "
    "slightly and greedy tokens can differ after a near tie; the Triton kernels need "
    "compute capability 8.9+ (H100/H200), the torch backend runs anywhere",
}
#: where an fp8 KV cache's per-layer K and V scales come from
KV_CACHE_SCALES: dict[str, str] = {
    "auto": "the checkpoint's k_scale/v_scale tensors when it has them (as fp8-KV "
    "checkpoints from llm-compressor or ModelOpt do), else calibrate",
    "calibrate": "measure each layer's largest |K| and |V| over a built-in text at "
    "startup (one prefill, before CUDA graphs are captured) and scale them to about "
    "half of fp8's range (K) and a quarter (V), leaving room for larger values later",
    "unit": "scale 1.0 everywhere (values beyond +-448 saturate, below 2^-10 round to zero)",
}
#: what the KV budget leaves free on an accelerator beyond the profiled peak: CUDA
#: graphs and the caching allocator's fragmentation are not in that peak
DEFAULT_MEMORY_RESERVE_BYTES = 256 * 2**20


def describe_choices(choices: Mapping[str, str]) -> str:
    """``"a: what a is; b: what b is"``, for help texts that explain every choice."""
    return "; ".join(f"{name}: {text}" for name, text in choices.items())


def quantization_setting(name: str | None) -> str | None:
    """The ``ModelConfig.quantization`` value of a ``--quantization`` choice
    (``"none"`` is ``None``)."""
    return None if name in (None, "none") else name


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which checkpoint to load and how.

    ``dtype="auto"`` takes float32 on CPU and the checkpoint's dtype (bfloat16 when
    it says float32) on an accelerator. ``max_model_len=None`` takes the
    checkpoint's ``max_position_embeddings``.
    """

    model: str
    dtype: str = "auto"
    device: str = "cpu"
    max_model_len: int | None = None
    seed: int = 0
    #: simulated models only: run this many times faster than the profile says
    sim_time_scale: float = 1.0
    #: paged attention: "auto" (Triton on CUDA when installed), "triton" or "torch"
    attention_backend: str = "auto"
    #: weight quantization of the decoder layers: None, "int8" or "fp8"
    quantization: str | None = None
    #: never capture CUDA graphs: every step runs its kernels one by one (debugging)
    enforce_eager: bool = False
    #: decode steps whose contexts are all at most this long replay CUDA graphs;
    #: longer ones run eagerly (the graphs' block tables are this wide)
    max_seq_len_to_capture: int = 8192
    #: a Hugging Face tokenizer directory used instead of the model's own tokenizer
    tokenizer: str | None = None
    #: honour fault-injection request ids (``lmfleet-fault-STAGE``, see
    #: :mod:`lmfleet.engine.faults`); for tests and drills, never in production
    fault_injection: bool = False

    def __post_init__(self) -> None:
        _check(
            bool(self.model),
            "model",
            "must name a model directory, a .gguf file or a built-in model",
        )
        _check(
            self.attention_backend in ATTENTION_BACKENDS,
            "attention_backend",
            f"must be 'auto', 'triton' or 'torch', got {self.attention_backend!r}",
        )
        _check(
            self.quantization is None or self.quantization in QUANTIZATIONS.keys() - {"none"},
            "quantization",
            f"must be None, 'int8' or 'fp8', got {self.quantization!r}",
        )
        _check(
            self.sim_time_scale > 0,
            "sim_time_scale",
            f"must be positive, got {self.sim_time_scale}",
        )
        _check(
            self.max_seq_len_to_capture > 0,
            "max_seq_len_to_capture",
            f"must be positive, got {self.max_seq_len_to_capture}",
        )
        _check(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        _check(
            self.max_model_len is None or self.max_model_len > 0,
            "max_model_len",
            f"must be positive, got {self.max_model_len}",
        )


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The paged KV cache.

    The budget is ``kv_cache_memory_bytes`` when given; otherwise, on an accelerator,
    ``gpu_memory_utilization`` of its memory minus the weights, the activation peak
    of a profiled forward at the full token budget, ``memory_reserve_bytes`` and what
    other processes use; on CPU a default of 1 GiB. ``num_blocks_override`` fixes
    the block count (tests).
    """

    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_blocks_override: int | None = None
    #: accelerator memory kept out of the KV budget for CUDA graphs and fragmentation
    memory_reserve_bytes: int = DEFAULT_MEMORY_RESERVE_BYTES
    #: KV cache storage: "auto" (the model dtype) or "fp8" (float8 e4m3)
    kv_cache_dtype: str = "auto"
    #: an fp8 cache's per-layer scales: "auto", "calibrate" or "unit" (KV_CACHE_SCALES)
    kv_cache_scales: str = "auto"

    def __post_init__(self) -> None:
        _check(
            self.kv_cache_dtype in KV_CACHE_DTYPES,
            "kv_cache_dtype",
            f"must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, got {self.kv_cache_dtype!r}",
        )
        _check(
            self.kv_cache_scales in KV_CACHE_SCALES,
            "kv_cache_scales",
            f"must be one of {', '.join(map(repr, KV_CACHE_SCALES))}, got {self.kv_cache_scales!r}",
        )
        _check(
            self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
            "block_size",
            f"must be a positive power of two, got {self.block_size}",
        )
        _check(
            self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
            "kv_cache_memory_bytes",
            f"must be positive, got {self.kv_cache_memory_bytes}",
        )
        _check(
            0 < self.gpu_memory_utilization <= 1,
            "gpu_memory_utilization",
            f"must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        _check(
            self.memory_reserve_bytes >= 0,
            "memory_reserve_bytes",
            f"must be at least 0, got {self.memory_reserve_bytes}",
        )
        _check(
            self.num_blocks_override is None or self.num_blocks_override > 1,
            "num_blocks_override",
            f"must be at least 2, got {self.num_blocks_override}",
        )


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Continuous batching limits.

    ``max_num_batched_tokens`` is the token budget of one step (prefill chunks plus
    one token per decoding sequence). ``max_waiting_tokens`` and
    ``waiting_served_ratio`` follow TGI: while sequences are decoding, newly waiting
    requests may be held back for up to ``max_waiting_tokens`` steps until at least
    ``waiting_served_ratio × running`` of them are waiting, so decode is interrupted
    by fewer, larger prefills. ``max_waiting_tokens=0`` (the default) admits at once.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # or "priority": lower value first, then arrival
    max_waiting_tokens: int = 0
    waiting_served_ratio: float = 0.3
    #: schedule and prepare step n+1 while step n runs on the device, feeding n's
    #: sampled tokens to n+1 there. None: on for a CUDA model, off on CPU (nothing
    #: overlaps there) and for simulated models
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        _check(self.max_num_seqs > 0, "max_num_seqs", f"must be positive, got {self.max_num_seqs}")
        _check(
            self.max_num_batched_tokens > 0,
            "max_num_batched_tokens",
            f"must be positive, got {self.max_num_batched_tokens}",
        )
        _check(
            self.policy in ("fcfs", "priority"),
            "policy",
            f"must be 'fcfs' or 'priority', got {self.policy!r}",
        )
        _check(
            self.max_waiting_tokens >= 0,
            "max_waiting_tokens",
            f"must be at least 0, got {self.max_waiting_tokens}",
        )
        _check(
            0 <= self.waiting_served_ratio <= 1,
            "waiting_served_ratio",
            f"must be in [0, 1], got {self.waiting_served_ratio}",
        )


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if not self.scheduler.enable_chunked_prefill and self.model.max_model_len is not None:
            _check(
                self.scheduler.max_num_batched_tokens >= self.model.max_model_len,
                "max_num_batched_tokens",
                "must be at least max_model_len when chunked prefill is off "
                f"({self.scheduler.max_num_batched_tokens} < {self.model.max_model_len})",
            )


# environment variable -> (SchedulerConfig field, parser)
_ENV_SCHEDULER = {
    "MAX_BATCH_SIZE": ("max_num_seqs", int),
    "MAX_NUM_SEQS": ("max_num_seqs", int),
    "MAX_WAITING_TOKENS": ("max_waiting_tokens", int),
    "WAITING_SERVED_RATIO": ("waiting_served_ratio", float),
    "MAX_BATCH_PREFILL_TOKENS": ("max_num_batched_tokens", int),
    "MAX_NUM_BATCHED_TOKENS": ("max_num_batched_tokens", int),
}


def scheduler_overrides_from_env(env: Mapping[str, str] | None = None) -> dict[str, object]:
    """Read the TGI-style batching variables users already set in their manifests."""
    env = os.environ if env is None else env
    out: dict[str, object] = {}
    for var, (name, parse) in _ENV_SCHEDULER.items():
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        try:
            out[name] = parse(raw)
        except ValueError:
            raise ConfigError(f"{var}: expected {parse.__name__}, got {raw!r}") from None
    return out


def apply_env(config: SchedulerConfig, env: Mapping[str, str] | None = None) -> SchedulerConfig:
    """``config`` with the environment's batching variables applied on top."""
    overrides = scheduler_overrides_from_env(env)
    return replace(config, **overrides) if overrides else config


def engine_config(model: str, **overrides: object) -> EngineConfig:
    """Build an ``EngineConfig`` from flat keyword arguments, each routed to the
    sub-config that has a field of that name (``block_size`` → cache, and so on)."""
    parts: dict[type, dict[str, object]] = {ModelConfig: {}, CacheConfig: {}, SchedulerConfig: {}}
    for name, value in overrides.items():
        for cls, bucket in parts.items():
            if name in cls.__dataclass_fields__:
                bucket[name] = value
                break
        else:
            known = sorted(f for cls in parts for f in cls.__dataclass_fields__ if f != "model")
            raise ConfigError(f"{name}: unknown engine setting; known settings: {', '.join(known)}")
    return EngineConfig(
        model=ModelConfig(model=model, **parts[ModelConfig]),  # type: ignore[arg-type]
        cache=CacheConfig(**parts[CacheConfig]),  # type: ignore[arg-type]
        scheduler=SchedulerConfig(**parts[SchedulerConfig]),  # type: ignore[arg-type]
    )
