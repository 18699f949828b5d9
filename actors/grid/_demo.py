"""The grid demo: one process per tile, halos exchanged through cellmesh.

``cellmesh demo`` (the coordinator, :func:`run_demo`) writes a topology,
starts one ``cellmesh node`` process per tile (:func:`run_tile`), shows their
progress live, gathers the final tiles, and checks the result against a
serial numpy run of the same start. Every byte between processes — halos,
progress, results — travels as a cellmesh ``send`` with an ACK.

Every ``depth`` frames a tile node sends its edges and corners, ``depth``
frames deep, to its (up to eight) neighbours on the ordered stream ``"halo"``
with ``frame_no`` set, waits for theirs, fills its halo and steps ``depth``
frames on its own (:class:`DeepTile`). A neighbour is never more than one
exchange ahead (it needs our halo first), so the inbox holds at most two.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import trio

from actors import (
    Actor,
    Delivery,
    Node,
    NodeConfig,
    NodeSpec,
    SendHandle,
    Topology,
    load_security,
    open_node,
)
from transport import (
    LocalProtocolError,
    SenderConfig,
)
from transport.security import (
    Security,
    generate_key_pair,
    write_key_pair,
)
from transport.testing import (
    FaultPlan,
)

from ._decomp import Decomposition, Direction, GridError, TilePos, assemble, interior, pad
from ._models import Model, RleError, get_model, grid_digest, load_rle, place_center, run_serial

if TYPE_CHECKING:
    # Imported where used: actors/grid/_recovery.py builds on this module.
    from rich.progress import Progress, TaskID

    from ._recovery import Kill, Recovery

COORDINATOR = "coord"

#: Set by the coordinator in each tile process's environment to its own pid:
#: such a node ignores SIGINT (a Ctrl-C at the terminal reaches the whole
#: process group; the coordinator alone answers it and stops the tiles) and
#: stops when its stdin, a pipe from the coordinator, closes: no tile outlives
#: its demo, even one whose coordinator was SIGKILLed.
PARENT_ENV = "CELLMESH_DEMO_PARENT"

#: Set in each tile process's environment too: the coordinator's node has
#: said that the run is plaintext, and the tiles need not say it again
#: (docs/observability.md; one warning per run, not per node).
PLAINTEXT_WARNED_ENV = "CELLMESH_PLAINTEXT_WARNED"

#: Seconds between a tile node's progress reports, with up to this many tiles ...
_REPORT_EVERY = 0.1
_REPORTING_TILES = 8
#: ... and proportionally longer with more: the coordinator, one process,
#: takes at most ~80 reports a second. At 64 tiles and 10 reports a second
#: each it fell behind on 2 cores, and the tiles' unanswered reports were
#: resent (56,690 retransmissions in a 64-frame run, docs/performance.md).

#: The automatic halo depth: at most this many frames per exchange ...
_MAX_AUTO_DEPTH = 16
#: ... and one frame of depth per this many cells of the tile's narrower
#: side, so the cells stepped twice (by a tile and its neighbour) stay a few
#: per cent of the tile: 16 frames of a 512-cell-wide tile recompute ~3%.
_CELLS_PER_DEPTH = 32

#: glibc returns large freed blocks to the OS and takes them back every frame
#: (the step allocates a tile-sized array); these keep them in the heap.
#: Measured by bench/grid.py: the 2048² step went from 7.4 ms to 2.4 ms.
_CHILD_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "100000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}

Grid = npt.NDArray[Any]


class DemoError(Exception):
    """A demo or tile run cannot start, or did not finish; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Job:
    """What every process of one demo run agrees on."""

    model: str = "life"
    size: int = 1024
    frames: int = 300
    seed: int = 1
    pattern: str | None = None
    drop: float = 0.0
    dup: float = 0.0
    delay_ms: float = 0.0
    linger: float = 10.0
    #: ``NodeConfig.spin`` of every node (``--spin``), None for the default.
    spin: float | None = None
    #: Frames per halo exchange (None: :func:`auto_depth` picks it).
    depth: int | None = None
    #: Frames whose end every node reports at once, on top of ten reports a
    #: second: ``cellmesh demo`` passes its ``--pause`` frames, so that a
    #: pause lands near its frame even in a run shorter than a report interval.
    report_at: tuple[int, ...] = ()
    #: Frames between a tile's checkpoints, 0 for none (``--checkpoint-every``;
    #: rounded up to a multiple of the depth, see actors/grid/_recovery.py).
    checkpoint_every: int = 0
    #: The run's checkpoint folder (the demo makes a temporary one); with it
    #: a tile process checkpoints and rolls back when the coordinator says.
    checkpoint_dir: str | None = None

    def check(self) -> None:
        """Check the job, and read its pattern file, before any process starts.

        Raises:
            DemoError: a value out of range, an unknown model, a pattern file
                that is missing, not Life RLE or larger than the grid. (The
                halo depth is the tiles' business: :func:`run_demo` and
                :class:`DeepTile` check it.)
        """
        try:
            model = get_model(self.model)
            self.fault_plan(0)
        except (ValueError, LocalProtocolError) as exc:
            raise DemoError(str(exc)) from None
        if self.size < 1:
            raise DemoError(f"the grid size must be >= 1 cell, got {self.size}")
        if self.frames < 0:
            raise DemoError(f"frames must be >= 0, got {self.frames}")
        if not self.linger >= 0:
            raise DemoError(f"linger must be >= 0 seconds, got {self.linger}")
        if self.checkpoint_every < 0:
            raise DemoError(f"--checkpoint-every must be >= 0 frames, got {self.checkpoint_every}")
        if self.pattern is None:
            return
        if model.name != "life":
            raise DemoError("--pattern is a Life pattern; use it with --model life")
        try:
            pattern = load_rle(self.pattern)
        except OSError as exc:
            raise DemoError(
                f"cannot read the pattern {self.pattern}: {exc.strerror}; "
                "give the path of a Life RLE file"
            ) from None
        except UnicodeDecodeError:
            raise DemoError(
                f"the pattern {self.pattern} is not text; give a Life RLE file"
            ) from None
        except RleError as exc:
            raise DemoError(f"{exc}; give a Life RLE file (x = W, y = H, rule = B3/S23)") from None
        rows, cols = pattern.shape
        if rows > self.size or cols > self.size:
            raise DemoError(
                f"the pattern {self.pattern} is {rows}x{cols} cells, larger than the "
                f"{self.size}x{self.size} grid; give --size {max(rows, cols)} or more"
            )

    def fault_plan(self, salt: int) -> FaultPlan:
        """The seeded wire faults of one process."""
        return FaultPlan(
            drop=self.drop,
            duplicate=self.dup,
            delay=self.delay_ms / 1000.0,
            seed=self.seed * 7919 + salt,
        )

    def node_config(self, salt: int) -> NodeConfig:
        """The node settings of one process (``salt`` seeds its faults)."""
        config = NodeConfig(
            faults=self.fault_plan(salt),
            sender=SenderConfig(retry_timeout=0.1, retry_ceiling=0.5, send_timeout=120.0),
            seed=self.seed,
        )
        return config if self.spin is None else replace(config, spin=self.spin)

    def initial_grid(self) -> Grid:
        """The start state: a pattern at the centre, or the model's seeded default."""
        model = get_model(self.model)
        shape = (self.size, self.size)
        if self.pattern is not None:
            if model.name != "life":
                raise ValueError("--pattern is a Life pattern; use it with --model life")
            return place_center(load_rle(self.pattern), shape)
        return model.initial(shape, self.seed)

    def args(self) -> list[str]:
        """The command-line options that reproduce this job in a node process."""
        out = ["--model", self.model, "--size", str(self.size), "--frames", str(self.frames)]
        out += ["--seed", str(self.seed), "--drop", str(self.drop), "--dup", str(self.dup)]
        out += ["--delay", str(self.delay_ms), "--linger", str(self.linger)]
        if self.pattern is not None:
            out += ["--pattern", self.pattern]
        if self.depth is not None:
            out += ["--depth", str(self.depth)]
        if self.spin is not None:
            out += ["--spin", str(self.spin)]
        for frame in self.report_at:
            out += ["--report-at", str(frame)]
        if self.checkpoint_every:
            out += ["--checkpoint-every", str(self.checkpoint_every)]
        if self.checkpoint_dir is not None:
            out += ["--checkpoint-dir", self.checkpoint_dir]
        return out


