"""A 2-D wave simulation split into tiles, one cellmesh node per tile.

This is the program ``docs/guide.md`` walks through. Each node owns one tile
of the grid, sends the edges and corners of its tile to its (up to eight)
neighbours every frame, waits for theirs, and steps the wave equation with a
9-point stencil. At the end every node saves its tile, and the pieces are put
together and compared, bit for bit, with a serial run of the same start.

Usage::

    python examples/my_grid.py                          # 4 local nodes, then check
    python examples/my_grid.py --nodes 6 --drop 0.05    # with a lossy wire
    python examples/my_grid.py plan --topology grid.toml
    python examples/my_grid.py node --topology grid.toml --out DIR [--id t0-1]
    python examples/my_grid.py check --topology grid.toml --out DIR

``node`` is what runs on each host (its id comes from ``--id`` or from the
launcher's rank variables); ``plan`` checks a topology file against the grid
before you launch; ``check`` compares the saved tiles with a serial run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import trio

from actors import (
    Actor,
    Delivery,
    DeliveryFailed,
    Gap,
    Node,
    NodeConfig,
    Reject,
    SendError,
    SendHandle,
    Topology,
    TopologyError,
    open_node,
)
from actors.grid import Decomposition, assemble, interior, pad
from actors.launch import node_id_from_env
from actors.statistics import (
    NodeStatistics,
)
from transport import (
    SenderConfig,
)
from transport.testing import (
    FaultPlan,
)

Grid = npt.NDArray[np.float64]

# --- the model: the same code steps a tile and the whole grid -----------------------

#: (c * dt / dx)^2. The 9-point leapfrog scheme is stable up to 0.75.
C2 = 0.25
#: Cells of halo the stencil reads on each side.
HALO = 1
#: The wave is pinned to zero beyond the grid's edge (a fixed boundary).
BOUNDARY = 0.0


def initial(shape: tuple[int, int]) -> tuple[Grid, Grid]:
    """The start: a Gaussian bump at rest, as (current, previous) grids."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    width = (min(h, w) / 10.0) ** 2
    u = np.exp(-((y - 0.35 * h) ** 2 + (x - 0.6 * w) ** 2) / width)
    return u, u.copy()


def step(padded: Grid, previous: Grid) -> Grid:
    """One leapfrog step of the wave equation; returns the next interior."""
    c = padded[1:-1, 1:-1]
    n, s, w, e = padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]
    nw, ne, sw, se = padded[:-2, :-2], padded[:-2, 2:], padded[2:, :-2], padded[2:, 2:]
    laplacian = (4.0 * (n + s + e + w) + (nw + ne + sw + se) - 20.0 * c) / 6.0
    return 2.0 * c - previous + C2 * laplacian


def run_serial(shape: tuple[int, int], frames: int) -> Grid:
    """The whole grid in one process: what the tiled run must reproduce exactly."""
    u, previous = initial(shape)
    padded = pad(u, HALO, BOUNDARY)
    for _ in range(frames):
        core = interior(padded, HALO)
        new = step(padded, previous)
        previous = core.copy()
        core[...] = new
    return np.array(interior(padded, HALO))


# --- the grid and the topology ------------------------------------------------------


def decomposition(topology: Topology, size: int) -> Decomposition:
    """The tiles of a ``size`` x ``size`` grid, one per node, in the file's rank order.

    Raises:
        TopologyError: the file does not link exactly the tiles that touch.
    """
    decomp = Decomposition.for_nodes((size, size), len(topology), names=topology.ids)
    decomp.check_halo(HALO)
    for tile in decomp.tile_ids():
        me = decomp.node_id(tile)
        wanted = {decomp.node_id(t) for t in decomp.neighbours(tile).values()}
        linked = set(topology.neighbours_of(me))
        if wanted - linked:
            other = min(wanted - linked)
            raise TopologyError(
                f"{me} and {other} are neighbouring tiles but not linked: "
                f'add [[link]] a = "{me}" b = "{other}"'
            )
        if linked - wanted:
            raise TopologyError(
                f"{me} and {min(linked - wanted)} are linked, but their tiles do not touch"
            )
    return decomp


# --- the compute actor and the halo inbox -------------------------------------------

HALO_STREAM = "halo"
DONE_STREAM = "done"
#: Our own ERR code (100 and up are the application's): a halo of the wrong shape.
BAD_HALO = 422


