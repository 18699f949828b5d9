"""What a user can watch: --version, --log-level, the statistics table, --metrics,
one plaintext warning per run, and a linger that ends when the neighbours are done."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from importlib import metadata
from pathlib import Path

import pytest
import trio

from actors._cli import _parser
from actors.testing import Inbox, open_test_network

PY = sys.executable


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=True,
    )


def test_version_is_the_installed_distributions() -> None:
    done = subprocess.run(
        [PY, "-m", "actors._cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert done.stdout.strip() == f"cellmesh {metadata.version('cellmesh')}"


def test_every_command_takes_log_level() -> None:
    parser = _parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands = subparsers[0].choices
    assert {"demo", "node", "keys"} <= set(commands)
    for name, command in commands.items():
        options = {o for a in command._actions for o in a.option_strings}
        assert "--log-level" in options, name
    args = parser.parse_args(["--log-level", "INFO", "keys", "x", "--dir", "d"])
    assert args.log_level == "info"
    args = parser.parse_args(["keys", "x", "--dir", "d", "--log-level", "debug"])
    assert args.log_level == "debug"


def test_log_level_reaches_the_cellmesh_loggers_only(tmp_path: Path) -> None:
    code = (
        "import logging; from actors._cli import main; "
        f"main(['--log-level', 'info', 'keys', 'x', '--dir', {str(tmp_path)!r}]); "
        "logging.getLogger('cellmesh.link').info('said at info'); "
        "logging.getLogger('other').info('not said')"
    )
    done = _run(code, env={"CELLMESH_LOG_LEVEL": ""})
    assert "cellmesh.link: INFO: said at info" in done.stderr
    assert "not said" not in done.stderr


_TWO_PLAINTEXT_NODES = """
import trio
from actors import open_node

async def main():
    async with open_node("a", bind="tcp://127.0.0.1:*"), open_node("b", bind="tcp://127.0.0.1:*"):
        pass

