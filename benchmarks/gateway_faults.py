"""What does the fleet lose when replicas fail, hang or the fleet file goes bad?

Each fault runs in its own phase against a fresh fleet of real processes: ``--replicas``
(3) ``lmfleet serve sim:gwfaults --fault-injection`` replicas on port 0 (``--port-file``)
behind one ``lmfleet gateway --port 0 --port-file`` process (round robin by default, so
new requests keep reaching a hung replica until the polls eject it). In every phase a
*wave* of ``--streams`` (32) greedy streams and ``--unary`` (32) non-streaming
completions (``temperature`` 0, ``ignore_eos``, ``--max-tokens`` tokens; every
``1/--chat-share``-th request a chat completion) is sent at once, and *probes* (short
requests, stream and non-stream in turn) go out every ``--probe-interval-s`` from the
wave's start until the phase ends. The fault starts once the streams have received
``--trigger-fraction`` of their tokens, so it lands mid-stream:

* ``kill_one``: SIGKILL of one replica;
* ``kill_all_restart``: SIGKILL of every replica, then as many new ones (port 0) started
  and registered through ``POST /admin/models/m/versions/v1/replicas`` (the dead ones
  removed by id); the fault ends when the last registration is answered;
* ``stop_one``: SIGSTOP of one replica for ``--stop-s`` (40) seconds, then SIGCONT;
  its JSON key is ``stop_one_<S>s``;
* ``poisoned``: one request with ``request_id`` ``lmfleet-fault-step-after-2`` (its
  engine step raises: the engine serving it dies, the process exits 2 s later);
  the fault ends when that request is answered; it is not counted below;
* ``broken_reload``: the fleet file overwritten with invalid YAML, then with YAML that
  does not validate, then with bytes that are not UTF-8, each followed by
  ``POST /admin/reload`` and SIGHUP; the running configuration must stay;
* ``valid_reload``: the file rewritten with a fourth (already running) replica and a
  new weight, applied by SIGHUP (the fault ends when ``/admin/replicas`` lists it),
  then ``POST /admin/reload`` again.

Every answer is compared with a reference phase (a fresh fleet of the same replicas,
no fault, the wave sent twice: ``reference.self_mismatches`` must be 0, or the
comparison itself is unsound). Per fault, over the wave and the probes:

* ``lost``: requests with no complete answer (non-200, an error event, no
  ``finish_reason`` or no ``[DONE]``, a client timeout); ``errors`` counts them by
  status and error code (``502 replica_failed``, ``stream upstream_failed`` ...);
* ``duplicated``: complete answers that repeat tokens: after a correct prefix the text
  goes on with an earlier part of the reference (a resume that re-sent tokens), or a
  stream with two ``finish_reason`` / ``usage`` chunks, two ``[DONE]`` or events after
  ``[DONE]``;
* ``corrupted``: other complete answers whose text differs from the reference;
* ``anomalies``: complete answers with a wrong ``usage.completion_tokens`` or a stream
  whose chunk ``id`` changed (counted, not judged);
* ``recovery_s``: from the end of the fault to the end of the first successful request
  that *started* after it (the probes make sure there is one);
* stop only: ``hang_nonstream_answer_s``, the longest time to its answer of a
  non-streaming request sent while the replica was stopped (round robin sends it a
  share until the polls eject it; the others add nothing), with the target
  ``first_byte_s + 2``; and, recorded but not judged, ``inflight_nonstream_answer_s``,
  the longest wait from the SIGSTOP of one already in flight then: a replica that sent
  early headers (``reference.replica_early_headers``) is left after ``idle_s`` of
  silence, not ``first_byte_s``.

Targets (``targets_met``): 0 lost, 0 corrupted, 0 duplicated for every fault that leaves
a replica alive (all but ``kill_all_restart``, whose figures are recorded, not judged),
and the hang target. The gateway's retry, resume and outcome counters (``/metrics``) and
its replica table at the end of each phase are recorded too; every process's log stays
in ``--log-dir``.

Every child runs in its own process group and is killed (SIGKILL to the group) when the
script ends, by an exception, Ctrl-C or SIGTERM included; replicas also get
``--exit-with-parent``.

    .venv/bin/python benchmarks/gateway_faults.py            # a few minutes; results JSON
    .venv/bin/python benchmarks/gateway_faults.py --smoke    # ~1 minute, JSON in the log dir
    .venv/bin/python benchmarks/gateway_faults.py --smoke --faults kill_one stop_one
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from lmfleet.engine.sim.tokenizer import synthetic_words

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sim:gwfaults"
GW_MODEL, GW_VERSION = "m", "v1"
FAULTS = ("kill_one", "kill_all_restart", "stop_one", "poisoned", "broken_reload", "valid_reload")
#: faults after which no replica of the first fleet is alive: figures not judged
NO_SURVIVOR = {"kill_all_restart"}
POISON_ID = "lmfleet-fault-step-after-2"
SMOKE = {"streams": 8, "unary": 8, "max_tokens": 64, "stop_s": 12.0, "recovery_timeout_s": 20.0}
_TAG = "[gateway faults]"


def _say(msg: str) -> None:
    print(f"{_TAG} {msg}", flush=True)


# ---- child processes -------------------------------------------------------------------------
class Child:
    """One ``lmfleet`` process in its own process group; the port it bound comes back
    in a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.port_file = log_dir / f"{name}.port"
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lmfleet.cli", *argv, "--port", "0",
                 "--port-file", str(self.port_file), "--host", "127.0.0.1"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        self.url = ""

    async def wait_port(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no port file after {timeout} s")
            await asyncio.sleep(0.05)
        self.url = f"http://127.0.0.1:{int(self.port_file.read_text())}"
        return self.url

    async def wait_ready(self, client: httpx.AsyncClient, path: str, timeout: float = 60.0) -> None:
        await self.wait_port(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(self.url + path, timeout=1)).status_code == 200:
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} ({self.url}) not ready after {timeout} s")

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{tail}")

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL to the whole process group (a stopped process dies too). Only while
        the child is not reaped: after that its pid may belong to someone else."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


