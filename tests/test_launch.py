"""``cellmesh run`` and ``open_node_from_env``: one program, whoever launches it.

The environment's half first (which topology and rank a process reads, and the
one-line errors when it says nothing usable), then real processes: the
launcher runs ``examples/hello_ranks.py`` on 3 ranks and on a secure 2x2 grid,
prefixes every line, ends the job at the first failed rank, stops every rank
on Ctrl-C or SIGTERM (also ranks that ignore SIGTERM), restarts a failed rank
with ``--restart on-failure``; and ``mpiexec -n 3`` (mpich from PyPI, the
``test`` extra) runs the same program unchanged.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import trio

from actors import Actor, Delivery, Gap, Topology, TopologyError, open_node_from_env
from actors._fromenv import (
    BASE_PORT_ENV,
    DEFAULT_BASE_PORT,
    GRID_ENV,
    KEYS_ENV,
    SIZE_ENV,
    TOPOLOGY_ENV,
)
from actors._launch import RestartPolicy, rank_environment
from actors._topology import NODE_ID_ENV, RANK_ENV
from actors.launch import node_id_from_env, topology_from_env
from transport.security import generate_key_pair, write_key_pair

ROOT = Path(__file__).resolve().parent.parent
HELLO = [sys.executable, str(ROOT / "examples" / "hello_ranks.py")]

_SCRIPT = Path(sys.executable).with_name("cellmesh")
CELLMESH = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "actors._cli"]

#: Every variable a launcher sets that this suite's own launcher (srun,
#: mpiexec, an outer cellmesh run) may have set for the test process.
LAUNCHER_VARS = (
    NODE_ID_ENV,
    TOPOLOGY_ENV,
    BASE_PORT_ENV,
    GRID_ENV,
    KEYS_ENV,
    *RANK_ENV,
    *SIZE_ENV.values(),
    "CELLMESH_DEBUG",
)

#: What a plaintext node says on its own (no rank of the launcher's says it).
UNAUTHENTICATED = "runs UNAUTHENTICATED"
#: The launcher's one line for a plaintext run.
PLAINTEXT = "without keys (plaintext, unauthenticated)"

#: Seconds any one launch may take on two noisy cores (they take 1-5 s).
TIMEOUT = 60


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**env, "LC_ALL": "C", **extra}


def _free_base(count: int) -> int:
    """A port p below the ephemeral range with p .. p+count-1 all free on 127.0.0.1."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - count)
        held = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
        return base
    pytest.fail(f"no {count} consecutive free ports in 20000..32000")


# -- the environment ---------------------------------------------------------------


def test_every_rank_makes_the_same_topology_from_the_rank_count() -> None:
    made = [
        topology_from_env({"PMI_RANK": str(r), "PMI_SIZE": "3", BASE_PORT_ENV: "24000"})
        for r in range(3)
    ]
    assert made[0] == made[1] == made[2]
    topology = made[0]
    assert topology.ids == ("0", "1", "2")
    assert [n.endpoint for n in topology.nodes] == [
        f"tcp://127.0.0.1:{24000 + r}" for r in range(3)
    ]
    # MPI's COMM_WORLD: every rank reaches every other.
    assert topology.peers_of("1") == {"0": "tcp://127.0.0.1:24000", "2": "tcp://127.0.0.1:24002"}
    assert node_id_from_env({"PMI_RANK": "2", "PMI_SIZE": "3"}, topology) == "2"


