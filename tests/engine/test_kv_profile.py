"""KV-cache sizing from a profiled forward, and the runner's packed step inputs.

The memory numbers come from a fake probe, so the whole sizing path (dummy forward
included) runs on CPU; only the ``torch.cuda`` calls behind ``CudaMemoryProbe``
are left to the GPU benchmark.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from lmfleet.engine.config import CacheConfig, ModelConfig, SchedulerConfig, engine_config
from lmfleet.engine.core import EngineCore
from lmfleet.engine.kv_sizing import KVSizing, kv_budget_bytes
from lmfleet.engine.outputs import ScheduledRequest, SchedulerOutput
from lmfleet.engine.request import Request, SamplingParams
from lmfleet.engine.runner import CPU_DEFAULT_KV_BYTES, ModelRunner
from lmfleet.engine.step_inputs import StagingBuffer
from lmfleet.errors import ConfigError

MIB = 2**20
GIB = 2**30


class FakeProbe:
    """Made-up device numbers; runs the profiled function for real."""

    def __init__(
        self, *, total: int, free: int, allocated: int, reserved: int, activation: int
    ) -> None:
        self.total, self.free = total, free
        self.allocated, self.reserved, self.activation = allocated, reserved, activation
        self.profiled = 0

    def mem_get_info(self) -> tuple[int, int]:
        return self.free, self.total

    def memory_allocated(self) -> int:
        return self.allocated

    def memory_reserved(self) -> int:
        return self.reserved

    def peak_allocated_during(self, fn: Callable[[], object]) -> int:
        fn()
        self.profiled += 1
        return self.allocated + self.activation


def make_runner(model_dir, probe=None, *, cache=None, **sched) -> ModelRunner:
    return ModelRunner(
        ModelConfig(model=str(model_dir), max_model_len=sched.pop("max_model_len", None)),
        cache or CacheConfig(),
        SchedulerConfig(**sched),
        progress=False,
        memory_probe=probe,
    )


def spy_forward(monkeypatch, runner: ModelRunner) -> list[dict]:
    """Record the shapes of every forward and logits call of ``runner``'s model."""
    calls: list[dict] = []
    model = runner.model
    forward, logits = model.forward, model.compute_logits

    def fwd(input_ids, positions, kv_caches, meta):
        calls.append({"tokens": input_ids.shape[0], "seqs": meta.num_seqs})
        return forward(input_ids, positions, kv_caches, meta)

    def lg(hidden):
        calls[-1]["logit_rows"] = hidden.shape[0]
        return logits(hidden)

    monkeypatch.setattr(model, "forward", fwd)
    monkeypatch.setattr(model, "compute_logits", lg)
    return calls


# ---- the arithmetic -------------------------------------------------------------------
def test_kv_budget_is_the_share_left_after_everything_else():
    budget = kv_budget_bytes(80 * GIB, 0.9, 16 * GIB, 3 * GIB, 256 * MIB, GIB)
    assert budget == int(80 * GIB * 0.9) - 16 * GIB - 3 * GIB - 256 * MIB - GIB


def test_kv_budget_never_negative():
    assert kv_budget_bytes(8 * GIB, 0.5, 6 * GIB, GIB, 0, 0) == 0


# ---- the profiled path ----------------------------------------------------------------
def test_profiled_sizing_takes_every_term_from_the_probe(tiny_model_dir, monkeypatch):
    probe = FakeProbe(
        total=GIB, free=600 * MIB, allocated=100 * MIB, reserved=124 * MIB, activation=50 * MIB
    )
    runner = make_runner(tiny_model_dir, probe, max_num_seqs=8, max_num_batched_tokens=100)
    calls = spy_forward(monkeypatch, runner)
    layout = runner.plan_kv_cache()
    s = runner.kv_sizing
    assert isinstance(s, KVSizing)
    non_torch = GIB - 600 * MIB - 124 * MIB
    expected = int(GIB * 0.9) - 100 * MIB - 50 * MIB - 256 * MIB - non_torch
    assert (s.total_bytes, s.weights_bytes, s.activation_peak_bytes) == (GIB, 100 * MIB, 50 * MIB)
    assert (s.reserve_bytes, s.non_torch_bytes, s.budget_bytes) == (256 * MIB, non_torch, expected)
    assert layout.num_blocks == s.num_blocks == expected // layout.bytes_per_block
    # one dummy forward of the full token budget over max_num_seqs sequences,
    # logits for one row per sequence, and nothing left allocated from it
    assert probe.profiled == 1
    assert calls == [{"tokens": 100, "seqs": 8, "logit_rows": 8}]
    assert (s.profile_tokens, s.profile_seqs) == (100, 8)
    assert runner.kv_caches == []
    assert "activation peak" in s.describe()