class Processes:
    """Every child started; :meth:`close` kills them all, whatever happened."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.children: list[Child] = []

    def spawn(self, name: str, argv: list[str], log_dir: Path) -> Child:
        child = Child(name, argv, self.env, log_dir)
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            child.kill()
        self.children.clear()


# ---- the fleet ------------------------------------------------------------------------------
def _fleet_doc(urls: list[str], args: argparse.Namespace, weight: float = 1.0) -> dict[str, Any]:
    return {
        "gateway": {
            "poll_interval_s": args.poll_interval_s,
            "timeouts": {"first_byte_s": args.first_byte_s, "idle_s": args.idle_s,
                         "total_s": args.total_s},
        },
        "models": [{
            "name": GW_MODEL, "balancing": {"policy": args.policy},
            "versions": [{"name": GW_VERSION, "weight": weight, "served_model_name": MODEL,
                          "replicas": urls}],
        }],
    }  # fmt: skip


@dataclass
class Fleet:
    procs: Processes
    dir: Path
    replicas: list[Child]
    gateway: Child
    config: Path
    spare: Child | None = None

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def close(self) -> None:
        for child in [*self.replicas, self.gateway, *([self.spare] if self.spare else [])]:
            child.kill()


def _replica_argv() -> list[str]:
    return ["--log-level", "WARNING", "serve", MODEL, "--disable-uvicorn-access-log",
            "--fault-injection", "--exit-on-engine-dead-after", "2",
            "--exit-with-parent", str(os.getpid())]  # fmt: skip


async def _start_replicas(procs: Processes, d: Path, names: list[str],
                          client: httpx.AsyncClient) -> list[Child]:  # fmt: skip
    reps = [procs.spawn(n, _replica_argv(), d) for n in names]
    await asyncio.gather(*(r.wait_ready(client, "/health/ready") for r in reps))
    return reps


async def _replica_table(client: httpx.AsyncClient, gw: str) -> list[dict[str, Any]]:
    r = await client.get(gw + "/admin/replicas", timeout=5)
    r.raise_for_status()
    return r.json()[GW_MODEL][GW_VERSION]["replicas"]


async def _wait_routable(client: httpx.AsyncClient, gw: str, urls: list[str],
                         timeout: float = 30.0) -> float:  # fmt: skip
    """Seconds until the gateway routes to every one of ``urls``."""
    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        with contextlib.suppress(httpx.HTTPError):
            table = {x["url"]: x for x in await _replica_table(client, gw)}
            if all(table.get(u, {}).get("routable") for u in urls):
                return time.perf_counter() - t
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the gateway did not route to {urls} within {timeout} s")


async def start_fleet(procs: Processes, d: Path, args: argparse.Namespace,
                      client: httpx.AsyncClient, *, spare: bool) -> Fleet:  # fmt: skip
    d.mkdir(parents=True, exist_ok=True)
    names = [f"replica-{i}" for i in range(args.replicas)] + (["spare"] if spare else [])
    reps = await _start_replicas(procs, d, names, client)
    config = d / "fleet.yaml"
    main = reps[: args.replicas]
    config.write_text(yaml.safe_dump(_fleet_doc([r.url for r in main], args)))
    gw = procs.spawn("gateway", ["gateway", "--config", str(config)], d)
    await gw.wait_ready(client, "/health/ready")
    fleet = Fleet(procs, d, main, gw, config, reps[-1] if spare else None)
    await _wait_routable(client, gw.url, fleet.urls)
    return fleet


# ---- requests ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Spec:
    key: str  # the same key in every phase: the reference's answer for it
    group: str  # "wave", "probe", "poison"
    stream: bool
    chat: bool
    prompt: str
    max_tokens: int
    request_id: str | None = None

    def body(self) -> dict[str, Any]:
        b: dict[str, Any] = {"model": GW_MODEL, "max_tokens": self.max_tokens,
                             "temperature": 0, "ignore_eos": True, "stream": self.stream}  # fmt: skip
        if self.chat:
            b["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            b["prompt"] = self.prompt
        if self.stream:
            b["stream_options"] = {"include_usage": True}
        if self.request_id is not None:
            b["request_id"] = self.request_id
        return b


@dataclass(slots=True)
class Outcome:
    spec: Spec
    t_start: float
    t_end: float = 0.0
    status: int | None = None
    error: str | None = None  # "502 replica_failed", "stream engine_dead", "timeout" ...
    message: str | None = None  # the error's message, as the client got it
    text: str = ""
    complete: bool = False
    completion_tokens: int | None = None
    anomalies: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.complete and self.error is None


@dataclass(slots=True)
class Progress:
    """Content chunks the wave's streams received; ``reached`` is set at ``target``."""

    target: int
    tokens: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, n: int) -> None:
        self.tokens += n
        if self.tokens >= self.target:
            self.reached.set()


def _set_error(out: Outcome, status: int, body: bytes) -> None:
    try:
        err = json.loads(body)["error"]
        code, out.message = err.get("code"), str(err.get("message"))[:300]
    except (ValueError, KeyError, TypeError, AttributeError):
        code, out.message = None, body[:300].decode(errors="replace")
    out.error = f"{status} {code or 'no_code'}"


