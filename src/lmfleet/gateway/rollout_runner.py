"""Runs the progressive rollouts: every second each running :class:`Rollout` judges
its current step's window, and its decision is applied as traffic weights
(candidate = the step's percent, baseline = the rest). Every transition is logged,
and a hold when what it waits for changes (not every second).

Ownership of weights: a running rollout locks its two versions' weights (the admin
API's ``PATCH`` answers 409 naming it; reloads keep them). A completed or rolled
back rollout leaves its weights as run-time weights, which survive reloads until an
operator changes them (``PATCH``, or a new weight for that version in the file).

State file: rollouts (plan, status, step, history) and run-time weights are written
to ``<fleet file>.state.json`` beside the fleet file on every change, atomically,
and read at start, so a restarted gateway goes on where it was (a running rollout
restarts its current step's window: samples are not kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmfleet.errors import ConfigError, LmfleetError
from lmfleet.fleet.config import RolloutConfig
from lmfleet.gateway.registry import WeightOverride
from lmfleet.gateway.rollout import Decision, Rollout, RolloutPlan, RolloutStep
from lmfleet.gateway.state import GatewayState

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class RolloutConflict(LmfleetError):
    """The operation clashes with a rollout (one already runs, or it owns the
    weights). Recoverable: roll it back or wait for it to end."""


def plan_from_config(cfg: RolloutConfig) -> RolloutPlan:
    return RolloutPlan(
        candidate=cfg.candidate,
        baseline=cfg.baseline,
        steps=tuple(RolloutStep(s.weight, s.min_requests, s.min_duration_s) for s in cfg.steps),
        max_error_rate_increase=cfg.max_error_rate_increase,
        max_ttft_p90_ratio=cfg.max_ttft_p90_ratio,
        max_tpot_p90_ratio=cfg.max_tpot_p90_ratio,
        max_e2e_p90_ratio=cfg.max_e2e_p90_ratio,
        min_samples_for_judgement=cfg.min_samples_for_judgement,
        confidence=cfg.confidence,
    )


def state_path_for(config_path: str | None) -> Path | None:
    """``fleet.yaml`` → ``fleet.yaml.state.json`` beside it (None without a file)."""
    if config_path is None:
        return None
    p = Path(config_path)
    return p.with_name(p.name + ".state.json")


def describe(model: str, rollout: Rollout) -> str:
    return (f"the rollout of {model!r} ({rollout.plan.baseline} → {rollout.plan.candidate}, "
            f"step {rollout.step_index} at {rollout.candidate_weight:g} %)")  # fmt: skip


class RolloutRunner:
    def __init__(
        self, state: GatewayState, interval_s: float = 1.0, *,
        clock: Callable[[], float] = time.time, state_path: str | Path | None = None,
    ) -> None:  # fmt: skip
        self.state = state
        self.interval_s = interval_s
        self.clock = clock
        path = state_path if state_path is not None else state_path_for(state.config_path)
        self.state_path = Path(path) if path is not None else None
        self.rollouts: dict[str, Rollout] = {}
        self._last_pending: dict[str, tuple[str, ...]] = {}
        self._task: asyncio.Task[None] | None = None

    # ---- queries ----------------------------------------------------------------------
    def running(self, model: str) -> Rollout | None:
        r = self.rollouts.get(model)
        return r if r is not None and r.status == "running" else None

    def check_weights_free(self, model: str) -> None:
        """:class:`RolloutConflict` while a rollout of ``model`` owns its weights."""
        r = self.running(model)
        if r is not None:
            raise RolloutConflict(
                f"{describe(model, r)} owns the weights of {model!r}; roll it back "
                f"(POST /admin/rollouts/{model}/rollback) or wait until it ends"
            )

    def status(self, model: str) -> dict[str, Any]:
        rollout = self.rollouts.get(model)
        if rollout is None:
            raise ConfigError(f"no rollout of {model!r}")
        return rollout.state.to_dict()

    # ---- transitions -------------------------------------------------------------------
    def start_rollout(self, model: str, plan: RolloutPlan) -> Rollout:
        entry = self.state.registry.model(model)
        for name in (plan.baseline, plan.candidate):
            if name not in entry.versions:
                raise ConfigError(f"model {model!r} has no version {name!r}")
        current = self.running(model)
        if current is not None:
            raise RolloutConflict(f"{describe(model, current)} is running; roll it back first")
        rollout = Rollout(plan, self.clock())
        self.rollouts[model] = rollout
        self._last_pending.pop(model, None)
        self._apply(model, rollout)
        logger.info("rollout of %s started: %s → %s at %g %%", model, plan.baseline,
                    plan.candidate, rollout.candidate_weight)  # fmt: skip
        self.save()
        return rollout

    def rollback(self, model: str, reason: str) -> Decision:
        rollout = self.rollouts.get(model)
        if rollout is None:
            raise ConfigError(f"no rollout of {model!r}")
        was_running = rollout.status == "running"
        decision = rollout.rollback(self.clock(), reason)
        if was_running:
            self._apply(model, rollout)
            logger.warning("rollout of %s rolled back by hand: %s", model, reason)
            self.save()
        return decision

    def evaluate_once(self) -> None:
        now = self.clock()
        for model, rollout in list(self.rollouts.items()):
            if rollout.status != "running" or model not in self.state.registry.models:
                continue
            decision = rollout.evaluate(now)
            if decision.action != "hold":
                self._apply(model, rollout)
                self.save()
            if decision.action != "hold" or self._last_pending.get(model) != decision.pending:
                level = logging.WARNING if decision.action == "rollback" else logging.INFO
                logger.log(level, "rollout of %s: %s at step %d, candidate %g %%: %s", model,
                           decision.action, decision.step_index, decision.candidate_weight,
                           decision.reason)  # fmt: skip
            self._last_pending[model] = decision.pending

    def _apply(self, model: str, rollout: Rollout) -> None:
        """Weights and the window the proxy feeds, after any change of the rollout."""
        reg = self.state.registry
        plan = rollout.plan
        locked = rollout.status == "running"
        w = rollout.candidate_weight
        reg.set_weight(model, plan.candidate, w, owner="rollout", locked=locked)
        reg.set_weight(model, plan.baseline, 100.0 - w, owner="rollout", locked=locked)
        if locked:
            self.state.windows[model] = rollout.window
        else:
            self.state.windows.pop(model, None)

    # ---- the state file ----------------------------------------------------------------
    def save(self) -> None:
        """Write rollouts and run-time weights (atomically); a failure is logged."""
        if self.state_path is None:
            return
        data = {
            "version": STATE_VERSION,
            "rollouts": {
                model: {
                    "plan": r.plan.to_dict(), "status": r.status, "step_index": r.step_index,
                    "started_at": r.started_at, "history": [d.to_dict() for d in r.history],
                }
                for model, r in self.rollouts.items()
            },
            "weights": [
                {"model": m, "version": v, **o.to_dict()}
                for (m, v), o in self.state.registry.overrides.items()
            ],
        }  # fmt: skip
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.state_path)
        except OSError as exc:
            logger.error("cannot write the gateway state file %s: %s", self.state_path, exc)

    def load(self) -> None:
        """Read the state file, if there is one; a broken one is logged and ignored."""
        if self.state_path is None or not self.state_path.exists():
            return
        try:
            data = json.loads(self.state_path.read_text())
            overrides = {
                (w["model"], w["version"]): WeightOverride(
                    float(w["weight"]), float(w["file_weight"]), str(w["owner"]),
                    bool(w.get("locked", False)),
                )
                for w in data.get("weights", [])
            }  # fmt: skip
            rollouts = {
                model: Rollout.restore(
                    RolloutPlan.from_dict(r["plan"]), self.clock(),
                    started_at=float(r["started_at"]), status=r["status"],
                    step_index=int(r["step_index"]),
                    history=[Decision.from_dict(d) for d in r.get("history", [])],
                )
                for model, r in data.get("rollouts", {}).items()
            }  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, LmfleetError) as exc:
            logger.error("ignoring the gateway state file %s: %s: %s", self.state_path,
                         type(exc).__name__, exc)  # fmt: skip
            return
        self.state.registry.restore_overrides(overrides)
        for model, rollout in rollouts.items():
            entry = self.state.registry.models.get(model)
            plan = rollout.plan
            if entry is None or not {plan.baseline, plan.candidate} <= set(entry.versions):
                logger.warning("state file: dropping the rollout of %s (the model or its "
                               "versions are gone from the fleet file)", model)  # fmt: skip
                continue
            self.rollouts[model] = rollout
            if rollout.status == "running":
                self._apply(model, rollout)
            logger.info("state file: %s is %s", describe(model, rollout), rollout.status)

    # ---- the loop ----------------------------------------------------------------------
    async def start(self) -> None:
        self.load()
        for m in self.state.config.models:
            cfg = m.rollout
            if cfg is None or not cfg.start:
                continue
            known = self.rollouts.get(m.name)
            if known is not None and (known.plan.baseline, known.plan.candidate) == (
                cfg.baseline, cfg.candidate,
            ):  # fmt: skip
                continue  # started before this restart: it goes on, or stays finished
            if known is not None and known.status == "running":
                logger.warning("not starting the fleet file's rollout of %s: %s is running",
                               m.name, describe(m.name, known))  # fmt: skip
                continue
            self.start_rollout(m.name, plan_from_config(cfg))
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