def test_profile_samples_every_sequence_the_costliest_way(tiny_model_dir, monkeypatch):
    """The sampler's copies of the logits (penalties, top-k/top-p sorting, logprobs,
    noise) are part of a step's peak: the profiled step samples every row with all of
    them, inside the measured call, and waits for the tokens."""
    from lmfleet.engine.runner import PROFILE_SAMPLING

    probe = FakeProbe(total=GIB, free=GIB, allocated=0, reserved=0, activation=MIB)
    runner = make_runner(tiny_model_dir, probe, max_num_seqs=8, max_num_batched_tokens=100)
    seen = []
    sample = runner.sampler.sample
    rng_before = runner.sampler.generator.get_state()

    def spy(logits, batch):
        pending = sample(logits, batch)
        seen.append((tuple(logits.shape), batch, probe.profiled, pending))
        return pending

    monkeypatch.setattr(runner.sampler, "sample", spy)
    runner.plan_kv_cache()
    [(shape, batch, profiled_before, pending)] = seen
    assert shape == (8, runner.arch.vocab_size) and profiled_before == 0
    assert batch.params == [PROFILE_SAMPLING] * 8
    # seeded and unseeded rows together (both noise buffers), and the sampler's own
    # generator as it was: unseeded tokens do not depend on whether the profile ran
    assert [g is not None for g in batch.generators] == [False, True] * 4
    assert torch.equal(runner.sampler.generator.get_state(), rng_before)
    assert PROFILE_SAMPLING.has_penalties and PROFILE_SAMPLING.logprobs == 20
    assert PROFILE_SAMPLING.top_k > 0 and PROFILE_SAMPLING.top_p < 1
    result = pending.result()
    assert len(result.token_ids) == 8 and all(lp is not None for lp in result.logprobs)


def test_reserve_is_a_cache_setting(tiny_model_dir):
    probe = FakeProbe(total=GIB, free=GIB, allocated=0, reserved=0, activation=0)
    cache = CacheConfig(memory_reserve_bytes=0, gpu_memory_utilization=0.5)
    runner = make_runner(tiny_model_dir, probe, cache=cache, max_num_batched_tokens=64)
    runner.plan_kv_cache()
    assert runner.kv_sizing.budget_bytes == GIB // 2
    with pytest.raises(ConfigError, match="memory_reserve_bytes"):
        CacheConfig(memory_reserve_bytes=-1)


def test_profile_with_one_token_per_sequence(tiny_model_dir, monkeypatch):
    probe = FakeProbe(total=GIB, free=GIB, allocated=0, reserved=0, activation=MIB)
    runner = make_runner(tiny_model_dir, probe, max_num_seqs=256, max_num_batched_tokens=100)
    calls = spy_forward(monkeypatch, runner)
    runner.plan_kv_cache()
    assert calls == [{"tokens": 100, "seqs": 100, "logit_rows": 100}]


def test_profile_sequences_stay_within_max_model_len(tiny_model_dir, monkeypatch):
    probe = FakeProbe(total=GIB, free=GIB, allocated=0, reserved=0, activation=MIB)
    runner = make_runner(
        tiny_model_dir, probe, max_num_seqs=2, max_num_batched_tokens=4096, max_model_len=64
    )
    calls = spy_forward(monkeypatch, runner)
    runner.plan_kv_cache()
    assert calls == [{"tokens": 128, "seqs": 2, "logit_rows": 2}]


def test_budget_below_two_blocks_names_the_fix(tiny_model_dir):
    probe = FakeProbe(total=GIB, free=GIB, allocated=int(0.7 * GIB), reserved=0, activation=0)
    runner = make_runner(tiny_model_dir, probe, max_num_batched_tokens=64)
    with pytest.raises(ConfigError) as err:
        runner.plan_kv_cache()
    msg = str(err.value)
    for fix in ("--gpu-memory-utilization", "--max-num-batched-tokens", "--kv-cache-memory"):
        assert fix in msg


def test_explicit_budget_is_not_profiled(tiny_model_dir, monkeypatch):
    probe = FakeProbe(total=GIB, free=GIB, allocated=0, reserved=0, activation=0)
    cache = CacheConfig(kv_cache_memory_bytes=8 * MIB)
    runner = make_runner(tiny_model_dir, probe, cache=cache)
    calls = spy_forward(monkeypatch, runner)
    layout = runner.plan_kv_cache()
    assert layout.num_blocks == 8 * MIB // layout.bytes_per_block
    assert (probe.profiled, calls, runner.kv_sizing) == (0, [], None)


def test_cpu_keeps_its_default_and_runs_nothing(tiny_model_dir, monkeypatch):
    runner = make_runner(tiny_model_dir)
    assert runner.memory_probe is None
    calls = spy_forward(monkeypatch, runner)
    layout = runner.plan_kv_cache()
    assert layout.num_blocks == CPU_DEFAULT_KV_BYTES // layout.bytes_per_block
    assert (calls, runner.kv_sizing) == ([], None)


