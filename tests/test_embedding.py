"""The guide's "Embedding in a Trio app" examples run as printed and say what it says.

Each example is the ```python block after its ``<!-- example: NAME -->`` marker
in docs/guide.md; it runs as its own process (real ZeroMQ on 127.0.0.1).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide.md"
# The examples are plaintext nodes; their warning is not what is tested.
ENV = {**os.environ, "CELLMESH_PLAINTEXT_WARNED": "1"}


def _example(name: str, tmp_path: Path) -> Path:
    text = GUIDE.read_text()
    found = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)\n```", text, re.S)
    assert found is not None, f"no example {name!r} in {GUIDE}"
    path = tmp_path / f"{name}.py"
    path.write_text(found.group(1) + "\n")
    return path


def _run(path: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=60, env=ENV
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_node_in_an_existing_nursery(tmp_path: Path) -> None:
    assert _run(_example("embed-nursery", tmp_path)) == "b answered 1\n"


def test_cancelling_a_send_and_what_pending_sends_get(tmp_path: Path) -> None:
    assert _run(_example("embed-cancel", tmp_path)).splitlines() == [
        "in flight after the cancel: 1",
        "pending send: the sending node shut down",
    ]


def _default_sigint() -> None:
    # A child of a shell without job control may inherit SIGINT ignored.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_closes_the_node_and_ends_every_pending_send(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(_example("embed-ctrl-c", tmp_path))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        preexec_fn=_default_sigint,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "running; press Ctrl-C\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()  # reaps it and closes its pipes
    assert proc.returncode == 130, err
    assert out.splitlines() == [
        "send #1: the sending node shut down",
        "send #2: the sending node shut down",
        "send #3: the sending node shut down",
        "interrupted",
    ]
