from __future__ import annotations

import dataclasses
import time

import pytest

from lmfleet.engine.llm import LLM
from lmfleet.engine.request import SamplingParams
from lmfleet.engine.sim import PROFILES, sim_token
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


def test_step_time_follows_profile():
    llm = LLM("sim:test-fast", progress=False)
    llm.generate([[10, 11]], params(max_tokens=2))  # warm up
    runner = llm.core.runner
    before = runner.seconds_simulated
    t0 = time.perf_counter()
    llm.generate([[10 + i] * 50 for i in range(8)], params(max_tokens=40))
    wall = time.perf_counter() - t0
    simulated = runner.seconds_simulated - before
    # 1 prefill step (400 tokens) + 39 decode steps of 8 sequences
    expected = FAST.step_seconds(400, 0, 0) + 39 * FAST.step_seconds(0, 8, 0)
    assert simulated == pytest.approx(expected, rel=1e-6)
    assert 0.9 < wall / simulated < 2.0

    fast = LLM("sim:test-fast", progress=False, sim_time_scale=10)
    t0 = time.perf_counter()
    fast.generate([[10 + i] * 50 for i in range(8)], params(max_tokens=40))
    assert (time.perf_counter() - t0) < wall / 3


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