class Inbox:
    """Halos by frame and sender; the frame loop waits here for a full set.

    A neighbour is at most one frame ahead of us (it needs our halo to step),
    so at most two frames are ever held.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.frames: dict[int, dict[str, Grid]] = {}
        self.done: set[str] = set()
        self.lost: Gap | None = None
        self._changed = trio.Event()

    def put(self, frame: int, peer: str, halo: Grid) -> None:
        self.frames.setdefault(frame, {})[peer] = halo
        self._changed.set()

    def finish(self, peer: str) -> None:
        self.done.add(peer)
        self._changed.set()

    def give_up(self, gap: Gap) -> None:
        self.lost = gap
        self._changed.set()

    def missing(self, frame: int) -> list[str]:
        return sorted(set(self.shapes) - set(self.frames.get(frame, {})))

    async def take(self, frame: int) -> dict[str, Grid]:
        """Wait until every neighbour's halo for ``frame`` is here, and take them."""
        while self.missing(frame):
            self._check_lost()
            self._changed = trio.Event()
            await self._changed.wait()
        return self.frames.pop(frame, {})

    async def wait_done(self) -> None:
        """Wait until every neighbour said it has finished."""
        while self.done != set(self.shapes):
            self._check_lost()
            self._changed = trio.Event()
            await self._changed.wait()

    def _check_lost(self) -> None:
        if self.lost is not None:
            gap = self.lost
            raise RuntimeError(
                f"halos #{gap.first}..#{gap.last} from {gap.peer} will never arrive "
                f"({gap.reason}); this frame cannot be computed"
            )


class HaloActor(Actor[Any, None]):
    """The node's compute actor: checks each halo and files it under its frame.

    Returning from ``receive`` answers ACK; raising ``Reject`` answers ERR.
    The state lives in the inbox, outside the actor, so a restarted actor
    carries on where the old one stopped.
    """

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox

    async def receive(self, msg: Delivery | Gap) -> None:
        if isinstance(msg, Gap):
            self._inbox.give_up(msg)
            return
        if msg.stream == DONE_STREAM:
            self._inbox.finish(msg.peer)
            return
        shape = self._inbox.shapes.get(msg.peer)
        data = msg.payload
        if shape is None or msg.frame_no is None or not isinstance(data, bytes):
            raise Reject(BAD_HALO, f"not a halo: stream {msg.stream}, frame {msg.frame_no}")
        if len(data) != 8 * int(np.prod(shape)):
            raise Reject(BAD_HALO, f"halo of {len(data)} bytes, expected shape {shape}")
        self._inbox.put(msg.frame_no, msg.peer, np.frombuffer(data).reshape(shape))


# --- one node -----------------------------------------------------------------------


async def run_node(topology: Topology, node_id: str, opts: argparse.Namespace) -> dict[str, Any]:
    """Run one tile to its last frame, save it, and return the node's counters."""
    decomp = decomposition(topology, opts.size)
    tile = decomp.tile_of(node_id)
    towards = {decomp.node_id(t): d for d, t in decomp.neighbours(tile).items()}
    send_at = {p: decomp.halo_send_slices(tile, d, HALO) for p, d in towards.items()}
    recv_at = {p: decomp.halo_recv_slices(tile, d, HALO) for p, d in towards.items()}
    u, previous = (np.array(a[decomp.tile_slices(tile)]) for a in initial(decomp.shape))
    padded = pad(u, HALO, BOUNDARY)
    inbox = Inbox({p: padded[s].shape for p, s in recv_at.items()})
    rank = topology.rank_of(node_id)
    config = NodeConfig(
        sender=SenderConfig(retry_timeout=0.05, retry_ceiling=0.5, send_timeout=opts.send_timeout),
        faults=FaultPlan(drop=opts.drop, duplicate=opts.dup, delay=opts.delay / 1000.0, seed=rank),
        seed=rank,
    )
    started = time.perf_counter()
    async with open_node(
        node_id,
        bind=opts.bind or topology.endpoint_of(node_id),
        peers=topology.peers_of(node_id),
        compute=lambda: HaloActor(inbox),
        config=config,
    ) as node:
        with trio.fail_after(opts.startup_timeout):
            await node.wait_all_up()
        pending: list[SendHandle] = []
        for frame in range(opts.frames):
            core = interior(padded, HALO)
            sent = []
            for peer in towards:
                await node.wait_window(peer)
                # tobytes() copies: the link keeps the payload for resends, and
                # core changes below.
                edge = core[send_at[peer]].tobytes()
                sent.append(node.send_nowait(peer, edge, stream=HALO_STREAM, frame_no=frame))
            halos = await wait_for_halos(node, inbox, frame, pending + sent)
            for peer, halo in halos.items():
                padded[recv_at[peer]] = halo
            new = step(padded, previous)
            previous = core.copy()
            core[...] = new
            # Confirm last frame's halos only now: one frame stays in flight
            # while we compute, and a failure still stops us within a frame.
            for handle in pending:
                await handle.wait()
            pending = sent
        for handle in pending:
            await handle.wait()
        await say_goodbye(node, inbox, opts.linger)
        stats = summary(node.statistics())
    np.save(Path(opts.out) / f"{node_id}.npy", interior(padded, HALO))
    return {"node": node_id, "seconds": round(time.perf_counter() - started, 3), **stats}


