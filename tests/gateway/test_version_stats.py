"""The per-version window (arrival rate, output tokens/s, TTFT/TPOT p50/p90,
requests, errors, time-to-ready, wake): exact figures on scripted records with a fake
clock, then through the gateway in front of fake replicas (Prometheus and JSON)."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmfleet.fleet.config import parse_config
from lmfleet.gateway.app import build_app
from lmfleet.gateway.state import GatewayState
from lmfleet.gateway.version_stats import REPLICA_STATES, VersionStats, versions_snapshot
from tests.gateway.fakes import FakeReplica, fleet, running, wait_for
from tests.server_thread import ServerThread


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def stats(window_s: float = 60.0, **kw: object) -> tuple[VersionStats, Clock]:
    clock = Clock()
    return VersionStats(window_s, clock=clock, **kw), clock  # type: ignore[arg-type]


# ---- unit: scripted records ------------------------------------------------------------


def test_never_seen_version_has_no_sample():
    s, _ = stats()
    w = s.window("m", "v")
    assert (w.arrival_rate, w.output_tokens_per_s, w.ttft_p50_s, w.tpot_p90_s) == (None,) * 4
    assert (w.requests, w.errors, w.window_s) == (0, 0, 0.0)
    assert s.keys() == []  # reading creates nothing


def test_exact_rates_and_percentiles():
    s, clock = stats(window_s=60.0)
    # 11 requests, one every second from t=1000; TTFT k/8 s, TPOT k/64 s, 4 tokens each
    for k in range(11):
        clock.t = 1000.0 + k
        s.record_arrival("m", "v")
        s.record_finish("m", "v", ttft_s=k / 8, tpot_s=k / 64, output_tokens=4, error=False)
    s.record_finish("m", "v", ttft_s=None, tpot_s=None, output_tokens=0, error=True)
    clock.t = 1016.0  # 16 s since the first record, under the 60 s window
    w = s.window("m", "v")
    assert w.window_s == 16.0
    assert w.arrival_rate == 11 / 16
    assert w.output_tokens_per_s == 44 / 16
    assert (w.ttft_p50_s, w.ttft_p90_s) == (5 / 8, 9 / 8)
    assert (w.tpot_p50_s, w.tpot_p90_s) == (5 / 64, 9 / 64)
    assert (w.requests, w.errors) == (12, 1)
    # the same percentiles as numpy's linear interpolation
    assert w.ttft_p90_s == float(np.percentile([k / 8 for k in range(11)], 90))


def test_first_seconds_are_not_diluted():
    s, clock = stats(window_s=60.0)
    for i in range(6):  # 2 per second for 3 s
        clock.t = 1000.0 + i / 2
        s.record_arrival("m", "v")
    clock.t = 1003.0
    w = s.window("m", "v")
    assert (w.window_s, w.arrival_rate) == (3.0, 2.0)  # not 6 / 60


def test_the_span_is_at_least_min_span():
    s, clock = stats()
    s.record_arrival("m", "v")
    s.record_arrival("m", "v")
    w = s.window("m", "v")  # at the same instant: over 1 s, not over 0
    assert (w.window_s, w.arrival_rate) == (1.0, 2.0)
    clock.t += 0.25
    assert s.window("m", "v").arrival_rate == 2.0
    s2 = VersionStats(60.0, clock=clock, min_span_s=0.5)
    s2.record_arrival("m", "v")
    assert s2.window("m", "v").window_s == 0.5


def test_window_trims_old_samples():
    s, clock = stats(window_s=5.0)
    for k in range(10):  # t = 1000 .. 1009
        clock.t = 1000.0 + k
        s.record_arrival("m", "v")
        s.record_finish("m", "v", ttft_s=float(k), tpot_s=None, output_tokens=k, error=k == 9)
    clock.t = 1009.5  # the window is (1004.5, 1009.5]: k = 5 .. 9
    w = s.window("m", "v")
    assert w.window_s == 5.0
    assert w.arrival_rate == 1.0
    assert w.output_tokens_per_s == (5 + 6 + 7 + 8 + 9) / 5
    assert (w.ttft_p50_s, w.requests, w.errors) == (7.0, 5, 1)
    assert w.tpot_p50_s is None  # no TPOT sample at all
    clock.t = 1100.0  # everything is out: zero, measured over the whole window
    w = s.window("m", "v")
    assert (w.arrival_rate, w.output_tokens_per_s, w.requests, w.window_s) == (0.0, 0.0, 0, 5.0)
    assert w.ttft_p50_s is None and w.ttft_p90_s is None


def test_memory_is_bounded_by_the_window():
    s, clock = stats(window_s=5.0)
    for i in range(10_000):  # 2 per second for 5,000 s
        clock.t = 1000.0 + i / 2
        s.record_arrival("m", "v")
        s.record_finish("m", "v", ttft_s=0.5, tpot_s=0.25, output_tokens=1, error=False)
    series = s._series[("m", "v")]
    assert len(series.arrivals) <= 11 and len(series.finishes) <= 11
    assert s.window("m", "v").arrival_rate == 2.0


def test_the_cap_bounds_samples_and_rates_stay_honest():
    s, clock = stats(window_s=60.0, max_samples=100)
    for i in range(1000):  # 64 per second, all inside the window
        clock.t = 1000.0 + i / 64
        s.record_arrival("m", "v")
        s.record_finish("m", "v", ttft_s=None, tpot_s=None, output_tokens=2, error=False)
    series = s._series[("m", "v")]
    assert len(series.arrivals) == 100 and len(series.finishes) == 100
    w = s.window("m", "v")
    # the kept 100 cover (899/64, 999/64]: 64 per second, the true rate, not 100/60
    assert w.window_s == 100 / 64
    assert (w.arrival_rate, w.output_tokens_per_s, w.requests) == (64.0, 128.0, 100)


def test_time_to_ready_and_wake_keep_the_last_value_and_a_count():
    s, _ = stats()
    s.note_time_to_ready("m", "v", 30.5)
    s.note_time_to_ready("m", "v", 12.25)
    s.note_wake("m", "v", 2.5)
    w = s.window("m", "v")
    assert (w.time_to_ready_s, w.time_to_ready_count, w.wake_s, w.wake_count) == (12.25, 2, 2.5, 1)
    assert w.arrival_rate is None and w.window_s == 0.0  # notes are not traffic


def test_retain_forgets_removed_versions():
    s, _ = stats()
    for v in ("v1", "v2", "v3"):
        s.record_arrival("m", v)
    s.note_wake("other", "v1", 1.0)
    s.retain([("m", "v1"), ("m", "v3")])
    assert sorted(s.keys()) == [("m", "v1"), ("m", "v3")]
    assert s.window("m", "v2").requests == 0 and s.window("m", "v2").arrival_rate is None


def test_versions_are_separate():
    s, clock = stats()
    s.record_arrival("m", "v1")
    clock.t += 4.0
    s.record_arrival("m", "v2")
    assert s.window("m", "v1").arrival_rate == 1 / 4
    assert s.window("m", "v2").arrival_rate == 1.0  # its own first record: 1 s floor


@pytest.mark.parametrize(
    "kw", [{"window_s": 0}, {"window_s": -1.0}, {"max_samples": 0}, {"min_span_s": -1.0}]
)
def test_bad_settings_are_refused(kw: dict):
    window_s = kw.pop("window_s", 60.0)
    with pytest.raises(ValueError):
        VersionStats(window_s, **kw)


def test_apply_config_retains_the_new_versions():
    state = GatewayState(parse_config(fleet({"v1": [], "v2": []})))
    state.version_stats.record_arrival("m", "v1")
    state.version_stats.record_arrival("m", "v2")
    state.apply_config(parse_config(fleet({"v1": []})))
    assert state.version_stats.keys() == [("m", "v1")]


# ---- through the gateway ---------------------------------------------------------------


@contextmanager
def gateway_with_clock(doc: dict, clock: Clock) -> Iterator[tuple[httpx.Client, GatewayState]]:
    config = parse_config(doc)
    state = GatewayState(config)
    state.version_stats = VersionStats(clock=clock)
    state.metrics.bind(state.registry, state.version_stats)
    server = ServerThread(build_app(config, state=state), lifespan="on")
    with server, httpx.Client(base_url=server.url, timeout=20) as client:
        yield client, state


def scrape(client: httpx.Client, prefix: str = "lmfleet_gateway_version_") -> dict:
    """(name, sorted labels) → value of every sample whose name starts with ``prefix``."""
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name.startswith(prefix):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def lbl(version: str, **extra: str) -> tuple:
    return tuple(sorted({"model": "m", "version": version, **extra}.items()))


def p50_p90(values: Iterable[float]) -> tuple[float, float]:
    p50, p90 = np.percentile(list(values), (50, 90))
    return float(p50), float(p90)


def closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def test_prometheus_and_json_after_requests():
    a, sleepy = FakeReplica("a"), FakeReplica("sleepy", state="asleep")
    b, failing = FakeReplica("b"), FakeReplica("failing", status=500, code="request_failed")
    a.running, sleepy.running = 3, 2
    clock = Clock(1000.0)
    gone = closed_port_url()
    with running(a, sleepy, b, failing) as (sa, ss, sb, sf):
        doc = fleet({"v1": [sa.url, ss.url, gone], "v2": [sb.url], "v3": [sf.url]})
        with gateway_with_clock(doc, clock) as (c, state):
            reg = state.registry
            want = {sa.url: "ready", ss.url: "asleep", gone: "unreachable",
                    sb.url: "ready", sf.url: "ready"}  # fmt: skip
            wait_for(lambda: all(r.state == want[r.url] for v in reg.all_versions()
                                 for r in v.replicas.values()))  # fmt: skip
            wait_for(lambda: reg.version("m", "v1").replicas[sa.url].running == 3)
            for i in range(5):  # v1: 5 streams of 4 tokens
                with c.stream("POST", "/v1/completions", headers={"x-lmfleet-version": "v1"},
                              json={"model": "m", "prompt": f"p{i}", "max_tokens": 4,
                                    "stream": True}) as r:  # fmt: skip
                    assert r.status_code == 200
                    r.read()
            for i in range(3):  # v2: 3 unary answers of 2 tokens
                r = c.post("/v1/completions", headers={"x-lmfleet-version": "v2"},
                           json={"model": "m", "prompt": f"q{i}", "max_tokens": 2})  # fmt: skip
                assert r.status_code == 200
            for i in range(2):  # v3: 2 failures (500, relayed)
                r = c.post("/v1/completions", headers={"x-lmfleet-version": "v3"},
                           json={"model": "m", "prompt": f"x{i}", "max_tokens": 2})  # fmt: skip
                assert r.status_code == 500
            state.version_stats.note_time_to_ready("m", "v1", 42.5)
            state.version_stats.note_wake("m", "v1", 1.75)
            clock.t = 1004.0  # every request was at t=1000: rates over 4 s

            # the TTFT/TPOT the proxy measured, as its A/B samples hold them
            ab = state.version_samples("m", "v1")
            ttft, tpot = p50_p90(ab.ttft), p50_p90(ab.tpot)
            assert len(ab.ttft) == 5 and len(ab.tpot) == 5

            got = scrape(c)
            expected = {
                ("lmfleet_gateway_version_arrival_rate", lbl("v1")): 5 / 4,
                ("lmfleet_gateway_version_arrival_rate", lbl("v2")): 3 / 4,
                ("lmfleet_gateway_version_arrival_rate", lbl("v3")): 2 / 4,
                ("lmfleet_gateway_version_output_tokens_per_second", lbl("v1")): 20 / 4,
                ("lmfleet_gateway_version_output_tokens_per_second", lbl("v2")): 6 / 4,
                ("lmfleet_gateway_version_output_tokens_per_second", lbl("v3")): 0.0,
                ("lmfleet_gateway_version_window_seconds", lbl("v1")): 4.0,
                ("lmfleet_gateway_version_window_seconds", lbl("v2")): 4.0,
                ("lmfleet_gateway_version_window_seconds", lbl("v3")): 4.0,
                # streamed only: v2's unary answers and v3's failures have none
                ("lmfleet_gateway_version_ttft_seconds", lbl("v1", quantile="0.5")): ttft[0],
                ("lmfleet_gateway_version_ttft_seconds", lbl("v1", quantile="0.9")): ttft[1],
                ("lmfleet_gateway_version_tpot_seconds", lbl("v1", quantile="0.5")): tpot[0],
                ("lmfleet_gateway_version_tpot_seconds", lbl("v1", quantile="0.9")): tpot[1],
                ("lmfleet_gateway_version_time_to_ready_seconds", lbl("v1")): 42.5,
                ("lmfleet_gateway_version_wake_seconds", lbl("v1")): 1.75,
            }
            by_state = {"v1": {"ready": 1, "asleep": 1, "unreachable": 1},
                        "v2": {"ready": 1}, "v3": {"ready": 1}}  # fmt: skip
            for v, counts in by_state.items():
                for s in REPLICA_STATES:
                    expected[("lmfleet_gateway_version_replicas", lbl(v, state=s))] = float(
                        counts.get(s, 0)
                    )
            for v in ("v1", "v2", "v3"):  # the registry's gauges, in the same family
                expected[("lmfleet_gateway_version_weight", lbl(v))] = 1.0
            assert got == expected
            queue = scrape(c, "lmfleet_gateway_queue_depth") | scrape(
                c, "lmfleet_gateway_inflight_requests"
            )
            assert queue == {(name, lbl(v)): 0.0 for v in ("v1", "v2", "v3") for name in
                             ("lmfleet_gateway_queue_depth", "lmfleet_gateway_inflight_requests")}  # fmt: skip

            snap = versions_snapshot(state)
            assert set(snap) == {"m"} and set(snap["m"]) == {"v1", "v2", "v3"}
            v1 = snap["m"]["v1"]
            assert {k: v1[k] for k in v1 if k != "window"} == {
                "weight": 1.0, "queue_depth": 0, "inflight": 0, "capacity": 256,
                # a (3 running) and the asleep one (2); the unreachable one is stale
                "replica_running": 5, "replica_waiting": 0,
                "replicas": {s: by_state["v1"].get(s, 0) for s in REPLICA_STATES},
            }  # fmt: skip
            assert v1["window"] == {
                "arrival_rate": 1.25, "output_tokens_per_s": 5.0,
                "ttft_p50_s": ttft[0], "ttft_p90_s": ttft[1],
                "tpot_p50_s": tpot[0], "tpot_p90_s": tpot[1],
                "requests": 5, "errors": 0, "window_s": 4.0,
                "time_to_ready_s": 42.5, "wake_s": 1.75,
                "time_to_ready_count": 1, "wake_count": 1,
            }  # fmt: skip
            v3 = snap["m"]["v3"]["window"]
            assert (v3["requests"], v3["errors"], v3["ttft_p50_s"]) == (2, 2, None)
            assert snap["m"]["v2"]["window"]["tpot_p90_s"] is None

            clock.t = 1000.0 + 61.0  # all out of the 60 s window
            got = scrape(c)
            assert got[("lmfleet_gateway_version_arrival_rate", lbl("v1"))] == 0.0
            assert got[("lmfleet_gateway_version_window_seconds", lbl("v1"))] == 60.0
            assert not any(name.endswith(("ttft_seconds", "tpot_seconds")) for name, _ in got)


def test_shadow_copies_count_on_the_shadow_version():
    a, b = FakeReplica("a"), FakeReplica("b")
    clock = Clock(1000.0)
    with running(a, b) as (sa, sb):
        doc = fleet({"v1": [sa.url], "v2": [sb.url]},
                    shadow={"version": "v2", "percent": 100})  # fmt: skip
        doc["models"][0]["versions"][1]["weight"] = 0
        with gateway_with_clock(doc, clock) as (c, state):
            wait_for(lambda: all(r.routable for v in state.registry.all_versions()
                                 for r in v.replicas.values()))  # fmt: skip
            for i in range(4):
                r = c.post("/v1/completions", json={"model": "m", "prompt": f"p{i}",
                                                    "max_tokens": 3})  # fmt: skip
                assert r.status_code == 200 and r.headers["x-lmfleet-version"] == "v1"
            stats = state.version_stats
            wait_for(lambda: stats.window("m", "v2").requests == 4)
            for v in ("v1", "v2"):
                w = stats.window("m", v)
                assert (w.arrival_rate, w.output_tokens_per_s, w.requests) == (4.0, 12.0, 4)
