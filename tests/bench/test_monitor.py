from __future__ import annotations

import asyncio
import time

import pytest
from starlette.applications import Starlette

from lmfleet.bench.monitor import (
    Monitor,
    MonitorSample,
    MonitorSettings,
    merge,
    parse_prometheus,
    sample_from_prometheus,
    sample_from_state,
    with_extra_metric_names,
)
from lmfleet.errors import ConfigError
from tests.bench.servers import FakeOpenAI, ServerThread

PROM = """\
# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a",engine="0"} 3.0
vllm:num_requests_waiting{model_name="b",engine="0"} 4.0
vllm:num_requests_running{model_name="a, with spaces} in label"} 7 1700000000000
lmfleet_gateway_replicas{model="m",version="a",routable="true"} 2
lmfleet_gateway_replicas{model="m",version="a",routable="false"} 1
lmfleet_gateway_replicas{model="m",version="b",routable="true"} 1
garbage_line_without_value
bad_value{x="1"} notanumber
"""


def test_parse_prometheus_sums_samples() -> None:
    sums = parse_prometheus(PROM)
    assert sums["vllm:num_requests_waiting"] == 7.0
    assert sums["vllm:num_requests_running"] == 7.0
    assert sums["lmfleet_gateway_replicas"] == 4.0
    assert "bad_value" not in sums and "garbage_line_without_value" not in sums
    routable = 'lmfleet_gateway_replicas{routable="true"}'
    assert parse_prometheus(PROM, wanted={routable, "lmfleet_gateway_replicas"}) == {
        routable: 3.0,
        "lmfleet_gateway_replicas": 4.0,
    }
    names = with_extra_metric_names([])
    wanted = {n for v in names.values() for n in v}
    s = sample_from_prometheus(parse_prometheus(PROM, wanted), names, t=1.5)
    assert s == MonitorSample(1.5, waiting=7.0, running=7.0, replicas=3.0)
    assert sample_from_prometheus({"other": 1.0}, names, 0.0) is None


def test_extra_metric_names_come_first() -> None:
    names = with_extra_metric_names(["waiting=my_queue"])
    assert names["waiting"][0] == "my_queue"
    s = sample_from_prometheus({"my_queue": 9.0, "vllm:num_requests_waiting": 1.0}, names, 0.0)
    assert s is not None and s.waiting == 9.0
    with pytest.raises(ConfigError, match="monitor-metric"):
        with_extra_metric_names(["depth=x"])


def test_state_json() -> None:
    s = sample_from_state(
        {"running": 3, "waiting": 1, "replicas": [{}, {}], "kv_cache_usage": 0.5}, 2.0
    )
    assert s == MonitorSample(2.0, waiting=1.0, running=3.0, replicas=2.0, kv_cache_usage=0.5)
    assert sample_from_state({"state": "ready", "ready": True}, 0.0) is None
    gateway = {  # model -> version -> values, as lmfleet's gateway reports them
        "m": {
            "a": {
                "queue_depth": 4,
                "inflight": 6,
                "replicas": [{"routable": True}, {"routable": False}],
            },
            "b": {"queue_depth": 1, "inflight": 2, "replicas": [{"routable": True}]},
        }
    }
    assert sample_from_state(gateway, 0.0) == MonitorSample(
        0.0, waiting=5.0, running=8.0, replicas=2.0
    )
    assert sample_from_state([1, 2], 0.0) is None
    a = MonitorSample(1.0, waiting=1.0)
    b = MonitorSample(1.1, waiting=5.0, replicas=2.0)
    assert merge(a, b) == MonitorSample(1.0, waiting=1.0, replicas=2.0)
    assert merge(None, b) == b


def _poll(url: str, seconds: float) -> list[MonitorSample]:
    async def go() -> list[MonitorSample]:
        monitor = Monitor(MonitorSettings(url, interval_s=0.05))
        stop = asyncio.Event()
        task = asyncio.create_task(monitor.run(time.perf_counter(), stop))
        await asyncio.sleep(seconds)
        stop.set()
        await task
        return monitor.samples

    return asyncio.run(go())


def test_monitor_polls_state_and_metrics(fake: FakeOpenAI, fake_server: ServerThread) -> None:
    samples = _poll(fake_server.url, 0.4)
    assert len(samples) >= 2
    # /state gives running, waiting and replicas; /metrics could fill the gaps
    assert {(s.waiting, s.running, s.replicas) for s in samples} == {(0.0, 0.0, 3.0)}


def test_monitor_skips_a_target_without_gauges() -> None:
    with ServerThread(Starlette()) as server:
        assert _poll(server.url, 0.2) == []