async def wait_for_halos(
    node: Node, inbox: Inbox, frame: int, in_flight: list[SendHandle]
) -> dict[str, Grid]:
    """``inbox.take(frame)``, saying every few seconds whom we are waiting for.

    Raises:
        PeerError, DeliveryFailed: one of our sends in flight failed (a dead
            neighbour shows up here once its send deadline passes).
    """
    while True:
        with trio.move_on_after(5.0):
            return await inbox.take(frame)
        for handle in in_flight:
            if handle.done:
                await handle.wait()  # returns at once; raises if the send failed
        late = ", ".join(f"{p} ({node.state(p).value})" for p in inbox.missing(frame))
        print(f"{node.id}: frame {frame}: still waiting for {late}", file=sys.stderr, flush=True)


async def say_goodbye(node: Node, inbox: Inbox, linger: float) -> None:
    """Leave without stranding a neighbour that still needs an answer from us.

    Every halo we sent is confirmed by now; "done" tells each neighbour so.
    We leave once every neighbour said the same, after a short linger that
    answers resends of their "done" whose ACK the wire lost.
    """
    byes = []
    for peer in inbox.shapes:
        await node.wait_window(peer)
        byes.append(node.send_nowait(peer, True, stream=DONE_STREAM, timeout=5.0))
    await inbox.wait_done()
    for handle in byes:
        # A failure here means it said done, got ours and left before its ACK
        # reached us: it needs nothing more from us.
        with contextlib.suppress(DeliveryFailed):
            await handle.wait()
    await trio.sleep(linger)


def summary(stats: NodeStatistics) -> dict[str, Any]:
    """The counters worth printing, summed over the node's links."""
    links = stats.links.values()
    rtts = [link.protocol.rtt for link in links if link.protocol.rtt is not None]
    return {
        "sent": sum(link.protocol.sent for link in links),
        "resent": sum(link.protocol.resent for link in links),
        "duplicates_dropped": sum(s.duplicates for s in stats.inbound.protocol.sessions),
        "reordered": sum(s.reordered for per in stats.streams.values() for s in per.values()),
        "worst_rtt_ms": round(1000.0 * max(rtts), 3) if rtts else None,
    }


# --- checking, launching, the command line -------------------------------------------


def check(topology: Topology, opts: argparse.Namespace) -> bool:
    """Put the saved tiles together and compare them with the serial run."""
    decomp = decomposition(topology, opts.size)
    out = Path(opts.out)
    parts = {t: np.load(out / f"{decomp.node_id(t)}.npy") for t in decomp.tile_ids()}
    tiled = assemble(decomp, parts)
    serial = run_serial(decomp.shape, opts.frames)
    same = bool(np.array_equal(tiled, serial))
    verdict = "OK" if same else "MISMATCH"
    print(
        f"{verdict}: {decomp.count} nodes computed {opts.frames} frames of a "
        f"{opts.size}x{opts.size} wave; the tiled result "
        f"{'equals' if same else 'DIFFERS from'} the serial run bit for bit "
        f"(max |u| = {np.abs(tiled).max():.6f}, max difference {np.abs(tiled - serial).max():g})"
    )
    return same


def plan(topology: Topology, opts: argparse.Namespace) -> None:
    """Print which node owns which tile, where it listens and whom it talks to."""
    decomp = decomposition(topology, opts.size)
    ty, tx = decomp.tiles
    print(f"{opts.size}x{opts.size} grid in {ty}x{tx} tiles, halo {HALO}:")
    for rank, node_id in enumerate(topology.ids):
        ys, xs = decomp.tile_slices(decomp.tile_of(node_id))
        print(
            f"  rank {rank}  {node_id:6}  rows {ys.start}:{ys.stop}  cols {xs.start}:{xs.stop}  "
            f"{topology.endpoint_of(node_id)}  -> {', '.join(topology.neighbours_of(node_id))}"
        )


