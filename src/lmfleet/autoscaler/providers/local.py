"""The local provider: each replica is a child ``lmfleet serve`` process.

- A child binds ``--port 0`` and writes the port it got to ``RUN_DIR/<id>.port``
  (``--port-file``), so ports never conflict; its stdout and stderr go to
  ``RUN_DIR/<id>.log`` (ids restart with the provider: a previous run's log of the
  same id moves to ``<id>.log.1``); ``RUN_DIR/<id>.pid`` holds its pid while it runs.
- One monitor task per child: it waits for the port, polls ``/health/ready`` until
  READY within the spec's load budget (logging progress), then ``/health/live``.
  A child that exits unasked, fails liveness ``live_failures`` times in a row or
  spends its load budget is killed and listed as DEAD, so the controller replaces it.
- Sleep, wake and drain are the replica's ``POST /admin/sleep|wake|drain``, with an
  admin token the provider hands each child (``LMFLEET_ADMIN_TOKEN``, not argv,
  which any local user can read). Drain and stop wait for the process to exit and
  send SIGKILL only after the drain timeout and a grace.

No orphans:
- each child leads its own session and process group: Ctrl-C in the terminal
  reaches only the provider's process (which drains the children), and a kill
  reaches what the replica started (an engine process) too;
- ``lmfleet serve --exit-with-parent PID``: the kernel sends the child SIGTERM (a
  drain) when this process dies, even of SIGKILL (Linux). This is a flag of the
  server rather than a ``preexec_fn`` here because ``preexec_fn`` is unsafe in a
  process with threads (the gateway's, asyncio's child watcher), and the flag
  closes the race where the parent dies before the call (the child compares its
  parent with PID). The signal fires when the *thread* that started the child
  ends, so use the provider from the thread that runs the event loop for good;
- :func:`kill_stale`, run when the provider opens: a previous provider on the same
  run dir that died without cleaning up left pid files; each pid whose
  ``/proc/PID/cmdline`` is an ``lmfleet serve`` with its port file in this run dir
  is killed (a pid reused by another program is left alone).

One event loop: the provider is not thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lmfleet.autoscaler.providers.base import (
    ProviderError,
    ReplicaActionFailed,
    ReplicaHandle,
    ReplicaSpec,
    ReplicaStartFailed,
    ReplicaStatus,
    UnknownReplica,
)
from lmfleet.errors import ConfigError

logger = logging.getLogger(__name__)

#: flags the provider sets itself; a spec's engine_args may not
RESERVED_FLAGS = frozenset(
    {
        "--host",
        "--port",
        "--port-file",
        "--exit-with-parent",
        "--drain-timeout",
        "--shutdown-timeout",
        "--admin-token",
    }
)
_PROGRESS_EVERY_S = 10.0
_FROM_SERVER = {
    "starting": ReplicaStatus.STARTING,
    "ready": ReplicaStatus.READY,
    "asleep": ReplicaStatus.ASLEEP,
    "draining": ReplicaStatus.DRAINING,
    "stopped": ReplicaStatus.DRAINING,  # still exiting; STOPPED once the process is gone
}


@dataclass(eq=False, slots=True)
class _Child:
    """One child process and what the provider knows of it (mutable, private)."""

    id: str
    spec: ReplicaSpec
    proc: asyncio.subprocess.Process
    log_path: Path
    port_file: Path
    pid_file: Path
    started_at: float
    state: ReplicaStatus = ReplicaStatus.STARTING
    since: float = 0.0
    detail: str = "waiting for its port"
    url: str | None = None
    ready_at: float | None = None
    wake_s: float | None = None
    exit_code: int | None = None
    #: drain or stop was asked: an exit is STOPPED, not DEAD, and liveness is not judged
    exit_requested: bool = False
    #: why the provider declared it DEAD (it is killed, and stays DEAD)
    failure: str | None = None
    #: an admin call in flight: the liveness poll does not overwrite the state meanwhile
    action: str | None = None
    ready_or_gone: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def handle(self) -> ReplicaHandle:
        return ReplicaHandle(
            id=self.id,
            version=self.spec.version,
            state=self.state,
            url=self.url,
            pid=self.pid,
            log_path=self.log_path,
            started_at=self.started_at,
            since=self.since,
            ready_at=self.ready_at,
            wake_s=self.wake_s,
            exit_code=self.exit_code,
            detail=self.detail,
        )


class LocalProvider:
    """Replicas as child ``lmfleet serve`` processes; see the module docstring.

    ``command`` is how to run the CLI (default ``python -m lmfleet.cli``);
    ``poll_interval_s`` the liveness poll of a started replica, ``startup_poll_s``
    the port and readiness poll while it loads; ``live_timeout_s`` the timeout of
    each probe and of the drain request; ``kill_grace_s`` how long beyond its drain
    timeout a replica may take to exit before SIGKILL. ``on_change(handle)`` is
    called on every state change (the controller registers a READY replica with
    the gateway from it). Use as ``async with LocalProvider(run_dir) as provider``.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        admin_token: str | None = None,
        command: Sequence[str] | None = None,
        exit_with_parent: bool = True,
        poll_interval_s: float = 1.0,
        startup_poll_s: float = 0.1,
        live_timeout_s: float = 5.0,
        live_failures: int = 3,
        kill_grace_s: float = 10.0,
        on_change: Callable[[ReplicaHandle], None] | None = None,
    ) -> None:
        for name, value in (
            ("poll_interval_s", poll_interval_s),
            ("startup_poll_s", startup_poll_s),
            ("live_timeout_s", live_timeout_s),
            ("live_failures", live_failures),
            ("kill_grace_s", kill_grace_s),
        ):
            if not value > 0:
                raise ConfigError(f"local provider: {name} must be > 0, got {value!r}")
        self.run_dir = Path(run_dir).resolve()
        self.host = host
        self.admin_token = admin_token or secrets.token_urlsafe(24)
        self._command = tuple(command) if command else (sys.executable, "-m", "lmfleet.cli")
        self._exit_with_parent = exit_with_parent
        self._poll_interval_s = poll_interval_s
        self._startup_poll_s = startup_poll_s
        self._live_timeout_s = live_timeout_s
        self._live_failures = live_failures
        self._kill_grace_s = kill_grace_s
        self._on_change = on_change
        self._children: dict[str, _Child] = {}
        self._started = 0
        self._http: httpx.AsyncClient | None = None
        self._closed = False

    async def __aenter__(self) -> LocalProvider:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Create the run dir and kill what a previous run on it left; ``start``
        opens the provider when it is not yet."""
        if self._closed:
            raise ProviderError("this local provider is closed; make a new one")
        if self._http is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        await kill_stale(self.run_dir)
        # trust_env=False: an HTTP(S)_PROXY of the environment must not see 127.0.0.1
        self._http = httpx.AsyncClient(trust_env=False, timeout=self._live_timeout_s)

    # ---- the Provider interface ---------------------------------------------------------
    async def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        await self.open()
        _check_engine_args(spec.engine_args)
        self._started += 1
        replica_id = f"{_slug(spec.version)}-{self._started}"
        log_path = self.run_dir / f"{replica_id}.log"
        port_file = self.run_dir / f"{replica_id}.port"
        pid_file = self.run_dir / f"{replica_id}.pid"
        port_file.unlink(missing_ok=True)
        if log_path.exists():  # a previous run's replica of the same id: keep its last log
            os.replace(log_path, log_path.with_name(f"{log_path.name}.1"))
        env = {**os.environ, **spec.env, "LMFLEET_ADMIN_TOKEN": self.admin_token}
        with open(log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *self._serve_command(spec, port_file),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        _write_atomically(pid_file, f"{proc.pid}\n")
        now = time.monotonic()
        child = _Child(replica_id, spec, proc, log_path, port_file, pid_file, now, since=now)
        self._children[replica_id] = child
        loop = asyncio.get_running_loop()
        child.tasks = [
            loop.create_task(self._watch_exit(child), name=f"lmfleet-exit-{replica_id}"),
            loop.create_task(self._monitor(child), name=f"lmfleet-monitor-{replica_id}"),
        ]
        logger.info(
            "replica %s: started %s (pid %d, log %s)", replica_id, spec.model, proc.pid, log_path
        )
        self._notify(child)
        return child.handle()

    async def wait_ready(self, replica_id: str) -> ReplicaHandle:
        child = self._child(replica_id)
        await child.ready_or_gone.wait()
        if child.state is ReplicaStatus.DEAD:
            raise ReplicaStartFailed(f"replica {replica_id} is dead: {child.detail}")
        if child.ready_at is None or child.exit_requested:
            raise ReplicaStartFailed(f"replica {replica_id} was stopped ({child.detail})")
        return child.handle()

    async def wake(self, replica_id: str) -> ReplicaHandle:
        child = self._child(replica_id)
        if child.state is ReplicaStatus.READY and child.action is None:
            return child.handle()
        self._check_idle_in(child, ReplicaStatus.ASLEEP, "woken")
        t0 = time.monotonic()
        child.action = "wake"
        self._set(child, ReplicaStatus.WAKING, "waking")
        try:
            r = await self._admin(child, "wake", timeout=child.spec.load_timeout_s)
        except BaseException:  # no answer, or the caller gave up: as it was
            self._revert(child, ReplicaStatus.WAKING, ReplicaStatus.ASLEEP)
            raise
        finally:
            child.action = None
        if r.status_code != 200:
            self._revert(child, ReplicaStatus.WAKING, ReplicaStatus.ASLEEP)
            raise ReplicaActionFailed(f"replica {replica_id} did not wake: {_error_text(r)}")
        child.wake_s = time.monotonic() - t0
        if child.state is ReplicaStatus.WAKING:
            self._follow(child, r, f"awake in {child.wake_s:.2f} s")
        return child.handle()

    async def sleep(self, replica_id: str) -> ReplicaHandle:
        child = self._child(replica_id)
        if child.state is ReplicaStatus.ASLEEP and child.action is None:
            return child.handle()
        self._check_idle_in(child, ReplicaStatus.READY, "put to sleep")
        child.action = "sleep"
        self._set(child, ReplicaStatus.ASLEEP, "going to sleep")  # counts as asleep already
        try:
            r = await self._admin(child, "sleep", timeout=child.spec.load_timeout_s)
        except BaseException:  # the liveness poll corrects it if it did fall asleep
            self._revert(child, ReplicaStatus.ASLEEP, ReplicaStatus.READY)
            raise
        finally:
            child.action = None
        if r.status_code != 200:
            self._revert(child, ReplicaStatus.ASLEEP, ReplicaStatus.READY)
            raise ReplicaActionFailed(f"replica {replica_id} did not sleep: {_error_text(r)}")
        self._follow(child, r, "asleep")
        return child.handle()

    async def drain(self, replica_id: str, timeout_s: float | None = None) -> ReplicaHandle:
        child = self._child(replica_id)
        timeout = child.spec.drain_timeout_s if timeout_s is None else timeout_s
        if not child.exited.is_set():
            self._ask_exit(child, f"draining (up to {timeout:g} s)")
            if not await self._post_drain(child, timeout):
                _signal(child, signal.SIGTERM)  # the server drains on it too
            await self._await_exit(child, timeout + self._kill_grace_s)
        return await self._forget(child)

    async def stop(self, replica_id: str, *, grace_s: float | None = None) -> ReplicaHandle:
        child = self._child(replica_id)
        grace = child.spec.drain_timeout_s + self._kill_grace_s if grace_s is None else grace_s
        if not child.exited.is_set():
            self._ask_exit(child, "stopping")
            _signal(child, signal.SIGTERM if grace > 0 else signal.SIGKILL)
            await self._await_exit(child, grace)
        return await self._forget(child)

    async def list(self) -> list[ReplicaHandle]:
        return [c.handle() for c in self._children.values()]

    async def close(self, *, grace_s: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            ids = list(self._children)
            results = await asyncio.gather(
                *(self.stop(i, grace_s=grace_s) for i in ids), return_exceptions=True
            )
            for replica_id, result in zip(ids, results, strict=True):
                if isinstance(result, BaseException):
                    logger.error("replica %s: stopping it failed: %r", replica_id, result)
        finally:
            for child in self._children.values():  # only if stopping failed or was cancelled
                if not child.exited.is_set():
                    _kill_group(child.pid)
            if self._http is not None:
                await self._http.aclose()

    # ---- watching a child -------------------------------------------------------------
    async def _monitor(self, child: _Child) -> None:
        try:
            await self._await_ready(child)
            await self._watch_live(child)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not leave a child unwatched in silence
            logger.exception("replica %s: monitor failed", child.id)
            self._fail(child, "the provider's monitor failed")

    async def _await_ready(self, child: _Child) -> None:
        budget = child.spec.load_timeout_s
        next_report = child.started_at + _PROGRESS_EVERY_S
        while child.state is ReplicaStatus.STARTING:
            now = time.monotonic()
            if now - child.started_at >= budget:
                self._fail(child, f"not ready within its load budget of {budget:g} s")
                return
            if now >= next_report:
                next_report += _PROGRESS_EVERY_S
                logger.info(
                    "replica %s: %s, %.0f s of its %g s load budget",
                    child.id,
                    child.detail,
                    now - child.started_at,
                    budget,
                )
            if child.url is None:
                port = _read_port(child.port_file)
                if port is not None:
                    child.url = f"http://{_connect_host(self.host)}:{port}"
                    child.detail = "loading"
                    logger.info("replica %s: listening on %s, loading", child.id, child.url)
            elif await self._probe(child, "/health/ready") == 200:
                if child.state is ReplicaStatus.STARTING:
                    child.ready_at = time.monotonic()
                    took = child.ready_at - child.started_at
                    self._set(child, ReplicaStatus.READY, f"ready after {took:.1f} s")
                    child.ready_or_gone.set()
                return
            await asyncio.sleep(self._startup_poll_s)

    async def _watch_live(self, child: _Child) -> None:
        failures = 0
        while not child.exited.is_set() and child.failure is None:
            await asyncio.sleep(self._poll_interval_s)
            if child.url is None or child.exit_requested or child.state is ReplicaStatus.DRAINING:
                continue  # leaving: the exit, or the drain's deadline, decides
            try:
                r = await self._http_client().get(f"{child.url}/health/live")
            except httpx.HTTPError as exc:
                why = f"/health/live failed: {exc!r}"
            else:
                if r.status_code == 200:
                    failures = 0
                    if child.action is None:
                        self._follow(child, r)
                    continue
                why = f"/health/live answered {r.status_code}"
            failures += 1
            logger.warning("replica %s: %s (%d in a row)", child.id, why, failures)
            if failures >= self._live_failures:
                self._fail(child, f"liveness failed {failures} times in a row; last: {why}")

    async def _watch_exit(self, child: _Child) -> None:
        code = await child.proc.wait()
        _kill_group(child.pid)  # whatever it left in its group (an engine process)
        child.exit_code = code
        child.pid_file.unlink(missing_ok=True)
        child.port_file.unlink(missing_ok=True)
        if child.failure is not None:
            pass  # already DEAD, and why
        elif child.exit_requested:
            self._set(child, ReplicaStatus.STOPPED, f"exited with {_describe_exit(code)}")
        else:
            child.failure = f"exited unasked with {_describe_exit(code)}"
            last = _last_line(child.log_path)
            self._set(
                child,
                ReplicaStatus.DEAD,
                f"{child.failure}; log {child.log_path}" + (f": {last}" if last else ""),
            )
            logger.error("replica %s: %s", child.id, child.detail)
        child.exited.set()
        child.ready_or_gone.set()
        for task in child.tasks:
            if task is not asyncio.current_task():
                task.cancel()

    def _fail(self, child: _Child, why: str) -> None:
        """Declare it DEAD and kill it; the exit watcher reaps it."""
        if child.failure is not None or child.exited.is_set():
            return
        child.failure = why
        self._set(child, ReplicaStatus.DEAD, f"{why}; killed; log {child.log_path}")
        logger.error("replica %s: %s: killing it (log %s)", child.id, why, child.log_path)
        _kill_group(child.pid)
        child.ready_or_gone.set()

    # ---- asking a child ----------------------------------------------------------------
    async def _probe(self, child: _Child, path: str) -> int | None:
        try:
            return (await self._http_client().get(f"{child.url}{path}")).status_code
        except httpx.HTTPError:
            return None  # not listening yet, or busy: the budget decides

    async def _admin(
        self,
        child: _Child,
        action: str,
        *,
        timeout: float | None = None,
        params: dict[str, float] | None = None,
    ) -> httpx.Response:
        if child.url is None:
            raise ReplicaActionFailed(f"replica {child.id} has no address yet ({child.detail})")
        try:
            return await self._http_client().post(
                f"{child.url}/admin/{action}",
                headers={"Authorization": f"Bearer {self.admin_token}"},
                params=params,
                timeout=timeout if timeout is not None else self._live_timeout_s,
            )
        except httpx.HTTPError as exc:
            raise ReplicaActionFailed(f"replica {child.id}: /admin/{action}: {exc!r}") from exc

    async def _post_drain(self, child: _Child, timeout: float) -> bool:
        """POST /admin/drain; False when it could not be asked (then SIGTERM)."""
        if child.url is None or child.failure is not None:
            return False
        try:
            r = await self._admin(child, "drain", params={"timeout": timeout})
        except ReplicaActionFailed as exc:
            logger.warning("%s; sending SIGTERM instead", exc)
            return False
        if r.status_code not in (200, 202):
            logger.warning(
                "replica %s: /admin/drain answered %d (%s); sending SIGTERM instead",
                child.id,
                r.status_code,
                _error_text(r),
            )
            return False
        return True

    async def _await_exit(self, child: _Child, grace_s: float) -> None:
        if grace_s > 0:
            try:
                await asyncio.wait_for(child.exited.wait(), grace_s)
                return
            except TimeoutError:
                logger.warning(
                    "replica %s: still running %g s after it was asked to stop: SIGKILL",
                    child.id,
                    grace_s,
                )
        _kill_group(child.pid)
        await child.exited.wait()

    async def _forget(self, child: _Child) -> ReplicaHandle:
        await asyncio.gather(*child.tasks, return_exceptions=True)
        self._children.pop(child.id, None)
        return child.handle()

    # ---- bookkeeping ---------------------------------------------------------------------
    def _child(self, replica_id: str) -> _Child:
        try:
            return self._children[replica_id]
        except KeyError:
            known = ", ".join(self._children) or "none"
            raise UnknownReplica(
                f"no replica {replica_id!r} (stopped ones are forgotten); known: {known}"
            ) from None

    def _check_idle_in(self, child: _Child, state: ReplicaStatus, verb: str) -> None:
        if child.action is not None:
            raise ReplicaActionFailed(f"replica {child.id} is busy ({child.action} in progress)")
        if child.state is not state:
            raise ReplicaActionFailed(
                f"replica {child.id} is {child.state}; it can be {verb} only when {state}"
            )

    def _ask_exit(self, child: _Child, detail: str) -> None:
        child.exit_requested = True
        if child.failure is None:
            self._set(child, ReplicaStatus.DRAINING, detail)

    def _follow(self, child: _Child, r: httpx.Response, detail: str | None = None) -> None:
        """Take the state the server reports (a response with its state in the body)."""
        try:
            reported = _FROM_SERVER.get(r.json().get("state"))
        except ValueError:
            reported = None
        if reported is None or child.failure is not None or child.exit_requested:
            return
        if detail is not None:
            self._set(child, reported, detail)
        elif reported is not child.state:
            self._set(child, reported, f"the replica reports {reported}")

    def _revert(self, child: _Child, during: ReplicaStatus, back: ReplicaStatus) -> None:
        if child.state is during and child.failure is None:
            self._set(child, back, child.detail)

    def _set(self, child: _Child, state: ReplicaStatus, detail: str) -> None:
        changed = state is not child.state
        child.state = state
        child.detail = detail
        if not changed:
            return
        child.since = time.monotonic()
        logger.info("replica %s: %s (%s)", child.id, state, detail)
        self._notify(child)

    def _notify(self, child: _Child) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(child.handle())
        except Exception:
            logger.exception("replica %s: on_change callback failed", child.id)

    def _http_client(self) -> httpx.AsyncClient:
        if self._http is None:
            raise ProviderError("the local provider is not open; use `async with` or open()")
        return self._http

    def _serve_command(self, spec: ReplicaSpec, port_file: Path) -> list[str]:
        cmd = [
            *self._command, "serve", spec.model,
            "--host", self.host, "--port", "0", "--port-file", str(port_file),
            "--drain-timeout", repr(float(spec.drain_timeout_s)),
        ]  # fmt: skip
        if self._exit_with_parent:
            cmd += ["--exit-with-parent", str(os.getpid())]
        return cmd + list(spec.engine_args)


# ---- processes ---------------------------------------------------------------------------
async def kill_stale(run_dir: Path, *, timeout_s: float = 10.0) -> list[int]:
    """Kill the replicas a previous provider on ``run_dir`` left running (by their
    pid files), and remove the pid files. Returns the pids killed. Only processes
    whose command line is ``lmfleet ... serve ... --port-file RUN_DIR/...`` are
    touched."""
    run_dir = run_dir.resolve()
    killed: list[int] = []
    for pid_file in sorted(run_dir.glob("*.pid")):
        pid = _read_int(pid_file)
        if pid is not None and pid != os.getpid() and _is_serve_of(pid, run_dir):
            logger.warning("killing replica pid %d left running by a previous run", pid)
            try:
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)  # it leads its own group
                else:
                    os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
            except PermissionError:
                logger.error("cannot kill stale replica pid %d: permission denied", pid)
        pid_file.unlink(missing_ok=True)
    deadline = time.monotonic() + timeout_s
    while alive := [p for p in killed if _alive(p)]:
        if time.monotonic() > deadline:
            raise ProviderError(f"stale replicas {alive} still run {timeout_s:g} s after SIGKILL")
        await asyncio.sleep(0.05)
    return killed


def _is_serve_of(pid: int, run_dir: Path) -> bool:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if "serve" not in args or "--port-file" not in args:
        return False
    if not any("lmfleet" in a for a in args[: args.index("serve")]):
        return False
    i = args.index("--port-file") + 1
    return i < len(args) and Path(args[i]).parent == run_dir


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _signal(child: _Child, sig: signal.Signals) -> None:
    if sig is signal.SIGKILL:
        _kill_group(child.pid)
        return
    with contextlib.suppress(ProcessLookupError):
        child.proc.send_signal(sig)  # the server alone: it drains, its engine follows


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is empty
        os.killpg(pgid, signal.SIGKILL)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


# ---- files and small helpers -------------------------------------------------------------
def _check_engine_args(args: Sequence[str]) -> None:
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in RESERVED_FLAGS:
            raise ConfigError(
                f"replica spec: engine_args must not set {flag}: the local provider sets it "
                "(the port is chosen by the replica, the drain timeout comes from "
                "drain_timeout_s, the admin token from the provider)"
            )


def _slug(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", version).strip("-.") or "replica"


def _connect_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_port(path: Path) -> int | None:
    port = _read_int(path)  # written by a rename: whole or absent
    return port if port is not None and 0 < port < 65536 else None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _error_text(r: httpx.Response) -> str:
    try:
        body = r.json()
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
    except ValueError:
        message = None
    return f"{r.status_code} {message or r.text[:200]}"


def _last_line(path: Path, max_bytes: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""
