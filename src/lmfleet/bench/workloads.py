"""What to send: the requests of a benchmark run, as token ids or text.

Workloads are built as token ids so ``bench offline`` can feed the engine directly;
a ``Renderer`` turns ids into text for HTTP targets. The default renderer uses the
simulator's word vocabulary, where one word is one token, so a ``sim:`` target sees
exactly the lengths asked for; ``--tokenizer`` decodes with a real model's tokenizer.

- random: prompt and output lengths uniform in ``len × [1 − r, 1 + r]``.
- shared prefix: the same ``prefix_len`` tokens (a system prompt) start every prompt.
- sessions: multi-turn chats; each turn's prompt is the prefix, the history of the
  session (earlier user messages and the answers the target gave) and a new message.
  Requests are ordered turn by turn across sessions, and a turn is not sent before
  the previous turn of its session has finished.
- file: prompts from a ``.txt`` (one per line) or ``.jsonl`` file (a string, or an
  object with ``prompt`` and optionally ``output_tokens``).
- trace: a ``.jsonl`` or ``.csv`` file of ``timestamp`` (seconds), ``prompt_tokens``,
  ``output_tokens`` and optionally ``session_id``; in a session, ``prompt_tokens``
  counts the new message only, the history comes on top.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lmfleet.errors import ConfigError

#: the simulator's first ordinary word id (ids below are special tokens)
SIM_FIRST_WORD_ID = 5
#: words every simulated profile knows (the smallest sim vocabulary is 32000)
SIM_NUM_WORDS = 32000 - SIM_FIRST_WORD_ID


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request of the workload. ``token_ids`` (or ``text``, for prompts read
    from a file) is the new part: the whole prompt for a single-turn request, the new
    user message for a turn of a session. The shared prefix is not included."""

    index: int
    token_ids: tuple[int, ...]
    output_len: int
    text: str | None = None
    session_id: str | None = None
    turn: int = 0

    @property
    def input_len(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class Workload:
    requests: list[BenchRequest]
    #: token ids that start every prompt (the system message of a chat)
    prefix_ids: tuple[int, ...] = ()
    #: send times from a trace, offsets in seconds; None = use the arrival process
    timestamps: list[float] | None = None
    name: str = "random"

    @property
    def has_sessions(self) -> bool:
        return any(r.session_id is not None for r in self.requests)


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    num_prompts: int
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    prefix_len: int = 0
    num_turns: int = 1
    seed: int = 0
    #: token ids are drawn from ``[id_low, id_high)``
    id_low: int = SIM_FIRST_WORD_ID
    id_high: int = SIM_FIRST_WORD_ID + SIM_NUM_WORDS

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ConfigError(f"num-prompts: must be ≥ 1, got {self.num_prompts}")
        if self.input_len < 1 or self.output_len < 1:
            raise ConfigError("random-input-len and random-output-len: must be ≥ 1")
        if not 0 <= self.range_ratio < 1:
            raise ConfigError(f"random-range-ratio: must be in [0, 1), got {self.range_ratio}")
        if self.prefix_len < 0:
            raise ConfigError(f"random-prefix-len: must be ≥ 0, got {self.prefix_len}")
        if self.num_turns < 1:
            raise ConfigError(f"num-turns: must be ≥ 1, got {self.num_turns}")
        if self.id_high <= self.id_low:
            raise ConfigError("vocabulary: empty token id range")


# ---- lengths and ids ------------------------------------------------------------------
def random_lengths(mean: int, range_ratio: float, n: int, rng: np.random.Generator) -> list[int]:
    """``n`` integers uniform in ``[mean × (1 − r), mean × (1 + r)]``, at least 1."""
    low = max(1, math.floor(mean * (1 - range_ratio)))
    high = max(low, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n).tolist()


def random_ids(n: int, spec: WorkloadSpec, rng: np.random.Generator) -> tuple[int, ...]:
    return tuple(rng.integers(spec.id_low, spec.id_high, size=n).tolist())


def random_workload(spec: WorkloadSpec) -> Workload:
    """Random lengths, an optional shared prefix, and sessions when ``num_turns > 1``."""
    rng = np.random.default_rng(spec.seed)
    prefix = random_ids(spec.prefix_len, spec, rng)
    n = spec.num_prompts
    ins = random_lengths(spec.input_len, spec.range_ratio, n, rng)
    outs = random_lengths(spec.output_len, spec.range_ratio, n, rng)
    requests: list[BenchRequest] = []
    if spec.num_turns == 1:
        for i in range(n):
            requests.append(BenchRequest(i, random_ids(ins[i], spec, rng), outs[i]))
        return Workload(requests, prefix, name="random")
    num_sessions = math.ceil(n / spec.num_turns)
    i = 0
    for turn in range(spec.num_turns):  # turn-major: every session's turn 0, then turn 1...
        for s in range(num_sessions):
            if i == n:
                break
            ids = random_ids(ins[i], spec, rng)
            requests.append(BenchRequest(i, ids, outs[i], session_id=f"s{s}", turn=turn))
            i += 1
    return Workload(requests, prefix, name="sessions")


# ---- files ----------------------------------------------------------------------------
def file_workload(
    path: str | Path, num_prompts: int, output_len: int, prefix_ids: tuple[int, ...] = ()
) -> Workload:
    """Prompts from a file, cycled to ``num_prompts``."""
    p = Path(path)
    prompts: list[tuple[str, int]] = []
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"dataset-path: cannot read {p}: {exc}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            obj = _json_line(line, p, lineno)
            if isinstance(obj, str):
                prompts.append((obj, output_len))
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                prompts.append((obj["prompt"], int(obj.get("output_tokens", output_len))))
            else:
                raise ConfigError(
                    f"{p}:{lineno}: expected a string or an object with a 'prompt' string"
                )
        else:
            prompts.append((line, output_len))
    if not prompts:
        raise ConfigError(f"dataset-path: {p} holds no prompts")
    requests = [
        BenchRequest(i, (), prompts[i % len(prompts)][1], text=prompts[i % len(prompts)][0])
        for i in range(num_prompts)
    ]
    return Workload(requests, prefix_ids, name="file")


_TRACE_ALIASES = {
    "timestamp": ("timestamp", "time", "arrival_time"),
    "prompt_tokens": ("prompt_tokens", "input_tokens", "input_len", "ContextTokens"),
    "output_tokens": ("output_tokens", "output_len", "max_tokens", "GeneratedTokens"),
    "session_id": ("session_id", "session", "conversation_id"),
}


def _field(row: dict, name: str, where: str) -> object:
    for key in _TRACE_ALIASES[name]:
        if key in row and row[key] not in (None, ""):
            return row[key]
    if name == "session_id":
        return None
    raise ConfigError(f"{where}: missing '{name}'")


def trace_workload(
    path: str | Path,
    spec: WorkloadSpec,
    *,
    num_prompts: int | None = None,
    time_scale: float = 1.0,
) -> Workload:
    """Requests and send times from a trace file (``.jsonl`` or ``.csv``)."""
    from lmfleet.bench.arrivals import trace_send_times

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"dataset-path: cannot read {p}: {exc}") from None
    if p.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        rows = [
            _json_line(line, p, i) for i, line in enumerate(text.splitlines(), 1) if line.strip()
        ]
    if num_prompts is not None:
        rows = rows[:num_prompts]
    if not rows:
        raise ConfigError(f"dataset-path: {p} holds no trace rows")
    rng = np.random.default_rng(spec.seed)
    prefix = random_ids(spec.prefix_len, spec, rng)
    stamps: list[float] = []
    requests: list[BenchRequest] = []
    turns: dict[str, int] = {}
    for i, row in enumerate(rows):
        where = f"{p}:{i + 1}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected an object")
        try:
            stamps.append(float(_field(row, "timestamp", where)))  # type: ignore[arg-type]
            n_in = int(_field(row, "prompt_tokens", where))  # type: ignore[call-overload]
            n_out = int(_field(row, "output_tokens", where))  # type: ignore[call-overload]
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if n_in < 1 or n_out < 1:
            raise ConfigError(f"{where}: prompt_tokens and output_tokens must be ≥ 1")
        sid = _field(row, "session_id", where)
        session = None if sid is None else str(sid)
        turn = 0
        if session is not None:
            turn = turns.get(session, 0)
            turns[session] = turn + 1
        ids = random_ids(n_in, spec, rng)
        requests.append(BenchRequest(i, ids, n_out, session_id=session, turn=turn))
    return Workload(requests, prefix, trace_send_times(stamps, time_scale), name="trace")


