"""The layering in ARCHITECTURE.md, enforced by reading imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmfleet"

#: what the server may import from the engine: the async engine's client interface
#: and the plain data types it hands over
SERVER_MAY_IMPORT = {
    "lmfleet.engine.async_engine",
    "lmfleet.engine.config",
    "lmfleet.engine.core",  # EngineStats snapshots, and EngineCore for typing call(fn)
    "lmfleet.engine.request",
    "lmfleet.engine.tokenizer",
}


def imports_of(package: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in sorted((SRC / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(SRC))] = names
    return out


def _under(name: str, pkg: str) -> bool:
    return name == pkg or name.startswith(pkg + ".")


def test_engine_imports_no_upper_layer():
    for module, names in imports_of("engine").items():
        for upper in ("lmfleet.server", "lmfleet.gateway", "lmfleet.autoscaler", "lmfleet.bench"):
            bad = [n for n in names if _under(n, upper)]
            assert not bad, f"engine/{module} imports {bad}"


def test_engine_kv_is_pure_python():
    for module, names in imports_of("engine/kv").items():
        assert not [n for n in names if _under(n, "torch")], f"engine/kv/{module} imports torch"


@pytest.mark.parametrize("package", ["gateway", "autoscaler"])
def test_fleet_layers_never_import_engine(package):
    if not (SRC / package).exists():
        pytest.skip(f"lmfleet.{package} does not exist yet")
    for module, names in imports_of(package).items():
        bad = [n for n in names if _under(n, "lmfleet.engine")]
        assert not bad, f"{package}/{module} imports {bad}"


def test_server_reaches_engine_only_through_client_interface():
    if not (SRC / "server").exists():
        pytest.skip("lmfleet.server does not exist yet")
    for module, names in imports_of("server").items():
        engine = {n for n in names if _under(n, "lmfleet.engine")}
        assert engine <= SERVER_MAY_IMPORT, f"server/{module} imports {engine - SERVER_MAY_IMPORT}"
