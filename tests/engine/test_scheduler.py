"""Scheduler tests with a fake runner: each sampled token is a function of the
sequence so far, so outcomes are checkable without a model."""

from __future__ import annotations

import pytest

from lmfleet.engine.config import SchedulerConfig
from lmfleet.engine.kv import KVCacheManager
from lmfleet.engine.outputs import RunnerOutput, SchedulerOutput
from lmfleet.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from lmfleet.engine.scheduler import Scheduler


def fake_run(sched: SchedulerOutput) -> RunnerOutput:
    out = RunnerOutput()
    for item in sched.scheduled:
        if item.samples:
            r = item.request
            out.sampled[r.request_id] = (sum(r.all_token_ids) + r.num_tokens) % 97
    return out


def fake_first_token() -> int:
    prompt = [1, 2, 3]
    return (sum(prompt) + len(prompt)) % 97


def make(num_blocks=64, block_size=4, max_len=1000, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), KVCacheManager(num_blocks, block_size), max_len)


def req(rid, n_prompt, max_tokens=5, priority=0, t=None, **params) -> Request:
    return Request(
        rid,
        [(7 * i + len(rid)) % 50 for i in range(n_prompt)],
        SamplingParams(max_tokens=max_tokens, **params),
        priority=priority,
        arrival_time=t,
    )


def run_all(s: Scheduler, max_steps=10_000) -> tuple[dict[str, list[int]], list[SchedulerOutput]]:
    tokens: dict[str, list[int]] = {}
    steps = []
    for _ in range(max_steps):
        if not s.has_unfinished():
            break
        sched = s.schedule()
        steps.append(sched)
        for o in s.update(sched, fake_run(sched)):
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
    return tokens, steps


def test_token_budget_and_chunked_prefill():
    s = make(max_num_batched_tokens=8)
    s.add_request(req("a", 20, max_tokens=3))
    sched = s.schedule()
    assert [(it.request.request_id, it.num_new_tokens, it.samples) for it in sched.scheduled] == [
        ("a", 8, False)
    ]
    s.update(sched, fake_run(sched))
    sched = s.schedule()
    assert sched.scheduled[0].num_new_tokens == 8
    s.update(sched, fake_run(sched))
    sched = s.schedule()
    assert sched.scheduled[0].num_new_tokens == 4 and sched.scheduled[0].samples


def test_running_first_then_waiting_with_max_num_seqs():
    s = make(max_num_batched_tokens=100, max_num_seqs=2)
    for rid in "abc":
        s.add_request(req(rid, 10))
    sched = s.schedule()
    assert [it.request.request_id for it in sched.scheduled] == ["a", "b"]
    s.update(sched, fake_run(sched))
    sched = s.schedule()
    assert [(it.request.request_id, it.num_new_tokens) for it in sched.scheduled] == [
        ("a", 1),
        ("b", 1),
    ]


def test_chunked_matches_whole_prefill_outputs():
    whole, _ = run_all(_fill(make(max_num_batched_tokens=4096)))
    chunked, steps = run_all(_fill(make(max_num_batched_tokens=7)))
    assert whole == chunked
    assert max(st.num_batched_tokens for st in steps) <= 7


def _fill(s: Scheduler) -> Scheduler:
    for i, n in enumerate([3, 17, 30, 9]):
        s.add_request(req(f"r{i}", n, max_tokens=6))
    return s


def test_preemption_under_tiny_kv_gives_same_tokens_and_frees_everything():
    reference, _ = run_all(_fill(make(num_blocks=200)))
    s = _fill(make(num_blocks=12, max_num_batched_tokens=64))
    tight, _ = run_all(s)
    assert tight == reference
    assert s.num_preemptions > 0
    assert s.kv.num_free_blocks == 12
    s.kv.pool.check_invariants()


