"""Stream resume against real simulated replicas (separate processes): the replica
serving a stream is SIGKILLed mid-way and the client's text must equal an
undisturbed run token for token (greedy and seeded, completions and chat). The
official ``openai`` client works through the gateway."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.gateway.fakes import gateway_thread, wait_for
from tests.gateway.sim_replicas import MODEL, REPLICA_KEY, SimReplica, sim_replicas

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SimReplica]]:
    with sim_replicas(tmp_path_factory.mktemp("sim"), 3) as reps:
        yield reps


def _fleet(urls: list[str], **version: str) -> dict:
    version = version or {"api_key": REPLICA_KEY}
    return {
        "gateway": {"poll_interval_s": 0.1, "timeouts": {"idle_s": 5}},
        "models": [{"name": "m", "balancing": {"policy": "least_outstanding"},
                    "versions": [{"name": "v1", "served_model_name": MODEL, "replicas": urls,
                                  **version}]}],
    }  # fmt: skip


def _stream(client: httpx.Client, path: str, body: dict, on_chunk=None) -> tuple[str, list[dict]]:
    chunks: list[dict] = []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            chunks.append(chunk)
            if on_chunk is not None:
                on_chunk(len(chunks))
    text = "".join(
        c.get("text") or (c.get("delta") or {}).get("content") or ""
        for ch in chunks for c in ch["choices"]
    )  # fmt: skip
    return text, chunks


CASES = {
    "greedy-completion": ("/v1/completions", {
        "model": "m", "prompt": "the fleet keeps every stream alive", "max_tokens": 300,
        "temperature": 0, "stream_options": {"include_usage": True},
    }),
    "seeded-chat": ("/v1/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": "tell a long story"}],
        "max_tokens": 300, "temperature": 1.0, "seed": 1234,
        "stream_options": {"include_usage": True},
    }),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_stream_survives_sigkill_of_its_replica(replicas, case):
    path, body = CASES[case]
    alive = [r for r in replicas if r.proc.poll() is None]
    assert len(alive) >= 2
    server, app = gateway_thread(_fleet([r.url for r in alive]))
    reg = app.state.gateway.registry
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        wait_for(lambda: len(reg.version("m", "v1").routable()) == len(alive), 10)
        reference, ref_chunks = _stream(client, path, body)
        assert ref_chunks[-1]["usage"]["completion_tokens"] == 300

        killed: list[SimReplica] = []

        def kill_serving(n: int) -> None:
            if n == 40 and not killed:
                busy = [r for r in reg.version("m", "v1").replicas.values() if r.inflight]
                assert len(busy) == 1
                victim = next(r for r in alive if r.url == busy[0].url)
                victim.kill()
                killed.append(victim)

        text, chunks = _stream(client, path, body, kill_serving)
        assert killed, "the stream ended before the kill"
        assert text == reference
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[-1]["usage"]["completion_tokens"] == 300
        assert chunks[-1]["usage"]["prompt_tokens"] == ref_chunks[-1]["usage"]["prompt_tokens"]
        resumed = client.get("/metrics").text
        assert (
            'lmfleet_gateway_stream_resumes_total{model="m",outcome="ok",version="v1"} 1.0'
            in resumed
        )


def test_openai_client_through_gateway(replicas):
    openai = pytest.importorskip("openai")
    alive = [r for r in replicas if r.proc.poll() is None]
    server, app = gateway_thread(_fleet([r.url for r in alive]))
    reg = app.state.gateway.registry
    with server:
        wait_for(lambda: len(reg.version("m", "v1").routable()) == len(alive), 10)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        models = client.models.list()
        assert [m.id for m in models.data] == ["m"]
        out = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5, seed=1
        )
        assert out.usage.completion_tokens == 5 and out.choices[0].message.content
        raw = client.completions.with_raw_response.create(model="m", prompt="hi", max_tokens=3)
        assert raw.headers["x-lmfleet-version"] == "v1"
        pieces = [
            c.choices[0].text
            for c in client.completions.create(model="m", prompt="hi", max_tokens=6, stream=True)
            if c.choices
        ]
        assert len(pieces) == 6
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="hi")


def test_replica_api_key_from_the_environment_and_without_it(replicas, monkeypatch):
    alive = [r for r in replicas if r.proc.poll() is None]
    body = {"model": "m", "prompt": "hello", "max_tokens": 4, "temperature": 0}
    monkeypatch.setenv("LMFLEET_TEST_REPLICA_KEY", REPLICA_KEY)
    for version, status in (({"api_key_env": "LMFLEET_TEST_REPLICA_KEY"}, 200),
                            ({"api_key": "wrong"}, 401)):  # fmt: skip
        server, app = gateway_thread(_fleet([alive[0].url], **version))
        reg = app.state.gateway.registry
        with server, httpx.Client(base_url=server.url, timeout=30) as client:
            wait_for(lambda reg=reg: len(reg.version("m", "v1").routable()) == 1, 10)
            r = client.post("/v1/completions", json=body)
            assert r.status_code == status, r.text
            if status == 401:  # the replica's own answer, relayed
                assert r.json()["error"]["code"] == "invalid_api_key"
            masked = client.get("/admin/config").json()["config"]["models"][0]["versions"][0]
            assert masked.get("api_key") in (None, "***")
