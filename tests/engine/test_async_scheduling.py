"""Async scheduling: step n+1 is scheduled and launched before step n's tokens are
known, and takes them on the device.

Whatever the overlap, every request must get exactly the tokens, logprobs and
finish reasons it gets with synchronous steps, no KV block may leak, and the step
order must really overlap (launch n+1, then collect n). The simulated accelerator
covers scheduling corner cases quickly (its tokens depend only on each request's
own context); the tiny random model checks the runner's device-side token feed.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from lmfleet.engine.llm import LLM
from lmfleet.engine.outputs import ScheduledRequest, SchedulerOutput
from lmfleet.engine.request import FinishReason, Request, SamplingParams
from lmfleet.engine.runner import LaunchedStep
from lmfleet.engine.sim import PROFILES
from lmfleet.engine.sim.tokenizer import EOS_ID
from lmfleet.engine.step_inputs import StepPlan

FAST = dataclasses.replace(
    PROFILES["llama-8b-h100"],
    name="test-async",
    fixed_s=0.0005,
    prefill_token_s=1e-6,
    decode_seq_s=1e-6,
    kv_token_s=0.0,
    load_s=0.0,
    sleep_s=0.0,
    wake_s=0.0,
    vocab_size=2000,
    kv_capacity_tokens=1 << 16,
    eos_probability=0.08,
)


@pytest.fixture(autouse=True)
def _profiles(monkeypatch, tmp_path):
    monkeypatch.setitem(PROFILES, "test-async", FAST)
    monkeypatch.setenv("LMFLEET_HOME", str(tmp_path))


def _sim(async_scheduling: bool, **kw) -> LLM:
    return LLM("sim:test-async", progress=False, async_scheduling=async_scheduling, **kw)


def _mixed_params() -> list[SamplingParams]:
    """Lengths, EOS stops (the profile emits EOS 8% of the time), stop tokens, min_tokens,
    logprobs and seeds."""
    return [
        SamplingParams(max_tokens=1),
        SamplingParams(max_tokens=2, ignore_eos=True),
        SamplingParams(max_tokens=40),
        SamplingParams(max_tokens=40, min_tokens=25),
        SamplingParams(max_tokens=30, seed=7, logprobs=2),
        SamplingParams(max_tokens=60, stop_token_ids=(1500, 1501, 1502)),
        SamplingParams(max_tokens=17, ignore_eos=True),
        SamplingParams(max_tokens=50),
    ]


def _prompts(n: int, length: int = 6) -> list[list[int]]:
    return [[100 + 13 * i + j for j in range(length + 3 * i)] for i in range(n)]


def _summary(outs) -> list[tuple]:
    return [
        (
            o.token_ids,
            o.finish_reason,
            o.stop_reason,
            [(lp.sampled, lp.top) for lp in o.logprobs] if o.logprobs else None,
        )
        for o in outs
    ]


def _assert_idle(llm: LLM) -> None:
    core = llm.core
    assert not core.has_unfinished()
    assert core.kv.num_free_blocks == core.kv.num_blocks
    assert core.scheduler.running == [] and len(core.scheduler.waiting) == 0


def test_sim_outputs_equal_sync():
    prompts, params = _prompts(8), _mixed_params()
    want = _sim(False).generate(prompts, params)
    llm = _sim(True)
    assert llm.core.async_scheduling
    got = llm.generate(prompts, params)
    assert _summary(got) == _summary(want)
    reasons = {o.finish_reason for o in got}
    assert reasons == {FinishReason.STOP, FinishReason.LENGTH}  # both ends occur
    assert any(o.token_ids[-1] == EOS_ID for o in got)
    _assert_idle(llm)


def test_sim_preemption_and_chunked_prefill_equal_sync():
    kw = {"num_blocks_override": 14, "block_size": 8, "max_num_batched_tokens": 24}
    prompts = _prompts(6, length=20)
    params = [SamplingParams(max_tokens=30 + 5 * i, ignore_eos=True) for i in range(6)]
    want = _sim(False, **kw).generate(prompts, params)
    llm = _sim(True, **kw)
    got = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert llm.core.stats().num_preemptions > 0  # 6 × ~60 tokens in 112 slots
    _assert_idle(llm)


def _record_calls(llm: LLM) -> list[str]:
    runner = llm.core.runner
    calls: list[str] = []
    launch, collect = runner.launch, runner.collect
    # the steps themselves, kept alive: keyed by id(), a freed step's id can be
    # handed to a later one
    launched: list[object] = []

    def rec_launch(sched, prev=None):  # type: ignore[no-untyped-def]
        step = launch(sched, prev)
        launched.append(step)
        calls.append(f"launch {len(launched)}")
        return step

    def rec_collect(step):  # type: ignore[no-untyped-def]
        number = next(i for i, s in enumerate(launched, 1) if s is step)
        calls.append(f"collect {number}")
        return collect(step)

    runner.launch, runner.collect = rec_launch, rec_collect  # type: ignore[method-assign]
    return calls


def test_next_step_launches_before_the_previous_is_collected():
    llm = _sim(True)
    calls = _record_calls(llm)
    request_id = llm._add([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True), 0)
    assert llm.core.step() == []  # step 1 launched; nothing known yet
    outs = llm.core.step()  # launches step 2, then finishes step 1
    assert [(o.request_id, len(o.new_token_ids)) for o in outs] == [(request_id, 1)]
    while llm.core.has_unfinished():
        llm.core.step()
    # the third token is the last: nothing is scheduled after it is launched, and the
    # final call only collects
    assert calls == [
        "launch 1",
        "launch 2",
        "collect 1",
        "launch 3",
        "collect 2",
        "launch 4",
        "collect 3",
    ]
    assert llm.core.steps == 3


def _count_rows(llm: LLM) -> list[int]:
    """Per scheduled step, how many requests it runs."""
    rows: list[int] = []
    schedule = llm.core.scheduler.schedule

    def counting():  # type: ignore[no-untyped-def]
        sched = schedule()
        rows.append(len(sched.scheduled))
        return sched

    llm.core.scheduler.schedule = counting  # type: ignore[method-assign]
    return rows


def test_a_stop_costs_one_wasted_row_and_no_output():
    llm = _sim(True)
    sync = _sim(False)
    prompt = [[9, 8, 7]]
    first = sync.generate(prompt, SamplingParams(max_tokens=30, ignore_eos=True))[0].token_ids
    stop = SamplingParams(max_tokens=30, stop_token_ids=(first[4],), ignore_eos=True)
    rows = _count_rows(llm)
    out = llm.generate(prompt, stop)[0]
    assert out.token_ids == first[: first.index(first[4]) + 1]
    assert out.finish_reason is FinishReason.STOP and out.stop_reason == first[4]
    # one row per known token, plus the step launched before the stop was seen
    assert sum(rows) == len(out.token_ids) + 1
    _assert_idle(llm)


def test_length_limit_is_known_ahead_and_wastes_nothing():
    llm = _sim(True)
    rows = _count_rows(llm)
    outs = llm.generate(
        _prompts(2), [SamplingParams(max_tokens=n, ignore_eos=True) for n in (1, 5)]
    )
    assert [len(o.token_ids) for o in outs] == [1, 5]
    assert sum(rows) == 1 + 5


def test_abort_while_a_step_is_in_flight():
    prompts = _prompts(3)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    want = _sim(False).generate(prompts, params)
    llm = _sim(True)
    ids = [llm._add(p, params, 0) for p in prompts]
    got: dict[str, list[int]] = {rid: [] for rid in ids}
    for _ in range(4):
        for o in llm.core.step():
            got[o.request_id] += o.new_token_ids
    llm.core.abort([ids[1]])
    while llm.core.has_unfinished():
        for o in llm.core.step():
            got[o.request_id] += o.new_token_ids
    assert got[ids[0]] == want[0].token_ids and got[ids[2]] == want[2].token_ids
    assert got[ids[1]] == want[1].token_ids[:3]  # steps 1-3 collected before the abort
    _assert_idle(llm)

    # every request aborted while a step runs: the step is still collected, and the
    # engine can sleep (nothing in flight afterwards)
    rid = llm._add([1, 2, 3], params, 0)
    llm.core.step()
    llm.core.abort([rid])
    assert llm.core.has_unfinished()  # the launched step is not collected yet
    llm.core.sleep()
    assert not llm.core.has_unfinished()
    llm.core.wake()
    _assert_idle(llm)


def test_in_flight_token_layout():
    prompt = [11, 12, 13]
    r = Request("r", prompt, SamplingParams(max_tokens=4))
    r.output_token_ids = [21]
    r.num_computed_tokens = 4  # the prompt and the first output are in the cache
    r.num_pending_tokens = 1  # a second output is being sampled
    item = ScheduledRequest(r, 1, [3])
    assert (item.start, item.samples, item.output_index, item.input_in_flight) == (4, True, 2, True)
    other = Request("o", [5, 6], SamplingParams(max_tokens=4))
    plan = StepPlan.gather(SchedulerOutput(scheduled=[ScheduledRequest(other, 2, [1]), item]))
    assert plan.tokens == [5, 6, 0] and plan.fill_rows == [2] and plan.fill_requests == ["r"]
    lay = plan.layout()
    assert lay.num_fills == 1
    buf = np.zeros(lay.size, dtype=np.int64)
    plan.write(buf, lay, 16, np.array([7]))
    assert buf[lay.fills].tolist() == [2, 7]
    assert buf[lay.positions].tolist() == [0, 1, 4]  # the in-flight token is the 5th
    with pytest.raises(ValueError, match="in flight"):
        plan.write(buf, lay, 16)


def _model(model_dir, async_scheduling: bool, **kw) -> LLM:
    return LLM(
        str(model_dir),
        progress=False,
        device="cpu",
        async_scheduling=async_scheduling,
        **kw,
    )


def _model_params(stop_token: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=8, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop_token,)),
        SamplingParams(temperature=0.0, max_tokens=6, min_tokens=4, ignore_eos=True),
    ]


def _count_in_flight(llm: LLM) -> list[int]:
    """Per step, how many inputs the runner takes from the previous step's tokens."""
    runner = llm.core.runner
    counts: list[int] = []
    prepare = runner._prepare

    def counting(sched, prev=None):  # type: ignore[no-untyped-def]
        counts.append(sum(item.input_in_flight for item in sched.scheduled))
        return prepare(sched, prev)

    runner._prepare = counting  # type: ignore[method-assign]
    return counts


