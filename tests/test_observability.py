"""What a user can watch: --version, --log-level, the statistics table, --metrics,
one plaintext warning per run, and a linger that ends when the neighbours are done."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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

    _, path = _two_tiles(tmp_path)
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
        for p in procs:
            p.communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0]
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