def test_engine_stats_carry_the_sizing(tiny_model_dir):
    core = EngineCore(engine_config(str(tiny_model_dir), num_blocks_override=8), progress=False)
    assert core.stats().kv_sizing is None
    sizing = KVSizing(GIB, 0.9, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    core.runner.kv_sizing = sizing
    assert core.stats().kv_sizing is sizing


# ---- packed step inputs ---------------------------------------------------------------
def _request(rid: str, prompt: list[int], output: list[int], computed: int) -> Request:
    r = Request(rid, prompt, SamplingParams(max_tokens=32))
    r.output_token_ids = list(output)
    r.num_computed_tokens = computed
    return r


def _reference_prepare(sched: SchedulerOutput, bs: int) -> dict:
    """The step inputs built tensor by tensor, as the runner did before packing."""
    tokens, positions, slots, qsl, seq_lens, rows = [], [], [], [0], [], []
    width = max(len(it.block_ids) for it in sched.scheduled)
    tables = np.zeros((len(sched.scheduled), width), dtype=np.int32)
    for i, item in enumerate(sched.scheduled):
        r = item.request
        start, end = r.num_computed_tokens, r.num_computed_tokens + item.num_new_tokens
        tokens += r.all_token_ids[start:end]
        for p in range(start, end):
            positions.append(p)
            slots.append(item.block_ids[p // bs] * bs + p % bs)
        tables[i, : len(item.block_ids)] = item.block_ids
        qsl.append(qsl[-1] + item.num_new_tokens)
        seq_lens.append(end)
        if item.samples:
            rows.append(qsl[-1] - 1)
    return {
        "input_ids": torch.tensor(tokens, dtype=torch.int64),
        "positions": torch.tensor(positions, dtype=torch.int64),
        "slot_mapping": torch.tensor(slots, dtype=torch.int64),
        "query_start_loc": torch.tensor(qsl, dtype=torch.int64),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int64),
        "block_tables": torch.from_numpy(tables),
        "sample_rows": torch.tensor(rows, dtype=torch.int64),
        "qsl_cpu": qsl,
        "seq_lens_cpu": seq_lens,
        "max_query_len": max(it.num_new_tokens for it in sched.scheduled),
        "max_seq_len": max(seq_lens),
    }


def _assert_same(step, ref: dict) -> None:
    meta = step.meta
    got = {
        "input_ids": step.input_ids,
        "positions": step.positions,
        "slot_mapping": meta.slot_mapping,
        "query_start_loc": meta.query_start_loc,
        "seq_lens": meta.seq_lens,
        "block_tables": meta.block_tables,
        "sample_rows": step.sample_rows,
    }
    for name, tensor in got.items():
        assert tensor.dtype == ref[name].dtype, name
        assert torch.equal(tensor, ref[name]), name
    assert meta.query_start_loc_cpu == ref["qsl_cpu"]
    assert meta.seq_lens_cpu == ref["seq_lens_cpu"]
    assert (meta.max_query_len, meta.max_seq_len) == (ref["max_query_len"], ref["max_seq_len"])


def test_packed_inputs_equal_the_per_tensor_ones(tiny_model_dir):
    runner = make_runner(tiny_model_dir, max_num_seqs=4, max_num_batched_tokens=64)
    bs = runner.block_size
    prompt = list(range(10, 47))
    mixed = SchedulerOutput(
        scheduled=[
            # a prefill chunk that does not sample
            ScheduledRequest(_request("a", prompt, [], 0), 20, [7, 3]),
            # a decode
            ScheduledRequest(_request("b", prompt, [5, 6, 9], 39), 1, [1, 9, 4]),
            # a recompute that spans the end of the prompt and the outputs
            ScheduledRequest(_request("c", prompt[:10], [50, 51, 52, 53], 5), 9, [12]),
            # a whole short prompt
            ScheduledRequest(_request("d", [3, 4, 5], [], 0), 3, [0]),
        ]
    )
    _assert_same(runner._prepare(mixed), _reference_prepare(mixed, bs))
    # the buffer is reused: a smaller step must not see the previous one's entries
    decode = SchedulerOutput(
        scheduled=[ScheduledRequest(_request("e", prompt, [1], 37), 1, [2, 8, 6])]
    )
    _assert_same(runner._prepare(decode), _reference_prepare(decode, bs))


def test_staging_buffer_grows_when_a_step_is_larger():
    buf = StagingBuffer(torch.device("cpu"), 4)
    view = buf.host_view(10)
    assert view.shape == (10,) and buf.capacity >= 10
    view[:] = np.arange(10)
    assert buf.to_device(10).tolist() == list(range(10))
