"""``lmfleet serve`` with no model argument serves the built-in SmolLM2, and the
official ``openai`` client gets the right answer to a question."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lmfleet.engine.models.builtin import DEFAULT_MODEL
from tests.server.processes import ServeProcess, free_port, stop_all, wait_ready

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [
        sys.executable, "-m", "lmfleet.cli", "serve", "--host", "127.0.0.1",
        "--port", str(port), "--device", "cpu", "--dtype", "float32",
        "--kv-cache-memory", "64Mi", "--max-model-len", "2048",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    with Path(log).open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    server = ServeProcess(proc, port, log)
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