def grid_topology(decomp: Decomposition, endpoints: dict[str, str]) -> Topology:
    """Tiles linked to their 8 neighbours, plus the coordinator linked to all."""
    nodes = [NodeSpec(name, endpoints[name]) for name in decomp.node_ids()]
    nodes.append(NodeSpec(COORDINATOR, endpoints[COORDINATOR]))
    links: list[tuple[str, str]] = []
    for tile in decomp.tile_ids():
        me = decomp.node_id(tile)
        links.append((me, COORDINATOR))
        for other in decomp.neighbours(tile).values():
            them = decomp.node_id(other)
            if me < them:
                links.append((me, them))
    return Topology.build(nodes, links)


def tile_decomposition(topology: Topology, size: int) -> Decomposition:
    """The decomposition a topology made by :func:`grid_topology` describes."""
    names = [n.id for n in topology.nodes if n.id != COORDINATOR]
    return Decomposition.for_nodes((size, size), len(names), names=names)


# --- the tile node ---------------------------------------------------------------------


def auto_depth(decomp: Decomposition, model: Model) -> int:
    """The halo depth a tile node uses when the job names none.

    Deep enough that the messages of an exchange are spread over many
    frames, shallow enough that the recomputed border stays small (see
    ``_CELLS_PER_DEPTH``); 1 for tiles too small to gain from it.
    """
    side = min(decomp.min_tile_shape())
    return max(1, min(_MAX_AUTO_DEPTH, side // _CELLS_PER_DEPTH) // model.halo)


class DeepTile:
    """One tile's cells with a halo ``depth`` frames deep: one exchange per ``depth`` frames.

    Ghost-cell expansion (C. Ding and Y. He, "A ghost cell expansion method
    for reducing communications in solving PDE problems", SC 2001): the halo
    is ``depth * model.halo`` cells wide; after an exchange the tile steps
    ``depth`` frames on its own, each frame over a region one ``model.halo``
    smaller per side than the last, and the last frame's region is exactly
    the tile. The border cells a tile computes are the ones its neighbours
    compute too, from the same inputs by the same element-wise operations,
    so the result equals the serial run's bit for bit. Sides at the grid's
    edge keep the model's boundary value and are never stepped. Measured
    (docs/performance.md, Grid): a confirmed halo costs a node more CPU than
    a 1024² Life frame does, so one exchange per 16 frames instead of one
    per frame is what makes the tiled run fast.

    Call :meth:`fill` for every neighbour when :attr:`needs_halos` is true,
    then :meth:`step`.
    """

    def __init__(
        self, model: Model, decomp: Decomposition, tile: TilePos, local: Grid, depth: int
    ) -> None:
        """Pad ``local`` (the tile's cells) for halos ``depth`` frames deep.

        Raises:
            GridError: ``depth`` < 1, or a tile narrower than the halo it needs.
        """
        if depth < 1:
            raise GridError(f"halo depth must be >= 1 frame, got {depth}")
        width = depth * model.halo
        decomp.check_halo(width)
        self.model = model
        self.depth = depth
        self.width = width
        self.neighbours = decomp.neighbours(tile)
        self._send = {d: decomp.halo_send_slices(tile, d, width) for d in self.neighbours}
        self._recv = {d: decomp.halo_recv_slices(tile, d, width) for d in self.neighbours}
        first = pad(np.array(local, dtype=model.dtype, order="C"), width, model.boundary)
        # Two buffers, stepped from one into the other: a frame's region reads
        # cells the frame before wrote, never its own output.
        self._bufs = (first, first.copy())
        self._current = 0
        self._frame = 0
        rows, cols = first.shape
        h = model.halo
        self._regions: list[tuple[slice, slice]] = []
        for done in range(depth):
            # The region frame `done` of an exchange reads: all the still
            # valid halo on a side with a neighbour, the fixed boundary ring
            # of width `h` on a side at the grid's edge.
            grow = done * h
            top = grow if Direction.N in self.neighbours else width - h
            left = grow if Direction.W in self.neighbours else width - h
            bottom = rows - grow if Direction.S in self.neighbours else rows - width + h
            right = cols - grow if Direction.E in self.neighbours else cols - width + h
            self._regions.append((slice(top, bottom), slice(left, right)))

    @property
    def needs_halos(self) -> bool:
        """Whether the next :meth:`step` starts an exchange (fill every halo first)."""
        return self._frame % self.depth == 0

    def cells(self) -> Grid:
        """The tile's current cells (a view: copy it to keep it)."""
        return interior(self._bufs[self._current], self.width)

    def edge(self, direction: Direction) -> Grid:
        """The cells the neighbour towards ``direction`` needs, as a view."""
        return self.cells()[self._send[direction]]

    def fill(self, direction: Direction, data: bytes) -> None:
        """Put the neighbour towards ``direction``'s edge (raw bytes) into the halo.

        Raises:
            ValueError: ``data`` has not the size that halo needs.
        """
        slot = self._bufs[self._current][self._recv[direction]]
        slot[...] = np.frombuffer(data, dtype=self.model.dtype).reshape(slot.shape)

    def step(self) -> None:
        """Advance the tile one frame."""
        rows, cols = self._regions[self._frame % self.depth]
        h = self.model.halo
        src = self._bufs[self._current]
        dst = self._bufs[1 - self._current]
        dst[rows.start + h : rows.stop - h, cols.start + h : cols.stop - h] = self.model.step(
            src[rows, cols]
        )
        self._current = 1 - self._current
        self._frame += 1


#: The inbox slot of the neighbours' "done": each has all its answers from us
#: (frames count from 0, so it never meets a halo).
_DONE = -3


class _Inbox:
    """Halo data by frame and sender, with a wake-up when a frame is complete."""

    def __init__(self) -> None:
        self.frames: dict[int, dict[str, bytes]] = {}
        self._complete = trio.Event()
        #: The frame the frame loop waits for and how many halos make it whole.
        self._wanted: tuple[int, int] | None = None

    def put(self, frame: int, peer: str, data: bytes) -> None:
        halos = self.frames.setdefault(frame, {})
        halos[peer] = data
        # Wake the frame loop once, when its frame is whole: a wake per halo
        # was a task step per halo that found the frame still incomplete.
        if self._wanted == (frame, len(halos)):
            self._complete.set()

    async def take(self, frame: int, count: int) -> dict[str, bytes]:
        if len(self.frames.get(frame, ())) < count:
            self._complete = trio.Event()
            self._wanted = (frame, count)
            try:
                await self._complete.wait()
            finally:
                self._wanted = None
        return self.frames.pop(frame, {})


class _HaloActor(Actor[Any, None]):
    """A tile's compute actor: files each halo under its frame number."""

    def __init__(self, inbox: _Inbox) -> None:
        self._inbox = inbox

    async def receive(self, msg: Any) -> None:
        if not isinstance(msg, Delivery):
            return
        if msg.stream == "halo" and msg.frame_no is not None:
            self._inbox.put(msg.frame_no, msg.peer, bytes(msg.payload))
        elif msg.stream == "done":
            self._inbox.put(_DONE, msg.peer, b"")


def _summary(stats: Any) -> dict[str, int]:
    """The counters the live display shows, summed over a node's links."""
    resent = sum(link.protocol.resent for link in stats.links.values())
    in_flight = sum(link.protocol.in_flight for link in stats.links.values())
    duplicates = sum(s.duplicates for s in stats.inbound.protocol.sessions)
    reordered = sum(
        st.max_buffered for streams in stats.streams.values() for st in streams.values()
    )
    return {
        "resent": resent,
        "duplicates": duplicates,
        "reordered": reordered,
        "in_flight": in_flight,
        "admitted": stats.security.admitted,
        "refused": sum(stats.security.refused.values()),
    }


async def run_tile(
    topology: Topology,
    node_id: str,
    job: Job,
    out: str = "out",
    bind: str | None = None,
    security: Security | None = None,
    metrics: str | None = None,
    metrics_every: float = 1.0,
) -> None:
    """Run one tile node of the demo until its last frame is confirmed.

    Args:
        topology: the run's topology: the tiles and, under ``cellmesh demo``,
            the coordinator. Without a coordinator in it (a run over several
            hosts) the node prints its progress and saves its final tile as
            ``OUT/<node id>.npy``.
        node_id: which tile this process is.
        job: the run's parameters.
        out: where a node without a coordinator saves its tile.
        bind: where to listen, if not the topology's endpoint (an interface
            name, or an address the topology's host name resolves to).
        security: run CURVE with these keys (:func:`load_security`).
        metrics: append a JSON line to this file every ``metrics_every``
            seconds, and one at the end: the frame and, per link, the
            counters of ``NodeStatistics.links_summary()``.
        metrics_every: seconds between metrics lines.
    """
    metrics_file = _MetricsFile(metrics, node_id) if metrics is not None else None
    try:
        await _run_tile(topology, node_id, job, out, bind, security, metrics_file, metrics_every)
    finally:
        if metrics_file is not None:
            metrics_file.close()


class _FrameBar:
    """A tile node's bar of frames on a terminal, in place of its lines of progress.

    rich's, redrawn at each report (about ten a second), not by its refresh
    thread; rich is loaded only here, so a node runs without it (``cellmesh
    node`` needs numpy alone) and then prints its lines as on a pipe.
    """

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress = progress
        self._task = task

    @classmethod
    def open(cls, node_id: str, frames: int) -> _FrameBar | None:
        """A shown bar of ``frames`` frames if stdout is a terminal and rich is installed."""
        if not sys.stdout.isatty():
            return None
        try:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )
        except ImportError:
            return None
        progress = Progress(
            TextColumn(f"{node_id}: frame"),
            MofNCompleteColumn(),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[wire]}"),
            auto_refresh=False,
            transient=True,
        )
        if not progress.console.is_terminal:
            return None
        task = progress.add_task(node_id, total=frames, wire="")
        progress.start()
        return cls(progress, task)

    def show(self, frame: int, report: dict[str, Any]) -> None:
        """Frame ``frame`` is done; ``report`` has the wire's counters."""
        wire = f"{report['resent']} resent, {report['duplicates']} duplicates"
        self._progress.update(self._task, completed=frame, wire=wire)
        self._progress.refresh()

    def close(self) -> None:
        self._progress.stop()


