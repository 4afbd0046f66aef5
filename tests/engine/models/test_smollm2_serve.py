"""``lmfleet serve`` with no model argument serves the built-in SmolLM2, and the
official ``openai`` client gets the right answer to a question."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from lmfleet.engine.models.builtin import DEFAULT_MODEL
from tests.server.processes import ServeProcess, launch_serve, stop_all, wait_ready

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    server = launch_serve(
        None, tmp_path_factory.mktemp("serve"), "--device", "cpu", "--dtype", "float32",
        "--kv-cache-memory", "64Mi", "--max-model-len", "2048", timeout=120,
    )  # fmt: skip
    try:
        wait_ready(server, timeout=180)
        yield server
    finally:
        stop_all([server])


def test_chat_answers_paris_with_consistent_usage(server: ServeProcess) -> None:
    with server.client() as client:
        assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL]
        resp = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=QUESTION, temperature=0, max_tokens=32
        )
    choice = resp.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    prompt = httpx.post(f"{server.url}/tokenize", json={"messages": QUESTION}).json()
    assert resp.usage.prompt_tokens == prompt["count"]
    answer = httpx.post(
        f"{server.url}/tokenize",
        json={"prompt": choice.message.content, "add_special_tokens": False},
    ).json()
    # the answer's tokens plus the end-of-turn token that stopped it
    assert resp.usage.completion_tokens == answer["count"] + 1
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
