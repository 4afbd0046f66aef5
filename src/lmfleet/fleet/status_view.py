"""The fleet's status at a glance, for ``lmfleet up`` (live) and ``lmfleet status URL``.

Both read the same two documents, so they show the same thing: the autoscaler's
snapshot (``GET /admin/autoscaler``: per version the replicas by state, the last
decision, the decision history) and the gateway's per-version figures (``GET
/admin/versions``: queue, in flight, arrival rate, output tokens/s, TTFT/TPOT p90).

- :func:`render`: a ``rich`` table per fleet plus the last decisions;
- :func:`lines`: the same as plain log lines, when stdout is not a terminal;
- :class:`StatusView`: redraws the table in place (``rich.live``) or logs the lines
  every few seconds while ``lmfleet up`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections import Counter
from typing import Any

logger = logging.getLogger(__name__)

#: replica states in the order the table shows them
STATES = ("ready", "starting", "waking", "asleep", "draining", "dead")
#: decisions the view shows
LAST_DECISIONS = 6


def _fmt_s(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _fmt_n(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rows(autoscaler: dict[str, Any], versions: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per version: what the table and the log lines show."""
    out = []
    managed = autoscaler.get("versions", {}) if autoscaler else {}
    for model, vs in (versions or {}).items():
        for name, v in vs.items():
            key = f"{model}/{name}"
            auto = managed.get(key)
            if auto is not None:
                by_state = Counter(r.get("phase", r.get("state")) for r in auto["replicas"])
            else:
                by_state = Counter({s: n for s, n in v.get("replicas", {}).items() if n})
            window = v.get("window", v)
            out.append({
                "version": key,
                "weight": v.get("weight"),
                "replicas": {s: by_state.get(s, 0) for s in STATES if by_state.get(s)},
                "desired": auto.get("desired") if auto else None,
                "range": f"{auto['min']}..{auto['max']}" if auto else "static",
                "queue": v.get("queue_depth", 0) + v.get("replica_waiting", 0),
                "inflight": v.get("inflight", 0),
                "arrival_rate": window.get("arrival_rate"),
                "tokens_per_s": window.get("output_tokens_per_s"),
                "ttft_p90_s": window.get("ttft_p90_s"),
                "tpot_p90_s": window.get("tpot_p90_s"),
            })  # fmt: skip
    return out


def _replicas_text(counts: dict[str, int]) -> str:
    return " ".join(f"{n} {s}" for s, n in counts.items()) or "none"


def lines(autoscaler: dict[str, Any], versions: dict[str, Any]) -> list[str]:
    """The status as plain lines (one per version, then the last decisions)."""
    out = []
    for r in rows(autoscaler, versions):
        desired = "" if r["desired"] is None else f" desired {r['desired']}"
        out.append(
            f"{r['version']}: replicas {_replicas_text(r['replicas'])} ({r['range']}{desired}); "
            f"queue {r['queue']}, in flight {r['inflight']}, {_fmt_n(r['arrival_rate'])} req/s, "
            f"{_fmt_n(r['tokens_per_s'])} tok/s, TTFT p90 {_fmt_s(r['ttft_p90_s'])}, "
            f"TPOT p90 {_fmt_s(r['tpot_p90_s'])}"
        )
    return out


def decision_lines(autoscaler: dict[str, Any], n: int = LAST_DECISIONS) -> list[str]:
    import time

    now = time.time()
    out = []
    for d in (autoscaler or {}).get("decisions", [])[-n:]:
        ago = now - d["time"]
        out.append(f"{ago:5.0f} s ago  {d['model']}/{d['version']}: {d['reason']}")
    return out


def render(autoscaler: dict[str, Any], versions: dict[str, Any], *, title: str = "") -> Any:
    """A ``rich`` renderable: the versions table and the last decisions."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title or None, expand=False)
    for col, justify in (
        ("version", "left"), ("weight", "right"), ("replicas", "left"), ("range", "right"),
        ("queue", "right"), ("in flight", "right"), ("req/s", "right"), ("tok/s", "right"),
        ("TTFT p90", "right"), ("TPOT p90", "right"),
    ):  # fmt: skip
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows(autoscaler, versions):
        desired = "" if r["desired"] is None else f" → {r['desired']}"
        table.add_row(
            r["version"], _fmt_n(r["weight"], 0), _replicas_text(r["replicas"]),
            r["range"] + desired, str(r["queue"]), str(r["inflight"]),
            _fmt_n(r["arrival_rate"]), _fmt_n(r["tokens_per_s"]),
            _fmt_s(r["ttft_p90_s"]), _fmt_s(r["tpot_p90_s"]),
        )  # fmt: skip
    decisions = decision_lines(autoscaler)
    parts: list[Any] = [table]
    if decisions:
        parts.append(Text("last decisions:", style="bold"))
        parts.extend(Text(d) for d in decisions)
    return Group(*parts)


async def local_documents(controller: Any, state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two documents, read in process (``lmfleet up``)."""
    from lmfleet.gateway.version_stats import versions_snapshot

    return await controller.snapshot(), versions_snapshot(state)


