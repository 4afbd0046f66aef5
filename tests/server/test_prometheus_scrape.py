"""A real Prometheus scrapes ``ReplicaMetrics.render()`` and answers PromQL on it.

Needs the ``prometheus`` binary on PATH (Debian/Ubuntu: ``apt-get install prometheus``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lmfleet.engine.request import FinishReason, RequestMetrics, RequestOutput
from lmfleet.engine.stats import EngineStats
from lmfleet.server.metrics import ReplicaMetrics

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="the prometheus binary is not on PATH; install it (apt-get install prometheus)",
    ),
]

DEADLINE_S = 30.0
GENERATION_TOKENS = 6789


class _FakeEngine:
    """Stats whose prompt-token counter grows on every scrape, so ``rate()`` is positive."""

    def __init__(self) -> None:
        self.scrapes = 0

    def stats(self) -> EngineStats:
        self.scrapes += 1
        return EngineStats(
            num_running=3,
            num_waiting=7,
            kv_usage=0.625,
            num_blocks=512,
            num_free_blocks=192,
            prefix_queries=4096,
            prefix_hits=1024,
            num_preemptions=2,
            steps=900,
            prompt_tokens_total=100 * self.scrapes,
            generation_tokens_total=GENERATION_TOKENS,
        )


def _bound_address(log: Path, proc: subprocess.Popen) -> str:
    """The ``host:port`` Prometheus listens on, from its own log line: it binds port 0
    and logs ``msg="Listening on" address=127.0.0.1:PORT``."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        found = re.search(r'msg="Listening on" address=(\S+)', log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited {proc.returncode}: {log.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"prometheus logged no listening address within {DEADLINE_S} s")


def _handler(render: Callable[[], tuple[bytes, str]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/metrics":
                self.send_error(404)
                return
            body, content_type = render()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output quiet

    return Handler


@pytest.fixture
def metrics() -> ReplicaMetrics:
    m = ReplicaMetrics("tiny-llama", "v3", device="cpu")
    m.set_engine_stats_source(_FakeEngine().stats)
    m.set_state("ready")
    m.record_rejected("queue_full")
    times = RequestMetrics(100.0, 100.25, 100.5, 102.5, 103.0)
    output = RequestOutput("r1", [1, 2, 3], "hi", [4, 5, 6, 7, 8], True)
    output.finish_reason, output.metrics = FinishReason.STOP, times
    m.record_finished(output, num_prompt_tokens=3, num_generation_tokens=5)
    return m


@pytest.fixture
def target(metrics: ReplicaMetrics) -> Iterator[str]:
    """``host:port`` of a stdlib HTTP server exposing ``/metrics``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(metrics.render))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def prometheus(target: str, tmp_path: Path) -> Iterator[str]:
    """Base URL of a real Prometheus scraping ``target`` every second."""
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: lmfleet\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            "--web.listen-address=127.0.0.1:0",
            "--log.level=info",  # the "Listening on" line with the bound port is info
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://{_bound_address(tmp_path / 'prometheus.log', proc)}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    if proc.returncode not in (0, -15):
        pytest.fail(
            f"prometheus exited {proc.returncode}: {(tmp_path / 'prometheus.log').read_text()}"
        )


def _query(base: str, promql: str) -> list[dict[str, object]]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            payload = json.load(response)
    except (urllib.error.URLError, ConnectionError):
        return []  # not listening yet
    assert payload["status"] == "success", payload
    return payload["data"]["result"]


def _wait_for_value(base: str, promql: str, accept: Callable[[float], bool]) -> float:
    """Poll until ``promql`` returns one series whose value ``accept`` likes."""
    deadline = time.monotonic() + DEADLINE_S
    last: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        last = _query(base, promql)
        if len(last) == 1:
            value = float(last[0]["value"][1])  # type: ignore[index]
            if accept(value):
                return value
        time.sleep(0.25)
    pytest.fail(f"{promql!r} never gave an accepted value within {DEADLINE_S} s: {last}")


def test_prometheus_scrapes_replica_metrics(prometheus: str) -> None:
    def equals(expected: float) -> Callable[[float], bool]:
        return lambda value: value == expected

    assert _wait_for_value(prometheus, 'up{job="lmfleet"}', equals(1.0)) == 1.0
    selector = '{job="lmfleet",model="tiny-llama",version="v3"}'
    assert _wait_for_value(
        prometheus, f"lmfleet_generation_tokens_total{selector}", equals(GENERATION_TOKENS)
    )
    assert _wait_for_value(prometheus, "lmfleet_num_requests_waiting", equals(7))
    assert _wait_for_value(prometheus, 'lmfleet_replica_state{state="ready"}', equals(1))
    assert _wait_for_value(
        prometheus, 'lmfleet_request_rejected_total{reason="queue_full"}', equals(1)
    )
    hit_rate = "lmfleet_prefix_cache_hits_total / lmfleet_prefix_cache_queries_total"
    assert _wait_for_value(prometheus, hit_rate, equals(0.25))
    # One TTFT of 0.5 s in the (0.3, 0.5] bucket: the median interpolates to 0.4 s.
    p50 = _wait_for_value(
        prometheus,
        "histogram_quantile(0.5, sum by (le) (lmfleet_time_to_first_token_seconds_bucket))",
        lambda value: value > 0,
    )
    assert p50 == pytest.approx(0.4)
    # The engine's prompt-token total grows on every scrape: rate() sees a real counter.
    rate = _wait_for_value(
        prometheus, "rate(lmfleet_prompt_tokens_total[10s])", lambda value: value > 0
    )
    assert rate > 0
