"""The autoscaler: grows and shrinks each version's replicas on queue depth.

``policy`` is pure (observation, config, state) -> decision, with no I/O and no
clock; the controller, the simulator and the KEDA scaler all call it. ``baselines``
holds policies to compare it with, of the same shape (``keda_hpa``: KEDA + the HPA).
Nothing here imports the engine, the server or the gateway: observations are plain
data.
"""

from __future__ import annotations

from lmfleet.autoscaler.baselines import KedaConfig, KedaState, keda_hpa
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
    "KedaConfig",
    "KedaState",
    "PolicyState",
    "ReplicaPhase",
    "ReplicaView",
    "Sample",
    "ScaleEvent",
    "StartMark",
    "VersionObservation",
    "decide",
    "keda_hpa",
]