def test_the_generated_topology_defaults_and_grid() -> None:
    plain = topology_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert plain.endpoint_of("1") == f"tcp://127.0.0.1:{DEFAULT_BASE_PORT + 1}"
    grid = topology_from_env(
        {"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "6", GRID_ENV: "2x3"}
    )
    assert grid == Topology.from_grid(2, 3, lambda r, c: f"tcp://127.0.0.1:{27500 + r * 3 + c}")
    # prterun sets PMIX_RANK, and Open MPI's count beside it.
    assert len(topology_from_env({"PMIX_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4"})) == 4


def test_a_topology_file_wins_and_must_fit_the_rank_count(tmp_path: Path) -> None:
    path = tmp_path / "grid.toml"
    Topology.from_grid(1, 2, lambda r, c: f"tcp://127.0.0.1:{23000 + c}").save(path)
    env = {TOPOLOGY_ENV: str(path), "PMI_RANK": "1", "PMI_SIZE": "2", BASE_PORT_ENV: "9"}
    topology = topology_from_env(env)
    assert topology.ids == ("t0-0", "t0-1")
    assert node_id_from_env(env, topology) == "t0-1"
    with pytest.raises(TopologyError, match=r"PMI_SIZE=3 but .*grid.toml has 2 nodes"):
        topology_from_env({**env, "PMI_SIZE": "3"})


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({}, "no rank in the environment: start the program with `cellmesh run -n N"),
        ({NODE_ID_ENV: "a"}, f"set {TOPOLOGY_ENV} to a topology file"),
        ({"PMIX_RANK": "0"}, "PMIX_RANK gives this rank but no variable gives the rank count"),
        ({"PMI_RANK": "x", "PMI_SIZE": "2"}, "PMI_RANK='x' is not a non-negative integer rank"),
        ({"PMI_RANK": "0", "PMI_SIZE": "0"}, "PMI_SIZE='0' is not a positive rank count"),
        ({"PMI_RANK": "3", "PMI_SIZE": "3"}, "PMI_RANK=3 but the topology has 3 nodes"),
        (
            {"PMI_RANK": "0", "PMI_SIZE": "3", BASE_PORT_ENV: "65534"},
            "CELLMESH_BASE_PORT='65534': wants a port such that 3 ports from it fit",
        ),
        ({"PMI_RANK": "0", "PMI_SIZE": "3", GRID_ENV: "2x2"}, "a 2x2 grid holds 4 ranks, not 3"),
        ({"PMI_RANK": "0", "PMI_SIZE": "4", GRID_ENV: "2by2"}, "CELLMESH_GRID: wants ROWSxCOL"),
        ({TOPOLOGY_ENV: "/nonexistent/t.toml"}, "cannot read it (No such file or directory)"),
        ({TOPOLOGY_ENV: "{good}"}, "no rank in the environment"),
    ],
)
async def test_an_environment_that_says_nothing_usable_is_one_typed_line(
    env: dict[str, str], says: str, tmp_path: Path
) -> None:
    good = tmp_path / "good.toml"
    Topology.from_grid(1, 2, lambda r, c: f"tcp://127.0.0.1:{23000 + c}").save(good)
    env = {k: v.format(good=good) for k, v in env.items()}
    with pytest.raises(TopologyError) as caught:
        async with open_node_from_env(environ=env):
            pytest.fail("opened a node from an environment that names no usable rank")
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


class _Echo(Actor[Delivery | Gap, str]):
    async def receive(self, msg: Delivery | Gap) -> str:
        assert isinstance(msg, Delivery)
        return f"got {msg.payload}"


async def test_two_ranks_open_their_nodes_from_the_environment_and_talk() -> None:
    base = _free_base(2)
    envs = [{"PMI_RANK": str(r), "PMI_SIZE": "2", BASE_PORT_ENV: str(base)} for r in range(2)]
    with trio.fail_after(30):
        async with (
            open_node_from_env(environ=envs[0], compute=_Echo) as zero,
            open_node_from_env(environ=envs[1], compute=_Echo) as one,
        ):
            assert (zero.id, one.id) == ("0", "1")
            assert one.endpoint == f"tcp://127.0.0.1:{base + 1}"
            assert (await zero.send("1", "hi")).result == "got hi"
            assert (await one.send("0", "ho")).result == "got ho"


async def test_keys_in_the_environment_make_the_node_secure(tmp_path: Path) -> None:
    base = _free_base(2)
    topology = Topology.from_grid(1, 2, lambda r, c: f"tcp://127.0.0.1:{base + c}")
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    public = {}
    for node_id in topology.ids:
        pair = generate_key_pair()
        write_key_pair(keys, node_id, pair)
        public[node_id] = pair.public
    path = tmp_path / "t.toml"
    topology.with_public_keys(public).save(path)
    envs = [{TOPOLOGY_ENV: str(path), KEYS_ENV: str(keys), "PMI_RANK": str(r)} for r in range(2)]
    with trio.fail_after(30):
        async with (
            open_node_from_env(environ=envs[0], compute=_Echo) as left,
            open_node_from_env(environ=envs[1], compute=_Echo) as right,
        ):
            assert (await left.send("t0-1", "x")).result == "got x"
            assert left.statistics().security.secure
            assert right.statistics().security.admitted >= 1


