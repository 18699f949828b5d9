"""Grid runs that outlive a killed tile process: checkpoints, restart, rollback.

With ``Job.checkpoint_every`` set (``cellmesh demo --checkpoint-every K``, or
any ``--kill``), every tile writes its cells to the run's checkpoint folder
every K frames (K rounded up to a multiple of the halo depth, so that a
checkpoint falls where a tile holds nothing but its own cells). When a tile
process dies — SIGKILLed by ``--kill NODE@FRAME`` or on its own — the
coordinator (:class:`Recovery`):

1. takes C, the latest frame for which *every* tile has a checkpoint: one
   global consistent state, because the tiles compute the same cells at the
   same frame whatever happened before (the run is deterministic);
2. starts a new epoch, restarts the dead tile from its checkpoint C, and
   tells every other tile, on the stream ``"recover"``, to roll back to C;
3. every tile goes on from C; the run rolls back that far and no further.

Why a global rollback and not a log of sent halos (only the killed tile
replaying): with a log, a second tile dying during the replay loses its log
with it, and the tile it fed must then find an older checkpoint and ask
*its* neighbours for their logs further back, and so on. A global rollback
to the last common checkpoint is correct for any number and order of
deaths, with nothing to remember but files on disk, at the cost of every
tile replaying (at most K frames plus the tiles' spread, a few exchanges).

Why on disk and not in a neighbour's memory: the checkpoint must outlive the
process, and one folder on the coordinator's host (a temporary folder per
run, removed at the end) outlives any tile's process, needs no protocol to
hand a tile's state to a buddy and back, and survives a tile and its
neighbour dying together. A write is an ``np.save`` of one tile and a
rename (atomic: a tile killed mid-write leaves a stray temporary file, never
a torn checkpoint). It is not fsync'd: it outlives the process, not the
machine (docs/reliability.md).

Each rollback starts an epoch; halos carry theirs. A tile in epoch e uses
only halos of epoch e, keeps those of a later one (the sender heard of the
next rollback first) and drops older ones. The bytes of a halo are the same
in every epoch, but its *arrival* is not: a tile that had not yet heard of a
rollback would take its neighbours' resent halos for the frames it was
about to replay anyway, and then wait for them again after the rollback, for
ever (measured: 1 run in 4 of a kill during recovery hung so). Epochs also
mark progress reports, so the coordinator ignores one sent before a rollback.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import trio

from actors import Actor, Delivery, Node, SendHandle, Topology, open_node
from transport.security import Security

from ._decomp import Direction
from ._demo import (
    _REPORT_EVERY,
    COORDINATOR,
    DeepTile,
    DemoError,
    Grid,
    Job,
    _Board,
    _summary,
    auto_depth,
    tile_decomposition,
)
from ._models import get_model

#: The stream the coordinator's rollback orders travel on.
RECOVER_STREAM: Final = "recover"

#: ``--checkpoint-every`` when ``--kill`` is given without it.
DEFAULT_CHECKPOINT_EVERY: Final = 10

#: Deaths a tile may have that nobody asked for (not a ``--kill``) before the
#: demo gives up, as ``cellmesh run --restart on-failure`` allows by default:
#: a tile that fails at start would otherwise be restarted for ever.
MAX_UNPLANNED_RESTARTS: Final = 3

_CHECKPOINT = re.compile(r"^(\d+)\.npy$")


def checkpoint_interval(every: int, depth: int) -> int:
    """The frames between checkpoints: ``every`` rounded up to a multiple of ``depth``.

    A tile holds nothing but its own cells only at the start of an exchange
    (its halos are refilled there), so that is where a checkpoint can be.
    """
    return -(-every // depth) * depth


class CheckpointStore:
    """One tile's checkpoints: ``DIR/<node id>/<frame>.npy``."""

    def __init__(self, root: Path, node_id: str) -> None:
        self.folder = root / node_id
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, frame: int, cells: Grid) -> None:
        """Write the cells at ``frame``; atomic (a rename), so never seen half written."""
        temp = self.folder / f".{frame}.{os.getpid()}.tmp.npy"
        np.save(temp, cells)
        os.replace(temp, self.folder / f"{frame}.npy")

    def load(self, frame: int) -> Grid:
        """The cells saved at ``frame``."""
        loaded: Grid = np.load(self.folder / f"{frame}.npy")
        return loaded


