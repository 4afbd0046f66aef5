from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench.servers import FakeOpenAI, ServerThread

#: step = fixed + prefill × prefill tokens + decode × decoding sequences (no KV term)
FIXED_S = 0.02
PREFILL_TOKEN_S = 0.0002
DECODE_SEQ_S = 0.005


@pytest.fixture
def sim_profile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A simulated model whose step time is known exactly; returns its model name."""
    import lmfleet.engine.sim

    profiles = lmfleet.engine.sim.PROFILES
    monkeypatch.setenv("LMFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(
        profiles,
        "bench-test",
        dataclasses.replace(
            profiles["llama-8b-h100"],
            name="bench-test",
            fixed_s=FIXED_S,
            prefill_token_s=PREFILL_TOKEN_S,
            decode_seq_s=DECODE_SEQ_S,
            kv_token_s=0.0,
            load_s=0.05,
            sleep_s=0.01,
            wake_s=0.01,
            vocab_size=32000,
            kv_capacity_tokens=200_000,
            max_model_len=4096,
        ),
    )
    return "sim:bench-test"


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
def fake_server(fake: FakeOpenAI) -> Iterator[ServerThread]:
    with ServerThread(fake.app()) as server:
        yield server