def test_each_rank_environment_overrides_what_an_outer_launcher_left() -> None:
    topology = Topology.from_grid(1, 3, lambda r, c: f"tcp://127.0.0.1:{23000 + c}")
    stale = {"SLURM_PROCID": "0", "SLURM_NTASKS": "64", NODE_ID_ENV: "x", KEYS_ENV: "/k"}
    env = rank_environment({**stale, "PATH": "/bin"}, topology, 2, "/tmp/t.toml", None)
    assert env["PATH"] == "/bin"
    assert all(env[var] == "2" for var in RANK_ENV)
    assert all(env[var] == "3" for var in SIZE_ENV.values())
    assert env[NODE_ID_ENV] == "t0-2"
    assert env[TOPOLOGY_ENV] == "/tmp/t.toml"
    assert KEYS_ENV not in env
    assert env["PYTHONUNBUFFERED"] == "1"


def test_restart_policies() -> None:
    assert RestartPolicy.parse("never").max_restarts == 0
    assert RestartPolicy.parse("on-failure").max_restarts == 3
    assert RestartPolicy.parse("on-failure:7").max_restarts == 7
    for bad in ("always", "on-failure:0", "on-failure:x", "never:2", ""):
        with pytest.raises(ValueError, match="wants never, on-failure or on-failure:MAX"):
            RestartPolicy.parse(bad)


# -- cellmesh run, with real processes ------------------------------------------------


def _launch(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CELLMESH, "run", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        cwd=tmp_path,
        # The launcher makes its topology folder in TMPDIR: the test sees it go.
        env=_env(TMPDIR=str(tmp_path), **env),
    )


def _by_prefix(text: str) -> dict[str, list[str]]:
    """Each line of ``text`` under its ``[id]`` prefix; fails on an unprefixed line."""
    lines: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\[([^\]]+)\] (.*)", line)
        assert m is not None, f"line without a rank prefix: {line!r}\n{text}"
        lines.setdefault(m[1], []).append(m[2])
    return lines


def _launcher_lines(stderr: str) -> list[str]:
    """The launcher's own lines on ``stderr`` (the ranks' are prefixed), but the plaintext one;
    the summary's time reads ``in T s``."""
    assert "Traceback" not in stderr, stderr
    return [
        re.sub(r" in \d+\.\d s ", " in T s ", line)
        for line in stderr.splitlines()
        if not line.startswith("[") and PLAINTEXT not in line
    ]


@pytest.mark.slow
def test_three_ranks_greet_each_other_with_prefixed_output(tmp_path: Path) -> None:
    done = _launch(["-n", "3", "--", *HELLO], tmp_path)
    assert done.returncode == 0, done.stderr
    out = _by_prefix(done.stdout)
    assert sorted(out) == ["0", "1", "2"]
    for rank in range(3):
        others = [r for r in range(3) if r != rank]
        assert out[str(rank)] == [
            *(f"rank {rank} ({rank}): {o} says 'hello from rank {o}'" for o in others),
            f"rank {rank} of 3: greeted by all 2 neighbours",
        ]
    assert _launcher_lines(done.stderr) == [
        "cellmesh run: 3 ranks finished in T s (0 failed, 0 restarts)"
    ]
    # One warning for the run, from the launcher; none from the ranks.
    assert [line for line in done.stderr.splitlines() if PLAINTEXT in line] == [
        "cellmesh run: 3 ranks on 127.0.0.1 without keys (plaintext, unauthenticated); "
        "--secure gives each rank throwaway CURVE keys"
    ]
    assert UNAUTHENTICATED not in done.stderr, done.stderr
    assert not list(tmp_path.glob("cellmesh-run-*")), "the topology folder was left behind"