def saved_frames(root: Path, node_id: str) -> set[int]:
    """The frames ``node_id`` has a checkpoint of; frame 0 (the start) always."""
    frames = {0}
    try:
        names = os.listdir(root / node_id)
    except FileNotFoundError:
        return frames
    for name in names:
        match = _CHECKPOINT.match(name)
        if match:
            frames.add(int(match.group(1)))
    return frames


def latest_common_checkpoint(root: Path, names: list[str]) -> int:
    """The latest frame every tile of ``names`` has a checkpoint of (0: the start)."""
    common = set.intersection(*(saved_frames(root, name) for name in names))
    return max(common)


def prune_checkpoints(root: Path, names: list[str], before: int) -> None:
    """Delete the checkpoints older than ``before``: no rollback goes behind it.

    Rollback targets never decrease: ``before`` is a frame every tile has a
    checkpoint of, so every later rollback goes to it or past it.
    """
    for name in names:
        for frame in saved_frames(root, name):
            if 0 < frame < before:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(root / name / f"{frame}.npy")


# --- the tile node ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a (re)started tile process begins: a checkpoint frame, in an epoch.

    ``Resume()`` is the first start: frame 0, epoch 0.
    """

    frame: int = 0
    epoch: int = 0


class _Rollbacks:
    """The newest rollback the coordinator ordered, and the frame loop to interrupt."""

    def __init__(self, start: Resume) -> None:
        self.wanted = start
        #: The scope of the running frame loop; a newer rollback cancels it.
        self.scope: trio.CancelScope | None = None

    def order(self, epoch: int, frame: int) -> None:
        # Orders travel on one ordered stream, but a restart may overtake
        # one: an epoch not newer than the one wanted is old news.
        if epoch <= self.wanted.epoch:
            return
        self.wanted = Resume(frame, epoch)
        if self.scope is not None:
            self.scope.cancel()


class _EpochInbox:
    """Halo data by epoch, frame and sender, with a wake-up when a frame is complete."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.frames: dict[tuple[int, int], dict[str, bytes]] = {}
        self._complete = trio.Event()
        #: The (epoch, frame) the frame loop waits for and how many halos make it whole.
        self._wanted: tuple[int, int, int] | None = None

    def put(self, epoch: int, frame: int, peer: str, data: bytes) -> None:
        if epoch < self.epoch:
            return
        halos = self.frames.setdefault((epoch, frame), {})
        halos[peer] = data
        if self._wanted == (epoch, frame, len(halos)):
            self._complete.set()

    def enter(self, epoch: int) -> None:
        """A rollback to ``epoch``: the halos of earlier epochs are of no use any more."""
        self.epoch = epoch
        for key in [k for k in self.frames if k[0] < epoch]:
            del self.frames[key]

    async def take(self, frame: int, count: int) -> dict[str, bytes]:
        key = (self.epoch, frame)
        if len(self.frames.get(key, ())) < count:
            self._complete = trio.Event()
            self._wanted = (*key, count)
            try:
                await self._complete.wait()
            finally:
                self._wanted = None
        return self.frames.pop(key, {})


