"""``bench serve``: send a workload on a schedule and collect the records.

One task per request, created at its scheduled time; a semaphore caps the requests
in flight when ``max_concurrency`` is set (a request's send time is when it really
went out, so waiting for a slot shows up as send lag). A turn of a session waits for
the previous turn of that session, because its prompt contains that turn's answer.
The records and the client's CPU time are all this module measures; the arithmetic
is in ``metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import time
from dataclasses import dataclass, field, replace

from tqdm import tqdm

from lmfleet.bench.arrivals import RampUp, send_times
from lmfleet.bench.client import ClientPool, Target, build_payload, resolve_model, stream_request
from lmfleet.bench.metrics import RequestRecord
from lmfleet.bench.monitor import Monitor, MonitorSample, MonitorSettings
from lmfleet.bench.workloads import (
    BenchRequest,
    Renderer,
    Turn,
    Workload,
    chat_messages,
    completion_prompt,
)
from lmfleet.errors import ConfigError

#: young-generation GC threshold during a run (Python's default is 700): thousands of
#: short-lived chunk objects a second would otherwise trigger a collection each few ms
_GC_GEN0_THRESHOLD = 20_000


@dataclass(frozen=True, slots=True)
class ServeSettings:
    target: Target
    request_rate: float = math.inf
    burstiness: float = 1.0
    ramp: RampUp | None = None
    max_concurrency: int | None = None
    seed: int = 0
    monitor: MonitorSettings | None = None
    progress: bool = False
    #: httpx clients to spread the streams over (see ``ClientPool``)
    num_clients: int = 32

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError(f"max-concurrency: must be ≥ 1, got {self.max_concurrency}")


@dataclass(slots=True)
class ServeRun:
    records: list[RequestRecord]
    schedule: list[float]
    #: from the start to the last request's end, seconds
    duration_s: float
    #: wall-clock time (Unix seconds) of the start
    started_at: float
    #: CPU seconds this process spent during the run (all threads)
    client_cpu_s: float
    #: the model name sent (resolved from /v1/models when none was given)
    model: str = ""
    samples: list[MonitorSample] = field(default_factory=list)

    @property
    def client_cpu_fraction(self) -> float:
        """CPU use of the bench process during the run, in cores (1.0 = one core busy)."""
        return self.client_cpu_s / self.duration_s if self.duration_s > 0 else 0.0


def schedule_for(workload: Workload, settings: ServeSettings) -> list[float]:
    if workload.timestamps is not None:
        return list(workload.timestamps)
    return send_times(
        len(workload.requests),
        settings.request_rate,
        burstiness=settings.burstiness,
        ramp=settings.ramp,
        seed=settings.seed,
    )


async def run_serve(settings: ServeSettings, workload: Workload, renderer: Renderer) -> ServeRun:
    """Run the whole benchmark against ``settings.target``."""
    schedule = schedule_for(workload, settings)
    target = settings.target
    async with ClientPool(
        settings.num_clients, timeout_s=target.timeout_s, headers=target.headers
    ) as pool:
        if not target.model:
            target = replace(target, model=await resolve_model(pool.get(0), target.base_url))
        return await _Run(settings, target, workload, renderer, schedule, pool).go()


class _Run:
    def __init__(
        self,
        settings: ServeSettings,
        target: Target,
        workload: Workload,
        renderer: Renderer,
        schedule: list[float],
        pool: ClientPool,
    ) -> None:
        self.settings = settings
        self.target = target
        self.workload = workload
        self.schedule = schedule
        self.pool = pool
        self.prefix = renderer.render(workload.prefix_ids) if workload.prefix_ids else ""
        # render ahead, so the send loop does no tokenizer work
        self.texts = [
            r.text if r.text is not None else renderer.render(r.token_ids)
            for r in workload.requests
        ]
        self.history: dict[str, list[Turn]] = {}
        self.history_tokens: dict[str, int] = {}
        self.turn_done: dict[tuple[str, int], asyncio.Event] = {}
        for r in workload.requests:
            if r.session_id is not None:
                self.turn_done[(r.session_id, r.turn)] = asyncio.Event()
        mc = settings.max_concurrency
        self.slots: asyncio.Semaphore | None = asyncio.Semaphore(mc) if mc else None
        self.bar = tqdm(
            total=len(workload.requests), desc="requests", unit="req", disable=not settings.progress
        )

    async def go(self) -> ServeRun:
        records = [
            RequestRecord(
                index=r.index,
                scheduled_time=at,
                input_len=r.input_len + len(self.workload.prefix_ids),
                output_len=r.output_len,
                session_id=r.session_id,
                turn=r.turn,
            )
            for r, at in zip(self.workload.requests, self.schedule, strict=True)
        ]
        stop = asyncio.Event()
        # Objects alive now (imports, the rendered workload) are never garbage: keep
        # the collector from rescanning them (that stalled the send loop for tenths of
        # a second), and collect the young generation less often.
        gc.collect()
        gc.freeze()
        thresholds = gc.get_threshold()
        gc.set_threshold(max(thresholds[0], _GC_GEN0_THRESHOLD), *thresholds[1:])
        wall0 = time.time()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        monitor = Monitor(self.settings.monitor) if self.settings.monitor else None
        monitor_task = asyncio.create_task(monitor.run(t0, stop)) if monitor else None
        tasks: list[asyncio.Task[None]] = []
        try:
            for i, (req, at) in enumerate(zip(self.workload.requests, self.schedule, strict=True)):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self._one(req, records[i], t0)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            end = time.perf_counter()
            cpu = time.process_time() - cpu0
            stop.set()
            if monitor_task is not None:
                with contextlib.suppress(Exception):
                    await monitor_task
            self.bar.close()
            gc.set_threshold(*thresholds)
            gc.unfreeze()
        return ServeRun(
            records=records,
            schedule=self.schedule,
            duration_s=end - t0,
            started_at=wall0,
            client_cpu_s=cpu,
            model=self.target.model,
            samples=monitor.samples if monitor else [],
        )

    async def _one(self, req: BenchRequest, record: RequestRecord, t0: float) -> None:
        sid = req.session_id
        text = self.texts[req.index]
        answer = ""
        if sid is not None and req.turn > 0:
            prev = self.turn_done.get((sid, req.turn - 1))
            if prev is not None:
                await prev.wait()
        try:
            async with self.slots or contextlib.nullcontext():
                payload = build_payload(
                    self.target, self._prompt(req, text, record), req.output_len
                )
                answer = await stream_request(
                    self.pool.get(req.index),
                    self.target,
                    payload,
                    record,
                    run_start=t0,
                    keep_text=sid is not None,
                )
        finally:
            if sid is not None:
                self.history.setdefault(sid, []).append((text, answer))
                self.history_tokens[sid] = (
                    self.history_tokens.get(sid, 0) + req.input_len + record.output_tokens
                )
                self.turn_done[(sid, req.turn)].set()
            self.bar.update(1)

    def _prompt(
        self, req: BenchRequest, text: str, record: RequestRecord
    ) -> str | list[dict[str, str]]:
        sid = req.session_id
        history = self.history.get(sid, []) if sid is not None else []
        if sid is not None:
            record.input_len += self.history_tokens.get(sid, 0)
        if self.target.chat:
            return chat_messages(self.prefix, history, text)
        return completion_prompt(self.prefix, history, text)
