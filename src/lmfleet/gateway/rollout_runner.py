"""Runs the progressive rollouts: every second each active :class:`Rollout` judges
the two versions' samples, and its decision is applied as traffic weights
(candidate = the step's percent, baseline = the rest). Every transition is logged,
and so is every hold whose reason changed; ``history`` keeps the transitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from lmfleet.errors import ConfigError
from lmfleet.gateway.config import RolloutConfig
from lmfleet.gateway.rollout import Decision, Rollout, RolloutPlan, RolloutStep
from lmfleet.gateway.state import GatewayState

logger = logging.getLogger(__name__)


def plan_from_config(cfg: RolloutConfig) -> RolloutPlan:
    return RolloutPlan(
        candidate=cfg.candidate,
        baseline=cfg.baseline,
        steps=tuple(RolloutStep(s.weight, s.min_requests, s.min_duration_s) for s in cfg.steps),
        max_error_rate_increase=cfg.max_error_rate_increase,
        max_ttft_p90_ratio=cfg.max_ttft_p90_ratio,
        max_tpot_p90_ratio=cfg.max_tpot_p90_ratio,
        min_samples_for_judgement=cfg.min_samples_for_judgement,
    )


class RolloutRunner:
    def __init__(self, state: GatewayState, interval_s: float = 1.0) -> None:
        self.state = state
        self.interval_s = interval_s
        self.rollouts: dict[str, Rollout] = {}
        self._last_reason: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def start_rollout(self, model: str, plan: RolloutPlan) -> Rollout:
        entry = self.state.registry.model(model)
        for name in (plan.baseline, plan.candidate):
            if name not in entry.versions:
                raise ConfigError(f"model {model!r} has no version {name!r}")
        current = self.rollouts.get(model)
        if current is not None and current.status == "running":
            raise ConfigError(f"a rollout of {model!r} is already running; roll it back first")
        candidate = self.state.version_samples(model, plan.candidate)
        rollout = Rollout(plan, self.state.clock(), candidate_requests=candidate.total)
        self.rollouts[model] = rollout
        self._apply(model, plan, rollout.candidate_weight)
        logger.info("rollout of %s started: %s → %s at %g %%", model, plan.baseline,
                    plan.candidate, rollout.candidate_weight)  # fmt: skip
        return rollout

    def rollback(self, model: str, reason: str) -> Decision:
        rollout = self.rollouts.get(model)
        if rollout is None:
            raise ConfigError(f"no rollout of {model!r}")
        decision = rollout.rollback(self.state.clock(), reason)
        self._apply(model, rollout.plan, decision.candidate_weight)
        logger.warning("rollout of %s rolled back by hand: %s", model, reason)
        return decision

    def evaluate_once(self) -> None:
        now = self.state.clock()
        for model, rollout in list(self.rollouts.items()):
            if rollout.status != "running" or model not in self.state.registry.models:
                continue
            plan = rollout.plan
            decision = rollout.evaluate(
                now,
                self.state.version_samples(model, plan.baseline),
                self.state.version_samples(model, plan.candidate),
            )
            self._apply(model, plan, decision.candidate_weight)
            if decision.action != "hold" or self._last_reason.get(model) != decision.reason:
                level = logging.WARNING if decision.action == "rollback" else logging.INFO
                logger.log(level, "rollout of %s: %s at step %d, candidate %g %%: %s", model,
                           decision.action, decision.step_index, decision.candidate_weight,
                           decision.reason)  # fmt: skip
            self._last_reason[model] = decision.reason

    def _apply(self, model: str, plan: RolloutPlan, candidate_weight: float) -> None:
        reg = self.state.registry
        reg.set_weight(model, plan.candidate, candidate_weight)
        reg.set_weight(model, plan.baseline, 100.0 - candidate_weight)

    def status(self, model: str) -> dict[str, Any]:
        rollout = self.rollouts.get(model)
        if rollout is None:
            raise ConfigError(f"no rollout of {model!r}")
        return rollout.state.to_dict()

    async def start(self) -> None:
        for m in self.state.config.models:
            if m.rollout is not None and m.rollout.start and m.name not in self.rollouts:
                self.start_rollout(m.name, plan_from_config(m.rollout))
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="gateway-rollouts")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.evaluate_once()
            except Exception:
                logger.exception("evaluating rollouts failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
