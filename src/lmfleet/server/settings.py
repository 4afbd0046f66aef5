"""Server settings: one frozen dataclass, built from ``lmfleet serve`` flags or by tests.

The engine's own settings (block size, batch limits ...) are kept flat here, with
the names vLLM users know, and turned into an ``EngineConfig`` by
:meth:`ServerSettings.engine_config`, which also applies the TGI-style environment
variables (``MAX_BATCH_SIZE`` ...).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace

from lmfleet.engine.config import (
    SIM_PREFIX,
    EngineConfig,
    apply_env,
    engine_config,
    quantization_setting,
)
from lmfleet.errors import ConfigError
from lmfleet.server.early_headers import KEEPALIVE_S

#: request bodies larger than this get 413 (a 128k-token prompt is well under it)
DEFAULT_MAX_BODY_BYTES = 8 * 2**20


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Everything one replica needs. ``served_model_names`` defaults to ``(model,)``."""

    model: str
    served_model_names: tuple[str, ...] = ()
    version_label: str = "v1"
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    admin_token: str | None = None
    # engine
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    seed: int = 0
    #: paged-attention implementation: "auto", "triton" or "torch"
    attention_backend: str = "auto"
    #: weight quantization: None (or "none"), "int8" or "fp8"
    quantization: str | None = None
    #: KV cache storage: "auto" (the model dtype) or "fp8" (float8 e4m3)
    kv_cache_dtype: str = "auto"
    #: an fp8 cache's per-layer scales: "auto", "calibrate" or "unit"
    kv_cache_scales: str = "auto"
    #: no CUDA graphs for decode steps
    enforce_eager: bool = False
    #: decode steps with longer contexts than this run eagerly
    max_seq_len_to_capture: int = 8192
    #: overlap the next step's scheduling with the current step (None: on for CUDA)
    async_scheduling: bool | None = None
    #: a Hugging Face tokenizer directory instead of the model's own tokenizer
    tokenizer: str | None = None
    progress: bool = True
    #: run the engine core in its own process (not a thread of the server's)
    engine_process: bool = False
    #: ``sim:PROFILE`` models only: run the simulated accelerator this many times faster
    sim_time_scale: float | None = None
    #: honour fault-injection request ids (``lmfleet-fault-STAGE``; tests and drills)
    fault_injection: bool = False
    # admission and lifecycle
    max_concurrent_requests: int = 1024
    max_waiting_requests: int | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    drain_timeout_s: float = 30.0
    retry_after_s: int = 1
    #: once the engine died, exit (status 1) after this long, so a supervisor replaces
    #: the process; meanwhile /health/live fails and requests get 503
    exit_on_engine_dead_after_s: float = 5.0
    warmup: bool = True
    # request handling
    #: render chat_template sources sent in requests (refused by default, as in vLLM)
    trust_request_chat_template: bool = False
    #: a chat-template render (the model's or a request's) stops after this long
    chat_template_timeout_s: float = 2.0
    #: ... or when its prompt would pass this many characters
    chat_template_max_chars: int = 16 * 2**20
    #: answer 400 to request fields lmfleet does not know, instead of ignoring them
    strict_request_fields: bool = False
    #: a stream whose client took no data for this long is aborted (its slot freed)
    stream_write_timeout_s: float = 30.0
    #: a non-streaming answer sent with early headers gets a space this often while it
    #: generates (docs/gateway.md, "Non-streaming answers and first_byte_s"); tests
    #: shorten it
    early_headers_keepalive_s: float = KEEPALIVE_S
    access_log: bool = True
    log_level: str = "info"
    extra_engine: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.served_model_names:
            object.__setattr__(self, "served_model_names", (self.model,))
        elif not isinstance(self.served_model_names, tuple):
            object.__setattr__(self, "served_model_names", tuple(self.served_model_names))
        checks = (
            (self.max_concurrent_requests > 0, "max_concurrent_requests", "must be positive"),
            (
                self.max_waiting_requests is None or self.max_waiting_requests >= 0,
                "max_waiting_requests",
                "must be at least 0",
            ),
            (self.max_body_bytes > 0, "max_body_bytes", "must be positive"),
            (self.drain_timeout_s >= 0, "drain_timeout", "must be at least 0"),
            (
                self.exit_on_engine_dead_after_s >= 0,
                "exit_on_engine_dead_after",
                "must be at least 0",
            ),
            (self.retry_after_s >= 0, "retry_after", "must be at least 0"),
            (self.chat_template_timeout_s > 0, "chat_template_timeout_s", "must be positive"),
            (self.chat_template_max_chars > 0, "chat_template_max_chars", "must be positive"),
            (self.stream_write_timeout_s > 0, "stream_write_timeout_s", "must be positive"),
            (
                0 < self.early_headers_keepalive_s <= KEEPALIVE_S,
                "early_headers_keepalive_s",
                f"must be in (0, {KEEPALIVE_S:g}] (the gateway's contract)",
            ),
            (0 <= self.port < 65536, "port", "must be in [0, 65535]"),
            (bool(self.version_label), "version_label", "must not be empty"),
            (
                self.sim_time_scale is None or self.is_simulated,
                "sim_time_scale",
                "only applies to simulated models (sim:PROFILE); drop the flag",
            ),
        )
        for ok, name, msg in checks:
            if not ok:
                raise ConfigError(f"{name}: {msg}, got {getattr(self, _field_of(name))!r}")

    @property
    def model_name(self) -> str:
        """The name responses report: the first served name."""
        return self.served_model_names[0]

    @property
    def is_simulated(self) -> bool:
        """A ``sim:PROFILE`` model: the simulated accelerator, no weights, no torch."""
        return self.model.startswith(SIM_PREFIX)

    @property
    def resolved_device(self) -> str:
        if self.is_simulated:
            return "cpu"  # the simulator runs nothing on a device
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def engine_config(self) -> EngineConfig:
        """The engine settings; ``extra_engine`` entries override the flat fields."""
        flat: dict[str, object] = {
            "dtype": self.dtype,
            "device": self.resolved_device,
            "max_model_len": self.max_model_len,
            "seed": self.seed,
            "attention_backend": self.attention_backend,
            "quantization": quantization_setting(self.quantization),
            "enforce_eager": self.enforce_eager,
            "max_seq_len_to_capture": self.max_seq_len_to_capture,
            "block_size": self.block_size,
            "kv_cache_memory_bytes": self.kv_cache_memory_bytes,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enable_prefix_caching": self.enable_prefix_caching,
            "kv_cache_dtype": self.kv_cache_dtype,
            "kv_cache_scales": self.kv_cache_scales,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "async_scheduling": self.async_scheduling,
            "fault_injection": self.fault_injection,
            "tokenizer": self.tokenizer,
        }
        if self.sim_time_scale is not None:
            flat["sim_time_scale"] = self.sim_time_scale
        cfg = engine_config(self.model, **{**flat, **self.extra_engine})
        return replace(cfg, scheduler=apply_env(cfg.scheduler))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerSettings:
        """Settings from the namespace ``lmfleet serve`` parses (same field names)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names and v is not None}
        if args.served_model_name:
            values["served_model_names"] = tuple(args.served_model_name)
        return cls(**values)


def _field_of(name: str) -> str:
    return {
        "drain_timeout": "drain_timeout_s",
        "retry_after": "retry_after_s",
        "exit_on_engine_dead_after": "exit_on_engine_dead_after_s",
    }.get(name, name)


_UNITS = {
    "": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "KI": 2**10,
    "MI": 2**20,
    "GI": 2**30,
    "TI": 2**40,
}


def parse_bytes(text: str) -> int:
    """``"4G"``, ``"512Mi"``, ``"1073741824"`` → bytes (an argparse ``type``)."""
    raw = text.strip().upper().removesuffix("B")
    number = raw.rstrip("KMGTI")
    unit = raw[len(number) :]
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected bytes such as 1073741824, 4G or 512Mi"
        )
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected bytes such as 1073741824, 4G or 512Mi"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return int(value)
