"""The layering rules of docs/architecture: enforced, not hoped for."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The sans-IO protocol core: no I/O libraries, ever.
CORE_MODULES = ["_frames.py", "_ids.py", "_errors.py"]
CORE_PREFIXES = ("_proto_",)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "transport").glob("*.py")), ids=lambda p: p.name)
def test_transport_never_imports_actors(path: Path) -> None:
    assert "actors" not in _imports(path)


def _core_files() -> list[Path]:
    files = [ROOT / "transport" / name for name in CORE_MODULES]
    files += [p for p in (ROOT / "transport").glob("*.py") if p.name.startswith(CORE_PREFIXES)]
    return sorted(files)


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: p.name)
def test_protocol_core_is_sans_io(path: Path) -> None:
    forbidden = {"trio", "zmq", "cbor2", "socket", "asyncio", "threading", "time", "random"}
    assert not (_imports(path) & forbidden), f"{path.name} imports {_imports(path) & forbidden}"


def _private_transport_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.module
        and node.module.startswith("transport._")
    }


@pytest.mark.parametrize(
    "path", sorted((ROOT / "actors").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_actors_use_only_the_public_faces_of_transport(path: Path) -> None:
    # ``transport`` and its public submodules (``transport.frames``,
    # ``.events``, ``.security``, ``.testing``) are faces; ``transport._x`` is not.
    assert not _private_transport_imports(path)


#: What the runtime never loads: the grid application's packages (the extra
#: ``grid``, pyproject.toml).
GRID_ONLY = ("numpy", "rich", "matplotlib")


def test_the_runtime_loads_no_grid_package() -> None:
    # A fresh interpreter: this test process has numpy loaded already.
    probe = (
        "import sys, actors, transport, actors.testing, actors._cli; "
        f"print(sorted(m for m in {GRID_ONLY!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.strip() == "[]", done.stdout
    # The probe would pass vacuously if the grid did not load them either.
    probe = f"import sys, actors.grid; print(all(m in sys.modules for m in {GRID_ONLY[:1]!r}))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.strip() == "True", done.stdout


def _module_level_imports(path: Path) -> set[tuple[str, str | None]]:
    """``(module, name)`` of each import ``path`` runs when it is imported (not
    inside a function); ``name`` is None for ``import module``."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[tuple[str, str | None]] = set()
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.Import):
            found.update((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found.update((module, alias.name) for alias in node.names)
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "actors").glob("*.py")), ids=lambda p: p.name)
def test_the_runtime_never_imports_the_grid(path: Path) -> None:
    # The command line imports actors.grid inside the two commands that run it.
    for module, name in _module_level_imports(path):
        full = f"{module}.{name}" if name else module
        assert full.split(".")[:2] != ["actors", "grid"], full
        assert module.split(".")[0] not in GRID_ONLY, module


#: The runtime's private modules actors.grid may use, and why: the default tile
#: ids are Topology.from_grid's (one rule, in one place), and the command
#: line's grid half raises the runtime half's one-line errors.
GRID_MAY_USE = {
    "actors._topology": {"tile_node_id"},
    "actors._cli": {"CliError", "check_out", "one_line", "read_topology", "run_trio"},
}


@pytest.mark.parametrize(
    "path", sorted((ROOT / "actors" / "grid").glob("*.py")), ids=lambda p: p.name
)
def test_the_grid_uses_the_runtime_as_an_application_does(path: Path) -> None:
    for module, name in _module_level_imports(path):
        if module.startswith("actors._"):
            assert name in GRID_MAY_USE.get(module, set()), f"{module}.{name}"