async def _read_stream(resp: httpx.Response, out: Outcome, progress: Progress | None) -> None:
    pieces: list[str] = []
    ids: set[str] = set()
    done = finishes = usages = 0
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if done and data:
            out.anomalies.append("events_after_done")
        if data == "[DONE]":
            done += 1
            continue
        ev = json.loads(data)
        if "error" in ev:
            err = ev["error"] or {}
            out.error = f"stream {err.get('code') or 'no_code'}"
            out.message = str(err.get("message"))[:300]
            continue
        if ev.get("id"):
            ids.add(ev["id"])
        if ev.get("usage"):
            usages += 1
            out.completion_tokens = ev["usage"].get("completion_tokens")
        for ch in ev.get("choices") or []:
            piece = (ch.get("delta") or {}).get("content") if out.spec.chat else ch.get("text")
            if piece:
                pieces.append(piece)
                if progress is not None:
                    progress.add(1)
            if ch.get("finish_reason"):
                finishes += 1
    out.text = "".join(pieces)
    out.complete = done >= 1 and finishes >= 1 and out.error is None
    if out.error is None and not out.complete:
        out.error = "stream incomplete (no [DONE] or finish_reason)"
    out.anomalies += [a for a, bad in (("done_twice", done > 1), ("finish_twice", finishes > 1),
                                       ("usage_twice", usages > 1), ("id_changed", len(ids) > 1))
                      if bad]  # fmt: skip


def _read_unary(body: bytes, out: Outcome) -> None:
    obj = json.loads(body)
    choice = obj["choices"][0]
    out.text = (
        (choice.get("message") or {}).get("content") or "" if out.spec.chat else choice["text"]
    )
    out.completion_tokens = (obj.get("usage") or {}).get("completion_tokens")
    out.complete = bool(choice.get("finish_reason"))
    if not out.complete:
        out.error = "200 no finish_reason"


async def send(client: httpx.AsyncClient, gw: str, spec: Spec, timeout: float,
               progress: Progress | None = None) -> Outcome:  # fmt: skip
    path = "/v1/chat/completions" if spec.chat else "/v1/completions"
    out = Outcome(spec, time.perf_counter())
    try:
        async with asyncio.timeout(timeout):
            if spec.stream:
                async with client.stream("POST", gw + path, json=spec.body()) as resp:
                    out.status = resp.status_code
                    if resp.status_code != 200:
                        _set_error(out, resp.status_code, await resp.aread())
                    else:
                        await _read_stream(resp, out, progress)
            else:
                resp = await client.post(gw + path, json=spec.body())
                out.status = resp.status_code
                if resp.status_code != 200:
                    _set_error(out, resp.status_code, resp.content)
                else:
                    _read_unary(resp.content, out)
    except TimeoutError:
        out.error = f"client timeout ({timeout:g} s)"
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        out.error = f"client {type(exc).__name__}"
    out.t_end = time.perf_counter()
    if out.error is not None:
        out.complete = False
    return out


def make_specs(args: argparse.Namespace) -> tuple[list[Spec], list[Spec]]:
    """The wave (streams and non-streams interleaved, so that round robin spreads both
    over the replicas) and the probe cycle."""
    rng = random.Random(args.seed)
    words = synthetic_words(20000)[200:]
    chat_every = round(1 / args.chat_share) if args.chat_share > 0 else 0

    def prompt(tag: str) -> str:
        return f"{tag}: " + " ".join(rng.choices(words, k=args.prompt_words))

    n = max(args.streams, args.unary)
    wave: list[Spec] = []
    for i in range(n):
        for stream, count in ((True, args.streams), (False, args.unary)):
            if i < count:
                kind = "s" if stream else "u"
                chat = chat_every > 0 and i % chat_every == chat_every - 1
                wave.append(Spec(f"wave-{kind}{i}", "wave", stream, chat,
                                 prompt(f"wave {kind}{i}"), args.max_tokens))  # fmt: skip
    probes = [Spec(f"probe-{j}", "probe", j % 2 == 0, j % 4 == 3, prompt(f"probe {j}"),
                   args.probe_max_tokens) for j in range(args.probe_prompts)]  # fmt: skip
    return wave, probes


# ---- comparing with the reference ---------------------------------------------------------
_TOKEN = re.compile(r"\s*\S+|\s+$")


def repeats(text: str, ref: str) -> bool:
    """Whether ``text``, after a correct prefix, goes on with an earlier part of
    ``ref``: ``ref[:j] + ref[i:...]`` with ``i < j`` (tokens sent twice)."""
    t, r = _TOKEN.findall(text), _TOKEN.findall(ref)
    if t == r:
        return False
    p = 0
    while p < min(len(t), len(r)) and t[p] == r[p]:
        p += 1
    where: dict[str, list[int]] = {}
    for i, tok in enumerate(r):
        where.setdefault(tok, []).append(i)
    for j in range(1, min(p, len(t) - 1) + 1):
        tail = t[j:]
        for i in where.get(tail[0], ()):
            if i >= j:
                break
            if r[i : i + len(tail)] == tail:
                return True
    return False


_DUP_ANOMALIES = {"done_twice", "finish_twice", "usage_twice", "events_after_done"}


def judge(o: Outcome, ref: dict[str, str]) -> str:
    """``ok``, ``lost``, ``duplicated`` or ``corrupted``."""
    if not o.ok:
        return "lost"
    expected = ref[o.spec.key]
    if _DUP_ANOMALIES & set(o.anomalies) or repeats(o.text, expected):
        return "duplicated"
    return "ok" if o.text == expected else "corrupted"