def _model_prompts(n: int) -> list[list[int]]:
    return [[(5 * i + 7 * j) % 300 + 10 for j in range(3 + 4 * i)] for i in range(n)]


def test_model_async_equals_sync(tiny_model_dir):
    prompts = _model_prompts(5)
    sync = _model(tiny_model_dir, False)
    probe = sync.generate(prompts[3:4], SamplingParams(temperature=0.0, max_tokens=12))
    stop_token = probe[0].token_ids[3]
    want = sync.generate(prompts, _model_params(stop_token))
    llm = _model(tiny_model_dir, True)
    in_flight = _count_in_flight(llm)
    got = llm.generate(prompts, _model_params(stop_token))
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [(o.finish_reason, o.stop_reason) for o in got] == [
        (o.finish_reason, o.stop_reason) for o in want
    ]
    # logprobs: the same tokens and ranks; values to float32 rounding (the stopped
    # request's wasted row changes one step's batch size, and with it the GEMM's
    # blocking on CPU)
    for a, b in zip(got[2].logprobs, want[2].logprobs, strict=True):
        for x, y in zip((a.sampled, *a.top), (b.sampled, *b.top), strict=True):
            assert (x.token_id, x.rank) == (y.token_id, y.rank)
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
    assert got[3].finish_reason is FinishReason.STOP and got[3].stop_reason == stop_token
    # every decode step took its inputs on the device: 5 rows after the prefill
    assert in_flight[:4] == [0, 5, 5, 5]
    _assert_idle(llm)