def _node_summary(node_id: str, frames: int, seconds: float, stats: dict[str, int]) -> str:
    """A tile node's last line: its frames, how long they took, and the wire's counters."""
    rate = frames / seconds if seconds > 0 else 0.0
    return (
        f"{node_id}: {frames} frames in {seconds:.2f} s ({rate:.1f} frames/s), "
        f"{stats['resent']} resent, {stats['duplicates']} duplicates"
    )


class _MetricsFile:
    """``--metrics FILE``: JSON lines of a node's link counters, appended as the run goes."""

    def __init__(self, path: str, node_id: str) -> None:
        try:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        except OSError as exc:
            raise DemoError(
                f"cannot write the metrics file {path}: {exc.strerror}; give --metrics a "
                "file in a folder you can write"
            ) from None
        self._node = node_id
        #: The last frame done, for the next line.
        self.frame = 0

    def write(self, node: Node) -> None:
        """Append one line now: time, node, frame, and per peer its link's counters."""
        line = {
            "time": round(time.time(), 3),
            "node": self._node,
            "frame": self.frame,
            "links": node.statistics().links_summary(),
        }
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    async def every(self, node: Node, seconds: float) -> None:
        """Write a line every ``seconds`` until cancelled."""
        while True:
            self.write(node)
            await trio.sleep(seconds)

    def close(self) -> None:
        self._file.close()