@pytest.mark.slow
def test_a_secure_grid_of_ranks(tmp_path: Path) -> None:
    done = _launch(["--grid", "2x2", "--secure", "--", *HELLO], tmp_path)
    assert done.returncode == 0, done.stderr
    out = _by_prefix(done.stdout)
    assert sorted(out) == ["t0-0", "t0-1", "t1-0", "t1-1"]
    for rank, node_id in enumerate(["t0-0", "t0-1", "t1-0", "t1-1"]):
        assert out[node_id][-1] == f"rank {rank} of 4: greeted by all 3 neighbours"
    # Every link is CURVE: no rank warns that it runs unauthenticated.
    assert _launcher_lines(done.stderr) == [
        "cellmesh run: 4 ranks finished in T s (0 failed, 0 restarts)"
    ]
    assert done.stderr.count("\n") == 1, done.stderr
    assert not list(tmp_path.glob("cellmesh-run-*"))


@pytest.mark.slow
def test_every_line_is_prefixed_even_an_unfinished_one(tmp_path: Path) -> None:
    script = 'echo "one"; printf "two\\nthree" >&2; echo "$CELLMESH_NODE_ID $PMI_RANK/$PMI_SIZE"'
    done = _launch(["-n", "2", "--", "sh", "-c", script], tmp_path)
    assert done.returncode == 0, done.stderr
    assert _by_prefix(done.stdout) == {"0": ["one", "0 0/2"], "1": ["one", "1 1/2"]}
    ranks_stderr = "\n".join(line for line in done.stderr.splitlines() if line.startswith("["))
    assert _by_prefix(ranks_stderr) == {"0": ["two", "three"], "1": ["two", "three"]}
    # Not a terminal: no live line, only the summary.
    assert _launcher_lines(done.stderr) == [
        "cellmesh run: 2 ranks finished in T s (0 failed, 0 restarts)"
    ]


