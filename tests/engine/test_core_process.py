"""``AsyncEngine(engine_process=True)``: the core in its own process, same interface."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from lmfleet.engine.async_engine import AsyncEngine
from lmfleet.engine.config import engine_config
from lmfleet.engine.core import EngineCore
from lmfleet.engine.request import FinishReason, SamplingParams
from lmfleet.errors import EngineDead, InvalidSamplingParams, PromptTooLong, RequestRejected
from tests.engine.test_async_engine import collect, run
from tests.engine.test_async_engine import started as _started

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


async def started(model_dir, *, engine_process: bool = True, **kw) -> AsyncEngine:
    return await _started(model_dir, engine_process=engine_process, **kw)


def _pid(engine: AsyncEngine) -> int:
    assert engine._client is not None and engine._client.pid is not None
    return engine._client.pid


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# functions sent to the core process through call(): module level, so they pickle
def _facts(core: EngineCore) -> tuple[int, int]:
    return core.max_model_len, os.getpid()


def _fail(core: EngineCore) -> None:
    raise ValueError("no such thing")


def _slow(core: EngineCore) -> None:
    time.sleep(30)


def _raise_in_step() -> list:
    raise RuntimeError("boom in step")


def _break_step(core: EngineCore) -> None:
    core.step = _raise_in_step  # type: ignore[method-assign]


def test_greedy_outputs_match_thread_mode_and_call_runs_in_child(tiny_model_dir):
    prompts = ["Hello there", "The fleet", "Ünïcödé 日本語 text", "a"]

    async def main(engine_process: bool):
        engine = await started(tiny_model_dir, engine_process=engine_process)
        try:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(collect(engine, p, GREEDY) for p in prompts))
            print(f"engine_process={engine_process}: {time.perf_counter() - t0:.2f} s")
            facts = await engine.call(_facts)
            with pytest.raises(ValueError, match="no such thing"):
                await engine.call(_fail)
            return results, facts, engine.stats()
        finally:
            await engine.shutdown()

    threaded, (max_len, _), _ = run(main(False))
    in_process, (max_len_p, child_pid), stats = run(main(True))

    def summary(results):
        return [(text, toks, last.finish_reason) for text, toks, last in results]

    assert summary(in_process) == summary(threaded)
    assert all(last.finish_reason is FinishReason.LENGTH for _, _, last in in_process)
    assert max_len_p == max_len and child_pid != os.getpid()
    assert stats is not None and stats.generation_tokens_total >= len(prompts) * 12


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
            call = asyncio.ensure_future(engine.call(_slow))
            await asyncio.sleep(0.1)
            pid = _pid(engine)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(EngineDead):
                async for _ in agen:
                    pass
            with pytest.raises(EngineDead):
                await asyncio.wait_for(call, 10)
            assert engine.is_dead and not engine.ready
            with pytest.raises(EngineDead):
                await collect(engine, [1, 2], GREEDY)
        finally:
            await engine.shutdown()
        return pid

    assert _gone(run(main()))


def test_exception_in_step_kills_engine(tiny_model_dir):
    async def main():
        engine = await started(tiny_model_dir)
        try:
            await engine.call(_break_step)
            with pytest.raises(EngineDead, match="boom in step"):
                await collect(engine, [1, 2, 3], GREEDY)
            assert engine.is_dead
            with pytest.raises(EngineDead):
                await engine.call(_facts)
        finally:
            await engine.shutdown()
        return _pid(engine)

    assert _gone(run(main()))


def test_shutdown_stops_the_child(tiny_model_dir):
    async def main():
        engine = await started(tiny_model_dir)
        assert engine.ready and not engine.is_dead
        pid = _pid(engine)
        assert not _gone(pid)
        t0 = time.monotonic()
        await engine.shutdown()
        return pid, time.monotonic() - t0

    pid, seconds = run(main())
    assert _gone(pid)
    assert seconds < 10


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