def _example(o: Outcome, ref: dict[str, str]) -> dict[str, Any]:
    return {"key": o.spec.key, "stream": o.spec.stream, "chat": o.spec.chat,
            "got": o.text[:300], "expected": ref[o.spec.key][:300], "anomalies": o.anomalies}  # fmt: skip


def tally(
    outcomes: list[Outcome], ref: dict[str, str], max_tokens: dict[str, int]
) -> dict[str, Any]:
    verdicts = [judge(o, ref) for o in outcomes]
    errors = Counter(o.error for o in outcomes if o.error is not None)
    anomalies: Counter[str] = Counter()
    for o in outcomes:
        if o.ok and o.completion_tokens not in (None, max_tokens[o.spec.key]):
            anomalies["usage_completion_tokens_wrong"] += 1
        anomalies.update(a for a in o.anomalies if a not in _DUP_ANOMALIES)
    bad = [_example(o, ref) for o, v in zip(outcomes, verdicts, strict=True)
           if v in ("corrupted", "duplicated")]  # fmt: skip
    return {
        "requests": len(outcomes),
        "ok": verdicts.count("ok"),
        "lost": verdicts.count("lost"),
        "corrupted": verdicts.count("corrupted"),
        "duplicated": verdicts.count("duplicated"),
        "errors": dict(errors.most_common()),
        "error_examples": {o.error: o.message for o in reversed(outcomes) if o.error},
        "anomalies": dict(anomalies),
        "bad_examples": bad[:3],
    }


# ---- gateway metrics ---------------------------------------------------------------------------
_METRICS = {
    "lmfleet_gateway_retries_total": "reason",
    "lmfleet_gateway_stream_resumes_total": "outcome",
    "lmfleet_gateway_requests_total": "outcome",
    "lmfleet_gateway_errors_total": "kind",
}


async def gateway_counters(client: httpx.AsyncClient, gw: str) -> dict[str, dict[str, float]]:
    text = (await client.get(gw + "/metrics", timeout=5)).text
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        label = _METRICS.get(name)
        if label is None or not rest:
            continue
        m = re.search(rf'{label}="([^"]*)"', rest)
        value = float(rest.rsplit(" ", 1)[1])
        if m and value:
            key = name.removeprefix("lmfleet_gateway_").removesuffix("_total")
            out.setdefault(key, {})
            out[key][m.group(1)] = out[key].get(m.group(1), 0.0) + value
    return out


# ---- phases -------------------------------------------------------------------------------------
@dataclass
class Phase:
    name: str
    fleet: Fleet
    client: httpx.AsyncClient
    args: argparse.Namespace
    t0: float = 0.0
    fault_start: float | None = None
    fault_end: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    extra: list[Outcome] = field(default_factory=list)  # the poison request

    @property
    def gw(self) -> str:
        return self.fleet.gateway.url

    def rel(self, t: float | None) -> float | None:
        return None if t is None else round(t - self.t0, 3)


FaultFn = Callable[[Phase], Awaitable[None]]


async def _kill_one(ph: Phase) -> None:
    victim = ph.fleet.replicas[0]
    ph.fault_start = ph.fault_end = time.perf_counter()
    victim.kill()
    ph.details["killed"] = victim.url


async def _kill_all_restart(ph: Phase) -> None:
    f, c = ph.fleet, ph.client
    old = list(f.replicas)
    ph.fault_start = time.perf_counter()
    for r in old:
        r.kill()
    names = [f"restarted-{i}" for i in range(len(old))]
    f.replicas = await _start_replicas(f.procs, f.dir, names, c)
    t_ready = time.perf_counter()
    answers = []
    for r in f.replicas:
        a = await c.post(f"{ph.gw}/admin/models/{GW_MODEL}/versions/{GW_VERSION}/replicas",
                         json={"url": r.url}, timeout=10)  # fmt: skip
        answers.append(a.status_code)
    ph.fault_end = time.perf_counter()
    table = {x["url"]: x["id"] for x in await _replica_table(c, ph.gw)}
    removed = []
    for r in old:
        if r.url in table:
            a = await c.delete(f"{ph.gw}/admin/models/{GW_MODEL}/versions/{GW_VERSION}"
                               f"/replicas/{table[r.url]}", timeout=10)  # fmt: skip
            removed.append(a.status_code)
    ph.details.update({
        "killed": [r.url for r in old], "started": f.urls,
        "restart_ready_s": round(t_ready - ph.fault_start, 3),
        "registered_s": round(ph.fault_end - ph.fault_start, 3),
        "register_answers": answers, "remove_old_answers": removed,
        "routable_after_registration_s": round(await _wait_routable(c, ph.gw, f.urls), 3),
    })  # fmt: skip


async def _stop_one(ph: Phase) -> None:
    victim = ph.fleet.replicas[0]
    victim.signal(signal.SIGSTOP)
    ph.fault_start = time.perf_counter()
    try:
        await asyncio.sleep(ph.args.stop_s)
    finally:
        victim.signal(signal.SIGCONT)
    ph.fault_end = time.perf_counter()
    ph.details.update({"stopped": victim.url, "stop_s": ph.args.stop_s})


async def _poisoned(ph: Phase) -> None:
    a = ph.args
    spec = Spec("poison", "poison", a.poison == "stream", False, "poison: please",
                a.max_tokens, POISON_ID)  # fmt: skip
    ph.fault_start = time.perf_counter()
    o = await send(ph.client, ph.gw, spec, a.request_timeout_s)
    ph.fault_end = o.t_end
    ph.extra.append(o)
    ph.details["poison"] = {"stream": spec.stream, "request_id": POISON_ID, "status": o.status,
                            "error": o.error, "answered_s": round(o.t_end - o.t_start, 3)}  # fmt: skip


