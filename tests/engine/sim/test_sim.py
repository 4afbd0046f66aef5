from __future__ import annotations

import dataclasses
import time

import pytest

from lmfleet.engine.llm import LLM
from lmfleet.engine.request import SamplingParams
from lmfleet.engine.sim import PROFILES, sim_token
from lmfleet.engine.sim import runner as sim_runner
from lmfleet.engine.sim.tokenizer import EOS_ID, FIRST_WORD_ID
from lmfleet.errors import ConfigError

FAST = dataclasses.replace(
    PROFILES["llama-8b-h100"],
    name="test-fast",
    fixed_s=0.004,
    prefill_token_s=2e-5,
    decode_seq_s=1e-4,
    kv_token_s=0.0,
    load_s=0.05,
    sleep_s=0.01,
    wake_s=0.02,
    vocab_size=2000,
    kv_capacity_tokens=1 << 16,
)


@pytest.fixture(autouse=True)
def _profiles(monkeypatch, tmp_path):
    monkeypatch.setitem(PROFILES, "test-fast", FAST)
    monkeypatch.setenv("LMFLEET_HOME", str(tmp_path))


def params(**kw):
    return SamplingParams(**{"max_tokens": 20, "ignore_eos": True, **kw})


def test_same_request_same_tokens_and_continuation():
    llm = LLM("sim:test-fast", progress=False)
    a = llm.generate(["ba be bi", "user assistant"], params())
    b = llm.generate(["ba be bi"], params())
    assert a[0].token_ids == b[0].token_ids
    assert a[0].token_ids != a[1].token_ids
    assert all(FIRST_WORD_ID <= t < 2000 for t in a[0].token_ids)
    # prompt + first 7 tokens continues exactly where the stream was
    cont = llm.generate([a[0].prompt_token_ids + a[0].token_ids[:7]], params(max_tokens=13))
    assert cont[0].token_ids == a[0].token_ids[7:]
    # seeds change the stream deterministically
    s1 = llm.generate(["ba be bi"], params(seed=5))[0].token_ids
    assert s1 == llm.generate(["ba be bi"], params(seed=5))[0].token_ids != a[0].token_ids
    # text is words of the vocabulary, one per token
    assert len(a[0].text.split()) == 20


def test_eos_probability_and_ignore_eos():
    p = dataclasses.replace(FAST, eos_probability=0.2)
    PROFILES["test-fast"] = p
    llm = LLM("sim:test-fast", progress=False)
    outs = llm.generate([[10 + i, 11, 12] for i in range(20)], SamplingParams(max_tokens=50))
    assert any(o.finish_reason.value == "stop" and len(o.token_ids) < 50 for o in outs)
    assert all(EOS_ID not in o.token_ids[:-1] for o in outs)
    ignored = llm.generate([[10, 11, 12]], SamplingParams(max_tokens=50, ignore_eos=True))
    assert len(ignored[0].token_ids) == 50
    assert sim_token(0, 5, (1, 2), 2000, 0.0) != EOS_ID


class FakeClock:
    """Stands in for the ``time`` module inside the sim runner: it reads a virtual
    clock that moves only when the runner sleeps, so a run's "wall" time is exactly
    the time the runner chose to wait, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


BATCH = [[10 + i] * 50 for i in range(8)]
# 1 prefill step (400 tokens) + 39 decode steps of 8 sequences
BATCH_SECONDS = FAST.step_seconds(400, 0, 0) + 39 * FAST.step_seconds(0, 8, 0)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_step_time_follows_profile(monkeypatch, scale):
    clock = FakeClock()
    monkeypatch.setattr(sim_runner, "time", clock)
    llm = LLM("sim:test-fast", progress=False, sim_time_scale=scale)
    assert clock.now == pytest.approx(FAST.load_s / scale)  # the load waits its profile time
    runner = llm.core.runner
    before, start = runner.seconds_simulated, clock.now
    llm.generate(BATCH, params(max_tokens=40))
    simulated = runner.seconds_simulated - before
    assert simulated == pytest.approx(BATCH_SECONDS, rel=1e-6)  # profile time, unscaled
    assert clock.now - start == pytest.approx(BATCH_SECONDS / scale, rel=1e-6)  # paced by scale


def test_steps_take_at_least_their_profile_time_on_the_real_clock():
    llm = LLM("sim:test-fast", progress=False)
    runner = llm.core.runner
    before = runner.seconds_simulated
    t0 = time.perf_counter()
    llm.generate(BATCH, params(max_tokens=40))
    wall = time.perf_counter() - t0
    simulated = runner.seconds_simulated - before
    assert simulated == pytest.approx(BATCH_SECONDS, rel=1e-6)
    assert wall >= simulated * (1 - 1e-6)  # a lower bound only: load makes it longer


def test_small_kv_capacity_queues_and_preempts():
    llm = LLM("sim:test-fast", progress=False, num_blocks_override=12, block_size=16)
    prompts = [[10 + i] * 40 for i in range(6)]
    ids = [llm._add(p, params(max_tokens=60), 0) for p in prompts]
    max_waiting_while_running = 0
    done = {}
    while llm.core.has_unfinished():
        for out in llm.processor.process(llm.core.step()).outputs:
            done[out.request_id] = out
        st = llm.core.stats()
        if st.num_running:
            max_waiting_while_running = max(max_waiting_while_running, st.num_waiting)
    assert max_waiting_while_running > 0  # 6 × 100 tokens cannot fit in 192 slots
    assert llm.core.stats().num_preemptions > 0
    outs = [done[i] for i in ids]
    assert all(len(o.token_ids) == 60 for o in outs)
    ref = LLM("sim:test-fast", progress=False).generate(prompts, params(max_tokens=60))
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert llm.core.kv.num_free_blocks == 12


def test_unknown_profile():
    with pytest.raises(ConfigError, match="unknown simulator profile"):
        LLM("sim:nope", progress=False)
