"""Streams over real sockets (uvicorn with lmfleet serve's HTTP implementation, in a
thread): HTTP/1.0 clients, clients that never read, keep-alive after a bad request."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from .live import live_app, poll, raw_post, read_response

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    with live_app(tiny_model_dir, api_key=None) as running:
        yield running


def _connect(live, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect: the window is agreed in the handshake
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", live.port))
    return sock


# ---- HTTP/1.0 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [CMPL, CHAT])
def test_http10_stream_is_close_delimited(live, path):
    body = {"model": "tiny", "max_tokens": 6, "stream": True, "temperature": 0}
    body |= {"prompt": "Hi"} if path == CMPL else {"messages": [{"role": "user", "content": "Hi"}]}
    with _connect(live) as sock:
        sock.sendall(raw_post(path, json.dumps(body).encode(), version="1.0", keep_alive=False))
        status, headers, payload = read_response(sock)  # reads until the server closes
    assert status.split()[1] == b"200", status
    assert "transfer-encoding" not in headers and "content-length" not in headers, headers
    assert headers.get("connection") == "close"
    text = payload.decode()
    assert text.startswith("data: {") and text.endswith("data: [DONE]\n\n"), text[:200]
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)  # no chunk-size lines in between
    assert json.loads(events[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"


def test_http10_json_answer_keeps_its_length(live):
    body = json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 2}).encode()
    with _connect(live) as sock:
        sock.sendall(raw_post(CMPL, body, version="1.0", keep_alive=False))
        status, headers, payload = read_response(sock)
    assert status.split()[1] == b"200"
    assert int(headers["content-length"]) == len(payload)
    assert json.loads(payload)["object"] == "text_completion"


def test_http11_stream_is_still_chunked(live):
    body = json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 2, "stream": True})
    with _connect(live) as sock:
        sock.sendall(raw_post(CMPL, body.encode(), keep_alive=False))
        _, headers, _ = read_response(sock)
    assert headers.get("transfer-encoding") == "chunked"


# ---- bad input keeps the connection -----------------------------------------------------------
def test_lone_surrogate_answers_400_and_keeps_the_connection(live):
    bad = b'{"model": "tiny", "prompt": "x \\ud800", "max_tokens": 2}'
    good = b'{"model": "tiny", "prompt": "x", "max_tokens": 2}'
    with _connect(live) as sock:
        sock.sendall(raw_post(CMPL, bad))
        status, headers, payload = read_response(sock)
        assert status.split()[1] == b"400", payload
        assert json.loads(payload)["error"]["param"] == "prompt"
        assert headers.get("connection") != "close"
        sock.sendall(raw_post(CMPL, good))  # the same connection, kept alive
        status, _, payload = read_response(sock)
        assert status.split()[1] == b"200", payload


# ---- a client that never reads ---------------------------------------------------------------
def test_client_that_never_reads_is_aborted_and_frees_its_slot(tiny_model_dir):
    """Small socket buffers on both ends fill after a few dozen logprob chunks; the
    server's writes then wait, and after the write timeout the request is aborted."""
    with live_app(tiny_model_dir, api_key=None, sndbuf=8192, stream_write_timeout_s=0.5) as live:
        body = {
            "model": "tiny", "prompt": "Go", "max_tokens": 480, "stream": True,
            "logprobs": 20, "ignore_eos": True, "temperature": 0,
        }  # fmt: skip
        stuck = _connect(live, rcvbuf=4096)
        try:
            stuck.sendall(raw_post(CMPL, json.dumps(body).encode()))
            poll(lambda: live.state()["in_flight_requests"] == 1)
            # others are served meanwhile
            other = httpx.post(
                f"{live.url}{CMPL}",
                json={"model": "tiny", "prompt": "Hi", "max_tokens": 3},
                timeout=60,
            )
            assert other.status_code == 200, other.text
            # the stuck stream is aborted while its socket stays open: slot and KV freed
            poll(lambda: live.state()["in_flight_requests"] == 0, timeout=60)
            poll(lambda: live.state()["running"] == 0, timeout=60)
            finished = httpx.get(f"{live.url}/metrics", timeout=30).text
            assert 'finished_reason="abort"' in finished
        finally:
            stuck.close()


def test_slow_but_reading_client_gets_everything(tiny_model_dir):
    """The write timeout is about no progress at all: a client that reads, however
    small its buffer, is served to the end."""
    with live_app(tiny_model_dir, api_key=None, sndbuf=8192, stream_write_timeout_s=5) as live:
        body = {
            "model": "tiny", "prompt": "Go", "max_tokens": 120, "stream": True,
            "logprobs": 5, "ignore_eos": True, "temperature": 0,
        }  # fmt: skip
        with _connect(live, rcvbuf=4096) as sock:
            sock.sendall(raw_post(CMPL, json.dumps(body).encode(), keep_alive=False))
            status, _, payload = read_response(sock)
        assert status.split()[1] == b"200"
        assert payload.rstrip().endswith(b"0")  # the chunked stream's last chunk
        assert b"data: [DONE]" in payload


def test_many_stuck_clients_do_not_stop_the_replica(tiny_model_dir):
    with live_app(tiny_model_dir, api_key=None, sndbuf=8192, stream_write_timeout_s=0.5) as live:
        body = json.dumps({
            "model": "tiny", "prompt": "Go", "max_tokens": 300, "stream": True,
            "logprobs": 20, "ignore_eos": True,
        }).encode()  # fmt: skip
        socks = [_connect(live, rcvbuf=4096) for _ in range(4)]
        try:
            for s in socks:
                s.sendall(raw_post(CMPL, body))
            poll(lambda: live.state()["in_flight_requests"] == 4)
            results: list[int] = []

            def ask() -> None:
                r = httpx.post(
                    f"{live.url}{CMPL}", json={"model": "tiny", "prompt": "a", "max_tokens": 2},
                    timeout=60,
                )  # fmt: skip
                results.append(r.status_code)

            threads = [threading.Thread(target=ask) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert results == [200, 200, 200]
            poll(lambda: live.state()["in_flight_requests"] == 0, timeout=60)
        finally:
            for s in socks:
                s.close()