def test_model_penalties_equal_sync(tiny_model_dir):
    # prompts the tiny model answers with the same token over and over, so that the
    # penalty on the newest (in-flight) token decides the next one
    prompts = [[5] * 8, [250] * 3, [99] * 8]
    params = [
        SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=2.0, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, frequency_penalty=0.9, ignore_eos=True),
    ]
    want = _model(tiny_model_dir, False).generate(prompts, params)
    llm = _model(tiny_model_dir, True)
    in_flight = _count_in_flight(llm)
    got = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    # the penalties work: no token follows itself (unpenalised, 345 repeats forever)
    for out in (want[0], want[2]):
        assert all(a != b for a, b in itertools.pairwise(out.token_ids))
    assert want[1].token_ids == [345] * 6
    # penalised requests too take their newest token on the device, where the
    # penalties count it: no step waits for the previous one
    assert in_flight[:4] == [0, 3, 3, 3]
    _assert_idle(llm)


def test_model_async_through_decode_graph_layout(tiny_model_dir):
    pytest.importorskip("triton")
    prompts = _model_prompts(3)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (4, 6, 5)]
    want = _model(tiny_model_dir, False, attention_backend="triton", enforce_eager=True)
    want_ids = [o.token_ids for o in want.generate(prompts, params)]
    llm = _model(tiny_model_dir, True, attention_backend="triton")
    runner = llm.core.runner
    runner.use_decode_graphs(capture=False)
    seen: list[int] = []
    graphs_run = runner.graphs.run

    def run(size: int) -> torch.Tensor:
        seen.append(size)
        return graphs_run(size)

    runner.graphs.run = run  # type: ignore[method-assign]
    fills = _count_in_flight(llm)
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == want_ids
    assert seen and max(fills) == 3  # the graph steps took their tokens on the device
    _assert_idle(llm)


