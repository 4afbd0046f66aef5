"""The offline engine end to end on a tiny random model: batching, chunking, prefix
caching and preemption must not change greedy tokens."""

from __future__ import annotations

import pytest

from lmfleet.engine.llm import LLM
from lmfleet.engine.request import FinishReason, SamplingParams
from lmfleet.errors import InvalidSamplingParams, PromptTooLong, RequestRejected

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def prompts(n: int, base: int = 3) -> list[list[int]]:
    # token-id prompts of mixed lengths, all inside the tiny vocabulary
    return [[(base + 13 * i + 7 * j) % 500 + 10 for j in range(5 + 9 * i)] for i in range(n)]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), progress=False)


def tokens(outs):
    return [o.token_ids for o in outs]


def test_alone_equals_batched(llm):
    ps = prompts(5)
    batched = tokens(llm.generate(ps, GREEDY))
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in ps]
    assert batched == alone
    assert all(len(t) == 12 for t in batched)


def test_chunked_prefill_equals_whole(tiny_model_dir, llm):
    ps = prompts(4, base=5)
    whole = tokens(llm.generate(ps, GREEDY))
    chunked = LLM(
        str(tiny_model_dir), progress=False, max_num_batched_tokens=8, enable_prefix_caching=False
    )
    assert tokens(chunked.generate(ps, GREEDY)) == whole
    # 74 prompt tokens at 8 per step, then 11 more decode steps
    assert chunked.core.steps >= 74 // 8 + 11


def test_prefix_hit_equals_no_cache(tiny_model_dir):
    shared = list(range(20, 60))  # 40 tokens = 2.5 blocks of 16
    ps = [[*shared, 100 + i, 101 + i, 102 + i] for i in range(3)]
    cached = LLM(str(tiny_model_dir), progress=False)
    first = cached.generate(ps[:1], GREEDY)
    rest = cached.generate(ps[1:], GREEDY)
    assert [o.num_cached_tokens for o in rest] == [32, 32]
    fresh = LLM(str(tiny_model_dir), progress=False, enable_prefix_caching=False)
    assert tokens(fresh.generate(ps, GREEDY)) == tokens(first) + tokens(rest)
    stats = cached.core.stats()
    assert stats.prefix_hits == 64


def test_preemption_equals_roomy_cache(tiny_model_dir, llm):
    ps = prompts(6, base=11)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    roomy = tokens(llm.generate(ps, params))
    tight = LLM(str(tiny_model_dir), progress=False, num_blocks_override=10, block_size=16)
    assert tokens(tight.generate(ps, params)) == roomy
    assert tight.core.stats().num_preemptions > 0
    assert tight.core.kv.num_free_blocks == 10


def test_seeded_sampling_independent_of_batch(llm):
    p = prompts(1, base=17)[0]
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate([p], seeded)[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=7, ignore_eos=True)
    mixed = llm.generate([*prompts(3), p], [others, others, GREEDY, seeded])
    assert mixed[3].token_ids == alone
    other_seed = llm.generate(
        [p], SamplingParams(temperature=1.0, seed=99, max_tokens=10, ignore_eos=True)
    )
    assert other_seed[0].token_ids != alone


def mid_stop_string(text: str) -> str:
    """A stop string cut from the second half of ``text``: the first two characters
    there that are printable, not blank, not U+FFFD (a partial UTF-8 sequence) and not
    seen earlier, so the stop falls mid-way through the greedy text. Random weights
    write odd text; the prompts below are chosen so one exists, and a change to the
    model's output fails here loudly instead of skipping."""
    for i in range(len(text) // 2, len(text) - 1):
        cand = text[i : i + 2]
        if cand.isprintable() and cand.strip() and "\ufffd" not in cand and text.index(cand) == i:
            return cand
    raise AssertionError(f"no usable stop string in the greedy text {text!r}")


def test_text_prompt_stop_string_and_logprobs(llm):
    full = llm.generate(
        "Hello fleet", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    )[0]
    assert full.finish_reason is FinishReason.LENGTH and len(full.token_ids) == 24
    assert full.text == llm.tokenizer.decode(full.token_ids)
    stop = mid_stop_string(full.text)
    cut = llm.generate(
        "Hello fleet", SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True)
    )[0]
    assert cut.finish_reason is FinishReason.STOP and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)] and cut.text
    assert len(cut.token_ids) < len(full.token_ids)
    lp = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3, logprobs=2))[0]
    assert len(lp.logprobs) == len(lp.token_ids)
    for tok, entry in zip(lp.token_ids, lp.logprobs, strict=True):
        assert entry.sampled.token_id == tok and entry.sampled.rank == 1
        assert len(entry.top) == 2 and entry.top[0].logprob >= entry.top[1].logprob


def test_bad_requests_raise_and_engine_keeps_serving(llm):
    max_len = llm.core.max_model_len
    with pytest.raises(PromptTooLong, match="maximum context length"):
        llm.generate([[1] * max_len], GREEDY)
    with pytest.raises(InvalidSamplingParams, match="max_tokens"):
        llm.generate([[1] * 10], SamplingParams(max_tokens=max_len))
    with pytest.raises(InvalidSamplingParams) as info:
        SamplingParams(top_p=0)
    assert info.value.param == "top_p"
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        llm.generate([[10**9]], GREEDY)
    # a failing request in a batch leaves nothing behind
    with pytest.raises(PromptTooLong):
        llm.generate([[5, 6, 7], [1] * max_len], GREEDY)
    assert not llm.core.has_unfinished()
    assert llm.core.kv.num_free_blocks == llm.core.kv.num_blocks
    assert len(llm.generate([[5, 6, 7]], GREEDY)[0].token_ids) == 12


def test_eos_stops_unless_ignored(llm):
    eos = next(iter(llm.eos_token_ids))
    out = llm.generate(
        [[5, 6, 7]],
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[], ignore_eos=False),
    )[0]
    assert eos not in out.token_ids[:-1]


def test_chat_uses_template(llm):
    out = llm.chat(
        [{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4)
    )[0]
    assert out.prompt_token_ids == llm.tokenizer.encode_chat([{"role": "user", "content": "hi"}])


def test_int8_quantized_engine_generates(tiny_model_dir):
    quant = LLM(str(tiny_model_dir), progress=False, quantization="int8")
    out = quant.generate(prompts(2), GREEDY)
    assert [len(o.token_ids) for o in out] == [12, 12]
    layer = quant.core.runner.model.model.layers[0]
    # the runner fuses q/k/v and gate/up first, then quantizes the fused layers
    assert type(layer.self_attn.qkv_proj).__name__ == "Int8WeightOnlyLinear"
    assert type(layer.mlp.gate_up_proj).__name__ == "Int8WeightOnlyLinear"


def test_engine_settings_are_validated(tiny_model_dir):
    from lmfleet.errors import ConfigError

    with pytest.raises(ConfigError, match="quantization"):
        LLM(str(tiny_model_dir), progress=False, quantization="int4")
    with pytest.raises(ConfigError, match="attention_backend"):
        LLM(str(tiny_model_dir), progress=False, attention_backend="flash")
