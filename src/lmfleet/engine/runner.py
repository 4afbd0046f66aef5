"""The model runner: the only code that builds device tensors and calls the model.

It owns the weights, the KV cache tensors and the per-request random generators.
It turns a ``SchedulerOutput`` into one flat batch of tokens, runs the model, and
samples a token for every request whose step reached the end of its known tokens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from lmfleet.engine.config import CacheConfig, ModelConfig
from lmfleet.engine.layers.attention_metadata import AttentionMetadata
from lmfleet.engine.layers.quant import quantize_model
from lmfleet.engine.layers.sampler import Sampler, SamplingBatch
from lmfleet.engine.layers.triton_attention import attention_backend
from lmfleet.engine.models.loader import load_model
from lmfleet.engine.outputs import RunnerOutput, SchedulerOutput
from lmfleet.errors import ConfigError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_DEFAULT_KV_BYTES = 1 << 30


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
class KVCacheLayout:
    num_blocks: int
    block_size: int
    bytes_per_block: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


class ModelRunner:
    def __init__(
        self, model_config: ModelConfig, cache_config: CacheConfig, *, progress: bool = True
    ):
        self.model_config = model_config
        self.cache_config = cache_config
        self.device = torch.device(model_config.device)
        self.model_dir = model_config.model
        from lmfleet.engine.models.config import ArchConfig

        arch = ArchConfig.from_dir(model_config.model)
        self.dtype = resolve_dtype(model_config.dtype, self.device, arch.torch_dtype)
        loaded = load_model(
            model_config.model, dtype=self.dtype, device=self.device, progress=progress
        )
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.model.set_attention_backend(
            attention_backend(self.device, model_config.attention_backend)
        )
        if model_config.quantization is not None:
            count = quantize_model(self.model, model_config.quantization)
            logger.info("quantized %d linear layers to %s", count, model_config.quantization)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # freed full-precision weights count as free memory
        self.arch = loaded.arch
        self.block_size = cache_config.block_size
        self.sampler = Sampler(seed=model_config.seed, device=self.device)
        self.kv_caches: list[torch.Tensor] = []
        self.layout: KVCacheLayout | None = None
        self._generators: dict[str, torch.Generator] = {}
        self.asleep = False

    # ---- KV cache ------------------------------------------------------------------
    def plan_kv_cache(self) -> KVCacheLayout:
        """How many blocks the KV budget buys."""
        cfg = self.cache_config
        bytes_per_block = self.arch.kv_bytes_per_token(self.dtype) * self.block_size
        if cfg.num_blocks_override is not None:
            num_blocks = cfg.num_blocks_override
        else:
            budget = cfg.kv_cache_memory_bytes
            if budget is None:
                budget = self._default_kv_budget()
            num_blocks = budget // bytes_per_block
        if num_blocks < 2:
            raise ConfigError(
                f"kv_cache_memory_bytes: the KV budget holds {num_blocks} blocks of "
                f"{bytes_per_block} bytes; give at least {2 * bytes_per_block} bytes"
            )
        return KVCacheLayout(num_blocks, self.block_size, bytes_per_block)

    def _default_kv_budget(self) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            return max(int(total * self.cache_config.gpu_memory_utilization) - used, 0)
        return CPU_DEFAULT_KV_BYTES

    def allocate_kv_cache(self, layout: KVCacheLayout) -> None:
        arch = self.arch
        shape = (2, layout.num_blocks, layout.block_size, arch.num_key_value_heads, arch.head_dim)
        self.kv_caches = [
            torch.empty(shape, dtype=self.dtype, device=self.device)
            for _ in range(arch.num_hidden_layers)
        ]
        self.layout = layout
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB)",
            layout.num_blocks,
            layout.block_size,
            layout.num_tokens,
            layout.num_bytes / 2**20,
        )

    # ---- one step ------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        for rid in sched.finished_request_ids:
            self._generators.pop(rid, None)
        if sched.is_empty:
            return RunnerOutput()
        input_ids, positions, meta, sample_rows = self._prepare(sched)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)  # (T, hidden)
        if not sample_rows:
            return RunnerOutput()
        rows = torch.tensor(sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))  # (S, V)
        sampling = [item for item in sched.scheduled if item.samples]
        requests = [it.request for it in sampling]
        batch = SamplingBatch.from_requests(requests, [self._generator(r) for r in requests])
        result = self.sampler(logits, batch)
        out = RunnerOutput()
        for item, token, lp in zip(sampling, result.token_ids, result.logprobs, strict=True):
            rid = item.request.request_id
            out.sampled[rid] = token
            if lp is not None:
                out.logprobs[rid] = lp
        return out

    def _prepare(self, sched: SchedulerOutput):
        bs = self.block_size
        tokens: list[int] = []
        pos_parts, slot_parts = [], []
        qsl = [0]
        seq_lens = []
        sample_rows = []
        max_blocks = max(len(it.block_ids) for it in sched.scheduled)
        tables = np.zeros((len(sched.scheduled), max_blocks), dtype=np.int32)
        for i, item in enumerate(sched.scheduled):
            r = item.request
            start = r.num_computed_tokens
            end = start + item.num_new_tokens
            n_prompt = r.num_prompt_tokens
            if start >= n_prompt:
                tokens.extend(r.output_token_ids[start - n_prompt : end - n_prompt])
            elif end <= n_prompt:
                tokens.extend(r.prompt_token_ids[start:end])
            else:
                tokens.extend(r.prompt_token_ids[start:])
                tokens.extend(r.output_token_ids[: end - n_prompt])
            pos = np.arange(start, end, dtype=np.int64)
            table = np.asarray(item.block_ids, dtype=np.int64)
            pos_parts.append(pos)
            slot_parts.append(table[pos // bs] * bs + pos % bs)
            tables[i, : len(item.block_ids)] = item.block_ids
            qsl.append(qsl[-1] + item.num_new_tokens)
            seq_lens.append(end)
            if item.samples:
                sample_rows.append(qsl[-1] - 1)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slot_parts)).to(dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int64, device=dev),
            query_start_loc_cpu=qsl,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=dev),
            seq_lens_cpu=seq_lens,
            block_tables=torch.from_numpy(tables).to(dev),
            block_size=bs,
            max_query_len=max(it.num_new_tokens for it in sched.scheduled),
            max_seq_len=max(seq_lens),
        )
        input_ids = torch.tensor(tokens, dtype=torch.int64, device=dev)
        positions = torch.from_numpy(np.concatenate(pos_parts)).to(dev)
        return input_ids, positions, meta, sample_rows

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
