"""The gateway's ASGI application: ``build_app(config) -> GatewayApp``.

:class:`GatewayApp` sends the two generation routes straight to the plain-ASGI
:class:`~lmfleet.gateway.proxy.Proxy` (no router, no middleware touches a stream:
each relayed chunk costs one ``send``). Everything else is ordinary FastAPI:

- ``GET /v1/models``: the fleet's models; ``POST /v1/feedback``: a score for a
  response id, credited to the version that produced it;
- ``GET /health`` (200 while the process runs), ``GET /health/ready`` (200 when every
  model has a routable replica), ``GET /metrics`` (Prometheus);
- admin (``Authorization: Bearer <admin token>``): ``GET /admin/config``,
  ``GET /admin/replicas``, ``PATCH /admin/models/{m}/versions/{v}`` (weight; 409
  while a rollout owns it), ``POST /admin/models/{m}/versions/{v}/replicas`` (add a
  replica), ``DELETE /admin/models/{m}/versions/{v}/replicas/{id}`` (remove one; the
  older ``DELETE .../replicas`` with ``{"url"}`` in the body still works, deprecated),
  ``POST /admin/reload``, ``GET /admin/ab/{m}``, and the rollouts:
  ``POST /admin/rollouts/{m}`` (start), ``GET /admin/rollouts/{m}`` (status and
  history), ``POST /admin/rollouts/{m}/rollback``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import Receive, Scope, Send

from lmfleet import __version__
from lmfleet.errors import ConfigError
from lmfleet.fleet.config import FleetConfig, RolloutConfig, check_replica_url, load_config
from lmfleet.gateway import abstats, errors
from lmfleet.gateway.call import CHAT_PATH, COMPLETIONS_PATH
from lmfleet.gateway.errors import GatewayError
from lmfleet.gateway.metrics import CONTENT_TYPE
from lmfleet.gateway.proxy import Proxy
from lmfleet.gateway.registry import UnknownTarget, replica_id_of
from lmfleet.gateway.rollout_runner import RolloutConflict, RolloutRunner, plan_from_config
from lmfleet.gateway.state import FeedbackExists, GatewayState
from lmfleet.gateway.version_stats import versions_snapshot

logger = logging.getLogger(__name__)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WeightPatch(_Body):
    weight: float = Field(ge=0, allow_inf_nan=False, strict=True)


class ReplicaBody(_Body):
    url: str

    @field_validator("url", mode="before")
    @classmethod
    def _routable(cls, v: object) -> str:
        return check_replica_url(v)


class Feedback(_Body):
    id: str = Field(min_length=1)
    #: a number (int or float, not a string, not NaN or Infinity)
    score: float = Field(allow_inf_nan=False, strict=True)


class RollbackBody(_Body):
    reason: str = "rolled back through the admin API"


def one_line(message: str) -> str:
    """A multi-line error (``f is invalid:`` and one line per field) as one line."""
    head, *rest = [part.strip() for part in message.splitlines() if part.strip()] or [""]
    return " ".join([head, "; ".join(rest)]) if rest else head


def reload_config(state: GatewayState, runner: RolloutRunner) -> FleetConfig:
    """Re-read the fleet file and apply it (admin API and SIGHUP). :class:`ConfigError`
    for a file that cannot be read or does not validate: the running configuration
    stays."""
    if state.config_path is None:
        raise GatewayError(409, "the gateway was not started from a file", code="no_file")
    config = load_config(state.config_path)
    state.apply_config(config)
    runner.save()  # a changed file weight may have replaced a run-time weight
    return config


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


async def require_admin(request: Request) -> None:
    _state(request).auth.check_admin(request.headers)


def _not_found(exc: UnknownTarget) -> GatewayError:
    return GatewayError(404, f"no {exc.args[0]}", code="not_found")


def _conflict(exc: RolloutConflict) -> GatewayError:
    return GatewayError(409, str(exc), code="rollout_running", type="conflict_error")


def _redacted(config: FleetConfig) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    for key in data.get("api_keys", []):
        if key.get("key"):
            key["key"] = "***"
    if data["gateway"].get("admin_token"):
        data["gateway"]["admin_token"] = "***"
    for model in data["models"]:
        for version in model["versions"]:
            if version.get("api_key"):
                version["api_key"] = "***"
    return data


def _public_router() -> APIRouter:
    r = APIRouter()

    @r.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @r.get("/health/ready")
    async def ready(request: Request) -> Response:
        reg = _state(request).registry
        missing = [
            m for m, entry in reg.models.items()
            if not any(v.routable() for v in entry.versions.values())
        ]  # fmt: skip
        if missing:
            raise GatewayError(503, f"no ready replica for: {', '.join(missing)}",
                               headers={"Retry-After": "1"})  # fmt: skip
        return Response(b'{"status":"ready"}', media_type="application/json")

    @r.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)

    @r.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        state = _state(request)
        state.auth.authenticate(request.headers)
        created = int(state.started_at)
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "lmfleet",
                 "root": name, "versions": list(entry.versions)}
                for name, entry in state.registry.models.items()
            ],
        }  # fmt: skip

    @r.post("/v1/feedback")
    async def feedback(body: Feedback, request: Request) -> dict[str, Any]:
        state = _state(request)
        state.auth.authenticate(request.headers)
        try:
            target = state.record_feedback(body.id, body.score)
        except FeedbackExists:
            raise GatewayError(409, f"response {body.id!r} already has a score; one score per "
                               "response (the first stands)", param="id",
                               code="feedback_exists", type="conflict_error") from None  # fmt: skip
        if target is None:
            raise GatewayError(404, f"unknown response id {body.id!r} (too old, or not "
                               "served by this gateway)", param="id", code="not_found")  # fmt: skip
        return {"model": target[0], "version": target[1], "recorded": True}

    return r


def _admin_router() -> APIRouter:
    r = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

    @r.get("/config")
    async def get_config(request: Request) -> dict[str, Any]:
        state = _state(request)
        return {"config": _redacted(state.config), "path": state.config_path}

    @r.get("/replicas")
    async def replicas(request: Request) -> dict[str, Any]:
        return _state(request).registry.snapshot()

    @r.get("/versions")
    async def versions(request: Request) -> dict[str, Any]:
        return versions_snapshot(_state(request))

    @r.get("/autoscaler")
    async def autoscaler(request: Request) -> dict[str, Any]:
        controller = getattr(request.app.state, "controller", None)
        if controller is None:
            raise GatewayError(
                404, "no autoscaler runs in this gateway (lmfleet up runs one)",
                code="no_autoscaler",
            )  # fmt: skip
        snapshot: dict[str, Any] = await controller.snapshot()
        return snapshot

    @r.patch("/models/{model}/versions/{version}")
    async def patch_version(model: str, version: str, body: WeightPatch,
                            request: Request) -> dict[str, Any]:  # fmt: skip
        reg = _state(request).registry
        runner: RolloutRunner = request.app.state.rollouts
        try:
            reg.version(model, version)
            runner.check_weights_free(model)
            reg.set_weight(model, version, body.weight)
        except UnknownTarget as exc:
            raise _not_found(exc) from None
        except RolloutConflict as exc:
            raise _conflict(exc) from None
        runner.save()
        logger.info("weight of %s/%s set to %g", model, version, body.weight)
        return {
            "model": model,
            "versions": {n: v.weight for n, v in reg.model(model).versions.items()},
        }

    @r.post("/models/{model}/versions/{version}/replicas")
    async def add_replica(model: str, version: str, body: ReplicaBody,
                          request: Request) -> dict[str, Any]:  # fmt: skip
        reg = _state(request).registry
        try:
            info = reg.add_replica(model, version, body.url)
        except UnknownTarget as exc:
            raise _not_found(exc) from None
        return info.snapshot()

    @r.delete("/models/{model}/versions/{version}/replicas/{replica_id}")
    async def remove_replica(model: str, version: str, replica_id: str,
                             request: Request) -> dict[str, Any]:  # fmt: skip
        reg = _state(request).registry
        try:
            info = reg.replica_by_id(model, version, replica_id)
            reg.remove_replica(model, version, info.url)
        except UnknownTarget as exc:
            raise _not_found(exc) from None
        return {"removed": info.url, "id": info.id}

    @r.delete("/models/{model}/versions/{version}/replicas", deprecated=True)
    async def remove_replica_by_body(model: str, version: str, body: ReplicaBody,
                                     request: Request, response: Response) -> dict[str, Any]:  # fmt: skip
        """Deprecated: some clients and proxies drop a DELETE's body; use the id path."""
        if not getattr(request.app.state, "warned_delete_body", False):
            request.app.state.warned_delete_body = True  # once per process, not per call
            logger.warning("DELETE .../replicas with the URL in the body is deprecated; use "
                           "DELETE .../replicas/{id} (the id is in GET /admin/replicas)")  # fmt: skip
        response.headers["Deprecation"] = "true"
        try:
            info = _state(request).registry.replica_by_id(model, version,
                                                          replica_id_of(body.url))  # fmt: skip
            _state(request).registry.remove_replica(model, version, info.url)
        except UnknownTarget as exc:
            raise _not_found(exc) from None
        return {"removed": info.url, "id": info.id}

    @r.post("/reload")
    async def reload(request: Request) -> dict[str, Any]:
        state = _state(request)
        try:
            reload_config(state, request.app.state.rollouts)
        except ConfigError as exc:
            logger.error("reload: keeping the running configuration: %s", one_line(str(exc)))
            raise GatewayError(400, f"{exc} (the running configuration stays)",
                               code="invalid_config") from None  # fmt: skip
        return {"reloaded": state.config_path, "models": list(state.registry.models)}

    @r.get("/ab/{model}")
    async def ab(model: str, request: Request, baseline: str | None = None) -> dict[str, Any]:
        state = _state(request)
        try:
            entry = state.registry.model(model)
        except UnknownTarget as exc:
            raise _not_found(exc) from None
        names = list(entry.versions)
        base = baseline or (entry.config.rollout.baseline if entry.config.rollout else names[0])
        if base not in names:
            raise GatewayError(400, f"baseline {base!r} is not a version of {model!r}",
                               param="baseline")  # fmt: skip
        samples = {n: state.version_samples(model, n) for n in names}
        return {"model": model, **abstats.report(samples, base)}

    @r.post("/rollouts/{model}")
    async def start_rollout(model: str, request: Request,
                            body: RolloutConfig | None = None) -> dict[str, Any]:  # fmt: skip
        state = _state(request)
        runner: RolloutRunner = request.app.state.rollouts
        try:
            entry = state.registry.model(model)
        except UnknownTarget as exc:
            raise _not_found(exc) from None
        cfg = body or entry.config.rollout
        if cfg is None:
            raise GatewayError(400, f"model {model!r} has no rollout in the fleet file; send "
                               "one in the body", code="no_rollout")  # fmt: skip
        try:
            runner.start_rollout(model, plan_from_config(cfg))
        except RolloutConflict as exc:
            raise _conflict(exc) from None
        return runner.status(model)

    @r.get("/rollouts/{model}")
    async def rollout_status(model: str, request: Request) -> dict[str, Any]:
        runner: RolloutRunner = request.app.state.rollouts
        try:
            return runner.status(model)
        except ConfigError as exc:
            raise GatewayError(404, str(exc), code="not_found") from None

    @r.post("/rollouts/{model}/rollback")
    async def rollback(model: str, request: Request,
                       body: RollbackBody | None = None) -> dict[str, Any]:  # fmt: skip
        runner: RolloutRunner = request.app.state.rollouts
        try:
            runner.rollback(model, (body or RollbackBody()).reason)
        except ConfigError as exc:
            raise GatewayError(404, str(exc), code="not_found") from None
        return runner.status(model)

    return r