async def _run_tile(
    topology: Topology,
    node_id: str,
    job: Job,
    out: str,
    bind: str | None,
    security: Security | None,
    metrics: _MetricsFile | None,
    metrics_every: float,
) -> None:
    coordinated = COORDINATOR in topology
    model = get_model(job.model)
    decomp = tile_decomposition(topology, job.size)
    tile = decomp.tile_of(node_id)
    depth = job.depth if job.depth is not None else auto_depth(decomp, model)
    cells = DeepTile(model, decomp, tile, job.initial_grid()[decomp.tile_slices(tile)], depth)
    towards: dict[str, Direction] = {
        decomp.node_id(other): d for d, other in cells.neighbours.items()
    }
    inbox = _Inbox()
    config = job.node_config(topology.rank_of(node_id))
    peers: dict[str, str | None] = dict(topology.peers_of(node_id))
    async with (
        open_node(
            node_id,
            bind=bind or topology.endpoint_of(node_id),
            peers=peers,
            compute=lambda: _HaloActor(inbox),
            config=config,
            security=security,
        ) as node,
        trio.open_nursery() as nursery,
    ):
        if metrics is not None:
            nursery.start_soon(metrics.every, node, metrics_every)
        next_report = 0.0
        previous: list[SendHandle] = []
        progress: list[SendHandle] = []
        frame_ms: list[float] = []
        # Start the frame clocks together, as MPI codes start from a barrier:
        # without it frame 0 would count the neighbours' process start-up
        # (30-250 ms measured on 2 cores). Every link hears from its peer
        # first: a message sent while a neighbour's process was still
        # starting waited for the retry timer (2-6 retransmissions and as
        # many duplicates in a fault-free run).
        await node.wait_all_up()
        await node.neighbour_barrier(peers=list(towards))
        ready_at = time.time()
        frames_from = time.perf_counter()
        tiles = len(topology) - (1 if coordinated else 0)
        report_every = _REPORT_EVERY * max(1.0, tiles / _REPORTING_TILES)
        # Under cellmesh demo the tiles share the demo's terminal, where its
        # coordinator draws the run: only a node on its own shows a bar.
        bar = None if coordinated else _FrameBar.open(node_id, job.frames)
        try:
            for frame in range(job.frames):
                started = time.perf_counter()
                exchange = cells.needs_halos
                if exchange:
                    sent = [
                        node.send_nowait(
                            peer, cells.edge(d).tobytes(), stream="halo", frame_no=frame
                        )
                        for peer, d in towards.items()
                    ]
                    halos = await inbox.take(frame, len(towards))
                    for peer, data in halos.items():
                        cells.fill(towards[peer], data)
                cells.step()
                if exchange:
                    # Keep one exchange of halos in flight, confirm the one before.
                    for handle in previous:
                        await handle.wait()
                    previous = sent
                frame_ms.append((time.perf_counter() - started) * 1000.0)
                if metrics is not None:
                    metrics.frame = frame + 1
                now = time.perf_counter()
                last = frame + 1 == job.frames
                # Report about ten times a second, not every frame: a report per
                # frame halved the frame rate (bench/grid.py --profile).
                if not last and now < next_report and frame + 1 not in job.report_at:
                    continue
                next_report = now + report_every
                report = {"frame": frame + 1, "ms": frame_ms[-1], **_summary(node.statistics())}
                if coordinated:
                    await node.wait_window(COORDINATOR)
                    progress.append(node.send_nowait(COORDINATOR, report, stream="progress"))
                    if len(progress) > 64:
                        for handle in progress[:32]:
                            await handle.wait()
                        del progress[:32]
                elif bar is not None:
                    bar.show(frame + 1, report)
                else:
                    print(f"{node_id}: frame {frame + 1}/{job.frames} {report}", flush=True)
        finally:
            if bar is not None:
                bar.close()
        for handle in previous + progress:
            await handle.wait()
        frames_took = time.perf_counter() - frames_from
        result = np.ascontiguousarray(cells.cells())
        if coordinated:
            await node.send(
                COORDINATOR,
                {
                    "data": result.tobytes(),
                    "frame_ms": frame_ms,
                    **_summary(node.statistics()),
                    **_footprint(ready_at),
                },
                stream="result",
                timeout=120.0,
            )
        else:
            # No coordinator (several hosts, launched by srun or mpiexec):
            # each node keeps its own tile; gather them with any tool.
            await trio.Path(out).mkdir(parents=True, exist_ok=True)
            path = Path(out) / f"{node_id}.npy"
            np.save(path, result)
            print(f"{node_id}: wrote {path} (sha256 {grid_digest(result)[:16]})", flush=True)
        await _leave_together(node, inbox, list(towards), job.linger)
        if not coordinated:
            # The coordinator says the run's summary for the demo's tiles.
            summary = _summary(node.statistics())
            print(_node_summary(node_id, job.frames, frames_took, summary), flush=True)
        if metrics is not None:
            metrics.write(node)
        nursery.cancel_scope.cancel()