def test_fcfs_preempts_latest_admitted():
    s = make(num_blocks=10, block_size=4, max_num_batched_tokens=100)
    s.add_request(req("old", 11, max_tokens=20, t=1.0))
    s.add_request(req("new", 11, max_tokens=20, t=2.0))
    seen_preempted = set()
    for _ in range(30):
        sched = s.schedule()
        if sched.num_preempted:
            seen_preempted |= {r.request_id for r in s.waiting}
        s.update(sched, fake_run(sched))
    assert seen_preempted == {"new"}


def test_priority_policy_orders_waiting_and_picks_victim():
    s = make(max_num_batched_tokens=10, max_num_seqs=1, policy="priority")
    s.add_request(req("low", 5, priority=5, t=1.0))
    s.add_request(req("high", 5, priority=-1, t=2.0))
    sched = s.schedule()
    assert [it.request.request_id for it in sched.scheduled] == ["high"]


def test_abort_frees_blocks_and_reports():
    s = make()
    s.add_request(req("a", 10))
    s.add_request(req("b", 10))
    sched = s.schedule()
    s.update(sched, fake_run(sched))
    used = s.kv.num_blocks - s.kv.num_free_blocks
    assert used > 0
    outs = s.abort(["a", "b", "unknown"])
    assert [(o.request_id, o.finish_reason) for o in outs] == [
        ("a", FinishReason.ABORT),
        ("b", FinishReason.ABORT),
    ]
    assert s.kv.num_free_blocks == s.kv.num_blocks
    assert not s.has_unfinished()
    assert s.schedule().finished_request_ids == ["a", "b"]


def test_abort_while_waiting():
    s = make(max_num_seqs=1)
    s.add_request(req("a", 4))
    s.add_request(req("b", 4))
    s.schedule()
    s.abort(["b"])
    assert s.num_waiting == 0 and s.num_running == 1


@pytest.mark.parametrize(
    ("params", "expected_len", "reason"),
    [
        ({"max_tokens": 4}, 4, FinishReason.LENGTH),
        ({"max_tokens": 50, "stop_token_ids": (fake_first_token(),)}, 1, FinishReason.STOP),
    ],
)
def test_stop_conditions(params, expected_len, reason):
    s = make()
    r = Request("x", [1, 2, 3], SamplingParams(**params))
    s.add_request(r)
    tokens, _ = run_all(s)
    assert r.finish_reason is reason and r.status is RequestStatus.FINISHED
    if expected_len:
        assert len(tokens["x"]) == expected_len


def test_eos_and_ignore_eos_and_min_tokens():
    def first_token(**params):
        s = make()
        r = Request(
            "x",
            [1, 2, 3],
            SamplingParams(max_tokens=8, **params),
            eos_token_ids=frozenset(range(97)),
        )
        s.add_request(r)
        tokens, _ = run_all(s)
        return len(tokens["x"]), r.finish_reason

    assert first_token() == (1, FinishReason.STOP)
    assert first_token(ignore_eos=True) == (8, FinishReason.LENGTH)
    assert first_token(min_tokens=3) == (3, FinishReason.STOP)


def test_max_model_len_ends_sequence():
    s = make(max_len=12)
    r = Request("x", list(range(10)), SamplingParams(max_tokens=None))
    s.add_request(r)
    tokens, _ = run_all(s)
    assert len(tokens["x"]) == 2 and r.finish_reason is FinishReason.LENGTH


def test_max_waiting_tokens_holds_newcomers_back():
    s = make(max_num_batched_tokens=100, max_waiting_tokens=3, waiting_served_ratio=0.5)
    for rid in "abcd":
        s.add_request(req(rid, 4, max_tokens=50))
    sched = s.schedule()
    s.update(sched, fake_run(sched))
    s.add_request(req("late", 4, max_tokens=5))  # 1 waiting < 0.5 × 4 running
    admitted_at = None
    for step in range(1, 6):
        sched = s.schedule()
        if any(it.request.request_id == "late" for it in sched.scheduled):
            admitted_at = step
            break
        s.update(sched, fake_run(sched))
    assert admitted_at == 4  # held back 3 decode steps, then forced in
