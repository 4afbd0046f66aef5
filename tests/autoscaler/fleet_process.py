"""``lmfleet up`` as a real process for the autoscaler's end-to-end tests: a fleet
file of simulated replicas (a fast test profile through ``LMFLEET_SIM_PROFILES``),
the gateway on port 0 (the port comes back in a file), and helpers that poll the
admin API with a deadline. Nothing here asserts how long anything took."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from lmfleet.engine.sim.profile import PROFILES_ENV

#: generous: a busy machine may be slow; only a hang reaches it
DEADLINE_S = 120.0

#: about 100 tokens/s per stream, a 1 s cold start, a 0.1 s wake
PROFILE = {
    "base": "llama-8b-h100",
    "fixed_s": 0.01,
    "prefill_token_s": 1e-5,
    "decode_seq_s": 1e-4,
    "kv_token_s": 0.0,
    "kv_capacity_tokens": 1 << 16,
    "max_model_len": 8192,
    "vocab_size": 2000,
    "load_s": 1.0,
    "sleep_s": 0.05,
    "wake_s": 0.1,
}


def fleet_file(
    tmp: Path, *, profile: dict[str, Any] | None = None, balancing: str | None = None,
    **version: Any,
) -> Path:  # fmt: skip
    """A one-model fleet (``chat``, version ``v1``) of sim replicas; ``version``
    overrides keys of the version (``replicas``, ``autoscaling``, ...), ``balancing``
    names the model's balancing policy."""
    profiles = tmp / "profiles.json"
    profiles.write_text(json.dumps({"up-test": {**PROFILE, **(profile or {})}}))
    v1: dict[str, Any] = {
        "name": "v1",
        "model": "sim:up-test",
        "env": {PROFILES_ENV: str(profiles)},
        "replicas": {"min": 1, "max": 3},
        "autoscaling": {
            "target_per_replica": 2,
            "stabilization_window_s": 3,
            "panic_window_s": 3,
            "trend_window_s": 2,
            "idle_timeout_s": 3,
            "default_time_to_ready_s": 2,
            "default_wake_s": 0.2,
            "interval_s": 0.5,
        },
        "drain_timeout_s": 60,
    }
    for key, value in version.items():
        if isinstance(value, dict) and isinstance(v1.get(key), dict):
            v1[key] = {**v1[key], **value}
        else:
            v1[key] = value
    model: dict[str, Any] = {
        "name": "chat",
        "versions": [v1],
        "queue": {"max_inflight_per_replica": 8, "max_wait_s": 60},
    }
    if balancing:
        model["balancing"] = {"policy": balancing}
    doc = {
        "gateway": {"poll_interval_s": 0.2, "timeouts": {"first_byte_s": 30}},
        "models": [model],
        "autoscaler": {"interval_s": 0.5},
    }  # fmt: skip
    path = tmp / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class FleetProcess:
    """``lmfleet up FLEET --port 0``; ``url`` once it listens."""

    def __init__(self, tmp: Path, fleet: Path | None, *flags: str) -> None:
        self.tmp = tmp
        self.run_dir = tmp / "run"
        self.port_file = tmp / "gateway.port"
        self.log_path = tmp / "up.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        env = {**os.environ, "LMFLEET_HOME": str(tmp / "home")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmfleet.cli", "up", *([str(fleet)] if fleet else []),
             "--port", "0", "--port-file", str(self.port_file), "--run-dir",
             str(self.run_dir), "--status", "log", "--status-every", "2", *flags],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        self.url = ""

    def __enter__(self) -> FleetProcess:
        self.url = f"http://127.0.0.1:{self.wait_for(self._port, 'the gateway port')}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()

    def _port(self) -> int | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"lmfleet up exited {self.proc.returncode}:\n{self.output()}")
        try:
            return int(self.port_file.read_text())
        except (OSError, ValueError):
            return None

    def output(self, limit: int | None = 6000) -> str:
        text = self.log_path.read_text(errors="replace")
        return text if limit is None else text[-limit:]

    def wait_for(self, cond: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; lmfleet up said:\n{self.output()}")

    def autoscaler(self) -> dict[str, Any]:
        r = httpx.get(self.url + "/admin/autoscaler", timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def replicas(self) -> list[dict[str, Any]]:
        return self.autoscaler()["versions"]["chat/v1"]["replicas"]

    def routable(self) -> list[dict[str, Any]]:
        return [r for r in self.replicas() if r["routable"]]

    def decisions(self) -> list[dict[str, Any]]:
        return self.autoscaler()["decisions"]

    def terminate(self, timeout: float = DEADLINE_S) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for good: it only waits to be reaped
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stream_text(url: str, prompt: str, max_tokens: int, **extra: Any) -> tuple[str, str]:
    """A greedy streamed completion through the gateway: (text, finish_reason)."""
    body = {"model": "chat", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, **extra}  # fmt: skip
    text, finish = [], ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=DEADLINE_S) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            choice = event["choices"][0]
            text.append(choice["text"])
            finish = choice.get("finish_reason") or finish
    return "".join(text), finish
