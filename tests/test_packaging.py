"""The installed package is usable from a project outside this repo: its types
reach mypy, and a built wheel carries them (py.typed)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

USER_CODE = """
from actors import NodeConfig, open_node
from transport import SenderConfig

config: NodeConfig = NodeConfig(sender=SenderConfig(lost_grace=3.0))
seed: int = config.seed
"""


def _mypy(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    # Outside the repo, so that only the installed package can answer the import.
    (tmp_path / "use.py").write_text(code)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "use.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_mypy_sees_the_installed_packages_types(tmp_path: Path) -> None:
    assert not tmp_path.is_relative_to(ROOT)
    ok = _mypy(tmp_path, USER_CODE)
    assert ok.returncode == 0, ok.stdout
    # Seen, not treated as Any: a wrong type is caught.
    bad = _mypy(tmp_path, USER_CODE + "name: str = config.seed\n")
    assert bad.returncode == 1
    assert 'Incompatible types in assignment (expression has type "int"' in bad.stdout


@pytest.mark.slow
def test_the_wheel_carries_py_typed(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("cellmesh-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"actors/py.typed", "transport/py.typed", "actors/grid/__init__.py"} <= names