def open_fds() -> int | None:
    """How many file descriptors this process holds (None where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir opened
    except OSError:
        return None


def _footprint(ready_at: float) -> dict[str, Any]:
    """What a tile process costs: when it passed its start barrier (wall clock), peak RSS, fds."""
    return {
        "ready_at": ready_at,
        "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "fds": open_fds(),
    }


async def _leave_together(node: Node, inbox: _Inbox, neighbours: list[str], linger: float) -> None:
    """Stay until every neighbour has all its answers from us, at most ``linger`` seconds.

    A neighbour may still wait for our ACK of its last halo (the answer can be
    lost on the wire, and it resends): we must not vanish under it. Every
    send of ours is answered by now, so we say "done"; a neighbour says
    "done" only once all its sends to us are answered, and then needs
    nothing more from us. The "done"s are not awaited: a neighbour that has
    ours may leave before its ACK reaches us. A lost "done" costs at most
    ``linger``, the old fixed wait (a 20-frame run took 13 s of which 10 s
    were linger).
    """
    for peer in neighbours:
        node.send_nowait(peer, b"", stream="done")
    with trio.move_on_after(linger):
        await inbox.take(_DONE, len(neighbours))


# --- the coordinator -------------------------------------------------------------------


@dataclass
class _NodeView:
    """What the coordinator knows of one tile node."""

    frame: int = 0
    started: float | None = None
    fps: float = 0.0
    resent: int = 0
    duplicates: int = 0
    reordered: int = 0
    in_flight: int = 0
    admitted: int = 0
    refused: int = 0
    frame_ms: list[float] = field(default_factory=list)
    paused: bool = False
    #: From the node's result: wall-clock time it passed its start barrier,
    #: its peak RSS and its open file descriptors at the end of its frames.
    ready_at: float | None = None
    rss_kb: int | None = None
    fds: int | None = None


class _Board:
    """The coordinator's picture of the run, fed by its compute actor."""

    def __init__(self, names: list[str]) -> None:
        self.nodes = {name: _NodeView() for name in names}
        self.results: dict[str, bytes] = {}
        #: Pauses carried out, as NODE@FRAME:SECONDS with the frame it was at.
        self.frozen: list[str] = []
        #: Pauses asked for that the run ended before (NODE@FRAME:SECONDS).
        self.missed: list[str] = []
        self.done = trio.Event()
        #: Set by every report; the watcher renews it before each wait.
        self.changed = trio.Event()

    def progress(self, peer: str, info: dict[str, Any]) -> None:
        view = self.nodes[peer]
        now = time.perf_counter()
        if view.started is None:
            view.started = now
        view.frame = int(info["frame"])
        elapsed = now - view.started
        if elapsed > 0 and view.frame > 1:
            view.fps = (view.frame - 1) / elapsed
        for key in ("resent", "duplicates", "reordered", "in_flight"):
            setattr(view, key, int(info[key]))
        self.changed.set()

    def result(self, peer: str, info: dict[str, Any]) -> None:
        view = self.nodes[peer]
        view.frame_ms = [float(x) for x in info["frame_ms"]]
        for key in ("resent", "duplicates", "reordered", "in_flight", "admitted", "refused"):
            setattr(view, key, int(info[key]))
        # A recovering tile (actors/grid/_recovery.py) reports no footprint.
        if "ready_at" in info:
            view.ready_at = float(info["ready_at"])
            view.rss_kb = int(info["rss_kb"])
            view.fds = None if info["fds"] is None else int(info["fds"])
        self.results[peer] = bytes(info["data"])
        if len(self.results) == len(self.nodes):
            self.done.set()
        self.changed.set()


class _BoardActor(Actor[Any, None]):
    def __init__(self, board: _Board) -> None:
        self._board = board

    async def receive(self, msg: Any) -> None:
        if not isinstance(msg, Delivery) or not isinstance(msg.payload, dict):
            return
        if msg.stream == "progress":
            self._board.progress(msg.peer, msg.payload)
        elif msg.stream == "result":
            self._board.result(msg.peer, msg.payload)


