"""The parts of ``benchmarks/gpu/gpu_bench.py`` that decide what its one device run
reports: phases skipped or failed without stopping the run, the ratio fields, and a
decode profile that really decodes the batch it names (on CPU, torch backend)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location(
        "gpu_bench", ROOT / "benchmarks" / "gpu" / "gpu_bench.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_phase_results_errors_and_skips_are_recorded(gpu_bench, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    run = gpu_bench.Run(out, budget_s=10_000)
    assert run.phase("ok", lambda cap: {"cap_seen": cap}, cap_s=30) == {
        "cap_s": 30,
        "cap_seen": 30,
        "seconds": pytest.approx(0, abs=1),
    }

    def boom(cap: float) -> dict:
        raise RuntimeError("kernel fault")

    failed = run.phase("boom", boom, cap_s=30)
    assert failed["error"] == "RuntimeError: kernel fault"
    assert "raise RuntimeError" in failed["traceback"]
    # less budget than the phase needs to measure anything: not started
    called = []
    skipped = run.phase("late", lambda cap: called.append(cap) or {}, cap_s=30, min_s=45)
    assert called == [] and skipped == {"cap_s": 30, "skipped": "only 30s of the run's budget left"}
    # the document on disk has every phase, rewritten after each
    assert list(json.loads(out.read_text())["phases"]) == ["ok", "boom", "late"]


def test_ratios(gpu_bench) -> None:
    assert gpu_bench._ratio(20_000.0, 800.0) == 25.0
    assert gpu_bench._ratio(None, 800.0) is None
    assert gpu_bench._ratio(20_000.0, None) is None
    assert gpu_bench._ratio(20_000.0, 0) is None


def test_decode_profile_decodes_the_whole_batch(gpu_bench, tiny_model_dir: Path) -> None:
    """Prompts that take several chunked-prefill steps: the first sequences decode
    beside the later prefills and must still be running when the profile starts."""
    llm = gpu_bench.make_llm(
        str(tiny_model_dir),
        "cpu",
        "float32",
        backend="torch",
        enforce_eager=True,
        max_num_batched_tokens=256,
        kv_cache_memory_bytes=64 << 20,
    )
    rec = gpu_bench._profile_decode(llm, batch=8, prompt_len=256, steps=3)
    assert (rec["batch"], rec["running"], rec["steps"]) == (8, 8, 3)
    assert rec["cpu_us_per_step"] > 0 and rec["top"]
    assert not llm.core.has_unfinished()
