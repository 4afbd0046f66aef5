"""Decode steps through fixed-shape, padded inputs (the CUDA-graph path).

On CPU the graphs' eager twin (``use_decode_graphs(capture=False)``) runs the same
padded, fixed-address forward that a graph replays, through the Triton kernels in
the interpreter: greedy tokens must equal the plain eager path's, padding rows must
never touch the KV cache. The test marked ``gpu`` records real graphs on CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from lmfleet.engine.cuda_graphs import DecodeGraphs, capture_sizes, pick_size
from lmfleet.engine.llm import LLM
from lmfleet.engine.outputs import ScheduledRequest, SchedulerOutput
from lmfleet.engine.request import Request, SamplingParams
from lmfleet.engine.step_inputs import PackLayout, StepPlan

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def test_capture_sizes_ladder():
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(1) == [1]
    assert capture_sizes(2000)[-1] == 512
    assert capture_sizes(300)[-2:] == [256, 300]
    with pytest.raises(ValueError, match="positive"):
        capture_sizes(0)


def test_pick_size():
    sizes = [1, 2, 4, 8, 16]
    assert [pick_size(n, sizes) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert pick_size(17, sizes) is None


def _decode_plan() -> StepPlan:
    """Three sequences decoding one token each at positions 5, 16 and 0."""
    reqs = []
    for i, (pos, blocks) in enumerate([(5, [7]), (16, [3, 9]), (0, [4])]):
        r = Request(f"r{i}", [11] * (pos + 1), SamplingParams(max_tokens=4))
        r.num_computed_tokens = pos  # the last prompt token is this step's
        reqs.append(ScheduledRequest(r, 1, blocks))
    return StepPlan.gather(SchedulerOutput(scheduled=reqs, num_batched_tokens=3))


def test_padded_layout_rows():
    plan = _decode_plan()
    lay = PackLayout(8, 8, 3, 4)
    buf = np.full(lay.size, 99, dtype=np.int64)
    qsl, seq_lens = plan.write(buf, lay, 16)
    assert qsl == [0, 1, 2, 3] and seq_lens == [6, 17, 1]  # the real rows only
    assert buf[lay.ids].tolist() == [11, 11, 11, 0, 0, 0, 0, 0]
    assert buf[lay.positions].tolist() == [5, 16, 0, 0, 0, 0, 0, 0]
    # block 7 offset 5; block 9 offset 0; block 4 offset 0; padding skipped (-1)
    assert buf[lay.slots].tolist() == [117, 144, 64, -1, -1, -1, -1, -1]
    assert buf[lay.query_start_loc].tolist() == list(range(9))
    assert buf[lay.seq_lens].tolist() == [6, 17, 1, 0, 0, 0, 0, 0]
    table = buf[lay.table].view(np.int32)[: lay.table_entries].reshape(8, 4)
    assert table[:3].tolist() == [[7, 0, 0, 0], [3, 9, 0, 0], [4, 0, 0, 0]]
    assert not table[3:].any()
    assert buf[lay.sample_rows].tolist() == [0, 1, 2]


def test_padded_layout_must_hold_the_step():
    plan = _decode_plan()
    with pytest.raises(ValueError, match="cannot hold"):
        plan.write(np.zeros(1000, dtype=np.int64), PackLayout(2, 2, 3, 4), 16)
    with pytest.raises(ValueError, match="cannot hold"):  # table too narrow for 2 blocks
        plan.write(np.zeros(1000, dtype=np.int64), PackLayout(4, 4, 3, 1), 16)
    with pytest.raises(ValueError, match="cannot hold"):  # padding rows hold one token
        plan.write(np.zeros(1000, dtype=np.int64), PackLayout(5, 4, 3, 4), 16)


def test_size_for_decode_only():
    graphs = DecodeGraphs(
        lambda *a: None,  # type: ignore[arg-type,return-value]
        device=torch.device("cpu"),
        sizes=[1, 2, 4],
        width=1,
        block_size=16,
        capture=False,
    )
    plan = _decode_plan()
    assert graphs.size_for(plan) is None  # sequence r1 has 2 blocks, wider than 1
    graphs.width = 2
    assert graphs.size_for(plan) == 4
    plan.tokens.append(5)  # one sequence brings two tokens: a prefill chunk
    plan.count[0] = 2
    assert graphs.size_for(plan) is None
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(
            lambda *a: None,  # type: ignore[arg-type,return-value]
            device=torch.device("cpu"),
            sizes=[1],
            width=1,
            block_size=16,
            capture=True,
        )


PARAMS = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (5, 2, 6, 4, 3)]


def _prompts() -> list[list[int]]:
    return [[(7 * i + 3 * j) % 400 + 20 for j in range(4 + 5 * i)] for i in range(5)]


def _engine(model_dir, **kw) -> LLM:
    return LLM(
        str(model_dir),
        progress=False,
        device=DEVICE,
        attention_backend="triton",
        enable_prefix_caching=True,
        **kw,
    )


def _graph_sizes_seen(llm: LLM) -> list[int]:
    """Wrap the runner's graphs so the test sees which sizes ran."""
    graphs = llm.core.runner.graphs
    assert graphs is not None
    seen: list[int] = []
    run = graphs.run

    def counting(size: int) -> torch.Tensor:
        seen.append(size)
        return run(size)

    graphs.run = counting  # type: ignore[method-assign]
    return seen