class StatusView:
    """Shows the status while ``lmfleet up`` runs: ``live`` redraws a table in place,
    ``log`` logs one line per version every ``every_s``."""

    def __init__(self, mode: str, controller: Any, state: Any, *, every_s: float) -> None:
        self.mode = mode
        self.controller = controller
        self.state = state
        self.every_s = every_s
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_mode(
        cls, mode: str, controller: Any, state: Any, *, every_s: float
    ) -> StatusView | None:
        if mode == "off":
            return None
        if mode == "auto":
            mode = "live" if sys.stdout.isatty() else "log"
        return cls(mode, controller, state, every_s=every_s)

    def start(self) -> None:
        run = self._live if self.mode == "live" else self._log
        self._task = asyncio.get_running_loop().create_task(run(), name="status-view")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _log(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            auto, versions = await local_documents(self.controller, self.state)
            for line in lines(auto, versions):
                logger.info("status %s", line)

    async def _live(self) -> None:
        from rich.live import Live

        auto, versions = await local_documents(self.controller, self.state)
        with Live(render(auto, versions), refresh_per_second=2, transient=False) as live:
            while True:
                await asyncio.sleep(1.0)
                auto, versions = await local_documents(self.controller, self.state)
                live.update(render(auto, versions))


def run_status(args: Any) -> int:
    """``lmfleet status URL``: the same view for a running fleet, once or ``--watch``."""
    import time

    import httpx
    from rich.console import Console

    headers = {"authorization": f"Bearer {args.admin_token}"} if args.admin_token else {}
    console = Console()

    def fetch() -> tuple[dict[str, Any], dict[str, Any]]:
        with httpx.Client(base_url=args.url.rstrip("/"), timeout=10, trust_env=False) as c:
            versions = c.get("/admin/versions", headers=headers)
            versions.raise_for_status()
            auto = c.get("/admin/autoscaler", headers=headers)
            return (auto.json() if auto.status_code == 200 else {}), versions.json()

    try:
        auto, versions = fetch()
        if not args.watch:
            if sys.stdout.isatty():
                console.print(render(auto, versions, title=args.url))
            else:
                for line in lines(auto, versions) + decision_lines(auto):
                    print(line)
            return 0
        from rich.live import Live

        with Live(render(auto, versions, title=args.url), console=console) as live:
            while True:
                time.sleep(args.watch)
                auto, versions = fetch()
                live.update(render(auto, versions, title=args.url))
    except httpx.HTTPStatusError as exc:
        print(f"lmfleet status: {args.url} answered {exc.response.status_code}: "
              f"{exc.response.text[:200]}", file=sys.stderr)  # fmt: skip
        return 1
    except httpx.HTTPError as exc:
        print(f"lmfleet status: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def add_status_parser(subparsers: Any) -> Any:
    import os

    p = subparsers.add_parser(
        "status",
        help="show a running fleet's versions, replicas, load and autoscaler decisions",
        description="Print the status of the fleet behind a gateway (lmfleet up or "
        "lmfleet gateway): per version the replicas by state, queue, in flight, arrival "
        "rate, tokens/s, TTFT/TPOT p90, and the autoscaler's last decisions.",
    )
    p.add_argument("url", metavar="URL", help="the gateway, e.g. http://127.0.0.1:8080")
    p.add_argument(
        "--admin-token",
        default=os.environ.get("LMFLEET_ADMIN_TOKEN"),
        help="the gateway's admin token (default: $LMFLEET_ADMIN_TOKEN)",
    )
    p.add_argument(
        "--watch",
        type=float,
        metavar="S",
        help="redraw every S seconds until Ctrl-C (default: print once)",
    )
    p.set_defaults(func=run_status)
    return p