def test_launched_step_without_the_token_is_an_error(tiny_model_dir):
    llm = _model(tiny_model_dir, True)
    r = Request("r", [11, 12, 13], SamplingParams(max_tokens=4))
    r.output_token_ids = [21]
    r.num_computed_tokens = 4
    r.num_pending_tokens = 1
    sched = SchedulerOutput(scheduled=[ScheduledRequest(r, 1, [0])], num_batched_tokens=1)
    with pytest.raises(RuntimeError, match="takes a token in flight"):
        llm.core.runner.launch(sched, LaunchedStep())


def test_prefix_cache_indexes_the_same_blocks_as_sync():
    """A block whose last token was in flight when its step was scheduled is indexed
    once the token is known, even when the request ends right after, so a
    continuation hits exactly what it hits after synchronous steps."""
    prompt = [[200 + j for j in range(11)]]
    hits = {}
    for mode in (False, True):
        llm = _sim(mode, block_size=8)
        first = llm.generate(prompt, SamplingParams(max_tokens=22, ignore_eos=True))[0]
        before = llm.core.stats().prefix_hits
        cont = [prompt[0] + first.token_ids + [7, 7, 7]]
        llm.generate(cont, SamplingParams(max_tokens=2, ignore_eos=True))
        hits[mode] = llm.core.stats().prefix_hits - before
        _assert_idle(llm)
    # 11 + 22 = 33 tokens, the last never fed: positions 0-31 were computed, and the
    # last step fed position 31 while it was in flight, filling the fourth block
    assert hits == {False: 32, True: 32}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_async_steps_equal_sync_and_never_wait_before_the_read_back(
    tiny_model_dir, monkeypatch
):
    """On CUDA with captured decode graphs: the same greedy tokens as synchronous
    steps, and a step launches without any host sync (``set_sync_debug_mode``), the
    only wait being the previous step's read-back, while the GPU still runs the new
    step."""
    from lmfleet.engine.layers import sampler as sampler_module

    prompts = _model_prompts(5)
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)] * 5
    kw = {"device": "cuda", "attention_backend": "triton", "kv_cache_memory_bytes": 1 << 28}
    want = [
        o.token_ids
        for o in LLM(str(tiny_model_dir), progress=False, **kw).generate(prompts, params)
    ]
    llm = LLM(str(tiny_model_dir), progress=False, async_scheduling=True, **kw)
    assert llm.core.async_scheduling and llm.core.runner.graphs is not None
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4))  # pinned buffers
    busy_at_wait: list[bool] = []
    wait = sampler_module._Fetch.wait

    def checked_wait(self):  # type: ignore[no-untyped-def]
        busy_at_wait.append(not torch.cuda.current_stream().query())
        torch.cuda.set_sync_debug_mode("default")
        try:
            return wait(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(sampler_module._Fetch, "wait", checked_wait)
    ids = [llm._add(p, sp, 0) for p, sp in zip(prompts, params, strict=True)]
    got: dict[str, list[int]] = {rid: [] for rid in ids}
    torch.cuda.set_sync_debug_mode("error")
    try:
        while llm.core.has_unfinished():
            for out in llm.core.step():
                got[out.request_id] += out.new_token_ids
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [got[rid] for rid in ids] == want
    # while decoding, each read-back found the GPU busy with the step launched after it
    assert sum(busy_at_wait) >= len(busy_at_wait) // 2