def _json_line(line: str, path: Path, lineno: int) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{lineno}: not JSON: {exc}") from None


# ---- sessions -------------------------------------------------------------------------
#: one past turn of a session: the user message and the answer the target gave
Turn = tuple[str, str]


def completion_prompt(prefix: str, history: Sequence[Turn], message: str) -> str:
    """A session's prompt for a completions endpoint: everything said so far, in
    order, joined by spaces."""
    parts = [prefix] + [p for turn in history for p in turn] + [message]
    return " ".join(s for p in parts if (s := p.strip()))


def chat_messages(prefix: str, history: Sequence[Turn], message: str) -> list[dict[str, str]]:
    """A session's messages for a chat endpoint: the prefix as the system message."""
    msgs = [{"role": "system", "content": prefix}] if prefix else []
    for user, answer in history:
        msgs.append({"role": "user", "content": user})
        msgs.append({"role": "assistant", "content": answer})
    msgs.append({"role": "user", "content": message})
    return msgs


def session_token_ids(
    prefix: Sequence[int],
    history: Sequence[tuple[Sequence[int], Sequence[int]]],
    ids: Sequence[int],
) -> list[int]:
    """A session's prompt as token ids (``bench offline``)."""
    out = list(prefix)
    for user, answer in history:
        out += user
        out += answer
    out += ids
    return out


