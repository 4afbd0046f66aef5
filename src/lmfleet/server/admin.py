"""Health, state, metrics and the admin actions (drain, sleep, wake).

- ``GET /health/live``: 200 while the process can make progress, also while the
  model loads (503 only when the engine loop died).
- ``GET /health/ready`` and ``GET /health``: 200 only when READY, else 503.
- ``GET /state``: JSON for the gateway and the autoscaler (no Prometheus parsing): a
  :class:`~lmfleet.fleet.replica_status.ReplicaStatusReport`; the admin actions
  answer the same document plus their own keys.
- ``GET /metrics``: Prometheus text.
- ``POST /admin/drain`` (optional ``?timeout=`` seconds), ``/admin/sleep``,
  ``/admin/wake``: need the admin token when one is configured (else the API key,
  when one is configured).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from lmfleet import __version__
from lmfleet.server.auth import require_admin
from lmfleet.server.replica import Replica

router = APIRouter()
admin_router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


def _replica(request: Request) -> Replica:
    return request.app.state.replica


def _state_response(replica: Replica, status: int = 200, **extra: Any) -> JSONResponse:
    report = replica.status_report().model_dump(mode="json")
    return JSONResponse({**report, **extra}, status_code=status)


@router.get("/health/live")
async def live(request: Request) -> JSONResponse:
    replica = _replica(request)
    ok = not replica.engine_dead
    return JSONResponse(
        {"status": "alive" if ok else "engine_dead", "state": replica.state.value},
        status_code=200 if ok else 503,
    )


@router.get("/health/ready")
@router.get("/health")
async def ready(request: Request) -> JSONResponse:
    replica = _replica(request)
    ok = replica.ready
    headers = {} if ok else {"Retry-After": str(replica.settings.retry_after_s)}
    return JSONResponse(
        {"status": "ready" if ok else "not_ready", "state": replica.state.value},
        status_code=200 if ok else 503,
        headers=headers,
    )


@router.get("/state")
async def state(request: Request) -> JSONResponse:
    return _state_response(_replica(request))


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = _replica(request).metrics.render()
    return Response(body, media_type=content_type)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@admin_router.post("/drain")
async def drain(
    request: Request,
    timeout: float | None = Query(None, ge=0, description="seconds; default --drain-timeout"),
) -> JSONResponse:
    replica = _replica(request)
    started = replica.start_drain(timeout)
    return _state_response(replica, 202 if started else 200)


@admin_router.post("/sleep")
async def sleep(request: Request) -> JSONResponse:
    replica = _replica(request)
    seconds = await replica.sleep()
    return _state_response(replica, sleep_seconds=seconds)


@admin_router.post("/wake")
async def wake(request: Request) -> JSONResponse:
    replica = _replica(request)
    seconds = await replica.wake()
    return _state_response(replica, wake_seconds=seconds)