trio.run(main)
"""


def test_plaintext_is_said_once_per_process_and_not_when_a_parent_said_it() -> None:
    done = _run(_TWO_PLAINTEXT_NODES)
    assert done.stderr.count("UNAUTHENTICATED") == 1, done.stderr
    quiet = _run(_TWO_PLAINTEXT_NODES, env={"CELLMESH_PLAINTEXT_WARNED": "1"})
    assert "UNAUTHENTICATED" not in quiet.stderr


async def test_statistics_print_as_a_short_table(autojump_clock: trio.abc.Clock) -> None:
    async with open_test_network() as net:
        b = await net.start_node("b", peers={"a": None}, compute=Inbox().compute)
        a = await net.start_node("a", peers=["b"])
        for i in range(3):
            await a.send("b", bytes([i]))
        sent = str(a.statistics()).splitlines()
        got = str(b.statistics()).splitlines()
        summary = a.statistics().links_summary()
    assert sent[0] == "node a (incarnation 2, open)"
    assert sent[1].split() == [
        "peer",
        "state",
        "sent",
        "acked",
        "resent",
        "gave_up",
        "in_flight",
        "dups",
        "rtt",
    ]
    assert sent[2].split()[:8] == ["b", "UP", "3", "3", "0", "0", "0", "0"]
    assert sent[-1].strip() == "security: plaintext"
    assert len(sent) == 5
    assert "received: 3 delivered" in got[3]
    assert summary["b"]["acked"] == 3
    json.dumps(summary)


def _node_cmd(path: Path, out: Path, extra: list[str]) -> list[str]:
    return [PY, "-m", "actors._cli", "node", "--topology", str(path), "--out", str(out), *extra]


@pytest.mark.slow
def test_node_metrics_lines_and_a_linger_that_ends_when_the_neighbours_are_done(
    tmp_path: Path,
) -> None:
    from test_demo import _two_tiles

    from actors.grid import Job

    decomp, path = _two_tiles(tmp_path)
    # A linger of 300 s is only an upper bound: each node leaves once its
    # neighbour said done. The 120 s timeout fails the test if it waited it out.
    job = Job(size=32, frames=10, seed=4, linger=300.0)
    procs = [
        subprocess.Popen(
            _node_cmd(
                path,
                tmp_path,
                [
                    *job.args(),
                    "--metrics",
                    str(tmp_path / f"m{rank}.jsonl"),
                    "--metrics-every",
                    "0.05",
                ],
            ),
            env={**os.environ, "SLURM_PROCID": str(rank)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0]
    for node_id, out in zip(decomp.node_ids(), outputs, strict=True):
        # Not a terminal: the lines of progress as before, then one summary line.
        lines = out.splitlines()
        assert lines[0].startswith(f"{node_id}: frame 1/10 "), out
        assert lines[-2].startswith(f"{node_id}: wrote "), out
        summary = re.fullmatch(
            rf"{node_id}: 10 frames in (\d+\.\d\d) s \((\d+\.\d) frames/s\), "
            r"(\d+) resent, (\d+) duplicates",
            lines[-1],
        )
        assert summary is not None, out
        # The rate is the frames over the seconds, up to the rounding of both.
        seconds, rate = float(summary[1]), float(summary[2])
        assert rate > 0, out
        if seconds >= 0.01:
            assert 10 / (seconds + 0.005) - 0.05 <= rate <= 10 / (seconds - 0.005) + 0.05, out
    for rank in range(2):
        lines = [json.loads(x) for x in (tmp_path / f"m{rank}.jsonl").read_text().splitlines()]
        assert len(lines) >= 2
        last = lines[-1]
        assert last["frame"] == 10
        (link,) = last["links"].values()
        assert {"sent", "acked", "resent", "duplicates", "rtt_ms", "state"} <= set(link)
        # Every halo was answered; the last "done" is not awaited (the
        # neighbour may leave before its ACK comes back).
        assert link["sent"] - 1 <= link["acked"] <= link["sent"]
        assert link["gave_up"] == 0


@pytest.mark.slow
async def test_the_demos_tiles_do_not_repeat_the_plaintext_warning(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from actors.grid import Job, run_demo

    job = Job(size=32, frames=4, seed=3)
    outcome = await run_demo(job, nodes=2, out=tmp_path, pauses=[], show=False, timeout=90)
    assert outcome.match
    assert "UNAUTHENTICATED" not in capfd.readouterr().err


@pytest.mark.slow
def test_node_on_a_terminal_shows_a_bar_of_frames_then_its_summary(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    from test_demo import _two_tiles

    from actors.grid import Job

    decomp, path = _two_tiles(tmp_path)
    first, second = decomp.node_ids()
    job = Job(size=32, frames=40, seed=4, linger=5.0)
    master, slave = os.openpty()
    # 100 columns: the bar's line fits on one row.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    procs: list[subprocess.Popen[bytes]] = []
    got = b""
    try:
        for rank, stdout in enumerate([slave, subprocess.PIPE]):
            procs.append(
                subprocess.Popen(
                    _node_cmd(path, tmp_path, job.args()),
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=subprocess.DEVNULL,
                    env={**os.environ, "SLURM_PROCID": str(rank), "TERM": "xterm-256color"},
                )
            )
        os.close(slave)
        slave = -1
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 0.5)[0]:
                if procs[0].poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the node closed the terminal's other side
                break
            if not chunk:
                break
            got += chunk
        piped = procs[1].communicate(timeout=120)[0].decode()
        procs[0].wait(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert [p.returncode for p in procs] == [0, 0]
    rows = re.split(r"\r\n|\r|\n", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", got.decode()))
    # The bar in place of the lines of progress, the last frame drawn.
    assert any(re.match(rf"{first}: frame +\d+/40 ", row) for row in rows), rows
    assert any(row.startswith(f"{first}: frame 40/40 ") for row in rows), rows
    assert not any(row.startswith(f"{first}: frame 1/40 {{") for row in rows), rows
    assert rows[-3].startswith(f"{first}: wrote "), rows
    assert re.fullmatch(rf"{first}: 40 frames in .* duplicates", rows[-2]), rows
    # Its neighbour, on a pipe, printed its lines of progress as before.
    assert piped.splitlines()[0].startswith(f"{second}: frame 1/40 {{"), piped