async def _reload(ph: Phase, content: bytes, via: tuple[str, ...]) -> dict[str, Any]:
    ph.fleet.config.write_bytes(content)
    got: dict[str, Any] = {}
    if "post" in via:
        r = await ph.client.post(ph.gw + "/admin/reload", timeout=10)
        try:
            code = r.json().get("error", {}).get("code")
        except ValueError:
            code = None
        got["post"] = f"{r.status_code} {code or ''}".strip()
    if "sighup" in via:
        ph.fleet.gateway.signal(signal.SIGHUP)
        await asyncio.sleep(0.2)
        got["sighup_gateway_alive"] = ph.fleet.gateway.proc.poll() is None
    return got


def _via(args: argparse.Namespace) -> tuple[str, ...]:
    return ("post", "sighup") if args.reload_via == "both" else (args.reload_via,)


async def _broken_reload(ph: Phase) -> None:
    bad_config = _fleet_doc(ph.fleet.urls, ph.args, weight=-1.0)
    bad_config["models"][0]["versions"][0]["replicsa"] = ph.fleet.urls
    files = {
        "invalid_yaml": b"models: [ {name: m, versions: [ {name: v1, replicas: [\n  - oops\n",
        "invalid_config": yaml.safe_dump(bad_config).encode(),
        "not_utf8": b"models:\n  - name: \xff\xfe\n",
    }
    before = await _running_config(ph)
    ph.fault_start = time.perf_counter()
    answers = {name: await _reload(ph, content, _via(ph.args)) for name, content in files.items()}
    ph.fault_end = time.perf_counter()
    ph.details.update({
        "answers": answers,
        "config_kept": await _running_config(ph) == before,
        "routable_after": sum(1 for x in await _replica_table(ph.client, ph.gw) if x["routable"]),
    })  # fmt: skip


async def _generated(client: httpx.AsyncClient, url: str) -> float | None:
    """The replica's ``lmfleet_generation_tokens_total``, or None."""
    with contextlib.suppress(httpx.HTTPError, ValueError, IndexError):
        for line in (await client.get(url + "/metrics", timeout=5)).text.splitlines():
            if line.startswith("lmfleet_generation_tokens_total"):
                return float(line.rsplit(" ", 1)[1])
    return None


async def _early_headers(client: httpx.AsyncClient, url: str) -> bool | None:
    """Whether a replica echoes ``x-lmfleet-early-headers`` (then a non-streaming request
    it has admitted is bounded by idle_s, not first_byte_s, when it hangs)."""
    body = {"model": MODEL, "prompt": "early?", "max_tokens": 2}
    with contextlib.suppress(httpx.HTTPError):
        r = await client.post(url + "/v1/completions", json=body, timeout=10,
                              headers={"x-lmfleet-early-headers": "1"})  # fmt: skip
        return r.headers.get("x-lmfleet-early-headers") == "1"
    return None


async def _running_config(ph: Phase) -> tuple[Any, list[str]]:
    """``GET /admin/config`` and the replica URLs of ``GET /admin/replicas``."""
    cfg = (await ph.client.get(ph.gw + "/admin/config", timeout=5)).json()["config"]
    return cfg, [x["url"] for x in await _replica_table(ph.client, ph.gw)]


async def _valid_reload(ph: Phase) -> None:
    f = ph.fleet
    if f.spare is None:
        raise RuntimeError("valid_reload needs the spare replica")
    urls = [*f.urls, f.spare.url]
    content = yaml.safe_dump(_fleet_doc(urls, ph.args, weight=2.0)).encode()
    ph.fault_start = time.perf_counter()
    answers: dict[str, Any] = {}
    if "sighup" in _via(ph.args):
        answers["sighup"] = await _reload(ph, content, ("sighup",))
        answers["sighup_applied_s"] = round(await _wait_routable(ph.client, ph.gw, urls, 10), 3)
    if "post" in _via(ph.args):
        answers["post"] = await _reload(ph, content, ("post",))
    ph.fault_end = time.perf_counter()
    f.replicas.append(f.spare)
    f.spare = None
    ph.details["added_replica_tokens_at_reload"] = await _generated(ph.client, urls[-1])
    table = await _replica_table(ph.client, ph.gw)
    ph.details.update({"added": urls[-1], "weight": 2.0, "answers": answers,
                       "routable_after": sum(1 for x in table if x["routable"])})  # fmt: skip


FAULT_FNS: dict[str, FaultFn] = {
    "kill_one": _kill_one, "kill_all_restart": _kill_all_restart, "stop_one": _stop_one,
    "poisoned": _poisoned, "broken_reload": _broken_reload, "valid_reload": _valid_reload,
}  # fmt: skip


async def _probe_loop(ph: Phase, probes: list[Spec], stop: asyncio.Event,
                      tasks: list[asyncio.Task[Outcome]]) -> None:  # fmt: skip
    j = 0
    while not stop.is_set():
        spec = probes[j % len(probes)]
        tasks.append(asyncio.create_task(send(ph.client, ph.gw, spec, ph.args.request_timeout_s)))
        j += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), ph.args.probe_interval_s)


def _recovered(ph: Phase, done: list[Outcome]) -> float | None:
    if ph.fault_end is None:
        return None
    ends = [o.t_end for o in done if o.ok and o.t_start >= ph.fault_end]
    return min(ends) - ph.fault_end if ends else None


