"""The autoscaler: grows and shrinks each version's replicas on queue depth.

``policy`` is pure (observation, config, state) -> decision, with no I/O and no
clock; the controller, the simulator and the KEDA scaler all call it. Nothing here
imports the engine, the server or the gateway: observations are plain data.
"""

from __future__ import annotations

from lmfleet.autoscaler.observation import (
    AutoscalingConfig,
    Decision,
    InvalidObservation,
    PolicyState,
    ReplicaPhase,
    ReplicaView,
    Sample,
    ScaleEvent,
    StartMark,
    VersionObservation,
)
from lmfleet.autoscaler.policy import decide

__all__ = [
    "AutoscalingConfig",
    "Decision",
    "InvalidObservation",
    "PolicyState",
    "ReplicaPhase",
    "ReplicaView",
    "Sample",
    "ScaleEvent",
    "StartMark",
    "VersionObservation",
    "decide",
]