class _RecoveringActor(Actor[Any, None]):
    """A recoverable tile's compute actor: halos into the inbox, rollback orders."""

    def __init__(self, inbox: _EpochInbox, rollbacks: _Rollbacks) -> None:
        self._inbox = inbox
        self._rollbacks = rollbacks

    async def receive(self, msg: Any) -> None:
        if not isinstance(msg, Delivery):
            return
        if msg.stream == "halo" and msg.frame_no is not None and isinstance(msg.payload, dict):
            self._inbox.put(
                int(msg.payload["epoch"]), msg.frame_no, msg.peer, bytes(msg.payload["cells"])
            )
        elif (
            msg.stream == RECOVER_STREAM
            and msg.peer == COORDINATOR
            and isinstance(msg.payload, dict)
        ):
            self._rollbacks.order(int(msg.payload["epoch"]), int(msg.payload["frame"]))


async def run_recovering_tile(
    topology: Topology,
    node_id: str,
    job: Job,
    resume: Resume = Resume(),
    bind: str | None = None,
    security: Security | None = None,
) -> None:
    """Run one tile node that checkpoints, and rolls back when the coordinator says.

    The frame loop of :func:`run_tile`, plus: a checkpoint every
    :func:`checkpoint_interval` frames, a rollback order from the
    coordinator cancelling the loop and starting it again from that
    checkpoint, and, once its result is sent, serving (its halos may be
    needed again after a rollback) until the coordinator ends it.

    Args:
        topology: the run's topology, with the coordinator in it.
        node_id: which tile this process is.
        job: the run's parameters; ``job.checkpoint_dir`` must be set.
        resume: the checkpoint and epoch to start from (a restarted tile).
        bind: where to listen, if not the topology's endpoint.
        security: run CURVE with these keys.

    Raises:
        DemoError: no checkpoint folder, or no coordinator in the topology.
    """
    if job.checkpoint_dir is None or not job.checkpoint_every:
        raise DemoError("a recovering tile needs --checkpoint-dir and --checkpoint-every")
    if COORDINATOR not in topology:
        raise DemoError(
            "checkpoint recovery needs cellmesh demo's coordinator, which restarts tiles; "
            "the topology has none"
        )
    model = get_model(job.model)
    decomp = tile_decomposition(topology, job.size)
    tile = decomp.tile_of(node_id)
    depth = job.depth if job.depth is not None else auto_depth(decomp, model)
    every = checkpoint_interval(job.checkpoint_every, depth)
    store = CheckpointStore(Path(job.checkpoint_dir), node_id)
    inbox = _EpochInbox(resume.epoch)
    rollbacks = _Rollbacks(resume)
    config = job.node_config(topology.rank_of(node_id))
    peers: dict[str, str | None] = dict(topology.peers_of(node_id))
    towards: dict[str, Direction] = {
        decomp.node_id(other): d for d, other in decomp.neighbours(tile).items()
    }
    async with open_node(
        node_id,
        bind=bind or topology.endpoint_of(node_id),
        peers=peers,
        compute=lambda: _RecoveringActor(inbox, rollbacks),
        config=config,
        security=security,
    ) as node:
        loop = _TileLoop(node, job, every, store, inbox, towards)
        await node.wait_all_up()
        if resume.epoch == 0:
            # The first start lines the frame clocks up as run_tile does. A
            # restarted tile skips it: its neighbours are mid-run, and a
            # collective's numbers do not survive a restart.
            with trio.CancelScope() as scope:
                rollbacks.scope = scope
                await node.neighbour_barrier(peers=list(towards))
        applied: Resume | None = None
        while True:
            target = rollbacks.wanted
            initial = (
                job.initial_grid()[decomp.tile_slices(tile)]
                if target.frame == 0
                else store.load(target.frame)
            )
            cells = DeepTile(model, decomp, tile, initial, depth)
            inbox.enter(target.epoch)
            with trio.CancelScope() as scope:
                rollbacks.scope = scope
                if rollbacks.wanted != target:
                    scope.cancel()
                await loop.run(cells, target, rolled_back_from=loop.frame if applied else None)
            rollbacks.scope = None
            applied = target