def test_padded_decode_equals_eager(tiny_model_dir):
    eager = _engine(tiny_model_dir, enforce_eager=True)
    assert eager.core.runner.graphs is None
    want = [o.token_ids for o in eager.generate(_prompts(), PARAMS)]

    llm = _engine(tiny_model_dir)
    if not CUDA:
        llm.core.runner.use_decode_graphs(capture=False)
    seen = _graph_sizes_seen(llm)
    got = [o.token_ids for o in llm.generate(_prompts(), PARAMS)]
    assert got == want
    # five sequences pad to 8; as they finish, 4 and 3 pad to 4, then 2 and 1
    assert set(seen) == {8, 4, 2, 1}
    # the padding rows wrote nothing: a prefix-cache hit on the same prompts reads the
    # blocks back and still gives the same tokens
    again = [o.token_ids for o in llm.generate(_prompts(), PARAMS)]
    assert again == want
    assert llm.core.stats().prefix_hits > 0


def test_long_context_runs_eagerly(tiny_model_dir):
    llm = _engine(tiny_model_dir, max_seq_len_to_capture=16)
    if not CUDA:
        llm.core.runner.use_decode_graphs(capture=False)
    graphs = llm.core.runner.graphs
    assert graphs is not None and graphs.width == 1
    seen = _graph_sizes_seen(llm)
    short = [[30, 31, 32]]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    out = llm.generate(short, params)[0].token_ids
    # positions 3..15 fit the one-block table; from 16 tokens of context on, eager
    assert len(seen) == 16 - 3
    eager = _engine(tiny_model_dir, enforce_eager=True)
    assert eager.generate(short, params)[0].token_ids == out


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_captured_graphs_equal_eager(tiny_model_dir):
    llm = _engine(tiny_model_dir)
    graphs = llm.core.runner.graphs
    assert graphs is not None and graphs.capture_enabled and graphs.capture_seconds > 0
    eager = _engine(tiny_model_dir, enforce_eager=True)
    want = [o.token_ids for o in eager.generate(_prompts(), PARAMS)]
    assert [o.token_ids for o in llm.generate(_prompts(), PARAMS)] == want


def test_failed_capture_falls_back_to_eager(tiny_model_dir, caplog):
    llm = _engine(tiny_model_dir)
    runner = llm.core.runner
    runner._graphs_wanted = lambda: True  # type: ignore[method-assign]
    with caplog.at_level("ERROR", logger="lmfleet.engine.runner"):
        # on CPU the capture itself raises ("CUDA graphs need a CUDA device")
        runner.allocate_kv_cache(runner.layout)
    assert runner.graphs is None
    assert "CUDA graph capture failed; decode steps run eagerly" in caplog.text
    out = llm.generate([[30, 31, 32]], SamplingParams(temperature=0.0, max_tokens=3))
    assert len(out[0].token_ids) == 3