class GatewayApp:
    """The ASGI entry point: generation routes to the proxy, the rest to FastAPI
    (``api``). ``state`` is the FastAPI app's state (``state.gateway``,
    ``state.proxy``, ``state.rollouts``)."""

    _PROXIED = frozenset({CHAT_PATH, COMPLETIONS_PATH})

    def __init__(self, api: FastAPI, proxy: Proxy) -> None:
        self.api = api
        self.proxy = proxy
        self.state = api.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self._PROXIED:
            await self.proxy(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def build_app(
    config: FleetConfig, *, config_path: str | None = None, state: GatewayState | None = None
) -> GatewayApp:
    """The gateway's ASGI app; polling and rollouts start with the lifespan."""
    state = state or GatewayState(config, config_path=config_path)
    state.started_at = time.time()
    proxy = Proxy(state)
    rollouts = RolloutRunner(state)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        await rollouts.start()
        try:
            yield
        finally:
            await rollouts.close()
            await proxy.close()
            await state.close()

    api = FastAPI(title="lmfleet gateway", version=__version__, lifespan=lifespan)
    api.state.gateway = state
    api.state.proxy = proxy
    api.state.rollouts = rollouts
    errors.install(api)
    api.include_router(_public_router())
    api.include_router(_admin_router())
    return GatewayApp(api, proxy)
