"""The layering in ARCHITECTURE.md, enforced by reading imports (and, for torch, by
importing in a subprocess where torch cannot be imported)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmfleet"

#: what the server may import from the engine: the narrow client interface and the
#: plain data types it hands over (none of them imports the core, the runner or torch)
SERVER_MAY_IMPORT = {
    "lmfleet.engine.client",
    "lmfleet.engine.config",
    "lmfleet.engine.request",
    "lmfleet.engine.stats",
    "lmfleet.engine.template_guard",  # the chat-template sandbox's limits
    "lmfleet.engine.tokenizer",
}
#: never imported by the server, whatever else changes
SERVER_MUST_NOT_IMPORT = ("lmfleet.engine.core", "lmfleet.engine.runner")


def imports_of(package: str) -> dict[str, set[str]]:
    """Module path -> every absolute module it imports (at any depth: lazy imports in
    functions count too)."""
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
        for upper in (
            "lmfleet.server",
            "lmfleet.gateway",
            "lmfleet.autoscaler",
            "lmfleet.bench",
            "lmfleet.cli",
        ):
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
    for module, names in imports_of("server").items():
        engine = {n for n in names if _under(n, "lmfleet.engine")}
        assert engine <= SERVER_MAY_IMPORT, f"server/{module} imports {engine - SERVER_MAY_IMPORT}"
        for forbidden in SERVER_MUST_NOT_IMPORT:
            bad = [n for n in names if _under(n, forbidden)]
            assert not bad, f"server/{module} imports {bad}"


@pytest.mark.parametrize("package", ["server", "gateway"])
def test_server_and_gateway_never_import_the_cli(package):
    """``lmfleet.cli`` imports them to build its parser; they import the shared
    pieces (``lmfleet.engine_flags``, ``lmfleet.serving``) instead."""
    for module, names in imports_of(package).items():
        bad = [n for n in names if _under(n, "lmfleet.cli")]
        assert not bad, f"{package}/{module} imports {bad}"


def test_client_interface_modules_import_no_engine_internals():
    """What the server may import stays free of the core and the runner (the client's
    factory imports the async engine when it is called, not on import)."""
    engine = imports_of("engine")
    for name in ("client.py", "stats.py", "request.py", "limits.py"):
        names = engine[f"engine/{name}"]
        bad = [n for n in names if n in SERVER_MUST_NOT_IMPORT or _under(n, "torch")]
        assert not bad, f"engine/{name} imports {bad}"


# A meta-path finder that makes ``import torch`` fail, as on a machine without it.
_BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc
    import pkgutil
    import sys

    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked in this test ({name})")
            return None

    sys.meta_path.insert(0, _NoTorch())
    """
)


def _import_without_torch(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_torch_block_works():
    result = _import_without_torch("import torch")
    assert result.returncode != 0 and "torch is blocked" in result.stderr


def test_gateway_imports_without_torch():
    """Every module of the gateway (the front door runs on machines with no torch)."""
    result = _import_without_torch(
        """
        import importlib, pkgutil
        import lmfleet.gateway as gw
        names = [m.name for m in pkgutil.walk_packages(gw.__path__, "lmfleet.gateway.")]
        for name in names:
            importlib.import_module(name)
        import lmfleet.gateway.app, lmfleet.gateway.serve
        assert "torch" not in sys.modules
        print(len(names), "modules")
        """
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[0]) > 5


def test_server_metrics_and_client_types_import_without_torch():
    result = _import_without_torch(
        """
        import lmfleet.server.metrics, lmfleet.engine.client, lmfleet.engine.stats
        import lmfleet.server.settings, lmfleet.engine_flags
        assert "torch" not in sys.modules
        """
    )
    assert result.returncode == 0, result.stderr