class _TileLoop:
    """The frame loop of a recoverable tile, started again at each rollback."""

    def __init__(
        self,
        node: Node,
        job: Job,
        every: int,
        store: CheckpointStore,
        inbox: _EpochInbox,
        towards: dict[str, Direction],
    ) -> None:
        self.node = node
        self.towards = towards
        self.job = job
        self.every = every
        self.store = store
        self.inbox = inbox
        #: The frame this process has computed up to (across rollbacks).
        self.frame = 0
        self.frame_ms: list[float] = []
        self.progress: list[SendHandle] = []

    async def _report(self, frame: int, epoch: int, *, cue: bool = False, **extra: Any) -> None:
        """Send a progress report; at a cue (a ``--kill`` frame) wait until it was taken.

        The coordinator kills on taking the report, so a tile killed at a
        frame dies there, not some frames on.
        """
        node = self.node
        info = {
            "frame": frame,
            "ms": self.frame_ms[-1] if self.frame_ms else 0.0,
            "epoch": epoch,
            **extra,
        }
        info.update(_summary(node.statistics()))
        await node.wait_window(COORDINATOR)
        handle = node.send_nowait(COORDINATOR, info, stream="progress")
        if cue:
            await handle.wait()
            return
        self.progress.append(handle)
        if len(self.progress) > 64:
            for handle in self.progress[:32]:
                await handle.wait()
            del self.progress[:32]

    async def run(self, cells: DeepTile, start: Resume, *, rolled_back_from: int | None) -> None:
        node, job = self.node, self.job
        towards = self.towards
        self.frame = start.frame
        if rolled_back_from is not None:
            # Tell the coordinator at once how far this tile went back.
            await self._report(start.frame, start.epoch, rolled_back_from=rolled_back_from)
        previous: list[SendHandle] = []
        next_report = 0.0
        for frame in range(start.frame, job.frames):
            began = time.perf_counter()
            if frame != start.frame and frame % self.every == 0:
                self.store.save(frame, np.ascontiguousarray(cells.cells()))
            exchange = cells.needs_halos
            if exchange:
                sent = [
                    node.send_nowait(
                        peer,
                        {"epoch": start.epoch, "cells": cells.edge(d).tobytes()},
                        stream="halo",
                        frame_no=frame,
                    )
                    for peer, d in towards.items()
                ]
                halos = await self.inbox.take(frame, len(towards))
                for peer, data in halos.items():
                    cells.fill(towards[peer], data)
            cells.step()
            self.frame = frame + 1
            if exchange:
                for handle in previous:
                    await handle.wait()
                previous = sent
            self.frame_ms.append((time.perf_counter() - began) * 1000.0)
            now = time.perf_counter()
            last = frame + 1 == job.frames
            if not last and now < next_report and frame + 1 not in job.report_at:
                continue
            next_report = now + _REPORT_EVERY
            await self._report(frame + 1, start.epoch, cue=frame + 1 in job.report_at)
        for handle in previous:
            await handle.wait()
        result = np.ascontiguousarray(cells.cells())
        await node.send(
            COORDINATOR,
            {
                "data": result.tobytes(),
                "frame_ms": self.frame_ms,
                "epoch": start.epoch,
                **_summary(node.statistics()),
            },
            stream="result",
            timeout=120.0,
        )
        # A neighbour that dies now rolls everyone back, and its replay needs
        # our halos again: serve until a rollback or the coordinator's end.
        await trio.sleep_forever()


# --- the coordinator -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kill:
    """``--kill NODE@FRAME``: SIGKILL a tile process once it reports FRAME."""

    node: str
    frame: int

    @classmethod
    def parse(cls, text: str) -> Kill:
        """Parse ``NODE@FRAME``.

        Raises:
            ValueError: the text does not have that form.
        """
        node, _, frame_text = text.partition("@")
        try:
            frame = int(frame_text)
        except ValueError:
            frame = -1
        if not node or frame < 1:
            raise ValueError(f"--kill wants NODE@FRAME with FRAME >= 1, e.g. t0-1@50, got {text!r}")
        return cls(node, frame)

    def __str__(self) -> str:
        return f"{self.node}@{self.frame}"


