"""The public faces: small, complete, and one public home per thing.

After trio's ``_tests/test_exports.py``. A face is a public module's
``__all__``; issue 15 bounds the two top-level ones at 40 names and asks that
no object be public under two names and no name mean two objects.
"""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Every public module with a face of its own.
FACES = [
    "transport",
    "transport.frames",
    "transport.events",
    "transport.security",
    "transport.testing",
    "actors",
    "actors.collectives",
    "actors.journal",
    "actors.statistics",
    "actors.launch",
    "actors.testing",
    "actors.grid",
]

#: The top-level faces' bound (issue 15, "Small faces").
MAX_TOP_LEVEL = 40


def _face(name: str) -> types.ModuleType:
    if name == "actors.grid":
        pytest.importorskip("numpy", reason="actors.grid needs the 'grid' extra")
    return importlib.import_module(name)


@pytest.mark.parametrize("name", ["transport", "actors"])
def test_top_level_faces_are_small(name: str) -> None:
    module = _face(name)
    assert len(module.__all__) <= MAX_TOP_LEVEL, (
        f"{name}.__all__ has {len(module.__all__)} names; move the less used ones into a "
        "public submodule with its own __all__"
    )


@pytest.mark.parametrize("name", FACES)
def test_every_exported_name_exists(name: str) -> None:
    module = _face(name)
    assert len(module.__all__) == len(set(module.__all__)), "a name listed twice"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists names it does not define: {missing}"


@pytest.mark.parametrize("name", FACES)
def test_every_public_binding_is_exported(name: str) -> None:
    # A face's module binds exactly what its __all__ says (plus dunders and
    # submodules): nothing public slips in beside the list.
    module = _face(name)
    public = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType) and n != "annotations"
    }
    assert public == set(module.__all__)


def _exports() -> list[tuple[str, str, object]]:
    return [(face, n, getattr(_face(face), n)) for face in FACES for n in _face(face).__all__]


def test_no_object_has_two_public_names() -> None:
    homes: dict[int, list[str]] = {}
    for face, name, value in _exports():
        if isinstance(value, int | str | float | bytes | bool) or value is None:
            continue  # equal constants may be the same interned object
        homes.setdefault(id(value), []).append(f"{face}.{name}")
    doubles = [names for names in homes.values() if len(names) > 1]
    assert not doubles, f"one object, several public names: {doubles}"


def test_no_name_means_two_things() -> None:
    meanings: dict[str, dict[int, str]] = {}
    for face, name, value in _exports():
        meanings.setdefault(name, {})[id(value)] = face
    clashes = {n: sorted(faces.values()) for n, faces in meanings.items() if len(faces) > 1}
    assert not clashes, f"one name, several objects: {clashes}"


def test_no_name_is_exported_twice() -> None:
    # With the two tests above: a name lives in exactly one face.
    seen: dict[str, str] = {}
    twice = []
    for face, name, _ in _exports():
        if name in seen:
            twice.append((name, seen[name], face))
        seen[name] = face
    assert not twice


@pytest.mark.parametrize(
    "path",
    sorted([*(ROOT / "transport").rglob("*.py"), *(ROOT / "actors").rglob("*.py")]),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_exec_based_code_generation(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    calls = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    generators = calls & {"exec", "eval", "compile"}
    assert not generators, f"{path.name} generates code with {sorted(generators)}"
