"""``AsyncEngine(engine_process=True)``: the core in its own process, same interface
(and the same command loop) as the thread."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from lmfleet.engine.async_engine import AsyncEngine
from lmfleet.engine.config import engine_config
from lmfleet.engine.core_process import CoreProcessClient
from lmfleet.engine.faults import fault_request_id
from lmfleet.engine.request import FinishReason, SamplingParams
from lmfleet.errors import (
    EngineBusy,
    EngineDead,
    InvalidSamplingParams,
    PromptTooLong,
    RequestRejected,
)
from tests.engine.test_async_engine import collect, run
from tests.engine.test_async_engine import started as _started

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


async def started(model_dir, *, engine_process: bool = True, **kw) -> AsyncEngine:
    return await _started(model_dir, engine_process=engine_process, **kw)


def _pid(engine: AsyncEngine) -> int:
    link = engine._link
    assert isinstance(link, CoreProcessClient) and link.pid is not None
    return link.pid


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_greedy_outputs_match_thread_mode_and_calls_run_in_the_core(tiny_model_dir):
    prompts = ["Hello there", "The fleet", "Ünïcödé 日本語 text", "a"]

    async def main(engine_process: bool):
        engine = await started(tiny_model_dir, engine_process=engine_process)
        try:
            results = await asyncio.gather(*(collect(engine, p, GREEDY) for p in prompts))
            long = engine.generate([5] * 20, SamplingParams(max_tokens=500, ignore_eos=True))
            await anext(long)
            with pytest.raises(EngineBusy, match="in flight"):  # the core's own error
                await engine.sleep()
            await long.aclose()
            slept = await wait_idle_then(engine, engine.sleep)
            assert engine.stats().asleep
            woke = await engine.wake()
            assert engine.info is not None
            return results, engine.info.max_model_len, engine.stats(), (slept, woke)
        finally:
            await engine.shutdown()

    threaded, max_len, _, _ = run(main(False))
    in_process, max_len_p, stats, seconds = run(main(True))

    def summary(results):
        return [(text, toks, last.finish_reason) for text, toks, last in results]

    assert summary(in_process) == summary(threaded)
    assert all(last.finish_reason is FinishReason.LENGTH for _, _, last in in_process)
    assert max_len_p == max_len
    assert stats is not None and stats.generation_tokens_total >= len(prompts) * 12
    assert not stats.asleep and all(s >= 0 for s in seconds)


async def wait_idle_then(engine: AsyncEngine, fn):
    """``fn()`` once the aborted request is gone (its abort reaches the core first)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        try:
            return await fn()
        except EngineBusy:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.02)


def test_rejected_requests_raise_as_in_thread_mode(tiny_model_dir):
    cases = [
        ([1] * 64, SamplingParams(max_tokens=1)),  # PromptTooLong
        ([1] * 10, SamplingParams(max_tokens=60)),  # InvalidSamplingParams
        ([], SamplingParams(max_tokens=1)),  # empty prompt
    ]

    async def main(engine_process: bool):
        engine = await started(tiny_model_dir, engine_process=engine_process, max_model_len=64)
        errors = []
        try:
            for prompt, params in cases:
                with pytest.raises(RequestRejected) as info:
                    await collect(engine, prompt, params)
                errors.append((type(info.value), str(info.value), info.value.param))
            _, toks, _ = await collect(
                engine, [1] * 10, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
            )
            assert len(toks) == 3
            return errors
        finally:
            await engine.shutdown()

    threaded = run(main(False))
    assert run(main(True)) == threaded
    assert [t for t, _, _ in threaded][:2] == [PromptTooLong, InvalidSamplingParams]


def test_killed_core_fails_waiting_requests_and_calls(tiny_model_dir):
    async def main():
        engine = await started(tiny_model_dir)
        try:
            long = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)
            agen = engine.generate([5] * 20, long)
            await agen.__anext__()  # streaming
            pid = _pid(engine)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(EngineDead):
                async for _ in agen:
                    pass
            with pytest.raises(EngineDead):
                await engine.sleep()
            assert engine.is_dead and not engine.ready and engine.health().dead
            with pytest.raises(EngineDead):
                await collect(engine, [1, 2], GREEDY)
        finally:
            await engine.shutdown()
        return pid

    assert _gone(run(main()))


def test_exception_in_step_kills_engine(tiny_model_dir):
    async def main():
        engine = await started(tiny_model_dir, fault_injection=True)
        try:
            with pytest.raises(EngineDead, match="fault injected"):
                await collect(engine, [1, 2, 3], GREEDY, request_id=fault_request_id("step"))
            assert engine.is_dead
            with pytest.raises(EngineDead):
                await engine.wake()
        finally:
            await engine.shutdown()
        return _pid(engine)

    assert _gone(run(main()))


def test_shutdown_stops_the_child(tiny_model_dir, caplog):
    async def main():
        engine = await started(tiny_model_dir)
        assert engine.ready and not engine.is_dead
        pid = _pid(engine)
        assert not _gone(pid)
        await engine.shutdown()
        link = engine._link
        assert isinstance(link, CoreProcessClient) and link._proc is not None
        return pid, link._proc.exitcode

    with caplog.at_level(logging.WARNING, logger="lmfleet.engine.core_process"):
        pid, exitcode = run(main())
    assert _gone(pid)
    # it stopped on the SHUTDOWN command (status 0), not by the kill after the timeout
    assert exitcode == 0
    assert "killing it" not in caplog.text


def test_load_error_is_raised_in_the_parent(tmp_path):
    async def main(engine_process: bool):
        engine = AsyncEngine(
            engine_config(str(tmp_path)), progress=False, engine_process=engine_process
        )
        with pytest.raises(Exception) as info:
            await engine.start()
        return type(info.value), str(info.value)

    threaded = run(main(False))
    assert run(main(True)) == threaded
