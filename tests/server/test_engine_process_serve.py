"""``lmfleet serve --engine-process``: the engine core in a child process of the
replica, behind the same HTTP API; SIGTERM stops both processes."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from lmfleet.cli import build_parser
from lmfleet.server.settings import ServerSettings
from tests.server.processes import launch_serve, stop_all, wait_ready

pytestmark = pytest.mark.integration


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if not path.exists():
        pytest.skip("/proc/PID/task/PID/children is not available")
    return [int(p) for p in path.read_text().split()]


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "(zombie)" not in _status(pid)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().splitlines()[2]
    except (OSError, IndexError):
        return ""


def test_flag_reaches_settings():
    args = build_parser().parse_args(["serve", "m", "--engine-process"])
    assert ServerSettings.from_args(args).engine_process is True
    args = build_parser().parse_args(["serve", "m"])
    assert ServerSettings.from_args(args).engine_process is False


def test_serve_with_engine_process_streams_and_stops(tiny_model_dir, tmp_path):
    srv = launch_serve(
        str(tiny_model_dir), tmp_path,
        "--device", "cpu", "--served-model-name", "tiny", "--kv-cache-memory", "8Mi",
        "--max-model-len", "1024", "--engine-process",
    )  # fmt: skip
    try:
        wait_ready(srv)
        children = _children(srv.proc.pid)
        assert children, "the engine core process is missing"
        with srv.client() as client:
            stream = client.completions.create(
                model="tiny", prompt="The fleet", max_tokens=6, stream=True,
                temperature=0, extra_body={"ignore_eos": True},
            )  # fmt: skip
            parts = list(stream)
        assert "".join(p.choices[0].text for p in parts if p.choices)
        assert parts[-1].choices[0].finish_reason == "length"
        assert srv.state()["state"] == "ready"
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=30) == 0, srv.logs()
        deadline = time.monotonic() + 10
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(c) for c in children), srv.logs()
    finally:
        stop_all([srv])