def launch_local(opts: argparse.Namespace) -> bool:
    """Write a topology for ``opts.nodes`` local nodes, run them, then check."""
    out = Path(opts.out or tempfile.mkdtemp(prefix="my-grid-"))
    out.mkdir(parents=True, exist_ok=True)
    opts.out = str(out)
    # Short ipc paths: the OS limits a socket path to about 100 bytes.
    sockets = Path(tempfile.mkdtemp(prefix="cm-"))
    ty, tx = Decomposition.for_nodes((opts.size, opts.size), opts.nodes).tiles
    topology = Topology.from_grid(ty, tx, lambda r, c: f"ipc://{sockets}/t{r}-{c}.sock")
    topology.save(out / "grid.toml")
    try:
        stats, failed = trio.run(run_nodes, topology, out, opts)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    if failed:
        print(f"FAILED: nodes {', '.join(sorted(failed))}", file=sys.stderr)
        return False
    for st in sorted(stats, key=lambda s: str(s["node"])):
        print(json.dumps(st))
    resent = sum(s["resent"] for s in stats)
    dups = sum(s["duplicates_dropped"] for s in stats)
    print(f"wire: {resent} retransmissions, {dups} duplicates dropped")
    (out / "summary.json").write_text(json.dumps(stats, indent=2))
    return check(topology, opts)


async def run_nodes(
    topology: Topology, out: Path, opts: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[str]]:
    """Start one ``node`` process per node of ``topology``; returns their counters."""
    stats: list[dict[str, Any]] = []
    failed: list[str] = []

    async def one(node_id: str) -> None:
        cmd = [sys.executable, __file__, "node", "--topology", str(out / "grid.toml")]
        cmd += ["--id", node_id, "--out", str(out), *passed_on(opts)]
        done = await trio.run_process(cmd, capture_stdout=True, check=False)
        if done.returncode != 0:
            failed.append(f"{node_id} (exit code {done.returncode})")
        else:
            stats.append(json.loads(done.stdout.decode().splitlines()[-1]))

    # Leaving the block early (timeout) kills every node process still running.
    with trio.fail_after(opts.timeout):
        async with trio.open_nursery() as nursery:
            for node_id in topology.ids:
                nursery.start_soon(one, node_id)
    return stats, failed


def passed_on(opts: argparse.Namespace) -> list[str]:
    """The options a local launch hands to every node."""
    names = ("size", "frames", "drop", "dup", "delay", "linger", "send_timeout")
    return [a for n in names for a in (f"--{n.replace('_', '-')}", str(getattr(opts, n)))]


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse the command line; no command means ``run``."""
    parser = argparse.ArgumentParser(prog="my_grid.py", description="A tiled 2-D wave on cellmesh.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every node on this machine, then check")
    run.add_argument("--nodes", type=int, default=4, help="node processes (default 4)")
    node = sub.add_parser("node", help="run one node (on each host)")
    node.add_argument("--id", help="this node's id (default: from the launcher's rank)")
    node.add_argument("--bind", help="endpoint to bind (default: its endpoint in the topology)")
    chk = sub.add_parser("check", help="compare the saved tiles with a serial run")
    pln = sub.add_parser("plan", help="show how a topology file maps onto the grid")
    for p in (node, chk, pln):
        p.add_argument("--topology", required=True, help="topology TOML file")
    for p in (run, node, chk, pln):
        p.add_argument("--size", type=int, default=96, help="grid is SIZE x SIZE (default 96)")
        p.add_argument("--frames", type=int, default=60, help="frames to step (default 60)")
    for p in (run, node, chk):
        p.add_argument("--out", required=p is not run, help="folder for the tiles")
    for p in (run, node):
        p.add_argument("--drop", type=float, default=0.0, help="drop probability per message")
        p.add_argument("--dup", type=float, default=0.0, help="duplicate probability")
        p.add_argument("--delay", type=float, default=0.0, help="random delay up to MS ms")
        p.add_argument("--linger", type=float, default=1.0, help="seconds to linger at the end")
        p.add_argument("--send-timeout", type=float, default=60.0, help="seconds per send")
        p.add_argument("--startup-timeout", type=float, default=60.0, help="wait for neighbours")
        p.add_argument("--timeout", type=float, default=120.0, help="give up after SECONDS")
    if not argv or argv[0].startswith("-"):
        argv = ["run", *argv]
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Run the command; returns the exit code."""
    opts = parse(argv)
    try:
        if opts.command == "run":
            return 0 if launch_local(opts) else 1
        topology = Topology.load(opts.topology)
        if opts.command == "plan":
            plan(topology, opts)
            return 0
        if opts.command == "check":
            return 0 if check(topology, opts) else 1
        node_id = opts.id or node_id_from_env(topology=topology)
        if node_id is None:
            print("give --id, or start under srun / mpirun (they set a rank)", file=sys.stderr)
            return 2

        async def bounded() -> dict[str, Any]:
            with trio.fail_after(opts.timeout):
                return await run_node(topology, node_id, opts)

        print(json.dumps(trio.run(bounded)), flush=True)
        return 0
    except TopologyError as exc:
        print(f"topology: {exc}", file=sys.stderr)
        return 2
    except (SendError, RuntimeError, trio.TooSlowError) as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
