"""Pure routing policies of the gateway: which version (``split``), which replica
(``balance``) and whether a request may enter now (``admission``).

Nothing here does I/O or reads the wall clock on its own: callers pass plain views of
the fleet, a ``random.Random`` and (for admission) a clock.
"""

from __future__ import annotations

from lmfleet.gateway.policies.admission import AdmissionQueue, QueueRejected
from lmfleet.gateway.policies.balance import (
    BALANCERS,
    Balancer,
    ReplicaView,
    RouteRequest,
    make_balancer,
    prefix_hashes,
)
from lmfleet.gateway.policies.split import VersionWeight, choose_version, split_counts

__all__ = [
    "BALANCERS",
    "AdmissionQueue",
    "Balancer",
    "QueueRejected",
    "ReplicaView",
    "RouteRequest",
    "VersionWeight",
    "choose_version",
    "make_balancer",
    "prefix_hashes",
    "split_counts",
]
