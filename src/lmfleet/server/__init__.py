"""One replica: the OpenAI-compatible API over the async engine.

``build_app(settings)`` gives the ASGI app; ``lmfleet serve`` runs it under uvicorn.
The server reaches the engine only through ``lmfleet.engine.client.EngineClient``; it
knows nothing of the scheduler, the KV cache or the model.
"""

from __future__ import annotations

from lmfleet.server.lifecycle import ReplicaState
from lmfleet.server.settings import ServerSettings

__all__ = ["ReplicaState", "ServerSettings", "build_app"]


def __getattr__(name: str) -> object:
    if name == "build_app":  # lazy: importing the package should not import FastAPI
        from lmfleet.server.app import build_app

        return build_app
    raise AttributeError(name)
