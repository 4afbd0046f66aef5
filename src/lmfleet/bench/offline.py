"""``bench offline``: the engine's own throughput, without HTTP.

The same workloads as ``bench serve``, as token-id prompts, all submitted at once to
``lmfleet.engine.llm.LLM`` (a session's turns go in rounds: every session's turn 0,
then turn 1 with the answers in its prompt). Latencies come from each output's
``RequestMetrics``: TTFT-like is first token minus arrival, E2EL is finish minus
arrival; there are no per-chunk times, so no ITL. A trace's lengths and sessions are
used, its timestamps are not (offline means everything at once).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmfleet.bench.metrics import RequestRecord
from lmfleet.bench.workloads import BenchRequest, Workload, session_token_ids

if TYPE_CHECKING:
    from lmfleet.engine.llm import LLM
    from lmfleet.engine.request import RequestOutput


@dataclass(slots=True)
class OfflineRun:
    records: list[RequestRecord]
    #: wall time of the generation, seconds (model loading excluded)
    duration_s: float
    load_s: float
    model: str
    #: prompt tokens served from the prefix cache, over all requests
    cached_tokens: int


def run_offline(
    llm: LLM,
    workload: Workload,
    *,
    temperature: float = 0.0,
    seed: int | None = None,
    progress: bool = False,
    load_s: float = 0.0,
) -> OfflineRun:
    from lmfleet.engine.request import SamplingParams

    prefix = list(workload.prefix_ids)
    rounds: dict[int, list[BenchRequest]] = defaultdict(list)
    for r in workload.requests:
        rounds[r.turn if r.session_id is not None else 0].append(r)
    history: dict[str, list[tuple[list[int], list[int]]]] = defaultdict(list)
    records: list[RequestRecord] = []
    t0 = time.monotonic()
    busy = 0.0
    for turn in sorted(rounds):
        batch = rounds[turn]
        prompts: list[list[int]] = []
        messages: list[list[int]] = []
        for r in batch:
            ids = llm.encode(r.text) if r.text is not None else list(r.token_ids)
            messages.append(ids)
            if r.session_id is not None:
                prompts.append(session_token_ids(prefix, history[r.session_id], ids))
            else:
                prompts.append(prefix + ids)
        params = [
            SamplingParams(
                max_tokens=r.output_len, ignore_eos=True, temperature=temperature, seed=seed
            )
            for r in batch
        ]
        start = time.monotonic()
        outputs = llm.generate(prompts, params, use_tqdm=progress)
        busy += time.monotonic() - start
        for r, prompt, ids, out in zip(batch, prompts, messages, outputs, strict=True):
            records.append(_record(r, prompt, out, t0))
            if r.session_id is not None:
                history[r.session_id].append((ids, list(out.token_ids)))
    records.sort(key=lambda rec: rec.index)
    return OfflineRun(
        records=records,
        duration_s=busy,
        load_s=load_s,
        model=str(llm.config.model.model),
        cached_tokens=sum(rec.cached_tokens or 0 for rec in records),
    )


def _record(r: BenchRequest, prompt: Sequence[int], out: RequestOutput, t0: float) -> RequestRecord:
    rec = RequestRecord(
        index=r.index,
        scheduled_time=0.0,
        input_len=len(prompt),
        output_len=r.output_len,
        session_id=r.session_id,
        turn=r.turn,
        output_tokens=len(out.token_ids),
        prompt_tokens=len(prompt),
        cached_tokens=out.num_cached_tokens,
    )
    m = out.metrics
    if m is None or m.finished_time is None:
        rec.error = "no_metrics"
        return rec
    rec.send_time = m.arrival_time - t0
    rec.latency = m.finished_time - m.arrival_time
    if m.first_token_time is not None:
        rec.ttft = m.first_token_time - m.arrival_time
    rec.success = True
    return rec
