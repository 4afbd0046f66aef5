from __future__ import annotations

import asyncio

import pytest

from lmfleet.engine.async_engine import AsyncEngine
from lmfleet.engine.config import engine_config
from lmfleet.engine.llm import LLM
from lmfleet.engine.request import FinishReason, SamplingParams
from lmfleet.errors import PromptTooLong
from tests.engine.test_llm import mid_stop_string


def run(coro):
    return asyncio.run(coro)


async def started(model_dir, *, engine_process: bool = False, **kw) -> AsyncEngine:
    engine = AsyncEngine(
        engine_config(str(model_dir), **kw), progress=False, engine_process=engine_process
    )
    await engine.start()
    return engine


async def collect(engine, prompt, params, **kw):
    text, toks, last = [], [], None
    async for out in engine.generate(prompt, params, **kw):
        text.append(out.text)
        toks.extend(out.token_ids)
        last = out
    return "".join(text), toks, last


ASYNC_SCHEDULING = pytest.mark.parametrize(
    "async_scheduling", [False, True], ids=["sync-steps", "async-steps"]
)


@ASYNC_SCHEDULING
def test_concurrent_streams_match_offline(tiny_model_dir, async_scheduling):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = ["Hello there", "The fleet", "Ünïcödé 日本語 text", "a"]
    expected = LLM(str(tiny_model_dir), progress=False).generate(prompts, params)

    async def main():
        engine = await started(tiny_model_dir, async_scheduling=async_scheduling)
        try:
            return await asyncio.gather(*(collect(engine, p, params) for p in prompts))
        finally:
            await engine.shutdown()

    results = run(main())
    for (text, toks, last), exp in zip(results, expected, strict=True):
        assert toks == exp.token_ids
        assert text == exp.text
        assert last.finished and last.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize(
    ("engine_process", "async_scheduling"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["thread", "process", "thread-async-steps", "process-async-steps"],
)
def test_cancelled_consumer_aborts_and_frees_blocks(
    tiny_model_dir, engine_process, async_scheduling
):
    async def main():
        engine = await started(
            tiny_model_dir, engine_process=engine_process, async_scheduling=async_scheduling
        )
        try:
            long = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)
            agen = engine.generate([5] * 40, long)
            got = 0
            async for out in agen:
                got += len(out.token_ids)
                if got >= 5:
                    break
            await agen.aclose()
            # a short request after it still completes
            _, toks, _ = await collect(
                engine, [7, 8, 9], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
            )
            assert len(toks) == 4
            deadline = asyncio.get_running_loop().time() + 30
            while asyncio.get_running_loop().time() < deadline:
                stats = engine.stats()
                if stats.num_running == 0 and stats.num_free_blocks == stats.num_blocks:
                    break
                await asyncio.sleep(0.02)
            return engine.stats()
        finally:
            await engine.shutdown()

    stats = run(main())
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_blocks


def test_rejected_request_raises_before_streaming(tiny_model_dir):
    async def main():
        engine = await started(tiny_model_dir, max_model_len=64)
        try:
            with pytest.raises(PromptTooLong):
                await collect(engine, [1] * 64, SamplingParams(max_tokens=1))
            _, toks, _ = await collect(
                engine, [1] * 10, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
            )
            return toks
        finally:
            await engine.shutdown()

    assert len(run(main())) == 3


@ASYNC_SCHEDULING
def test_stop_string_ends_stream(tiny_model_dir, async_scheduling):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompt = "Once upon a time"  # its greedy text has a usable stop string mid-way
    full = LLM(str(tiny_model_dir), progress=False).generate(prompt, params)[0].text
    stop = mid_stop_string(full)

    async def main():
        engine = await started(tiny_model_dir, async_scheduling=async_scheduling)
        try:
            return await collect(
                engine,
                prompt,
                SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True),
            )
        finally:
            await engine.shutdown()

    text, _, last = run(main())
    assert text == full[: full.index(stop)] and text
    assert last.finish_reason is FinishReason.STOP and last.stop_reason == stop


def test_bind_device_sets_the_current_cuda_device(monkeypatch):
    """Triton launches on the thread's current CUDA device: ``cuda:1`` must become it
    (through the real ``torch.cuda.set_device``, only the driver call is replaced); a
    device without an index and a CPU device leave CUDA alone."""
    import torch

    from lmfleet.engine import runner

    calls = []
    monkeypatch.setattr(torch._C, "_cuda_setDevice", calls.append, raising=False)  # CPU builds
    runner.bind_device(torch.device("cuda", 1))
    runner.bind_device(torch.device("cuda"))  # torch.cuda.set_device would raise here
    runner.bind_device(torch.device("cpu"))
    assert calls == [1]


def test_engine_loop_thread_binds_the_runner_device(tiny_model_dir, monkeypatch):
    """The model loads on one thread and steps on another: the engine loop binds the
    runner's device before its first step (the current CUDA device is per thread)."""
    import threading

    from lmfleet.engine import runner

    bound = []
    monkeypatch.setattr(
        runner,
        "bind_device",
        lambda device: bound.append((threading.current_thread().name, str(device))),
    )

    async def main():
        engine = await started(tiny_model_dir)
        try:
            _, toks, _ = await collect(engine, "hi", SamplingParams(max_tokens=2, ignore_eos=True))
        finally:
            await engine.shutdown()
        return toks

    assert len(run(main())) == 2
    # the loading thread binds it too (ModelRunner.__init__), then the engine loop's
    assert bound[-1] == ("lmfleet-engine", "cpu")
    assert [name for name, _ in bound].count("lmfleet-engine") == 1