def _pids(folder: Path, count: int, proc: subprocess.Popen[str] | None = None) -> list[int]:
    """The pids the ranks wrote into ``folder`` (waits up to 60 s for ``count``)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        files = sorted(folder.glob("*.pid"))
        texts = [f.read_text().strip() for f in files]
        if len(files) >= count and all(texts):
            return [int(t) for t in texts]
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"only {len(files)} of {count} ranks started"
        time.sleep(0.05)


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive


def _kill_all(pids: list[int]) -> None:
    for pid in _alive(pids):
        os.kill(pid, signal.SIGKILL)


#: A rank that writes its pid into $PIDS and waits; rank 2 fails with status 3
#: once all 4 pids are there (at most 60 s), so that every rank is seen stopped.
FAILING = (
    'echo $$ > "$PIDS/$PMI_RANK.pid"; [ "$PMI_RANK" != 2 ] && exec sleep 120; i=0; '
    'while [ "$(ls "$PIDS" | wc -l)" -lt 4 ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; '
    "exit 3"
)


@pytest.mark.slow
def test_the_first_failed_rank_ends_the_job_with_one_line(tmp_path: Path) -> None:
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    try:
        done = _launch(["-n", "4", "--", "sh", "-c", FAILING], tmp_path, PIDS=str(pids_dir))
        # The others sleep 120 s: the launcher returning at all says they were stopped.
        assert done.returncode == 3, done.stderr
        assert _launcher_lines(done.stderr) == [
            "cellmesh run: rank 2 exited with status 3; stopping the other 3 ranks",
            "cellmesh run: 0 of 4 ranks finished in T s (1 failed, 3 stopped, 0 restarts)",
        ]
        assert _alive(_pids(pids_dir, 4)) == []
    finally:
        _kill_all(_pids(pids_dir, 0))


#: A rank that writes its pid and ignores SIGTERM: only SIGKILL stops it.
STUBBORN = 'echo $$ > "$PIDS/$PMI_RANK.pid"; trap "" TERM; exec sleep 120'


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "status", "says"),
    [
        ("ctrl-c at the terminal", 130, "interrupted (Ctrl-C)"),
        ("sigint to the launcher", 130, "interrupted (Ctrl-C)"),
        ("sigterm to the launcher", 143, "terminated (SIGTERM)"),
    ],
)
def test_a_signal_stops_every_rank_even_one_that_ignores_sigterm(
    how: str, status: int, says: str, tmp_path: Path
) -> None:
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    proc = subprocess.Popen(
        [*CELLMESH, "run", "-n", "3", "--grace", "0.5", "--", "sh", "-c", STUBBORN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(PIDS=str(pids_dir)),
        start_new_session=True,
    )
    try:
        pids = _pids(pids_dir, 3, proc)
        if how == "ctrl-c at the terminal":
            # What a terminal does: SIGINT to the foreground group (the launcher's).
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM if "sigterm" in how else signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == status, err
        assert _launcher_lines(err) == [
            f"cellmesh run: {says}; stopping 3 ranks",
            "cellmesh run: 0 of 3 ranks finished in T s (0 failed, 3 stopped, 0 restarts)",
        ]
        assert _alive(pids) == []
    finally:
        proc.kill()
        proc.communicate()
        _kill_all(_pids(pids_dir, 0))


@pytest.mark.slow
def test_a_rank_that_fails_once_is_restarted_and_the_job_succeeds(tmp_path: Path) -> None:
    marker = tmp_path / "failed-once"
    # Rank 1 fails before its node opens, the first time only; the others
    # keep sending it their greeting until the restarted rank 1 answers.
    once = f'[ "$PMI_RANK" = 1 ] && [ ! -e "{marker}" ] && touch "{marker}" && exit 3; exec "$@"'
    done = _launch(
        ["-n", "3", "--restart", "on-failure", "--", "sh", "-c", once, "sh", *HELLO], tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert marker.exists()
    assert _launcher_lines(done.stderr) == [
        "cellmesh run: rank 1 exited with status 3; restarting it (restart 1 of 3)",
        "cellmesh run: 3 ranks finished in T s (0 failed, 1 restart)",
    ]
    out = _by_prefix(done.stdout)
    for rank in range(3):
        assert out[str(rank)][-1] == f"rank {rank} of 3: greeted by all 2 neighbours"


@pytest.mark.slow
def test_a_rank_that_keeps_failing_fails_the_job_after_max_restarts(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    script = f'[ "$PMI_RANK" = 1 ] && echo run >> "{runs}" && exit 4; exec sleep 120'
    done = _launch(["-n", "2", "--restart", "on-failure:2", "--", "sh", "-c", script], tmp_path)
    assert done.returncode == 4, done.stderr
    assert runs.read_text().splitlines() == ["run"] * 3
    assert _launcher_lines(done.stderr) == [
        "cellmesh run: rank 1 exited with status 4; restarting it (restart 1 of 2)",
        "cellmesh run: rank 1 exited with status 4; restarting it (restart 2 of 2)",
        "cellmesh run: rank 1 exited with status 4; stopping the other rank",
        "cellmesh run: 0 of 2 ranks finished in T s (1 failed, 1 stopped, 2 restarts)",
    ]


@pytest.mark.slow
def test_a_rank_killed_by_a_signal_is_named_with_it(tmp_path: Path) -> None:
    done = _launch(["-n", "1", "--", "sh", "-c", "kill -9 $$"], tmp_path)
    assert done.returncode == 128 + 9
    assert _launcher_lines(done.stderr) == [
        "cellmesh run: rank 0 was killed by signal 9 (SIGKILL); no other rank runs",
        "cellmesh run: 0 of 1 rank finished in T s (1 failed, 0 stopped, 0 restarts)",
    ]


#: Escape sequences rich writes to draw, erase and redraw its live line.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _read_terminal(master: int, proc: subprocess.Popen[bytes]) -> str:
    """All the launcher writes to the terminal ``master`` until it exits (at most TIMEOUT s)."""
    deadline = time.monotonic() + TIMEOUT
    got = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every end of the terminal's other side is closed
            break
        if not chunk:
            break
        got += chunk
    proc.wait(timeout=TIMEOUT)
    return got.decode(errors="replace")


@pytest.mark.slow
def test_on_a_terminal_a_live_line_shows_and_the_ranks_lines_stay_whole(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    master, slave = os.openpty()
    # A terminal 100 columns wide: the live line fits on one row.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    script = 'echo "start $PMI_RANK"; sleep 3; echo "end $PMI_RANK"'
    try:
        proc = subprocess.Popen(
            [*CELLMESH, "run", "-n", "2", "--", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=slave,
            env=_env(TERM="xterm-256color", COLUMNS="100", LINES="30"),
            cwd=tmp_path,
            start_new_session=True,
        )
        os.close(slave)
        slave = -1
        try:
            text = _read_terminal(master, proc)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, text
    rows = re.split(r"\r\n|\r|\n", _ANSI.sub("", text))
    # The live line while both ranks sleep: past 2 s, before the end.
    live = [row for row in rows if row.startswith("cellmesh run:") and "running" in row]
    assert any("2 running, 0 finished, 0 failed, 0 restarts" in row for row in live), rows
    # Every rank line is whole, on a row of its own, and each came once.
    for rank in ("0", "1"):
        for word in ("start", "end"):
            assert rows.count(f"[{rank}] {word} {rank}") == 1, rows
    assert rows.index("[0] start 0") < rows.index("[0] end 0")
    summary = [row for row in rows if "finished in" in row]
    assert len(summary) == 1, rows
    assert re.fullmatch(
        r"cellmesh run: 2 ranks finished in \d+\.\d s \(0 failed, 0 restarts\)", summary[0]
    ), summary


BAD_RUN = {
    "no program": (["-n", "2"], "give the program after --"),
    "no program after --": (["-n", "2", "--"], "give the program after --"),
    "no rank count": (["--", "true"], "say how many ranks: -n N"),
    "zero ranks": (["-n", "0", "--", "true"], "argument -n: must be >= 1"),
    "grid and count disagree": (["-n", "2", "--grid", "3x1", "--", "true"], "has 3 tiles"),
    "grid shape": (["--grid", "2by2", "--", "true"], "wants ROWSxCOLUMNS"),
    "restart policy": (["-n", "1", "--restart", "always", "--", "true"], "on-failure:MAX"),
    "grace": (["-n", "1", "--grace", "-1", "--", "true"], "--grace"),
    "unknown program": (["-n", "1", "--", "no-such-program-x"], "cannot find the program"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_RUN))
def test_bad_run_input_is_one_line_and_status_2(case: str, tmp_path: Path) -> None:
    args, says = BAD_RUN[case]
    done = _launch(args, tmp_path)
    assert done.returncode == 2, done.stderr
    lines = _launcher_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cellmesh run: error: "), lines
    assert says in lines[0]
    assert done.stdout == ""


# -- the same program under mpiexec ---------------------------------------------------


def _mpiexec() -> str:
    # The venv's bin first: `pip install mpich` puts mpiexec there.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("mpiexec", path=path)
    if found is None:
        pytest.skip("no mpiexec: pip install mpich (the test extra has it)")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("given", ["base port", "topology file"])
def test_mpiexec_runs_the_same_program_unchanged(given: str, tmp_path: Path) -> None:
    mpiexec = _mpiexec()
    base = _free_base(3)
    if given == "base port":
        env = _env(**{BASE_PORT_ENV: str(base)})
        ids = ["0", "1", "2"]
    else:
        path = tmp_path / "row.toml"
        Topology.from_grid(1, 3, lambda r, c: f"tcp://127.0.0.1:{base + c}").save(path)
        env = _env(**{TOPOLOGY_ENV: str(path)})
        ids = ["t0-0", "t0-1", "t0-2"]
    done = subprocess.run(
        [mpiexec, "-n", "3", *HELLO],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # mpiexec forwards each rank's writes as they come, not line by line: two
    # ranks' lines may run together, so look for each one's text anywhere.
    neighbours = [2, 2, 2] if given == "base port" else [1, 2, 1]
    for rank, node_id in enumerate(ids):
        assert f"rank {rank} of 3: greeted by all {neighbours[rank]} neighbours" in done.stdout
        assert f"rank {rank} ({node_id}): " in done.stdout
