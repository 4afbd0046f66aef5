"""Unit tests of the replica's Prometheus metrics, read back through the text parser."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from lmfleet.engine.request import FinishReason, RequestMetrics, RequestOutput
from lmfleet.engine.stats import EngineStats
from lmfleet.server.metrics import REPLICA_STATES, ReplicaMetrics

MODEL, VERSION = "tiny-llama", "v3"
LABELS = {"model": MODEL, "version": VERSION}


def _samples(metrics: ReplicaMetrics) -> list[Sample]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]


def _value(metrics: ReplicaMetrics, name: str, **labels: str) -> float:
    """The one sample called ``name`` whose labels include ``labels`` (plus model/version)."""
    want = {**LABELS, **labels}
    found = [
        s.value for s in _samples(metrics) if s.name == name and want.items() <= s.labels.items()
    ]
    assert len(found) == 1, f"{name}{want}: {found}"
    return found[0]


def _output(
    metrics: RequestMetrics | None, reason: FinishReason | None = FinishReason.STOP
) -> RequestOutput:
    return RequestOutput(
        request_id="r1",
        prompt_token_ids=[1, 2, 3],
        text="hello",
        token_ids=[4, 5, 6, 7, 8],
        finished=True,
        finish_reason=reason,
        metrics=metrics,
    )


# Exactly representable timestamps: queue 0.25 s, TTFT 0.5 s, decode 2 s, e2e 3 s.
TIMES = RequestMetrics(
    arrival_time=100.0,
    first_scheduled_time=100.25,
    first_token_time=100.5,
    last_token_time=102.5,
    finished_time=103.0,
)

STATS = EngineStats(
    num_running=3,
    num_waiting=7,
    kv_usage=0.625,
    num_blocks=512,
    num_free_blocks=192,
    prefix_queries=4096,
    prefix_hits=1024,
    num_preemptions=2,
    steps=900,
    prompt_tokens_total=12345,
    generation_tokens_total=6789,
)


@pytest.fixture
def metrics() -> ReplicaMetrics:
    return ReplicaMetrics(MODEL, VERSION)


def test_each_instance_has_its_own_registry() -> None:
    a, b = ReplicaMetrics("a", "1"), ReplicaMetrics("b", "1")
    assert a.registry is not b.registry
    shared = CollectorRegistry()
    assert ReplicaMetrics("c", "1", shared).registry is shared


def test_every_sample_carries_model_and_version(metrics: ReplicaMetrics) -> None:
    metrics.set_engine_stats_source(lambda: STATS)
    metrics.record_finished(_output(TIMES), 3, 5)
    metrics.record_rejected("queue_full")
    metrics.observe_token_gap(0.01)
    samples = _samples(metrics)
    assert len(samples) > 50
    for s in samples:
        assert s.name.startswith("lmfleet_"), s.name
        assert LABELS.items() <= s.labels.items(), s
    assert not [s for s in samples if s.name.endswith("_created")]


def test_latency_histograms_from_request_timestamps(metrics: ReplicaMetrics) -> None:
    metrics.record_finished(_output(TIMES), num_prompt_tokens=3, num_generation_tokens=5)
    expected = {
        "lmfleet_request_queue_time_seconds": 0.25,
        "lmfleet_time_to_first_token_seconds": 0.5,
        "lmfleet_time_per_output_token_seconds": 0.5,  # 2 s over 4 gaps
        "lmfleet_e2e_request_latency_seconds": 3.0,
        "lmfleet_request_prompt_tokens": 3.0,
        "lmfleet_request_generation_tokens": 5.0,
    }
    for name, value in expected.items():
        assert _value(metrics, f"{name}_count") == 1, name
        assert _value(metrics, f"{name}_sum") == value, name
    ttft = "lmfleet_time_to_first_token_seconds_bucket"
    assert _value(metrics, ttft, le="0.3") == 0
    assert _value(metrics, ttft, le="0.5") == 1  # upper bounds are inclusive
    assert _value(metrics, ttft, le="+Inf") == 1
    assert _value(metrics, "lmfleet_request_generation_tokens_bucket", le="4.0") == 0
    assert _value(metrics, "lmfleet_request_generation_tokens_bucket", le="8.0") == 1


def test_histograms_accumulate(metrics: ReplicaMetrics) -> None:
    metrics.record_finished(_output(TIMES), 3, 5)
    later = RequestMetrics(200.0, 201.0, 202.0, 202.0, 202.0)
    metrics.record_finished(_output(later, FinishReason.LENGTH), 10, 1)
    assert _value(metrics, "lmfleet_time_to_first_token_seconds_count") == 2
    assert _value(metrics, "lmfleet_time_to_first_token_seconds_sum") == 2.5
    assert _value(metrics, "lmfleet_request_queue_time_seconds_sum") == 1.25
    # A one-token request has no time per output token.
    assert _value(metrics, "lmfleet_time_per_output_token_seconds_count") == 1
    assert _value(metrics, "lmfleet_request_prompt_tokens_sum") == 13


def test_missing_timestamps_skip_only_their_latencies(metrics: ReplicaMetrics) -> None:
    aborted = RequestMetrics(arrival_time=10.0, finished_time=14.0)  # never scheduled
    metrics.record_finished(_output(aborted, FinishReason.ABORT), 3, 0)
    assert _value(metrics, "lmfleet_e2e_request_latency_seconds_sum") == 4.0
    assert _value(metrics, "lmfleet_time_to_first_token_seconds_count") == 0
    assert _value(metrics, "lmfleet_request_queue_time_seconds_count") == 0
    assert _value(metrics, "lmfleet_time_per_output_token_seconds_count") == 0
    assert _value(metrics, "lmfleet_request_success_total", finished_reason="abort") == 1


def test_e2e_falls_back_to_last_token_and_no_metrics_is_fine(metrics: ReplicaMetrics) -> None:
    metrics.record_finished(_output(RequestMetrics(1.0, 1.0, 1.5, 2.0, None)), 3, 2)
    metrics.record_finished(_output(None), 3, 2)
    assert _value(metrics, "lmfleet_e2e_request_latency_seconds_count") == 1
    assert _value(metrics, "lmfleet_e2e_request_latency_seconds_sum") == 1.0
    assert _value(metrics, "lmfleet_request_success_total", finished_reason="stop") == 2
    assert _value(metrics, "lmfleet_request_generation_tokens_count") == 2


def test_success_counter_by_finish_reason(metrics: ReplicaMetrics) -> None:
    for reason in (FinishReason.STOP, FinishReason.STOP, FinishReason.LENGTH, None):
        metrics.record_finished(_output(TIMES, reason), 3, 5)
    success = "lmfleet_request_success_total"
    assert _value(metrics, success, finished_reason="stop") == 2
    assert _value(metrics, success, finished_reason="length") == 1
    assert _value(metrics, success, finished_reason="abort") == 0  # present before use
    assert _value(metrics, success, finished_reason="unknown") == 1


def test_inter_token_latency(metrics: ReplicaMetrics) -> None:
    for gap in (0.01, 0.02, 0.25):
        metrics.observe_token_gap(gap)
    metrics.observe_token_gap(-1.0)  # a clock glitch is dropped
    itl = "lmfleet_inter_token_latency_seconds"
    assert _value(metrics, f"{itl}_count") == 3
    assert _value(metrics, f"{itl}_sum") == pytest.approx(0.28)
    assert _value(metrics, f"{itl}_bucket", le="0.02") == 2


def test_engine_counters_and_gauges_read_at_scrape_time(metrics: ReplicaMetrics) -> None:
    current = {"stats": STATS}
    metrics.set_engine_stats_source(lambda: current["stats"])
    assert _value(metrics, "lmfleet_num_requests_running") == 3
    assert _value(metrics, "lmfleet_num_requests_waiting") == 7
    assert _value(metrics, "lmfleet_kv_cache_usage_ratio") == 0.625
    assert _value(metrics, "lmfleet_kv_blocks_total") == 512
    assert _value(metrics, "lmfleet_kv_blocks_free") == 192
    assert _value(metrics, "lmfleet_prompt_tokens_total") == 12345
    assert _value(metrics, "lmfleet_generation_tokens_total") == 6789
    assert _value(metrics, "lmfleet_num_preemptions_total") == 2
    assert _value(metrics, "lmfleet_prefix_cache_queries_total") == 4096
    assert _value(metrics, "lmfleet_prefix_cache_hits_total") == 1024
    assert _value(metrics, "lmfleet_engine_steps_total") == 900
    current["stats"] = EngineStats(0, 0, 0.0, 512, 512, 5000, 1500, 2, 950, 13000, 7000)
    assert _value(metrics, "lmfleet_generation_tokens_total") == 7000
    assert _value(metrics, "lmfleet_num_requests_running") == 0


def test_engine_counters_have_counter_type(metrics: ReplicaMetrics) -> None:
    metrics.set_engine_stats_source(lambda: STATS)
    families = {
        f.name: f.type for f in text_string_to_metric_families(metrics.render()[0].decode())
    }
    for name in ("prompt_tokens", "generation_tokens", "prefix_cache_hits", "num_preemptions"):
        assert families[f"lmfleet_{name}"] == "counter"
    assert families["lmfleet_num_requests_waiting"] == "gauge"


def test_no_engine_yet_hides_engine_series(metrics: ReplicaMetrics) -> None:
    metrics.set_engine_stats_source(lambda: None)
    names = {s.name for s in _samples(metrics)}
    assert "lmfleet_num_requests_running" not in names
    assert "lmfleet_generation_tokens_total" not in names
    assert "lmfleet_replica_state" in names


def test_state_gauge_is_one_hot(metrics: ReplicaMetrics) -> None:
    def states() -> dict[str, float]:
        return {s: _value(metrics, "lmfleet_replica_state", state=s) for s in REPLICA_STATES}

    assert states() == {s: float(s == "starting") for s in REPLICA_STATES}
    for state in ("ready", "draining", "asleep", "ready", "stopped"):
        metrics.set_state(state)
        assert states() == {s: float(s == state) for s in REPLICA_STATES}
    with pytest.raises(ValueError, match="unknown replica state"):
        metrics.set_state("sleeping")


def test_rejected_by_reason(metrics: ReplicaMetrics) -> None:
    for reason in ("queue_full", "queue_full", "draining", "invalid", "queue_full"):
        metrics.record_rejected(reason)
    rejected = "lmfleet_request_rejected_total"
    assert _value(metrics, rejected, reason="queue_full") == 3
    assert _value(metrics, rejected, reason="draining") == 1
    assert _value(metrics, rejected, reason="invalid") == 1


def test_load_sleep_and_wake(metrics: ReplicaMetrics) -> None:
    assert _value(metrics, "lmfleet_model_load_seconds") == 0
    metrics.record_load(2.0, 3_000_000_000)
    assert _value(metrics, "lmfleet_model_load_seconds") == 2.0
    assert _value(metrics, "lmfleet_model_load_bytes") == 3e9
    assert _value(metrics, "lmfleet_model_load_bytes_per_second") == 1.5e9
    metrics.record_sleep(0.75)
    metrics.record_wake(1.25)
    metrics.record_sleep(0.5)
    assert _value(metrics, "lmfleet_sleep_seconds") == 0.5  # the last one
    assert _value(metrics, "lmfleet_wake_seconds") == 1.25
    assert _value(metrics, "lmfleet_sleeps_total") == 2
    assert _value(metrics, "lmfleet_wakes_total") == 1
    metrics.record_load(0.0, 10)  # no division by zero
    assert _value(metrics, "lmfleet_model_load_bytes_per_second") == 0


def test_memory_gauges_on_cpu() -> None:
    metrics = ReplicaMetrics(MODEL, VERSION, device="cpu")
    used = _value(metrics, "lmfleet_accelerator_memory_used_bytes", device="cpu")
    total = _value(metrics, "lmfleet_accelerator_memory_total_bytes", device="cpu")
    assert 0 < used < total


def test_memory_gauges_by_default(metrics: ReplicaMetrics) -> None:
    used = [s for s in _samples(metrics) if s.name == "lmfleet_accelerator_memory_used_bytes"]
    assert len(used) == 1
    assert used[0].value > 0
    assert used[0].labels["device"] == "cpu" or used[0].labels["device"].startswith("cuda:")


@pytest.mark.gpu
def test_memory_gauges_on_cuda() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # 64 MiB
    metrics = ReplicaMetrics(MODEL, VERSION)  # auto: CUDA is initialised now
    used = _value(metrics, "lmfleet_accelerator_memory_used_bytes", device="cuda:0")
    total = _value(metrics, "lmfleet_accelerator_memory_total_bytes", device="cuda:0")
    assert block.numel() <= used < total
    explicit = ReplicaMetrics(MODEL, VERSION, device="cuda:0")
    assert _value(explicit, "lmfleet_accelerator_memory_used_bytes", device="cuda:0") >= used
    del block