@dataclass
class RecoveryRecord:
    """One tile death and what it cost: ``cellmesh demo``'s summary lists these."""

    node: str
    #: ``"killed"`` (a ``--kill``) or ``"exited N"`` / ``"signal N"`` (on its own).
    cause: str
    #: How far the dead tile had got: its last report or checkpoint, whichever is later
    #: (a lower bound: it may have stepped on before the kill landed).
    died_at: int
    epoch: int
    #: The checkpoint every tile went back to.
    rolled_back_to: int
    #: Frames each tile computes again: its frame at the rollback minus the checkpoint.
    replayed: dict[str, int] = field(default_factory=dict)
    #: Seconds from the death to the restarted tile's first frame after the checkpoint.
    restart_seconds: float | None = None
    #: Seconds from the death until the restarted tile is back at ``died_at``.
    recovered_seconds: float | None = None
    #: The epoch of an earlier recovery not yet back where it was when this
    #: death came (a death during recovery), or None.
    during: int | None = None
    died: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The JSON form (``DemoOutcome.recoveries``)."""
        return {
            "node": self.node,
            "cause": self.cause,
            "died_at_frame": self.died_at,
            "epoch": self.epoch,
            "rolled_back_to": self.rolled_back_to,
            "frames_replayed": self.died_at - self.rolled_back_to,
            "tile_frames_replayed": sum(self.replayed.values()),
            "restart_seconds": _round(self.restart_seconds),
            "recovered_seconds": _round(self.recovered_seconds),
            "during_recovery": self.during,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class RecoveryBoard(_Board):
    """The coordinator's board for a recovering run: progress by epoch, deaths, kills."""

    def __init__(self, names: list[str], checkpoints: Path) -> None:
        super().__init__(names)
        self.checkpoints = checkpoints
        self.epoch = 0
        #: The frame the latest rollback went back to (0: none yet).
        self.rolled_back_to = 0
        self.records: list[RecoveryRecord] = []
        #: Deaths whose restart and rollback orders :class:`Recovery` has still to do.
        self.to_restart: list[RecoveryRecord] = []
        #: Kills not yet carried out, in the order given: each is armed once
        #: the one before it was carried out, so ``--kill A@29 --kill B@26``
        #: kills B as it replays frame 26 after A's death (a kill during
        #: recovery).
        self.pending: list[Kill] = []
        #: Kills carried out, as NODE@FRAME it had reported.
        self.carried_out: list[str] = []
        self.procs: dict[str, trio.Process] = {}

    def died(self, name: str, cause: str) -> RecoveryRecord:
        """A tile is dead: start the next epoch, here and now.

        Synchronous, so that no report is taken between the death and the
        new epoch: a report of the old epoch would move a view (and fire a
        kill) that the rollback is about to move back.
        """
        died = time.perf_counter()
        self.epoch += 1
        back_to = latest_common_checkpoint(self.checkpoints, list(self.nodes))
        # Reports come ten times a second: a tile may have got further than
        # its last one, and it was at least as far as its last checkpoint.
        died_at = max(self.nodes[name].frame, *saved_frames(self.checkpoints, name))
        open_ones = [r.epoch for r in self.records if r.recovered_seconds is None]
        record = RecoveryRecord(
            name,
            cause,
            died_at,
            self.epoch,
            back_to,
            during=max(open_ones, default=None),
            died=died,
        )
        record.replayed[name] = max(0, died_at - back_to)
        self.records.append(record)
        self.to_restart.append(record)
        self.rolled_back_to = back_to
        for view in self.nodes.values():
            view.frame = min(view.frame, back_to)
        self.changed.set()
        return record

    def fire_due_kills(self) -> None:
        """SIGKILL each tile whose ``--kill`` frame has come, at once.

        Called on the coordinator's compute actor as it takes a report,
        before the report is answered: a tile waits for that answer at a
        ``--kill`` frame (``Job.report_at``), so it dies at that frame, not
        some frames later.
        """
        while self.pending:
            kill = self.pending[0]
            view = self.nodes[kill.node]
            if view.frame < kill.frame:
                return
            self.pending.pop(0)
            proc = self.procs[kill.node]
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            self.carried_out.append(f"{kill.node}@{view.frame}")
            self.died(kill.node, "killed")

    def progress(self, peer: str, info: dict[str, Any]) -> None:
        epoch = int(info.get("epoch", 0))
        if epoch < self.epoch or any(r.node == peer for r in self.to_restart):
            # Sent before the tile heard of the latest rollback (or by a
            # tile now dead): its frame is no longer where the tile is.
            return
        super().progress(peer, info)
        frame = int(info["frame"])
        now = time.perf_counter()
        for record in self.records:
            if "rolled_back_from" in info and record.epoch == epoch:
                record.replayed[peer] = max(0, int(info["rolled_back_from"]) - frame)
            if record.node != peer or epoch < record.epoch:
                continue
            if record.restart_seconds is None and frame > record.rolled_back_to:
                record.restart_seconds = now - record.died
            if record.recovered_seconds is None and frame >= record.died_at:
                record.recovered_seconds = now - record.died
        self.fire_due_kills()


