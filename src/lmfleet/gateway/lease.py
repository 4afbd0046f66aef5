"""A request's hold on a replica: the replica's in-flight count, raised while held.

``ReplicaInfo.inflight`` is the gateway's own count of the requests a replica is
serving (the balancers read it, the autoscaler drains by it), so every raise needs
exactly one lowering, whatever ends the request: an answer, an error, a retry on
another replica, a stream resumed elsewhere, a client that went away. A
:class:`ReplicaLease` raises the count when it is taken and lowers it when it is
released; releasing again does nothing, so no path can lower it twice.

Two ways to hold one:

- for the length of a block: ``with ReplicaLease(replica):``;
- handed over: a block that takes a lease and gives it to its caller on success
  returns :meth:`ReplicaLease.hand_over`, so the ``with`` releases it only when the
  block fails (like :meth:`contextlib.ExitStack.pop_all`). The new owner releases
  it (a non-streaming answer once it is read; a stream when it ends, a resume
  trading it for a lease on the next replica).

A lease garbage-collected while held is a bug: it warns (``ResourceWarning``, like
an unclosed file; tests turn warnings into errors) and gives the count back.
"""

from __future__ import annotations

import warnings
from types import TracebackType

from lmfleet.gateway.registry import ReplicaInfo


class ReplicaLease:
    """One request's hold on ``replica``: its in-flight count is raised by one from
    the moment the lease is taken until :meth:`release`."""

    __slots__ = ("_held", "replica")

    def __init__(self, replica: ReplicaInfo) -> None:
        self.replica = replica
        replica.inflight += 1
        self._held = True

    @property
    def held(self) -> bool:
        """True until released (or handed over)."""
        return self._held

    def release(self) -> None:
        """Lower the count; a no-op when already released."""
        if self._held:
            self._held = False
            self.replica.inflight -= 1

    def hand_over(self) -> ReplicaLease:
        """A new lease holding this one's count, which this one no longer holds:
        releasing this one (leaving its ``with`` block) then leaves the count alone."""
        if not self._held:
            raise RuntimeError(f"the lease on {self.replica.url} was already released")
        new = ReplicaLease.__new__(ReplicaLease)
        new.replica = self.replica
        new._held = True
        self._held = False
        return new

    def __enter__(self) -> ReplicaLease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.release()

    def __del__(self) -> None:
        if getattr(self, "_held", False):
            self.release()  # first: with warnings as errors the warning raises
            warnings.warn(
                f"a lease on {self.replica.url} was never released: its in-flight count "
                "would have stayed raised", ResourceWarning, source=self, stacklevel=1,
            )  # fmt: skip

    def __repr__(self) -> str:
        return f"ReplicaLease({self.replica.url!r}, held={self._held})"