async def run_wave(ph: Phase, wave: list[Spec], probes: list[Spec],
                   fault: FaultFn | None) -> list[Outcome]:  # fmt: skip
    """The wave and the probes; the fault once the streams are ``--trigger-fraction``
    through. Returns every outcome (wave first, then probes in order)."""
    a = ph.args
    streams = sum(1 for s in wave if s.stream)
    progress = Progress(target=max(1, int(a.trigger_fraction * streams * a.max_tokens)))
    ph.t0 = time.perf_counter()
    wave_tasks = [asyncio.create_task(send(ph.client, ph.gw, s, a.request_timeout_s, progress))
                  for s in wave]  # fmt: skip
    probe_tasks: list[asyncio.Task[Outcome]] = []
    stop = asyncio.Event()
    prober = asyncio.create_task(_probe_loop(ph, probes, stop, probe_tasks) if probes
                                 else stop.wait())  # fmt: skip
    try:
        if fault is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.reached.wait(), a.request_timeout_s)
            ph.details["at_fault"] = {
                "t_s": round(time.perf_counter() - ph.t0, 3),
                "stream_token_fraction": round(progress.tokens / max(1, streams * a.max_tokens), 3),
                "wave_in_flight": sum(1 for t in wave_tasks if not t.done()),
            }  # fmt: skip
            _say(f"{ph.name}: fault at {ph.details['at_fault']}")
            await fault(ph)
        await asyncio.gather(*wave_tasks)
        deadline = time.perf_counter() + a.recovery_timeout_s
        while fault is not None and time.perf_counter() < deadline:
            if _recovered(ph, [t.result() for t in probe_tasks if t.done()]) is not None:
                break
            await asyncio.sleep(0.05)
    except BaseException:  # do not wait for requests to a fleet that is going away
        for t in [*wave_tasks, *probe_tasks, prober]:
            t.cancel()
        raise
    finally:
        stop.set()
        await asyncio.gather(prober, *probe_tasks, return_exceptions=True)
    return [t.result() for t in wave_tasks] + [t.result() for t in probe_tasks]


# ---- per-fault figures -------------------------------------------------------------------------
def _longest(waits: list[tuple[float, Outcome]], prefix: str, limit: float) -> dict[str, Any]:
    w, o = max(waits, key=lambda x: x[0], default=(None, None))
    return {
        f"{prefix}_answer_s": None if w is None else round(w, 3),
        f"{prefix}_request": None if o is None else {"key": o.spec.key, "ok": o.ok,
                                                      "error": o.error},
        f"{prefix}_requests": len(waits),
        f"{prefix}_over_{limit:g}s": sum(1 for x, _ in waits if x > limit),
    }  # fmt: skip


def _hang(ph: Phase, outcomes: list[Outcome]) -> dict[str, Any]:
    """Non-streaming requests and the stopped replica: ``hang_nonstream_*`` over those
    sent while it was stopped (time to their answer; judged against first_byte_s + 2),
    ``inflight_nonstream_*`` over those already in flight at the SIGSTOP (time from
    the SIGSTOP; an admitted request with early headers waits for idle_s, so these
    are recorded against idle_s + 2, not judged)."""
    t_stop, t_cont = ph.fault_start, ph.fault_end
    a = ph.args
    if t_stop is None or t_cont is None:
        return {"hang_nonstream_answer_s": None, "hang_target_s": a.first_byte_s + 2}
    unary = [o for o in outcomes if not o.spec.stream]
    sent = [(o.t_end - o.t_start, o) for o in unary if t_stop <= o.t_start < t_cont]
    held = [(o.t_end - t_stop, o) for o in unary if o.t_start < t_stop < o.t_end]
    return {
        **_longest(sent, "hang_nonstream", a.first_byte_s + 2),
        **_longest(held, "inflight_nonstream", a.idle_s + 2),
        "hang_target_s": a.first_byte_s + 2,
        "first_byte_s": a.first_byte_s,
        "idle_s": a.idle_s,
    }


def fault_figures(ph: Phase, outcomes: list[Outcome], ref: dict[str, str],
                  max_tokens: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    total = tally(outcomes, ref, max_tokens)
    rec = _recovered(ph, outcomes)
    out: dict[str, Any] = {
        **{
            k: total[k]
            for k in ("lost", "corrupted", "duplicated", "errors", "error_examples", "anomalies")
        },
        "recovery_s": None if rec is None else round(rec, 3),
        "requests": total["requests"],
        "by_group": {
            g: tally([o for o in outcomes if o.spec.group == g], ref, max_tokens)
            for g in ("wave", "probe")
        },
        "fault_start_s": ph.rel(ph.fault_start),
        "fault_end_s": ph.rel(ph.fault_end),
        "wave_end_s": ph.rel(max(o.t_end for o in outcomes if o.spec.group == "wave")),
        **ph.details,
    }
    if ph.name.startswith("stop_one"):
        out.update(_hang(ph, outcomes))
    judged = ph.name not in NO_SURVIVOR
    met: dict[str, bool | None] = {
        k: (out[k] == 0 if judged else None) for k in ("lost", "corrupted", "duplicated")
    }
    if "hang_nonstream_answer_s" in out:
        h = out["hang_nonstream_answer_s"]
        met["hang_nonstream_answer_s"] = h is not None and h <= out["hang_target_s"]
    out["targets_met"] = met
    return out


async def run_phase(name: str, fault: str | None, procs: Processes, args: argparse.Namespace,
                    wave: list[Spec], probes: list[Spec], log_dir: Path,
                    ) -> tuple[Phase, list[Outcome], dict[str, Any]]:  # fmt: skip
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout_s, connect=10),
                                 limits=limits) as client:  # fmt: skip
        fleet = await start_fleet(
            procs, log_dir / name, args, client, spare=fault == "valid_reload"
        )
        try:
            ph = Phase(name, fleet, client, args)
            _say(f"{name}: fleet up ({', '.join(fleet.urls)}; gateway {fleet.gateway.url})")
            if fault is None:  # the reference: every spec, twice, to check determinism
                outcomes = await run_wave(ph, wave + probes, probes, None)
                outcomes += await run_wave(ph, wave + probes, [], None)
            else:
                outcomes = await run_wave(ph, wave, probes, FAULT_FNS[fault])
            state: dict[str, Any] = {"gateway_alive": fleet.gateway.proc.poll() is None}
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                state["gateway_counters"] = await gateway_counters(client, fleet.gateway.url)
                state["replicas_at_end"] = [
                    {k: x[k] for k in ("url", "state", "routable", "ejections", "last_error")}
                    for x in await _replica_table(client, fleet.gateway.url)
                ]  # fmt: skip
            if "added" in ph.details:
                state["added_replica_tokens_at_end"] = await _generated(client, ph.details["added"])
            if fault is None:
                state["replica_early_headers"] = await _early_headers(client, fleet.urls[0])
            return ph, outcomes, state
        finally:
            fleet.close()


