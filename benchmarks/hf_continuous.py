"""transformers' continuous batching, timed the same way for every engine benchmark.

The manager that ``generate_batch`` uses (``continuous_batching_context_manager``
with ``WorkloadHints``), greedy, EOS disabled, each request with its own
``max_new_tokens``. Imported by the benchmark scripts beside it (engine_cpu.py,
engine_smollm2.py); run inside their child processes.
"""

from __future__ import annotations

import time


def _run(model, config, prompts: list[list[int]], lens: list[int]) -> int:
    """Generate every request to its own length; returns the tokens generated."""
    from transformers.generation.continuous_batching.utils import WorkloadHints

    hints = WorkloadHints(
        max_prompt_length=max(len(p) for p in prompts),
        max_generated_length=max(lens),
        num_requests=len(prompts),
    )
    cm = model.continuous_batching_context_manager(
        generation_config=config, block=True, timeout=5, workload_hints=hints
    )
    with cm as manager:
        ids = [
            manager.add_request(p, max_new_tokens=n, eos_token_id=-1)
            for p, n in zip(prompts, lens, strict=True)
        ]
        done: dict[str, int] = {}
        while len(done) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"transformers request failed: {result.error}")
                done[result.request_id] = len(result.generated_tokens)
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching loop died")
    return sum(done.values())


def time_continuous_batching(
    model, prompts: list[list[int]], lens: list[int], *, pad_token_id: int, warmup_token: int
) -> dict:
    """One small warm-up run (two prompts of ``warmup_token``), then the timed run of
    ``prompts``; raises unless every request generated its own length."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False, max_new_tokens=max(lens), eos_token_id=-1, pad_token_id=pad_token_id
    )
    with torch.no_grad():
        _run(model, config, [[warmup_token] * 48, [warmup_token + 1] * 40], [8, 8])
        t0 = time.perf_counter()
        got = _run(model, config, prompts, lens)
        seconds = time.perf_counter() - t0
    if got != sum(lens):
        raise RuntimeError(f"transformers produced {got} tokens, expected {sum(lens)}")
    return {"seconds": seconds, "output_tokens": got}
