"""The simulated accelerator: the real scheduler and KV cache manager in front of a
timed stand-in model, so many "GPU" replicas run on a small machine."""

from __future__ import annotations

from lmfleet.engine.sim.profile import PROFILES, SimProfile, get_profile
from lmfleet.engine.sim.runner import SIM_PREFIX, SimRunner, sim_token

__all__ = ["PROFILES", "SIM_PREFIX", "SimProfile", "SimRunner", "get_profile", "sim_token"]
