"""The gateway: the fleet's front door.

It knows models, their versions and their replicas, and decides for every request
which version and which replica serve it, whether it may enter now, must wait, or is
turned away. It speaks HTTP to replicas and reads their JSON state; it never imports
``lmfleet.engine``, so it can front any OpenAI-compatible server.

The decisions themselves live in pure modules over plain data (``policies/``,
``abstats``, ``rollout``), deterministic given their inputs, an injected clock and an
injected random generator, so they run the same live, in tests and in simulation.
"""