@dataclass(frozen=True, slots=True)
class Pause:
    """``--pause NODE@FRAME:SECONDS``: freeze a node's process mid-run."""

    node: str
    frame: int
    seconds: float

    @classmethod
    def parse(cls, text: str) -> Pause:
        """Parse ``NODE@FRAME:SECONDS``.

        Raises:
            ValueError: the text does not have that form.
        """
        node, _, rest = text.partition("@")
        frame_text, _, seconds_text = rest.partition(":")
        try:
            frame, seconds = int(frame_text), float(seconds_text)
        except ValueError:
            frame, seconds = -1, math.nan
        if not node or frame < 0 or not 0 <= seconds < math.inf:
            raise ValueError(
                "--pause wants NODE@FRAME:SECONDS with FRAME >= 0 and SECONDS >= 0, "
                f"e.g. t0-1@50:3, got {text!r}"
            )
        return cls(node, frame, seconds)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 below the ephemeral range (design.md §5)."""
    import random

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port found on 127.0.0.1 in 20000..32000")


def _render(board: _Board, job: Job, started: float) -> Any:
    from rich.table import Table

    title = (
        f"cellmesh demo: {job.model} {job.size}x{job.size}, {len(board.nodes)} nodes, "
        f"{job.frames} frames — {time.perf_counter() - started:5.1f} s"
    )
    table = Table(title=title, title_justify="left")
    for column in ("node", "frame", "progress", "fps", "retries", "dups", "reordered", "in-flight"):
        table.add_column(column, justify="left" if column in ("node", "progress") else "right")
    for name, view in board.nodes.items():
        filled = int(10 * view.frame / max(job.frames, 1))
        bar = "█" * filled + "·" * (10 - filled)
        if view.paused:
            bar = "PAUSED    "
        elif name in board.results:
            bar = "done      "
        table.add_row(
            name,
            str(view.frame),
            bar,
            f"{view.fps:.0f}",
            str(view.resent),
            str(view.duplicates),
            str(view.reordered),
            str(view.in_flight),
        )
    table.caption = "retries: resends; dups: duplicates dropped; reordered: most held out of order"
    return table


@dataclass
class DemoOutcome:
    """What ``cellmesh demo --json`` prints."""

    model: str
    size: int
    nodes: int
    frames: int
    seconds: float
    frames_per_second: float
    live_cells: int | None
    sha256: str
    serial_sha256: str
    match: bool
    faults: dict[str, float]
    per_node: dict[str, dict[str, Any]]
    pictures: dict[str, str]
    paused: list[str]
    #: CURVE on every link (``--secure``), and what the nodes' gates did.
    secure: bool = False
    admitted: int = 0
    refused: int = 0
    #: ``--pause`` requests the run ended before (NODE@FRAME:SECONDS).
    pauses_missed: list[str] = field(default_factory=list)
    #: Frames between checkpoints as the tiles take them (0: none).
    checkpoint_every: int = 0
    #: Each tile death and its recovery (``RecoveryRecord.summary``).
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    #: ``--kill`` requests carried out (NODE@FRAME it had reported) and not.
    killed: list[str] = field(default_factory=list)
    kills_missed: list[str] = field(default_factory=list)
    #: Seconds from starting the first tile process until the last tile
    #: passed its start barrier (process start, imports, links up).
    startup_seconds: float = 0.0
    #: The coordinator's open file descriptors at the end of the run (it
    #: links to every tile, so it holds the most).
    coordinator_fds: int | None = None


async def run_demo(
    job: Job,
    *,
    nodes: int,
    out: Path,
    pauses: list[Pause],
    show: bool,
    timeout: float,
    secure: bool = False,
    kills: Sequence[Kill] = (),
) -> DemoOutcome:
    """Start the tile processes, follow them, gather and check the result.

    Args:
        job: the run's parameters.
        nodes: how many tile processes.
        out: folder for the topology, pictures and summary.
        pauses: processes to freeze and thaw on the way.
        show: draw the live table (off for ``--json``).
        timeout: give up after this many seconds.
        secure: make throwaway CURVE keys for every node (in a private
            temporary folder, deleted afterwards) and run every link on them.
        kills: tile processes to SIGKILL on the way (``--kill NODE@FRAME``),
            in this order; with any, the run checkpoints (every
            ``job.checkpoint_every`` frames, 10 if that is 0) and recovers.

    Returns:
        The outcome; ``match`` says whether it equals the serial run.

    Raises:
        GridError: ``nodes`` cannot tile the grid, or its tiles are narrower
            than the halo (checked before any process starts).
        DemoError: another bad input (checked before any process starts), a
            node process that exited early, or the run outlasting ``timeout``.
    """
    from ._recovery import DEFAULT_CHECKPOINT_EVERY

    # Every input is checked before the first process starts: a bad one
    # fails here once, not in every node process.
    job.check()
    model = get_model(job.model)
    names = Decomposition.for_nodes((job.size, job.size), nodes).node_ids()
    decomp = Decomposition.for_nodes((job.size, job.size), nodes, names=list(names))
    if job.depth is not None and job.depth < 1:
        raise GridError(f"halo depth must be >= 1 frame, got {job.depth}")
    try:
        decomp.check_halo(model.halo * (job.depth or 1))
    except GridError as exc:
        raise GridError(f"{exc} (--depth {job.depth} frames)") from None
    for pause in pauses:
        if pause.node not in names:
            raise DemoError(f"--pause names {pause.node!r}; the tiles are {', '.join(names)}")
    for kill in kills:
        if kill.node not in names:
            raise DemoError(f"--kill names {kill.node!r}; the tiles are {', '.join(names)}")
    if kills and not job.checkpoint_every:
        job = replace(job, checkpoint_every=DEFAULT_CHECKPOINT_EVERY)
    if not timeout > 0:
        raise DemoError(f"the timeout must be > 0 seconds, got {timeout}")
    try:
        await trio.Path(out).mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DemoError(f"{out} is a file; give --out a folder") from None
    except OSError as exc:
        raise DemoError(
            f"cannot make the folder {out}: {exc.strerror}; give --out a folder you can write"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise DemoError(f"cannot write into {out}; give --out a folder you can write")
    ports: set[int] = set()
    while len(ports) < len(names) + 1:
        ports.add(free_port())
    endpoints = {
        name: f"tcp://127.0.0.1:{port}"
        for name, port in zip([*names, COORDINATOR], sorted(ports), strict=True)
    }
    topology = grid_topology(decomp, endpoints)
    # mkdtemp makes the folder 0700; the secret files are 0600.
    keys: contextlib.AbstractContextManager[str | None] = (
        tempfile.TemporaryDirectory(prefix="cellmesh-keys-") if secure else contextlib.nullcontext()
    )
    # One checkpoint folder per run, removed at the end (actors/grid/_recovery.py).
    checkpoints: contextlib.AbstractContextManager[str | None] = (
        tempfile.TemporaryDirectory(prefix="cellmesh-ckpt-")
        if job.checkpoint_every
        else contextlib.nullcontext()
    )
    with keys as keys_dir, checkpoints as checkpoint_dir:
        if keys_dir is not None:
            topology = _throwaway_keys(topology, keys_dir)
        # Every node reports the frames a pause or a kill waits for, the
        # moment it is there.
        cues = {*job.report_at, *(p.frame for p in pauses), *(k.frame for k in kills)}
        job = replace(job, report_at=tuple(sorted(cues)), checkpoint_dir=checkpoint_dir)
        return await _run_demo(
            job, decomp, topology, pauses, show, timeout, out, keys_dir, list(kills)
        )


def _throwaway_keys(topology: Topology, keys_dir: str) -> Topology:
    """A key pair per node in ``keys_dir``; the topology with their public keys."""
    made: dict[str, str] = {}
    for name in topology.ids:
        pair = generate_key_pair()
        write_key_pair(keys_dir, name, pair)
        made[name] = pair.public
    return topology.with_public_keys(made)


async def _run_demo(
    job: Job,
    decomp: Decomposition,
    topology: Topology,
    pauses: list[Pause],
    show: bool,
    timeout: float,
    out: Path,
    keys_dir: str | None,
    kills: list[Kill],
) -> DemoOutcome:
    from ._recovery import Recovery, RecoveryBoard, checkpoint_interval

    model = get_model(job.model)
    names = decomp.node_ids()
    endpoints = {n.id: n.endpoint for n in topology.nodes}
    topo_path = out / "topology.toml"
    topology.save(topo_path)
    security = load_security(topology, COORDINATOR, keys_dir) if keys_dir is not None else None

    recovering = job.checkpoint_dir is not None
    board = (
        RecoveryBoard(list(names), Path(job.checkpoint_dir))
        if job.checkpoint_dir is not None
        else _Board(list(names))
    )
    procs: dict[str, trio.Process] = {}
    recovery: Recovery | None = None
    started = time.perf_counter()
    launched = time.time()
    config = job.node_config(len(names))
    try:
        async with open_node(
            COORDINATOR,
            bind=endpoints[COORDINATOR],
            # A recovering run's coordinator also sends, rollback orders: it
            # needs a link to each tile; otherwise it only receives.
            peers={n: endpoints[n] for n in names} if recovering else dict.fromkeys(names),
            compute=lambda: _BoardActor(board),
            config=config,
            security=security,
        ) as coordinator:

            async def start_tile(name: str, extra: list[str]) -> trio.Process:
                cmd = [sys.executable, "-m", "actors._cli", "node", "--topology", str(topo_path)]
                cmd += ["--id", name, *job.args(), *extra]
                if keys_dir is not None:
                    cmd += ["--keys", keys_dir]
                return await trio.lowlevel.open_process(
                    cmd,
                    # Held open while we live: its end tells the tile we are gone.
                    stdin=subprocess.PIPE,
                    env={
                        **os.environ,
                        **_CHILD_MALLOC_ENV,
                        PARENT_ENV: str(os.getpid()),
                        # The coordinator's node said it for the run.
                        PLAINTEXT_WARNED_ENV: "1",
                    },
                )

            for name in names:
                procs[name] = await start_tile(name, [])
            if isinstance(board, RecoveryBoard):
                recovery = Recovery(board, coordinator, procs, start_tile, kills)
            try:
                with trio.fail_after(timeout):
                    await _follow(board, job, procs, pauses, show, started, recovery)
            except trio.TooSlowError:
                if all(view.started is None for view in board.nodes.values()):
                    where = "no node had reported a frame yet; they take seconds to start"
                else:
                    slowest = min(view.frame for view in board.nodes.values())
                    where = f"the slowest node was at frame {slowest} of {job.frames}"
                raise DemoError(
                    f"the run did not finish within --timeout {timeout:g} s ({where}); "
                    "give a larger --timeout, or fewer --frames or a smaller --size"
                ) from None
            gate = coordinator.statistics().security
            coordinator_fds = open_fds()
    finally:
        with trio.CancelScope(shield=True):
            for proc in procs.values():
                if proc.returncode is None:
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
                await proc.wait()
                if proc.stdin is not None:
                    await proc.stdin.aclose()
    seconds = time.perf_counter() - started

    parts: dict[TilePos, Grid] = {}
    for name, data in board.results.items():
        tile = decomp.tile_of(name)
        parts[tile] = np.frombuffer(data, dtype=model.dtype).reshape(decomp.tile_shape(tile))
    final = assemble(decomp, parts)
    serial = run_serial(model, job.initial_grid(), job.frames)
    digest, serial_digest = grid_digest(final), grid_digest(serial)
    pictures = _pictures(model, final, board, out)
    return DemoOutcome(
        model=job.model,
        size=job.size,
        nodes=len(names),
        frames=job.frames,
        seconds=round(seconds, 3),
        # The median node's own rate (see _rate): start-up and the gather
        # are not frame rate.
        frames_per_second=round(float(np.median([_rate(v) for v in board.nodes.values()])), 1),
        live_cells=int(final.sum()) if model.name == "life" else None,
        sha256=digest,
        serial_sha256=serial_digest,
        match=digest == serial_digest,
        faults={"drop": job.drop, "dup": job.dup, "delay_ms": job.delay_ms},
        per_node={
            name: {
                "resent": view.resent,
                "duplicates_dropped": view.duplicates,
                "reordered": view.reordered,
                "median_frame_ms": round(float(np.median(view.frame_ms)), 3)
                if view.frame_ms
                else None,
                "ready_s": None if view.ready_at is None else round(view.ready_at - launched, 3),
                "rss_mb": None if view.rss_kb is None else round(view.rss_kb / 1024, 1),
                "fds": view.fds,
            }
            for name, view in board.nodes.items()
        },
        pictures=pictures,
        paused=board.frozen,
        pauses_missed=board.missed,
        secure=security is not None,
        admitted=gate.admitted + sum(v.admitted for v in board.nodes.values()),
        refused=sum(gate.refused.values()) + sum(v.refused for v in board.nodes.values()),
        checkpoint_every=checkpoint_interval(
            job.checkpoint_every, job.depth or auto_depth(decomp, model)
        )
        if job.checkpoint_every
        else 0,
        recoveries=[r.summary() for r in board.records] if isinstance(board, RecoveryBoard) else [],
        killed=board.carried_out if isinstance(board, RecoveryBoard) else [],
        kills_missed=[str(k) for k in board.pending] if isinstance(board, RecoveryBoard) else [],
        startup_seconds=round(
            max((v.ready_at - launched for v in board.nodes.values() if v.ready_at), default=0.0),
            3,
        ),
        coordinator_fds=coordinator_fds,
    )


async def _follow(
    board: _Board,
    job: Job,
    procs: dict[str, trio.Process],
    pauses: list[Pause],
    show: bool,
    started: float,
    recovery: Recovery | None = None,
) -> None:
    """Watch the run until every tile reported its result; freeze/thaw on cue.

    With ``recovery``, a tile that dies is restarted and the run rolled back
    (:class:`Recovery`) instead of ending the run.
    """
    pending = list(pauses)

    async def thaw(name: str, seconds: float) -> None:
        await trio.sleep(seconds)
        procs[name].send_signal(signal.SIGCONT)
        board.nodes[name].paused = False

    live: Any = None
    if show:
        from rich.live import Live

        live = Live(_render(board, job, started), refresh_per_second=8, transient=False)
        live.start()
    try:
        async with trio.open_nursery() as nursery:
            while not board.done.is_set():
                for pause in list(pending):
                    if board.nodes[pause.node].frame >= pause.frame:
                        procs[pause.node].send_signal(signal.SIGSTOP)
                        board.nodes[pause.node].paused = True
                        board.frozen.append(
                            f"{pause.node}@{board.nodes[pause.node].frame}:{pause.seconds:g}"
                        )
                        pending.remove(pause)
                        nursery.start_soon(thaw, pause.node, pause.seconds)
                if recovery is not None:
                    await recovery.tick()
                for name, proc in procs.items():
                    code = proc.poll()
                    if recovery is None and code is not None and name not in board.results:
                        raise DemoError(
                            f"node {name} exited with code {code} before finishing "
                            "(its own error is printed above)"
                        )
                if live is not None:
                    live.update(_render(board, job, started))
                # Wake on every report, so a pause lands near its frame.
                board.changed = trio.Event()
                with trio.move_on_after(0.1):
                    await board.changed.wait()
            board.missed = [f"{p.node}@{p.frame}:{p.seconds:g}" for p in pending]
            nursery.cancel_scope.cancel()
    finally:
        if live is not None:
            live.update(_render(board, job, started))
            live.stop()


def _rate(view: _NodeView) -> float:
    """A node's own frames/s: its frame count over the time its frame loop took.

    Measured in the node, so neither process start-up nor the batching of
    progress reports on their way to the coordinator distorts it.
    """
    busy = sum(view.frame_ms) / 1000.0
    return len(view.frame_ms) / busy if busy > 0 else 0.0


def _pictures(model: Model, final: Grid, board: _Board, out: Path) -> dict[str, str]:
    """Write the final grid and the per-frame times as PNGs; returns their paths."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid_png = out / f"{model.name}-final.png"
    fig, ax = plt.subplots(figsize=(6, 6), dpi=150)
    cmap = "binary" if model.name == "life" else "inferno"
    ax.imshow(final, cmap=cmap, interpolation="nearest")
    ax.set_title(f"{model.name}: final grid {final.shape[0]}x{final.shape[1]}")
    ax.set_axis_off()
    fig.savefig(grid_png, bbox_inches="tight")
    plt.close(fig)

    times_png = out / "frame-times.png"
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    for name, view in board.nodes.items():
        ax.plot(view.frame_ms, linewidth=0.8, label=name)
    ax.set_xlabel("frame")
    ax.set_ylabel("ms per frame (halo exchange + step)")
    ax.set_yscale("log")
    ax.set_title("per-frame time on each node")
    ax.legend(fontsize="small", ncol=4)
    fig.savefig(times_png, bbox_inches="tight")
    plt.close(fig)
    return {"grid": str(grid_png), "frame_times": str(times_png)}


def outcome_json(outcome: DemoOutcome) -> str:
    """The machine-readable summary of a demo run."""
    return json.dumps(asdict(outcome), indent=2)
