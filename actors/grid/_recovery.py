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

Halos need no epoch: a tile's halo for frame f has the same bytes in every
epoch, so a stale copy that arrives late is still right, and the inbox keeps
what came early. Epochs order the rollbacks and mark progress reports, so
the coordinator ignores a report from before a rollback.
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

from actors import Actor, Delivery, Node, NodeConfig, SendHandle, Topology, open_node
from transport import SenderConfig
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
    _Inbox,
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


class _RecoveringActor(Actor[Any, None]):
    """A recoverable tile's compute actor: halos into the inbox, rollback orders."""

    def __init__(self, inbox: _Inbox, rollbacks: _Rollbacks) -> None:
        self._inbox = inbox
        self._rollbacks = rollbacks

    async def receive(self, msg: Any) -> None:
        if not isinstance(msg, Delivery):
            return
        if msg.stream == "halo" and msg.frame_no is not None:
            self._inbox.put(msg.frame_no, msg.peer, bytes(msg.payload))
        elif (
            msg.stream == RECOVER_STREAM
            and msg.peer == COORDINATOR
            and isinstance(msg.payload, dict)
        ):
            self._rollbacks.order(int(msg.payload["epoch"]), int(msg.payload["frame"]))


def _forget_before(inbox: _Inbox, frame: int) -> None:
    """Drop halos for frames before ``frame``: no rollback goes behind it again."""
    for old in [f for f in inbox.frames if f < frame]:
        del inbox.frames[old]


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
    inbox = _Inbox()
    rollbacks = _Rollbacks(resume)
    config = NodeConfig(
        faults=job.fault_plan(topology.rank_of(node_id)),
        sender=SenderConfig(retry_timeout=0.1, retry_ceiling=0.5, send_timeout=120.0),
        seed=job.seed,
    )
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
            _forget_before(inbox, target.frame)
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
        inbox: _Inbox,
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

    async def _report(self, frame: int, epoch: int, **extra: Any) -> None:
        node = self.node
        info = {
            "frame": frame,
            "ms": self.frame_ms[-1] if self.frame_ms else 0.0,
            "epoch": epoch,
            **extra,
        }
        info.update(_summary(node.statistics()))
        await node.wait_window(COORDINATOR)
        self.progress.append(node.send_nowait(COORDINATOR, info, stream="progress"))
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
                    node.send_nowait(peer, cells.edge(d).tobytes(), stream="halo", frame_no=frame)
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
            await self._report(frame + 1, start.epoch)
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
    #: The last frame the dead tile had reported.
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
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class RecoveryBoard(_Board):
    """The coordinator's board for a recovering run: progress by epoch."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.epoch = 0
        self.records: list[RecoveryRecord] = []

    def progress(self, peer: str, info: dict[str, Any]) -> None:
        epoch = int(info.get("epoch", 0))
        if epoch < self.epoch:
            # Sent before the tile heard of the latest rollback: its frame
            # number is no longer where the tile is.
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


class Recovery:
    """The coordinator's half: fire ``--kill``s, restart dead tiles, order rollbacks.

    :meth:`tick` runs on every pass of the demo's watch loop.
    """

    def __init__(
        self,
        board: RecoveryBoard,
        coordinator: Node,
        procs: dict[str, trio.Process],
        start: Callable[[str, list[str]], Awaitable[trio.Process]],
        checkpoints: Path,
        kills: list[Kill],
    ) -> None:
        self.board = board
        self.coordinator = coordinator
        self.procs = procs
        self.start = start
        self.checkpoints = checkpoints
        self.names = list(board.nodes)
        #: Kills not yet carried out, in the order given: each is armed once
        #: the one before it was carried out, so ``--kill A@12 --kill B@11``
        #: kills B while it replays frame 11 after A's death (a kill during
        #: recovery).
        self.pending = list(kills)
        self.carried_out: list[str] = []
        self.unplanned: dict[str, int] = dict.fromkeys(self.names, 0)
        self.orders: list[SendHandle] = []

    async def tick(self) -> None:
        if self.board.done.is_set():
            return
        while self.pending:
            kill = self.pending[0]
            view = self.board.nodes[kill.node]
            if view.frame < kill.frame:
                break
            self.pending.pop(0)
            proc = self.procs[kill.node]
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            await self._restart(kill.node, "killed", view.frame)
            self.carried_out.append(f"{kill.node}@{view.frame}")
        for name in self.names:
            code = self.procs[name].poll()
            if code is None:
                continue
            self.unplanned[name] += 1
            if self.unplanned[name] > MAX_UNPLANNED_RESTARTS:
                raise DemoError(
                    f"node {name} died {self.unplanned[name]} times on its own "
                    f"(last: exit code {code}); giving up (its own error is printed above)"
                )
            cause = f"signal {-code}" if code < 0 else f"exited {code}"
            await self._restart(name, cause, self.board.nodes[name].frame)
        prune_checkpoints(
            self.checkpoints, self.names, latest_common_checkpoint(self.checkpoints, self.names)
        )

    async def _restart(self, name: str, cause: str, died_at: int) -> None:
        old = self.procs[name]
        await old.wait()
        died = time.perf_counter()
        if old.stdin is not None:
            await old.stdin.aclose()
        board = self.board
        board.epoch += 1
        epoch = board.epoch
        back_to = latest_common_checkpoint(self.checkpoints, self.names)
        record = RecoveryRecord(name, cause, died_at, epoch, back_to, died=died)
        record.replayed[name] = max(0, died_at - back_to)
        board.records.append(record)
        for view in board.nodes.values():
            view.frame = min(view.frame, back_to)
        self.procs[name] = await self.start(name, ["--resume", str(back_to), "--epoch", str(epoch)])
        for other in self.names:
            if other != name:
                # Not awaited: a tile that is dead too gets its order as its
                # restart's arguments, and its old incarnation's pending
                # copy is resent to the new one, which finds it old news.
                self.orders.append(
                    self.coordinator.send_nowait(
                        other, {"epoch": epoch, "frame": back_to}, stream=RECOVER_STREAM
                    )
                )
        board.changed.set()