class Recovery:
    """The coordinator's half: restart dead tiles, order the rollbacks.

    :meth:`tick` runs on every pass of the demo's watch loop; the kills
    themselves are fired by the board as it takes the reports.
    """

    def __init__(
        self,
        board: RecoveryBoard,
        coordinator: Node,
        procs: dict[str, trio.Process],
        start: Callable[[str, list[str]], Awaitable[trio.Process]],
        kills: list[Kill],
    ) -> None:
        self.board = board
        self.coordinator = coordinator
        self.procs = procs
        self.start = start
        self.names = list(board.nodes)
        board.pending = list(kills)
        board.procs = procs
        self.unplanned: dict[str, int] = dict.fromkeys(self.names, 0)
        self.orders: list[SendHandle] = []

    async def tick(self) -> None:
        board = self.board
        if board.done.is_set():
            return
        # A kill whose frame a rollback has gone back past is due at once.
        board.fire_due_kills()
        for name in self.names:
            code = self.procs[name].poll()
            if code is None or any(r.node == name for r in board.to_restart):
                continue
            self.unplanned[name] += 1
            if self.unplanned[name] > MAX_UNPLANNED_RESTARTS:
                raise DemoError(
                    f"node {name} died {self.unplanned[name]} times on its own "
                    f"(last: exit code {code}); giving up (its own error is printed above)"
                )
            board.died(name, f"signal {-code}" if code < 0 else f"exited {code}")
        while board.to_restart:
            await self._restart(board.to_restart[0])
            board.to_restart.pop(0)
        # Not past the latest rollback's checkpoint: a tile may not have
        # loaded it yet, and a tile that has not heard of the rollback may
        # still make a later one common meanwhile.
        common = latest_common_checkpoint(board.checkpoints, self.names)
        before = min(common, board.rolled_back_to) if board.epoch else common
        prune_checkpoints(board.checkpoints, self.names, before)

    async def _restart(self, record: RecoveryRecord) -> None:
        old = self.procs[record.node]
        await old.wait()
        if old.stdin is not None:
            await old.stdin.aclose()
        resume = ["--resume", str(record.rolled_back_to), "--epoch", str(record.epoch)]
        self.procs[record.node] = await self.start(record.node, resume)
        order = {"epoch": record.epoch, "frame": record.rolled_back_to}
        for other in self.names:
            if other != record.node:
                # Not awaited: a tile that is dead too gets its order as its
                # restart's arguments, and its old incarnation's pending
                # copy is resent to the new one, which finds it old news.
                self.orders.append(
                    self.coordinator.send_nowait(other, order, stream=RECOVER_STREAM)
                )