def reference_answers(outcomes: list[Outcome], n: int) -> tuple[dict[str, str], dict[str, Any]]:
    """The reference texts (the first round: the wave and every probe prompt) and how
    the second round and the probes sent during the first compared. ``n`` is the
    number of requests in a round."""
    first, probes, second = outcomes[:n], outcomes[n:-n], outcomes[-n:]
    failed = [o.spec.key for o in first + second if not o.ok]
    if failed:
        raise RuntimeError(f"the reference run failed for {failed[:5]}: "
                           f"{[o.error for o in first + second if not o.ok][:5]}")  # fmt: skip
    ref = {o.spec.key: o.text for o in first}
    mismatches = sum(1 for o in second if o.text != ref[o.spec.key])
    mismatches += sum(1 for o in probes if o.ok and o.text != ref[o.spec.key])
    unary = [o.t_end - o.t_start for o in first + second if not o.spec.stream]
    stream = [o.t_end - o.t_start for o in first + second if o.spec.stream]
    info = {
        "requests": len(outcomes), "self_mismatches": mismatches,
        "probe_failures": sum(1 for o in probes if not o.ok),
        "nonstream_e2e_max_s": round(max(unary, default=0.0), 3),
        "stream_e2e_max_s": round(max(stream, default=0.0), 3),
    }  # fmt: skip
    return ref, info


# ---- main -------------------------------------------------------------------------------------
def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }  # fmt: skip
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    git = ["git", "-C", str(ROOT)]
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["git_commit"] = subprocess.run([*git, "rev-parse", "HEAD"], check=True,
                                            capture_output=True, text=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               check=True, capture_output=True, text=True).stdout  # fmt: skip
        info["git_dirty"] = bool(dirty.strip())
    return info


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def table(faults: dict[str, dict[str, Any]]) -> str:
    head = ("fault", "lost", "corrupt", "dup", "recovery_s", "hang_s", "targets", "errors")
    rows = [head]
    for name, f in faults.items():
        met = [v for v in f["targets_met"].values() if v is not None]
        targets = "n/a" if not met else ("met" if all(met) else "MISSED")
        errors = ", ".join(f"{k}: {v}" for k, v in f["errors"].items()) or "-"
        rows.append((name, _fmt(f["lost"]), _fmt(f["corrupted"]), _fmt(f["duplicated"]),
                     _fmt(f["recovery_s"]), _fmt(f.get("hang_nonstream_answer_s")), targets,
                     errors))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (the top of this file) for what each fault does "
               "and how answers are judged.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    a = p.add_argument
    a(
        "--faults",
        nargs="+",
        choices=FAULTS,
        default=list(FAULTS),
        metavar="FAULT",
        help=f"faults to run, each in its own phase with a fresh fleet: {', '.join(FAULTS)}",
    )
    a(
        "--smoke",
        action="store_true",
        help=f"a quick check: defaults become {SMOKE} (flags given explicitly still win), and "
        "the JSON goes to the log dir unless --out is given",
    )
    a("--replicas", type=int, default=3, help="replicas per fleet")
    a("--streams", type=int, default=32, help="greedy streams in each phase's wave")
    a("--unary", type=int, default=32, help="non-streaming requests in each phase's wave")
    a("--max-tokens", type=int, default=128, help="output tokens of every wave request")
    a("--prompt-words", type=int, default=32, help="random words per prompt")
    a(
        "--chat-share",
        type=float,
        default=0.25,
        help="share of the wave (of streams and of non-streams) sent as chat completions; "
        "the rest are completions; 0 = none",
    )
    a(
        "--step-ms",
        type=float,
        default=8.0,
        help="the simulated replicas' fixed time per engine step (profile fixed_s), so the "
        "wave's answers take about max_tokens × this; keep the longest non-streaming "
        "answer well under --first-byte-s (a replica without early headers sends nothing "
        "before its answer is complete)",
    )
    a(
        "--policy",
        default="round_robin",
        choices=("round_robin", "least_outstanding", "prefix_affinity", "kv_aware"),
        help="the gateway's balancing policy; round robin keeps sending to a hung replica "
        "until the polls eject it, which is what stop_one measures",
    )
    a("--first-byte-s", type=float, default=5.0, help="the fleet file's timeouts.first_byte_s")
    a(
        "--idle-s",
        type=float,
        default=10.0,
        help="the fleet file's timeouts.idle_s: the silence after which a stream resumes elsewhere",
    )
    a("--total-s", type=float, default=120.0, help="the fleet file's timeouts.total_s")
    a("--poll-interval-s", type=float, default=0.5, help="the fleet file's gateway.poll_interval_s")
    a("--stop-s", type=float, default=40.0, help="stop_one: seconds between SIGSTOP and SIGCONT")
    a(
        "--trigger-fraction",
        type=float,
        default=0.3,
        help="the fault starts once the wave's streams have this share of their tokens",
    )
    a(
        "--probe-interval-s",
        type=float,
        default=0.1,
        help="a probe request (stream and non-stream in turn) goes out this often during a phase",
    )
    a("--probe-max-tokens", type=int, default=16, help="output tokens of a probe")
    a("--probe-prompts", type=int, default=20, help="distinct probe prompts (cycled)")
    a(
        "--recovery-timeout-s",
        type=float,
        default=60.0,
        help="after the wave, wait at most this long for a success that started after the fault",
    )
    a(
        "--request-timeout-s",
        type=float,
        default=180.0,
        help="client-side limit per request; past it the request counts as lost",
    )
    a(
        "--poison",
        choices=("stream", "unary"),
        default="unary",
        help="poisoned: whether the poisoned request streams",
    )
    a(
        "--reload-via",
        choices=("both", "post", "sighup"),
        default="both",
        help="broken_reload / valid_reload: POST /admin/reload, SIGHUP, or both in turn",
    )
    a("--seed", type=int, default=0, help="seed of the prompts")
    a(
        "--log-dir",
        default=None,
        help="where every process's log (and fleet file) goes, one folder per phase; "
        "default: a new temporary folder, kept and printed",
    )
    a(
        "--out",
        default=None,
        help="the JSON results (default: benchmarks/results/gateway_faults.json; "
        "with --smoke, gateway_faults.json in the log dir)",
    )
    return p


