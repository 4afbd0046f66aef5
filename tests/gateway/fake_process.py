"""A :class:`~tests.gateway.fakes.FakeReplica` in a process of its own, for faults
that need one (SIGSTOP, SIGKILL): ``python -m tests.gateway.fake_process NAME
PORT_FILE`` binds port 0 and writes the bound port to PORT_FILE (whole, then
renamed into place) before it serves."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import uvicorn

from tests.gateway.fakes import FakeReplica


def main(name: str, port_file: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    target = Path(port_file)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, target)
    config = uvicorn.Config(
        FakeReplica(name).app(), log_level="warning", access_log=False, log_config=None,
        ws="none",
    )  # fmt: skip
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
