"""``cellmesh run``: N local ranks of one program, with MPI's semantics.

The launcher writes the job's topology (free ports on 127.0.0.1) to a file in
a temporary folder and starts each rank with the variables ``mpiexec`` and
``srun`` would set, so ``open_node_from_env`` finds the same things under all
three. It prefixes each line a rank writes with ``[its node id]``.

The first rank to fail ends the job (``mpiexec``'s rule): the others get
SIGTERM, then SIGKILL after the grace, and the launcher exits with the failed
rank's status. With ``--restart on-failure[:MAX]`` a failed rank is started
again, same id, same environment, up to MAX times, before it counts as
failed. SIGINT or SIGTERM to the launcher stops every rank the same way (exit
status 130 or 143); a second one skips the grace.

Each rank runs in its own session, so a terminal's Ctrl-C reaches the
launcher alone and the ranks stop in one way, by the launcher's signals; a
signal goes to the rank's whole process group, which also stops what a shell
wrapper (``sh -c ...``) started.

At the end the launcher says in one line on stderr how many ranks finished,
failed, were stopped and restarted, and how long the job took. On a terminal
a job that runs past ``_LIVE_AFTER`` seconds also shows a live line below the
ranks' output (rich, the ``grid`` extra; without it, the summary alone).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

import trio

from transport.security import generate_key_pair, write_key_pair

from ._fromenv import (
    BASE_PORT_ENV,
    GRID_ENV,
    KEYS_ENV,
    SIZE_ENV,
    TOPOLOGY_ENV,
    local_topology,
)
from ._node import PLAINTEXT_WARNED_ENV
from ._topology import NODE_ID_ENV, RANK_ENV, Topology

if TYPE_CHECKING:
    # Only for the types: the runtime loads rich lazily, and only on a
    # terminal (tests/test_layering.py: ``import actors`` loads no rich).
    from rich.console import RenderableType
    from rich.live import Live

#: Restarts per rank that ``on-failure`` allows without ``:MAX``.
DEFAULT_MAX_RESTARTS: Final = 3

#: Seconds a rank's pipes may stay open after it exits (a child it left behind
#: holding them); then what it still writes is dropped.
_DRAIN: Final = 1.0

#: A line longer than this is cut and written in pieces, so that a rank that
#: never writes a newline cannot grow the launcher's buffer without bound.
_LINE_MAX: Final = 64 * 1024

#: Seconds a job runs before its live line shows on a terminal: a short job
#: ends before it would be read, and its summary line says it all.
_LIVE_AFTER: Final = 2.0

#: Seconds between redraws of the live line (its elapsed time counts seconds).
_LIVE_EVERY: Final = 0.25

_SIGNAL_STATUS: Final = {signal.SIGINT: 130, signal.SIGTERM: 143}
_SIGNAL_SAYS: Final = {
    signal.SIGINT: "interrupted (Ctrl-C)",
    signal.SIGTERM: "terminated (SIGTERM)",
}


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """What ``--restart`` allows.

    Attributes:
        max_restarts: how many times one rank may be started again after a
            failure; 0 is ``never``.
    """

    max_restarts: int = 0

    @classmethod
    def parse(cls, text: str) -> RestartPolicy:
        """``never``, ``on-failure`` or ``on-failure:MAX``.

        Raises:
            ValueError: another text; the message says what is accepted.
        """
        kind, sep, count = text.partition(":")
        if kind == "never" and not sep:
            return cls(0)
        if kind == "on-failure":
            if not sep:
                return cls(DEFAULT_MAX_RESTARTS)
            if count.isdecimal() and int(count) >= 1:
                return cls(int(count))
        raise ValueError(f"wants never, on-failure or on-failure:MAX (MAX >= 1), got {text!r}")


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """One ``cellmesh run``.

    Attributes:
        command: the program and its arguments, run once per rank.
        ranks: how many.
        grid: ``(rows, columns)`` for a tile-grid topology, or None for every
            rank linked to every other.
        restart: the restart policy.
        grace: seconds between SIGTERM and SIGKILL when ranks are stopped.
        secure: give every rank throwaway CURVE keys (``CELLMESH_KEYS``).
    """

    command: tuple[str, ...]
    ranks: int
    grid: tuple[int, int] | None = None
    restart: RestartPolicy = RestartPolicy()
    grace: float = 3.0
    secure: bool = False


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1, below the ephemeral range.

    A port chosen by the kernel (bind to 0) is an ephemeral one, which an
    outgoing connection may take before the rank binds it (guide.md, "Ports
    and firewalls"); so pick in 20000..32000, as the demo does. The sockets
    stay bound until all are picked, so the ports are distinct.

    Raises:
        OSError: not enough free ports found.
    """
    rng = random.Random()
    held: list[socket.socket] = []
    try:
        for _ in range(count * 50 + 100):
            if len(held) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", rng.randrange(20000, 32000)))
            except OSError:
                s.close()
                continue
            held.append(s)
        if len(held) < count:
            raise OSError(f"found only {len(held)} of {count} free TCP ports in 20000..32000")
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def rank_environment(
    base: Mapping[str, str], topology: Topology, rank: int, topology_file: str, keys: str | None
) -> dict[str, str]:
    """The environment of ``rank``: ``base`` with the launcher variables set.

    Every rank variable ``node_id_from_env`` reads is set (``SLURM_PROCID``,
    ``PMI_RANK``, ``PMIX_RANK``, ``OMPI_COMM_WORLD_RANK``) with its count
    beside it, so a value inherited from an outer launcher cannot win; and
    ``CELLMESH_NODE_ID``, ``CELLMESH_TOPOLOGY``, ``CELLMESH_KEYS`` (only with
    keys; without them ``CELLMESH_PLAINTEXT_WARNED=1``, as the launcher has
    warned once for the run). ``PYTHONUNBUFFERED=1`` unless set: a Python rank's lines then reach
    the terminal as it prints them, not when its pipe buffer fills.
    """
    env = dict(base)
    for var in (KEYS_ENV, BASE_PORT_ENV, GRID_ENV):
        env.pop(var, None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    for var in RANK_ENV:
        env[var] = str(rank)
    for var in SIZE_ENV.values():
        env[var] = str(len(topology))
    env[NODE_ID_ENV] = topology.ids[rank]
    env[TOPOLOGY_ENV] = topology_file
    if keys is not None:
        env[KEYS_ENV] = keys
    else:
        # The launcher says once that the run is plaintext; its ranks need not.
        env[PLAINTEXT_WARNED_ENV] = "1"
    return env


def _describe(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = "an unknown signal"
        return f"was killed by signal {-status} ({name})"
    return f"exited with status {status}"


def _ranks(count: int) -> str:
    return f"{count} rank" if count == 1 else f"{count} ranks"


def _restarts(count: int) -> str:
    return f"{count} restart" if count == 1 else f"{count} restarts"


def _same_terminal(a: BinaryIO, b: BinaryIO) -> bool:
    """Whether ``a`` is a terminal and ``b`` writes to that same terminal."""
    try:
        if not a.isatty():
            return False
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class _Job:
    """The running ranks, and how the job ends."""

    def __init__(self, plan: LaunchPlan, topology: Topology, envs: Sequence[dict[str, str]]):
        self._plan = plan
        self._topology = topology
        self._envs = envs
        self._stop = trio.Event()
        self._kill = trio.Event()
        self._running: set[int] = set()
        self._failure: tuple[int, int] | None = None
        self._signal: int | None = None
        self._out = sys.stdout.buffer
        self._err = sys.stderr.buffer
        #: For the live line and the summary: ranks that exited 0, the one
        #: that failed the job, those stopped by the launcher, restarts made.
        self._finished = 0
        self._failed = 0
        self._stopped = 0
        self._restarts = 0
        self._started = 0.0
        #: The live line while it shows; then every line goes through its console.
        self._live: Live | None = None
        #: The ranks' stdout shares the live line's terminal: through its console too.
        self._out_with_live = _same_terminal(self._err, self._out)

    async def run(self) -> int:
        """Run every rank to its end; returns the launcher's exit status."""
        self._started = trio.current_time()
        async with trio.open_nursery() as nursery:
            # Listening before the first spawn: a Ctrl-C during start-up stops
            # the ranks already started too.
            await nursery.start(self._watch_signals)
            if self._err.isatty():
                nursery.start_soon(self._show_live_line)
            async with trio.open_nursery() as ranks:
                for rank in range(self._plan.ranks):
                    ranks.start_soon(self._rank, rank)
            nursery.cancel_scope.cancel()
        self._say(self._summary())
        if self._signal is not None:
            return _SIGNAL_STATUS[signal.Signals(self._signal)]
        if self._failure is not None:
            status = self._failure[1]
            return status if status > 0 else 128 - status
        return 0

    def _label(self, rank: int) -> str:
        node_id = self._topology.ids[rank]
        return f"rank {rank}" if node_id == str(rank) else f"rank {rank} ({node_id})"

    def _say(self, text: str) -> None:
        self._emit(self._err, f"cellmesh run: {text}\n".encode())

    def _emit(self, out: BinaryIO, data: bytes) -> None:
        """Write ``data`` (whole lines) to ``out``, above the live line if it shows there."""
        live = self._live
        if live is not None and (out is self._err or self._out_with_live):
            # The console erases the live line, writes, and draws it again below.
            text = data.decode(errors="replace").removesuffix("\n")
            live.console.out(text, highlight=False)
        else:
            _write(out, data)

    def _elapsed(self) -> float:
        return trio.current_time() - self._started

    def _state(self) -> str:
        """The live line's text: the ranks running, finished, failed, restarts, time."""
        return (
            f"{len(self._running)} running, {self._finished} finished, {self._failed} failed, "
            f"{_restarts(self._restarts)}; {self._elapsed():.0f} s"
        )

    def _summary(self) -> str:
        """The last line: how the ranks ended, and how long the job took."""
        ranks = self._plan.ranks
        took = f"in {self._elapsed():.1f} s"
        if self._finished == ranks:
            return f"{_ranks(ranks)} finished {took} (0 failed, {_restarts(self._restarts)})"
        return (
            f"{self._finished} of {_ranks(ranks)} finished {took} ({self._failed} failed, "
            f"{self._stopped} stopped, {_restarts(self._restarts)})"
        )

    def _render(self) -> RenderableType:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        line = Table.grid(padding=(0, 1))
        done = self._finished + self._failed + self._stopped
        bar = ProgressBar(total=self._plan.ranks, completed=done, width=20)
        line.add_row("cellmesh run:", bar, self._state())
        return line

    async def _show_live_line(self) -> None:
        """From ``_LIVE_AFTER`` seconds on, the live line below the ranks' output.

        Redrawn by this task, not by rich's refresh thread: every write to
        the terminal then happens on the launcher's one Trio thread.
        """
        await trio.sleep(_LIVE_AFTER)
        try:
            from rich.console import Console
            from rich.live import Live
        except ImportError:
            # rich comes with the grid extra; without it the summary line says enough.
            return
        console = Console(file=sys.stderr)
        if not console.is_terminal:
            return
        live = Live(self._render(), console=console, auto_refresh=False, transient=True)
        live.start(refresh=True)
        self._live = live
        try:
            while True:
                await trio.sleep(_LIVE_EVERY)
                live.update(self._render(), refresh=True)
        finally:
            self._live = None
            live.stop()

    async def _watch_signals(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                if self._stop.is_set():
                    # A second signal, or one while a failure stops the job: no more grace.
                    self._kill.set()
                    continue
                self._signal = signum
                says = _SIGNAL_SAYS[signal.Signals(signum)]
                self._say(f"{says}; stopping {_ranks(len(self._running))}")
                self._stop.set()

    async def _rank(self, rank: int) -> None:
        restarts = 0
        while not self._stop.is_set():
            status = await self._run_once(rank)
            if status == 0:
                self._finished += 1
                return
            if self._stop.is_set():
                self._stopped += 1
                return
            if restarts < self._plan.restart.max_restarts:
                restarts += 1
                self._restarts += 1
                self._say(
                    f"{self._label(rank)} {_describe(status)}; restarting it "
                    f"(restart {restarts} of {self._plan.restart.max_restarts})"
                )
                continue
            self._failure = (rank, status)
            self._failed += 1
            others = len(self._running)
            stopping = {0: "no other rank runs", 1: "stopping the other rank"}.get(
                others, f"stopping the other {others} ranks"
            )
            self._say(f"{self._label(rank)} {_describe(status)}; {stopping}")
            self._stop.set()
            return

    async def _run_once(self, rank: int) -> int:
        """Start ``rank`` once and wait for its end; returns its status (< 0: a signal)."""
        prefix = f"[{self._topology.ids[rank]}] ".encode()
        # Counted from before the spawn: a failure meanwhile counts it among
        # the ranks it stops, and stops it as soon as it runs.
        self._running.add(rank)
        try:
            # Not cancellable (a thread runs Popen), so no rank escapes unseen.
            proc = await trio.lowlevel.open_process(
                list(self._plan.command),
                env=self._envs[rank],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except BaseException:
            self._running.discard(rank)
            raise
        stdout, stderr = proc.stdout, proc.stderr
        assert stdout is not None
        assert stderr is not None
        try:
            async with stdout, stderr, trio.open_nursery() as io:
                io.start_soon(_pump, stdout, functools.partial(self._emit, self._out), prefix)
                io.start_soon(_pump, stderr, functools.partial(self._emit, self._err), prefix)
                async with trio.open_nursery() as life:
                    life.start_soon(self._stop_when_told, proc)
                    status = await proc.wait()
                    self._running.discard(rank)
                    life.cancel_scope.cancel()
                io.cancel_scope.deadline = trio.current_time() + _DRAIN
            return status
        finally:
            self._running.discard(rank)
            if proc.returncode is None:
                # Cancelled (an error elsewhere ended the job): no rank outlives it.
                _signal_group(proc, signal.SIGKILL)
                with trio.CancelScope(shield=True):
                    await proc.wait()

    async def _stop_when_told(self, proc: trio.Process) -> None:
        await self._stop.wait()
        _signal_group(proc, signal.SIGTERM)
        with trio.move_on_after(self._plan.grace):
            await self._kill.wait()
        _signal_group(proc, signal.SIGKILL)


def _signal_group(proc: trio.Process, signum: int) -> None:
    """Send ``signum`` to the process group ``proc`` leads, if it is not reaped yet.

    An unreaped process keeps its pid, so the group cannot be another's.
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)


def _write(out: BinaryIO, data: bytes) -> None:
    try:
        out.write(data)
        out.flush()
    except BrokenPipeError:
        # Our reader left (`cellmesh run ... | head`): the ranks run on.
        pass


async def _pump(
    stream: trio.abc.ReceiveStream, write: Callable[[bytes], None], prefix: bytes
) -> None:
    """Copy ``stream`` to ``write`` line by line, each line behind ``prefix``.

    Whole lines only, so the lines of two ranks never mix mid-line; the
    unfinished last line is written when the stream ends or is cancelled.
    """
    pending = b""
    try:
        async for chunk in stream:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > _LINE_MAX:
                lines.append(pending)
                pending = b""
            if lines:
                write(b"".join(prefix + line + b"\n" for line in lines))
    finally:
        if pending:
            write(prefix + pending + b"\n")


def launch(plan: LaunchPlan) -> int:
    """Run ``plan``'s ranks to their end; returns the launcher's exit status.

    Raises:
        OSError: no free ports, the temporary folder, or a rank that could not
            be started (the others are killed first).
    """
    ports = free_ports(plan.ranks)
    topology = local_topology(plan.ranks, lambda rank: f"tcp://127.0.0.1:{ports[rank]}", plan.grid)
    folder = Path(tempfile.mkdtemp(prefix="cellmesh-run-"))
    try:
        keys: str | None = None
        if plan.secure:
            keys_dir = folder / "keys"
            keys_dir.mkdir(mode=0o700)
            public: dict[str, str] = {}
            for node_id in topology.ids:
                pair = generate_key_pair()
                write_key_pair(keys_dir, node_id, pair)
                public[node_id] = pair.public
            topology = topology.with_public_keys(public)
            keys = str(keys_dir)
        else:
            print(
                f"cellmesh run: {_ranks(plan.ranks)} on 127.0.0.1 without keys (plaintext, "
                "unauthenticated); --secure gives each rank throwaway CURVE keys",
                file=sys.stderr,
                flush=True,
            )
        topology_file = folder / "topology.toml"
        topology.save(topology_file)
        envs = [
            rank_environment(os.environ, topology, rank, str(topology_file), keys)
            for rank in range(plan.ranks)
        ]
        return trio.run(_Job(plan, topology, envs).run)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
