"""The ``cellmesh`` command line speaks one line: bad input, busy ports, Ctrl-C.

Every case runs the real console script as a subprocess. A bad input ends in
exactly one line on stderr, exit status 2, no traceback, and (for the demo)
before anything is made or started; ``--debug`` shows the traceback; Ctrl-C
ends the demo with one line and status 130 and leaves no node process behind.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors import Topology
from actors._topology import NODE_ID_ENV, RANK_ENV
from actors.grid import COORDINATOR, Decomposition, free_port, grid_topology
from transport.security import (
    generate_key_pair,
    write_key_pair,
)

pytestmark = pytest.mark.slow

#: The variable the docs name for --debug.
DEBUG_ENV = "CELLMESH_DEBUG"

_SCRIPT = Path(sys.executable).with_name("cellmesh")
CELLMESH = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "actors._cli"]


def _env() -> dict[str, str]:
    """This environment without the launcher variables `cellmesh node` reads its id
    from (so that a test run under srun or mpiexec still sees "no --id"), in the C
    locale (so the system's error texts are the English ones)."""
    env = {k: v for k, v in os.environ.items() if k not in (NODE_ID_ENV, *RANK_ENV, DEBUG_ENV)}
    return {**env, "LC_ALL": "C"}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CELLMESH, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env=_env(),
    )