# ---- rendering ------------------------------------------------------------------------
class Renderer(Protocol):
    """Turns token ids into text an HTTP target tokenizes back to (about) those ids."""

    def render(self, ids: Sequence[int]) -> str: ...


class WordRenderer:
    """The simulator's vocabulary: id ``SIM_FIRST_WORD_ID + k`` is the k-th word,
    and words are joined by spaces, so one word is one token on a ``sim:`` model."""

    def __init__(self, words: Sequence[str], first_id: int = SIM_FIRST_WORD_ID) -> None:
        self.words = list(words)
        self.first_id = first_id

    @classmethod
    def sim(cls) -> WordRenderer:
        from lmfleet.engine.sim.tokenizer import synthetic_words

        return cls(synthetic_words(SIM_NUM_WORDS))

    def render(self, ids: Sequence[int]) -> str:
        words, first = self.words, self.first_id
        return " ".join(words[i - first] for i in ids)


class TokenizerRenderer:
    """A Hugging Face ``tokenizer.json``: random ids are decoded to text."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:
            raise ConfigError(f"tokenizer: cannot load {file}: {exc}") from None
        specials = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
        vocab = self.tokenizer.get_vocab()
        ordinary = sorted(i for tok, i in vocab.items() if tok not in specials)
        # draw from the longest run of ordinary ids, so a plain [low, high) range works
        self.id_low, self.id_high = _longest_run(ordinary)

    def render(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def _longest_run(sorted_ids: list[int]) -> tuple[int, int]:
    """The longest ``[low, high)`` of consecutive ids in a sorted list."""
    if not sorted_ids:
        raise ConfigError("tokenizer: no ordinary tokens in the vocabulary")
    best = (sorted_ids[0], sorted_ids[0] + 1)
    low = sorted_ids[0]
    for prev, cur in itertools.pairwise(sorted_ids):
        if cur != prev + 1:
            low = cur
        if cur + 1 - low > best[1] - best[0]:
            best = (low, cur + 1)
    return best