def _args() -> argparse.Namespace:
    p = _parser()
    if p.parse_known_args()[0].smoke:
        p.set_defaults(**SMOKE)
    args = p.parse_args()
    if args.replicas < 2:
        p.error("--replicas must be at least 2 (a fault must leave a replica alive)")
    if not 0 < args.trigger_fraction < 1:
        p.error("--trigger-fraction must be in (0, 1)")
    if not 0 <= args.chat_share <= 1:
        p.error("--chat-share must be in [0, 1]")
    return args


async def _main(args: argparse.Namespace, procs: Processes, log_dir: Path) -> dict[str, Any]:
    wave, probes = make_specs(args)
    max_tokens = {s.key: s.max_tokens for s in wave + probes}
    result: dict[str, Any] = {
        "benchmark": "gateway_faults",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "config": {
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "log_dir")},
            "model": MODEL, "profile": _profile(args), "replica_argv": _replica_argv()[:-2],
            "fleet_file": _fleet_doc(["<replica urls>"], args),
            "wave": {"streams": args.streams, "unary": args.unary,
                     "chat": sum(1 for s in wave if s.chat)},
        },
    }  # fmt: skip
    _say(
        f"reference: {len(wave)} + {len(probes)} probe requests twice, no fault (logs in {log_dir})"
    )
    _, outs, ref_state = await run_phase("reference", None, procs, args, wave, probes, log_dir)
    ref, result["reference"] = reference_answers(outs, len(wave) + len(probes))
    result["reference"].update(ref_state)
    _say(f"reference: {result['reference']}")
    if result["reference"]["nonstream_e2e_max_s"] > 0.8 * args.first_byte_s:
        _say("WARNING: the longest non-streaming answer is close to first_byte_s; "
             "the gateway will take slow answers for hung replicas (lower --step-ms)")  # fmt: skip
    result["faults"] = {}
    for fault in args.faults:
        name = f"stop_one_{args.stop_s:g}s" if fault == "stop_one" else fault
        ph, outs, state = await run_phase(name, fault, procs, args, wave, probes, log_dir)
        fig = fault_figures(ph, outs, ref, max_tokens)
        fig.update(state)
        result["faults"][name] = fig
        _say(f"{name}: lost {fig['lost']}, corrupted {fig['corrupted']}, duplicated "
             f"{fig['duplicated']}, recovery {_fmt(fig['recovery_s'])} s, errors {fig['errors']}"
             f", targets {fig['targets_met']}")  # fmt: skip
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["targets_met_all"] = all(
        v for f in result["faults"].values() for v in f["targets_met"].values() if v is not None
    )
    return result


def _profile(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return {"gwfaults": {"base": "llama-8b-h100", "load_s": 0.05, "fixed_s": args.step_ms / 1000}}


def _kill_on_signals(procs: Processes) -> None:
    """SIGINT / SIGTERM: kill every child at once, then stop as Ctrl-C does."""

    def handler(signum: int, frame: object) -> None:
        procs.close()
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def main() -> int:
    args = _args()
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="lmfleet-gwfaults-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.out is None:
        args.out = str(log_dir / "gateway_faults.json" if args.smoke
                       else ROOT / "benchmarks" / "results" / "gateway_faults.json")  # fmt: skip
    profiles = log_dir / "profiles.json"
    profiles.write_text(json.dumps(_profile(args)))
    procs = Processes({**os.environ, "LMFLEET_SIM_PROFILES": str(profiles)})
    _kill_on_signals(procs)
    try:
        result = asyncio.run(_main(args, procs, log_dir))
    finally:
        procs.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result["faults"]))
    _say(f"targets met: {result['targets_met_all']}; results in {args.out}, logs in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
