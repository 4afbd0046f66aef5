from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmfleet.bench.workloads import (
    SIM_FIRST_WORD_ID,
    SIM_NUM_WORDS,
    TokenizerRenderer,
    WordRenderer,
    WorkloadSpec,
    chat_messages,
    completion_prompt,
    file_workload,
    random_workload,
    session_token_ids,
    trace_workload,
)
from lmfleet.errors import ConfigError


def test_random_lengths_prefix_and_ids() -> None:
    spec = WorkloadSpec(
        num_prompts=500, input_len=100, output_len=20, range_ratio=0.5, prefix_len=7, seed=1
    )
    wl = random_workload(spec)
    assert len(wl.requests) == 500 and len(wl.prefix_ids) == 7 and not wl.has_sessions
    ins = [r.input_len for r in wl.requests]
    outs = [r.output_len for r in wl.requests]
    assert min(ins) >= 50 and max(ins) <= 150 and min(ins) < 60 and max(ins) > 140
    assert min(outs) >= 10 and max(outs) <= 30
    ids = [i for r in wl.requests for i in r.token_ids]
    assert min(ids) >= SIM_FIRST_WORD_ID and max(ids) < SIM_FIRST_WORD_ID + SIM_NUM_WORDS
    assert random_workload(spec) == wl  # seeded
    fixed = random_workload(WorkloadSpec(num_prompts=3, input_len=8, output_len=4))
    assert [(r.input_len, r.output_len) for r in fixed.requests] == [(8, 4)] * 3


def test_sessions_are_turn_major() -> None:
    wl = random_workload(WorkloadSpec(num_prompts=7, input_len=4, output_len=2, num_turns=3))
    assert wl.has_sessions and wl.name == "sessions"
    order = [(r.session_id, r.turn) for r in wl.requests]
    assert order == [("s0", 0), ("s1", 0), ("s2", 0), ("s0", 1), ("s1", 1), ("s2", 1), ("s0", 2)]
    assert [r.index for r in wl.requests] == list(range(7))


def test_session_prompts_carry_the_history() -> None:
    history = [("hello there", " hi you"), ("more", " sure")]
    assert completion_prompt("sys", history, "last") == "sys hello there hi you more sure last"
    assert completion_prompt("", [], " just this ") == "just this"
    msgs = chat_messages("sys", history[:1], "next")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"] == " hi you" and msgs[3]["content"] == "next"
    assert chat_messages("", [], "x") == [{"role": "user", "content": "x"}]
    assert session_token_ids([1], [([2, 3], [4]), ([5], [6, 7])], [8]) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_words_are_one_token_each_on_the_sim(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tokenizers import Tokenizer

    from lmfleet.engine.sim.tokenizer import write_sim_tokenizer

    tok = Tokenizer.from_file(str(write_sim_tokenizer(tmp_path, 32000) / "tokenizer.json"))
    ids = list(
        random_workload(WorkloadSpec(num_prompts=1, input_len=300, output_len=1))
        .requests[0]
        .token_ids
    )
    text = WordRenderer.sim().render(ids)
    assert tok.encode(text).ids == ids
    # ... and the tokenizer renderer finds the same ordinary range
    r = TokenizerRenderer(tmp_path)
    assert (r.id_low, r.id_high) == (SIM_FIRST_WORD_ID, 32000)
    assert tok.encode(r.render(ids[:5])).ids == ids[:5]


def test_file_workload(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    wl = file_workload(txt, num_prompts=3, output_len=9)
    assert [r.text for r in wl.requests] == ["first prompt", "second prompt", "first prompt"]
    assert {r.output_len for r in wl.requests} == {9}
    jl = tmp_path / "p.jsonl"
    jl.write_text(
        json.dumps("plain") + "\n" + json.dumps({"prompt": "obj", "output_tokens": 3}) + "\n"
    )
    wl = file_workload(jl, num_prompts=2, output_len=9)
    assert [(r.text, r.output_len) for r in wl.requests] == [("plain", 9), ("obj", 3)]
    jl.write_text('{"text": 1}\n')
    with pytest.raises(ConfigError, match=r"p.jsonl:1"):
        file_workload(jl, 1, 1)
    with pytest.raises(ConfigError, match="cannot read"):
        file_workload(tmp_path / "missing.txt", 1, 1)


def test_trace_workload(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text(
        "timestamp,prompt_tokens,output_tokens,session_id\n10.0,5,3,a\n10.5,6,4,\n11.0,2,2,a\n"
    )
    wl = trace_workload(csv, WorkloadSpec(num_prompts=1), time_scale=0.5)
    assert wl.timestamps == [0.0, 1.0, 2.0]
    assert [(r.input_len, r.output_len, r.session_id, r.turn) for r in wl.requests] == [
        (5, 3, "a", 0),
        (6, 4, None, 0),
        (2, 2, "a", 1),
    ]
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"timestamp": 1, "input_tokens": 3, "output_tokens": 1}\n{"timestamp": 2}\n')
    with pytest.raises(ConfigError, match=r"t.jsonl:2: missing 'prompt_tokens'"):
        trace_workload(jl, WorkloadSpec(num_prompts=1))
    assert len(trace_workload(jl, WorkloadSpec(num_prompts=1), num_prompts=1).requests) == 1


def test_bad_specs() -> None:
    with pytest.raises(ConfigError, match="num-prompts"):
        WorkloadSpec(num_prompts=0)
    with pytest.raises(ConfigError, match="range-ratio"):
        WorkloadSpec(num_prompts=1, range_ratio=1.0)
    with pytest.raises(ConfigError, match="num-turns"):
        WorkloadSpec(num_prompts=1, num_turns=0)