def _one_line(stderr: str) -> str:
    """The single line of ``stderr``; fails on none, on more, or on a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def _two_tiles(folder: Path, *, coordinator: bool = False) -> Path:
    """A topology of two tiles (and the demo's coordinator), saved in ``folder``."""
    decomp = Decomposition.for_nodes((32, 32), 2)
    names = [*decomp.node_ids(), COORDINATOR]
    ports: set[int] = set()
    while len(ports) < len(names):
        ports.add(free_port())
    endpoints = {n: f"tcp://127.0.0.1:{p}" for n, p in zip(names, sorted(ports), strict=True)}
    topology = grid_topology(decomp, endpoints)
    if not coordinator:
        tiles = [n for n in topology.nodes if n.id != COORDINATOR]
        topology = Topology.build(tiles, [(tiles[0].id, tiles[1].id)])
    path = folder / ("demo.toml" if coordinator else "two.toml")
    topology.save(path)
    return path


def _keyed(folder: Path, topology: Path) -> Path:
    """Fresh CURVE keys for every node of ``topology`` in ``folder/keys``; writes them in."""
    keys = folder / "keys"
    keys.mkdir(mode=0o700)
    loaded = Topology.load(topology)
    made = {}
    for name in loaded.ids:
        pair = generate_key_pair()
        write_key_pair(keys, name, pair)
        made[name] = pair.public
    loaded.with_public_keys(made).save(topology)
    return keys


def _files(folder: Path) -> None:
    (folder / "afile").write_text("not a folder\n")
    (folder / "binary.toml").write_bytes(b"\xff\xfe\x00")
    (folder / "typo.toml").write_text(
        '[[node]]\nid = "a"\nendpoint = "tcp://127.0.0.1:5601"\nneighbors = ["b"]\n'
    )
    (folder / "broken.toml").write_text('[[node]]\nid = "a"\n[[link]\n')
    (folder / "corrupt.rle").write_text("x = 3, y = 3, rule = B3/S23\nbzo$3o!\n")
    (folder / "wide.rle").write_text("x = 40, y = 1, rule = B3/S23\n40o!\n")


#: (arguments, a fragment the one line must hold). ``{two}`` is a two-tile
#: topology, ``{demo}`` one with the demo's coordinator.
BAD_INPUT = {
    "missing topology": (["node", "--topology", "nope.toml", "--id", "t0-0"], "nope.toml"),
    "topology is a folder": (["node", "--topology", ".", "--id", "t0-0"], "cannot read"),
    "topology not UTF-8": (["node", "--topology", "binary.toml", "--id", "a"], "not a TOML"),
    "topology not TOML": (["node", "--topology", "broken.toml", "--id", "a"], "line 3"),
    "topology unknown key": (["node", "--topology", "typo.toml", "--id", "a"], "'neighbors'"),
    "unknown id": (["node", "--topology", "{two}", "--id", "zz"], "'zz' is not a node"),
    "coordinator id": (["node", "--topology", "{demo}", "--id", COORDINATOR], "coordinator"),
    "no id": (["node", "--topology", "{two}"], "give --id"),
    "size too small for the tiles": (
        ["node", "--topology", "{two}", "--id", "t0-0", "--size", "1"],
        "cannot tile",
    ),
    "node out is a file": (
        ["node", "--topology", "{two}", "--id", "t0-0", "--out", "afile"],
        "afile",
    ),
    "no secret key": (
        ["node", "--topology", "{two}", "--id", "t0-0", "--keys", "nokeys"],
        "no such secret key file",
    ),
    "bind not an endpoint": (
        ["node", "--topology", "{two}", "--id", "t0-0", "--bind", "5601"],
        "--bind",
    ),
    "no topology": (["node", "--id", "t0-0"], "--topology"),
    "nodes 0": (["demo", "--nodes", "0"], "--nodes"),
    "frames -1": (["demo", "--frames", "-1"], "--frames"),
    "drop 2": (["demo", "--drop", "2"], "--drop"),
    "dup nan": (["demo", "--dup", "nan"], "--dup"),
    "depth 0": (["demo", "--depth", "0"], "--depth"),
    "seed -1": (["demo", "--seed", "-1"], "--seed"),
    "timeout 0": (["demo", "--timeout", "0"], "--timeout"),
    "size word": (["demo", "--size", "big"], "--size"),
    "pause bad": (["demo", "--pause", "bad"], "NODE@FRAME:SECONDS"),
    "pause unknown node": (["demo", "--nodes", "2", "--pause", "zz@1:1"], "'zz'"),
    "bad model": (["demo", "--model", "wave"], "'wave'"),
    "missing pattern": (["demo", "--pattern", "nonexistent.rle"], "nonexistent.rle"),
    "corrupt pattern": (["demo", "--pattern", "corrupt.rle"], "unknown tag 'z'"),
    "pattern wider than the grid": (
        ["demo", "--size", "32", "--pattern", "wide.rle"],
        "give --size 40",
    ),
    "pattern with heat": (["demo", "--model", "heat", "--pattern", "wide.rle"], "--model life"),
    "grid too small for the nodes": (["demo", "--size", "1"], "cannot tile"),
    "depth wider than the tiles": (["demo", "--size", "8", "--depth", "9"], "--depth 9"),
    "demo out is a file": (["demo", "--out", "afile"], "afile is a file"),
    "keys without nodes": (["keys", "--dir", "k"], "name the nodes"),
    "keys dir is a file": (["keys", "--dir", "afile", "n1"], "afile"),
    "unknown command": (["launch"], "'launch'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_status_2(case: str, tmp_path: Path) -> None:
    _files(tmp_path)
    places = {"two": _two_tiles(tmp_path), "demo": _two_tiles(tmp_path, coordinator=True)}
    args, fragment = BAD_INPUT[case]
    done = _run([a.format(**places) for a in args], tmp_path)
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    assert line.startswith("cellmesh"), line
    assert ": error: " in line, line
    assert fragment in line, line
    # Checked before anything was made or started: no demo output folder.
    assert not (tmp_path / "out").exists()
    assert done.stdout == ""


def _without_grid(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``cellmesh ARGS`` in a Python without the extra ``grid`` (its packages unimportable)."""
    code = (
        "import sys\n"
        "for name in ('numpy', 'rich', 'matplotlib'):\n"
        "    sys.modules[name] = None\n"
        "from actors._cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env=_env(),
    )


@pytest.mark.parametrize("command", ["demo", "node"])
def test_a_grid_command_without_the_grid_extra_says_what_to_install(
    command: str, tmp_path: Path
) -> None:
    args = ["demo"]
    if command == "node":
        args = ["node", "--topology", str(_two_tiles(tmp_path)), "--id", "t0-0"]
    done = _without_grid(args, tmp_path)
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    assert line.startswith(f"cellmesh {command}: error: "), line
    assert "numpy" in line, line
    assert "pip install 'cellmesh[grid]'" in line, line


def test_keys_needs_no_grid_extra(tmp_path: Path) -> None:
    done = _without_grid(["keys", "--dir", str(tmp_path / "keys"), "n1"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "keys" / "n1.key").is_file()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    for args in (
        ["--debug", "node", "--topology", "nope.toml"],
        ["demo", "--pattern", "nope.rle", "--debug"],
    ):
        done = _run(args, tmp_path)
        assert done.returncode != 0
        assert "Traceback" in done.stderr, done.stderr
        assert "nope." in done.stderr


def test_a_busy_port_is_one_line_naming_the_endpoint(tmp_path: Path) -> None:
    topology = _two_tiles(tmp_path)
    # Keyed, so the node does not warn that it runs unauthenticated.
    keys = _keyed(tmp_path, topology)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        endpoint = f"tcp://127.0.0.1:{holder.getsockname()[1]}"
        node = ["node", "--topology", str(topology), "--id", "t0-0", "--size", "32"]
        done = _run([*node, "--keys", str(keys), "--bind", endpoint], tmp_path)
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    assert f"cannot bind {endpoint}" in line, line
    assert "receiver" not in line


def _listening(port: int) -> bool:
    """Whether a TCP socket listens on ``port`` (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state = line.split()[1:4]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
            return True
    return False


def _group(pgid: int) -> list[int]:
    """The pids of the live processes in process group ``pgid`` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdecimal():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state, ppid, pgrp, ...
        state, _, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            pids.append(int(entry.name))
    return pids


def _wait_gone(pgid: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _start_demo(tmp_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A long secure demo in its own process group, its live view forced on."""
    cmd = [*CELLMESH, "demo", "--nodes", "2", "--size", "64", "--frames", "1000000"]
    # --secure: no "runs UNAUTHENTICATED" warnings on stderr.
    cmd += ["--secure", "--out", str(tmp_path / "out"), *extra]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # rich draws its live table into a pipe only if told it is a terminal.
        env={**_env(), "TTY_COMPATIBLE": "1", "COLUMNS": "120"},
        start_new_session=True,
    )


def _wait_progress(proc: subprocess.Popen[bytes]) -> None:
    """Until the live view shows a tile past frame 0 (60 s at most)."""
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, "the demo closed its stdout before showing progress"
            seen += chunk
        if re.search(rb"t0-0\W+[1-9][0-9]*", seen):
            return
    pytest.fail(f"no progress within 60 s: {seen[-500:]!r}")


@pytest.mark.parametrize(
    ("how", "status", "says"),
    [
        ("ctrl-c at the terminal", 130, "interrupted (Ctrl-C)"),
        ("sigint to the coordinator", 130, "interrupted (Ctrl-C)"),
        ("sigterm to the coordinator", 143, "terminated (SIGTERM)"),
    ],
)
def test_stopping_the_demo_is_one_line_and_leaves_no_process(
    how: str, status: int, says: str, tmp_path: Path
) -> None:
    proc = _start_demo(tmp_path)
    try:
        _wait_progress(proc)
        assert len(_group(proc.pid)) == 3  # the coordinator and its two tiles
        if how == "ctrl-c at the terminal":
            # What a terminal does: SIGINT to the whole foreground group.
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM if "sigterm" in how else signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == status, err
        assert says in _one_line(err.decode())
        assert _wait_gone(proc.pid, 5) == []
    finally:
        if _group(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


def test_tiles_stop_when_their_coordinator_is_killed(tmp_path: Path) -> None:
    proc = _start_demo(tmp_path)
    try:
        _wait_progress(proc)
        tiles = [pid for pid in _group(proc.pid) if pid != proc.pid]
        assert len(tiles) == 2
        # SIGKILL: no finally runs in the coordinator; the tiles see their
        # stdin pipe close and stop on their own.
        proc.kill()
        proc.communicate(timeout=30)
        assert _wait_gone(proc.pid, 10) == []
    finally:
        if _group(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def test_demo_timeout_says_what_timed_out(tmp_path: Path) -> None:
    proc = _start_demo(tmp_path, "--timeout", "3")
    try:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        line = _one_line(err.decode())
        assert "did not finish within --timeout 3 s" in line
        assert "give a larger --timeout" in line
        assert _wait_gone(proc.pid, 5) == []
    finally:
        if _group(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


def test_node_ctrl_c_is_one_line_and_status_130(tmp_path: Path) -> None:
    topology = _two_tiles(tmp_path)
    keys = _keyed(tmp_path, topology)
    # Its neighbour never comes: the node waits for it until interrupted.
    node = ["node", "--topology", str(topology), "--id", "t0-0", "--size", "32"]
    proc = subprocess.Popen(
        [*CELLMESH, *node, "--keys", str(keys), "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    try:
        port = int(Topology.load(topology).endpoint_of("t0-0").rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while not _listening(port) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "interrupted (Ctrl-C)" in _one_line(err.decode())
    finally:
        proc.kill()
        proc.wait()
