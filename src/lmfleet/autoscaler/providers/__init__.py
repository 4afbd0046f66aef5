"""Providers run replicas for the autoscaler's controller: ``base`` is the interface
and its hand-off objects, ``local`` runs child ``lmfleet serve`` processes (a
Kubernetes provider implements the same interface later)."""

from __future__ import annotations

from lmfleet.autoscaler.providers.base import (
    Provider,
    ProviderError,
    ReplicaActionFailed,
    ReplicaHandle,
    ReplicaSpec,
    ReplicaStartFailed,
    ReplicaStatus,
    UnknownReplica,
)
from lmfleet.autoscaler.providers.local import LocalProvider

__all__ = [
    "LocalProvider",
    "Provider",
    "ProviderError",
    "ReplicaActionFailed",
    "ReplicaHandle",
    "ReplicaSpec",
    "ReplicaStartFailed",
    "ReplicaStatus",
    "UnknownReplica",
]
