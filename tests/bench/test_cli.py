from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmfleet.cli import build_parser, main
from tests.bench.servers import FakeOpenAI, ServerThread


def test_every_flag_has_help() -> None:
    parser = build_parser()
    bench = parser._subparsers._group_actions[0].choices["bench"]  # type: ignore[union-attr]
    for mode in ("serve", "offline"):
        sub = bench._subparsers._group_actions[0].choices[mode]
        for action in sub._actions:
            assert action.help, f"bench {mode} {action.option_strings} has no help"


def test_bench_serve_writes_table_json_and_plots(
    fake: FakeOpenAI, fake_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.ttft_s, fake.gap_s = 0.01, 0.002
    out = tmp_path / "res"
    rc = main(
        [
            "bench", "serve", "--base-url", fake_server.url, "--num-prompts", "30",
            "--random-input-len", "8", "--random-output-len", "6", "--request-rate", "200",
            "--burstiness", "0.5", "--goodput", "ttft:1000", "tpot:1000",
            "--result-dir", str(out), "--no-progress", "--save-detailed",
            "--monitor-interval", "0.05", "--label", "cli-test",
        ]
    )  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out
    assert "Serving Benchmark Result" in table and "Goodput (req/s)" in table
    assert "P99 TTFT (ms)" in table and "fake-model" in table
    doc = json.loads((out / "result.json").read_text())
    assert doc["kind"] == "serve" and doc["label"] == "cli-test"
    assert doc["summary"]["completed"] == 30 and doc["summary"]["good_requests"] == 30
    assert doc["summary"]["slos_ms"] == {"ttft": 1000.0, "tpot": 1000.0}
    assert doc["summary"]["ttft_ms"]["p99"] > 0
    assert doc["config"]["model"] == "fake-model" and "api_key" not in doc["config"]
    assert len(doc["requests"]) == 30 and doc["requests"][0]["output_tokens"] == 6
    assert doc["monitor"] and doc["monitor"][0]["replicas"] == 3
    tl, duration = doc["timeline"], doc["summary"]["duration_s"]
    widths = [min(tl["bin_s"], duration - t) for t in tl["t"]]
    assert sum(r * w for r, w in zip(tl["completed_per_s"], widths, strict=True)) == pytest.approx(
        30
    )
    for png in ("latency_cdf.png", "throughput.png", "queue.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_bench_serve_ramp_and_trace(
    fake: FakeOpenAI, fake_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.ttft_s = fake.gap_s = 0.001
    common = ["--base-url", fake_server.url, "--no-progress", "--no-save", "--no-monitor"]
    rc = main(
        ["bench", "serve", *common, "--num-prompts", "20", "--random-input-len", "4",
         "--random-output-len", "2", "--ramp-up-strategy", "linear",
         "--ramp-up-start-rps", "50", "--ramp-up-end-rps", "200", "--endpoint-type", "chat"]
    )  # fmt: skip
    assert rc == 0 and "Successful requests:" in capsys.readouterr().out
    trace = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 100 + i * 0.02, "prompt_tokens": 3, "output_tokens": 2} for i in range(5)]
    rows.append({"timestamp": 100.1, "prompt_tokens": 3, "output_tokens": 2, "session_id": "x"})
    rows.append({"timestamp": 100.12, "prompt_tokens": 3, "output_tokens": 2, "session_id": "x"})
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["bench", "serve", *common, "--dataset-name", "trace", "--dataset-path", str(trace)])
    assert rc == 0
    assert "Successful requests:                             7" in capsys.readouterr().out
    assert fake.prompts[-1].startswith(fake.prompts[-2] + " w0 w1")  # the session's history


def test_bench_serve_reports_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "serve", "--goodput", "latency:5", "--no-save"]) == 2
    assert "goodput" in capsys.readouterr().err
    assert main(["bench", "serve", "--dataset-name", "file", "--no-save"]) == 2
    assert "dataset-path" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_offline(
    sim_profile: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """All prompts at once: one prefill step for the batch, then decode steps of
    the whole batch; the second turn of each session hits the prefix cache."""
    out = tmp_path / "off"
    rc = main(
        ["bench", "offline", "--model", sim_profile, "--num-prompts", "8", "--num-turns", "2",
         "--random-input-len", "32", "--random-output-len", "8", "--random-prefix-len", "16",
         "--result-dir", str(out), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out
    assert "Offline Benchmark Result" in table and "Inter-token" not in table
    doc = json.loads((out / "result.json").read_text())
    s = doc["summary"]
    assert s["completed"] == 8 and s["total_output_tokens"] == 64
    # turn 0: 4 prompts of 48 tokens in one step; later decode steps of 4 sequences
    from tests.bench.conftest import DECODE_SEQ_S, FIXED_S, PREFILL_TOKEN_S

    decode4 = FIXED_S + 4 * DECODE_SEQ_S
    assert s["tpot_ms"]["median"] == pytest.approx(decode4 * 1000, rel=0.15)
    assert s["ttft_ms"]["min"] >= (FIXED_S + PREFILL_TOKEN_S * 4 * 16) * 1000 * 0.9
    assert doc["cached_tokens"] >= 4 * (16 + 32)  # turn 1 reuses prefix + turn 0's prompt
    assert (out / "latency_cdf.png").exists()
