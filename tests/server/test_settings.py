from __future__ import annotations

import argparse

import pytest

from lmfleet.cli import build_parser
from lmfleet.errors import ConfigError
from lmfleet.server.settings import ServerSettings, parse_bytes


@pytest.mark.parametrize(
    ("text", "value"),
    [("1073741824", 2**30), ("4G", 4 * 10**9), ("512Mi", 512 * 2**20), ("1.5GiB", 3 * 2**29)],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "abc", "4X", "-1", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes(text)


def test_serve_flags_use_vllm_names(tmp_path):
    args = build_parser().parse_args(
        [
            "serve", str(tmp_path),
            "--served-model-name", "tiny", "alias",
            "--api-key", "k", "--admin-token", "a",
            "--max-model-len", "256", "--max-num-seqs", "8",
            "--max-num-batched-tokens", "512", "--block-size", "32",
            "--kv-cache-memory", "8Mi", "--gpu-memory-utilization", "0.5",
            "--no-enable-prefix-caching", "--dtype", "float32",
            "--host", "127.0.0.1", "--port", "9001", "--version-label", "v2",
            "--max-concurrent-requests", "3", "--max-waiting-requests", "2",
            "--drain-timeout", "7", "--max-body-size", "1Mi",
        ]
    )  # fmt: skip
    s = ServerSettings.from_args(args)
    assert s.served_model_names == ("tiny", "alias") and s.model_name == "tiny"
    assert (s.api_key, s.admin_token, s.version_label) == ("k", "a", "v2")
    assert (s.host, s.port) == ("127.0.0.1", 9001)
    assert (s.max_concurrent_requests, s.max_waiting_requests) == (3, 2)
    assert s.drain_timeout_s == 7.0 and s.max_body_bytes == 2**20
    cfg = s.engine_config()
    assert cfg.model.max_model_len == 256 and cfg.model.dtype == "float32"
    assert cfg.cache.block_size == 32 and cfg.cache.kv_cache_memory_bytes == 8 * 2**20
    assert cfg.cache.gpu_memory_utilization == 0.5 and not cfg.cache.enable_prefix_caching
    assert cfg.scheduler.max_num_seqs == 8 and cfg.scheduler.max_num_batched_tokens == 512


def test_defaults_and_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("MAX_BATCH_SIZE", "5")
    s = ServerSettings(model=str(tmp_path), device="cpu")
    assert s.served_model_names == (str(tmp_path),)
    assert s.engine_config().scheduler.max_num_seqs == 5  # TGI's variable applies
    with pytest.raises(ConfigError, match="max_concurrent_requests"):
        ServerSettings(model="m", max_concurrent_requests=0)
    with pytest.raises(ConfigError, match="drain_timeout"):
        ServerSettings(model="m", drain_timeout_s=-1)
