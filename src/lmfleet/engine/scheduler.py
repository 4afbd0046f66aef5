"""Continuous batching: which requests run this step, and how many tokens of each.

One accounting rule: every request has ``num_computed_tokens`` and catches up to
``num_tokens`` (prompt + output) plus ``num_pending_tokens``. A step gives each
running request what it lacks, capped by the token budget (chunked prefill), then
admits waiting requests while budget, ``max_num_seqs`` and KV blocks allow. A prefix-cache hit simply starts a
request with some tokens already computed. When blocks run out, the
lowest-priority running request (the latest admitted, under FCFS) is preempted: its
blocks are freed and it is recomputed later. Running out is never an error.

``schedule`` advances ``num_computed_tokens`` and counts the token each sampling
request will get as pending; ``update`` turns pending tokens into outputs. Between
the two the engine may schedule the next step (async scheduling): a request whose
token is still pending is scheduled for that token, which the runner takes from the
device, unless the pending token is sure to end it (``max_tokens``, the context
limit). One whose pending token turns out to be a stop token has its next step's
work thrown away.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterable

from lmfleet.engine.config import SchedulerConfig
from lmfleet.engine.kv import KVCacheManager
from lmfleet.engine.outputs import (
    EngineCoreOutput,
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    describe_error,
)
from lmfleet.engine.request import FinishReason, Request, RequestStatus

logger = logging.getLogger(__name__)


class _WaitingQueue:
    """Waiting requests in service order: FCFS, or (priority, arrival) with
    preempted requests put back where their key says."""

    def __init__(self, by_priority: bool) -> None:
        self._by_priority = by_priority
        self._items: list[Request] = []
        self._keys: list[tuple[int, float]] = []

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def _key(self, r: Request) -> tuple[int, float]:
        return (r.priority, r.arrival_time) if self._by_priority else (0, r.arrival_time)

    def add(self, r: Request) -> None:
        key = self._key(r)
        i = bisect.bisect_right(self._keys, key)
        self._items.insert(i, r)
        self._keys.insert(i, key)

    def peek(self) -> Request:
        return self._items[0]

    def pop(self) -> Request:
        self._keys.pop(0)
        return self._items.pop(0)

    def remove(self, r: Request) -> None:
        i = self._items.index(r)
        del self._items[i]
        del self._keys[i]


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting = _WaitingQueue(by_priority=config.policy == "priority")
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_prompt_tokens = 0  # cumulative, for metrics
        self.num_generation_tokens = 0
        self._finished_ids: list[str] = []
        self._steps_without_admission = 0

    # ---- queries -------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- intake --------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.num_prompt_tokens += request.num_prompt_tokens
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def abort(
        self, request_ids: Iterable[str], reason: FinishReason = FinishReason.ABORT
    ) -> list[EngineCoreOutput]:
        """End these requests now; unknown or finished ids are ignored."""
        out = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None:
                continue
            self._remove(request)
            self._finish(request, reason)
            out.append(EngineCoreOutput(rid, [], finish_reason=reason))
        return out

    def fail(self, errors: dict[str, str]) -> list[EngineCoreOutput]:
        """End these requests because handling their own inputs failed (request id ->
        error): their blocks are freed, their outputs carry the error. Unknown or
        finished ids are ignored."""
        out = []
        for rid, error in errors.items():
            request = self.requests.get(rid)
            if request is None:
                continue
            self._remove(request)
            self._finish(request, FinishReason.ERROR)
            out.append(EngineCoreOutput(rid, [], finish_reason=FinishReason.ERROR, error=error))
        return out

    # ---- one step ------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens
        budget, preempted = self._schedule_running(out, budget)
        if not preempted and self._may_admit():
            budget = self._schedule_waiting(out, budget)
        else:
            self._steps_without_admission += 1
        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> tuple[int, bool]:
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_pending_tokens and self._ends_with_pending(request):
                i += 1  # nothing to run: its pending token is its last
                continue
            num_new = request.num_tokens + request.num_pending_tokens
            num_new = min(num_new - request.num_computed_tokens, budget)
            blocks = self.kv.allocate_slots(request, num_new)
            while blocks is None:
                victim = self._pick_victim(i)
                self._preempt(victim)
                preempted = True
                out.num_preempted += 1
                if victim is request:
                    break
                blocks = self.kv.allocate_slots(request, num_new)
            if blocks is None:
                break  # the request itself was preempted; all after it too
            self._add_scheduled(out, request, num_new, blocks)
            budget -= num_new
            i += 1
        return budget, preempted

    def _add_scheduled(
        self, out: SchedulerOutput, request: Request, num_new: int, blocks: list[int]
    ) -> None:
        item = ScheduledRequest(request, num_new, blocks)  # records the step's start
        out.scheduled.append(item)
        request.num_computed_tokens += num_new
        if item.samples:
            request.num_pending_tokens += 1

    def _ends_with_pending(self, request: Request) -> bool:
        """Whether the request's pending tokens finish it by length, whatever they are."""
        num_out = len(request.output_token_ids) + request.num_pending_tokens
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None and num_out >= max_tokens:
            return True
        return request.num_tokens + request.num_pending_tokens >= self.max_model_len

    def _pick_victim(self, first_unscheduled: int) -> Request:
        candidates = self.running[first_unscheduled:]
        if self.config.policy == "priority":
            return max(candidates, key=lambda r: (r.priority, r.arrival_time))
        return candidates[-1]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        self.waiting.add(request)

    def _may_admit(self) -> bool:
        """TGI's max_waiting_tokens rule: while sequences decode, hold newcomers back
        until enough of them wait or they have waited long enough."""
        cfg = self.config
        if cfg.max_waiting_tokens == 0 or not self.running or not self.waiting:
            return True
        enough = len(self.waiting) >= cfg.waiting_served_ratio * len(self.running)
        return enough or self._steps_without_admission >= cfg.max_waiting_tokens

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> int:
        admitted = False
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            if request.num_pending_tokens:
                break  # preempted while its last step ran; admitted once that ends
            if request.num_computed_tokens == 0:
                hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            else:  # cannot happen today: waiting requests own no blocks
                hit_blocks, num_hit = [], request.num_computed_tokens
            num_new = request.num_tokens - num_hit
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            request.num_computed_tokens = num_hit
            blocks = self.kv.allocate_slots(request, num_new, hit_blocks)
            if blocks is None:
                request.num_computed_tokens = 0
                break
            self.waiting.pop()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_scheduled(out, request, num_new, blocks)
            budget -= num_new
            admitted = True
        self._steps_without_admission = 0 if admitted else self._steps_without_admission + 1
        return budget

    # ---- results -------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[EngineCoreOutput]:
        """Turn a finished step's sampled tokens into outputs and check stops. The
        requests may have been scheduled again since (async scheduling). A request
        whose own update raises (a stop check on odd parameters ...) fails alone."""
        outputs: list[EngineCoreOutput] = []
        failed: dict[str, str] = {}
        for item in sched.scheduled:
            request = item.request
            if item.samples:
                request.num_pending_tokens -= 1
            if request.is_finished:
                continue  # aborted, or stopped by the previous step, while this one ran
            token = result.sampled.get(request.request_id)
            if token is None:
                continue
            try:
                output = self._update_one(request, token, result)
            except Exception as exc:
                logger.exception("request %s: update failed", request.request_id)
                failed[request.request_id] = describe_error(exc)
                continue
            outputs.append(output)
        if failed:
            outputs += self.fail(failed)
        return outputs

    def _update_one(self, request: Request, token: int, result: RunnerOutput) -> EngineCoreOutput:
        """Append one sampled token to the request, check its stops, end it if one
        matched, and return its output."""
        first = not request.output_token_ids
        request.output_token_ids.append(token)
        self.num_generation_tokens += 1
        n = request.num_tokens
        if request.num_computed_tokens >= n and n % self.kv.block_size == 0:
            # a launched step already feeds this token (async scheduling) and it
            # fills a block: index that block now that its tokens are known
            self.kv.register_known(request)
        reason, stop_token = self._check_stop(request, token)
        logprobs = result.logprobs.get(request.request_id)
        if reason is not None:
            self._remove(request)
            self._finish(request, reason)
        return EngineCoreOutput(
            request.request_id,
            [token],
            [logprobs] if logprobs is not None else None,
            finish_reason=reason,
            stop_reason=stop_token,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            first_scheduled_time=request.first_scheduled_time if first else None,
        )

    def _remove(self, request: Request) -> None:
        """Take a request out of its queue: running, or waiting (preempted)."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)

    def _check_stop(self, request: Request, token: int) -> tuple[FinishReason | None, int | None]:
        params = request.sampling_params
        num_out = len(request.output_token_ids)
        if num_out >= params.min_tokens:
            if token in request.eos_token_ids and not params.ignore_eos:
                return FinishReason.STOP, None
            if token in params.stop_token_ids:
                return FinishReason.STOP, token
        if params.max_tokens is not None and num_out >= params.max_tokens:
            return FinishReason.LENGTH, None
        if request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    def _finish(self, request: Request, reason: FinishReason) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.kv.free(request)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)

    def queue_snapshot(self) -> dict[str, float]:
        now = time.monotonic()
        oldest = min((r.arrival_time for r in self.waiting), default=now)
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "oldest_wait_s": now - oldest,
        }
