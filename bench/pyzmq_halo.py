"""The hand-written pyzmq baseline of the grid benchmark: the Life demo's loop, no cellmesh.

What a careful user writes today without cellmesh: one ROUTER bound per
process, one DEALER per neighbour (its routing id is the node's id, ``LINGER``
0). Every halo is answered at once with a small ACK on the ROUTER — the
confirmation a cellmesh send gets — with no retries, no deduplication and no
ordering beyond ZeroMQ's own. Two loops drive the same sockets and messages:

* **blocking** (the default): no event loop, a ``zmq.Poller`` over all sockets;
* **trio** (``--trio``): the same loop written by hand on Trio, the event loop
  cellmesh runs on, with no cellmesh code: the floor any Trio-based
  implementation stands on. One task does everything with ``NOBLOCK`` calls:
  it drains every socket while ``ZMQ_EVENTS`` shows ``POLLIN`` and, when
  none does, sleeps in ``trio.lowlevel.wait_readable`` on one epoll set
  holding every socket's ``ZMQ_FD``. No other task, no channel, no per-message
  task hop.

Run one process per tile of a topology (``bench/grid.py``'s ``measure_pyzmq``
builds one with free ports and starts them)::

    .venv/bin/python bench/pyzmq_halo.py --topology grid.toml --id t0-0 \\
        --size 1024 --frames 300 --reps 3 [--trio]

The work is the demo's and ``bench/mpi_halo.py``'s: the same decomposition
(``Decomposition.for_nodes`` over the topology's ids), the same deep-halo
algorithm (``actors.grid.DeepTile`` with ``LIFE``) at the same depth
(``--depth``, 0 = ``auto_depth``), and the per-exchange shape of
``actors.grid.run_tile``: send the halos (the frame number and
``cells.edge(d).tobytes()``), wait for the neighbours' halos of that frame
(ACKing each as it arrives), fill, step, then wait for the ACKs of the
previous exchange (one exchange in flight).

Each repetition starts with the demo's two-round "ready" barrier with the
neighbours (as the demo's ``node.neighbour_barrier``: so that the clocks start together, as MPI's
``Barrier``) and is timed from the barrier's end to the end of the last frame.
A warm-up repetition comes first. The process prints one JSON object on
stdout: its node id, the loop (``"blocking"`` or ``"trio"``), the depth, the
seconds and frames/s of every timed repetition, and the SHA-256 of its final
tile (``grid_digest``), which must equal the serial run's tile after
``frames`` steps. It then keeps answering for about a second (a neighbour may
still wait for the ACK of its last halo) and exits.
"""

from __future__ import annotations

import argparse
import json
import select
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import trio
import zmq

from actors import Topology
from actors.grid import LIFE, Decomposition, DeepTile, Direction, auto_depth, grid_digest

#: A message's header: the repetition and the frame (the barrier's rounds are
#: frames -1 and -2), so a fast neighbour's next repetition never meets this one's.
_HEADER = struct.Struct("<ii")
_READY = (-1, -2)
#: How long a process keeps answering after its report (its neighbours may
#: still wait for the ACK of their last halo).
_LINGER_S = 1.0
_POLLIN: Final = int(zmq.POLLIN)
_NOBLOCK: Final = int(zmq.NOBLOCK)

Key = tuple[int, int]


class _Exchange:
    """The sockets of one node and what has arrived on them, by (repetition, frame).

    The loops share the sockets, the messages and their filing; they differ
    only in how they wait (:class:`_Blocking`, :class:`_Trio`).
    """

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], bind: str) -> None:
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(bind)
        self.dealers: dict[str, zmq.Socket[bytes]] = {}
        self.halos: dict[Key, dict[str, bytes]] = {}
        self.acks: dict[Key, int] = {}

    def connect(self, own_id: str, peers: dict[str, str]) -> None:
        """One DEALER per neighbour; the neighbour's ROUTER sees us as ``own_id``."""
        for peer, endpoint in peers.items():
            dealer = self.router.context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.ROUTING_ID, own_id.encode())
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(endpoint)
            self.dealers[peer] = dealer

    @property
    def sockets(self) -> list[zmq.Socket[bytes]]:
        """The ROUTER, then the DEALERs."""
        return [self.router, *self.dealers.values()]

    def file(self, sock: zmq.Socket[bytes], parts: list[bytes]) -> None:
        """File a message received on ``sock``: ACK and keep a halo, count an ACK."""
        if sock is self.router:
            sender, header, payload = parts
            # A ROUTER never blocks a send (it drops past the HWM, which one
            # exchange in flight never reaches).
            self.router.send_multipart([sender, header], _NOBLOCK)
            key = _HEADER.unpack(header)
            self.halos.setdefault(key, {})[sender.decode()] = payload
        else:
            key = _HEADER.unpack(parts[0])
            self.acks[key] = self.acks.get(key, 0) + 1

    def has_halos(self, key: Key) -> bool:
        """Whether every neighbour's halo tagged ``key`` has arrived."""
        return len(self.halos.get(key, ())) == len(self.dealers)

    def has_acks(self, key: Key) -> bool:
        """Whether every neighbour has ACKed our message tagged ``key``."""
        return self.acks.get(key, 0) == len(self.dealers)

    def close(self) -> None:
        """Close every socket (``LINGER`` 0: nothing unsent is kept)."""
        for sock in self.sockets:
            sock.close()


class _Blocking(_Exchange):
    """The blocking loop: a ``zmq.Poller`` over every socket."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], bind: str) -> None:
        super().__init__(ctx, bind)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)

    def connect(self, own_id: str, peers: dict[str, str]) -> None:
        """As :meth:`_Exchange.connect`, then poll each DEALER for input too."""
        super().connect(own_id, peers)
        for dealer in self.dealers.values():
            self.poller.register(dealer, zmq.POLLIN)

    def send(self, key: Key, data: dict[str, bytes]) -> None:
        """Send ``data[peer]`` to every neighbour, tagged with ``key``."""
        header = _HEADER.pack(*key)
        for peer, payload in data.items():
            self.dealers[peer].send_multipart([header, payload])

    def pump(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for traffic; file halos (ACKing each) and count ACKs."""
        for sock, _ in self.poller.poll(timeout_ms):
            # Drain the socket: one poll wake may stand for many messages.
            while True:
                try:
                    parts = sock.recv_multipart(_NOBLOCK)
                except zmq.Again:
                    break
                self.file(sock, parts)

    def wait_for(self, done: Callable[[], bool], deadline: float) -> None:
        """Pump until ``done()``.

        Raises:
            TimeoutError: ``deadline`` (a ``time.monotonic`` value) passed first.
        """
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("a neighbour stopped answering")
            self.pump(min(1000, max(1, int(left * 1000))))

    def wait_halos(self, key: Key, deadline: float) -> dict[str, bytes]:
        """The neighbours' halos tagged ``key``, once all have arrived."""
        self.wait_for(lambda: self.has_halos(key), deadline)
        return self.halos.pop(key, {})

    def wait_acks(self, key: Key, deadline: float) -> None:
        """Return once every neighbour has ACKed our message tagged ``key``."""
        self.wait_for(lambda: self.has_acks(key), deadline)
        self.acks.pop(key, None)


class _Trio(_Exchange):
    """The Trio loop: one task, ``NOBLOCK`` calls, one epoll set over every ``ZMQ_FD``.

    ``ZMQ_FD`` only says "``ZMQ_EVENTS`` may have changed", and any zmq call on
    the socket (a send, ``getsockopt(EVENTS)``) may consume that signal. So
    the task drains every socket, reading ``EVENTS`` after each call, before
    each sleep; the epoll set is level-triggered on the ``ZMQ_FD``s, whose
    signal stays up until a zmq call handles it, so nothing that arrives
    between the drain and the sleep is missed. One fd for Trio to wait on
    costs one ``wait_readable`` per sleep, where a waiter task per socket
    would cost a nursery, a task each and a cancellation.
    """

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], bind: str) -> None:
        super().__init__(ctx, bind)
        self.epoll = select.epoll()
        self._watch(self.router)

    def _watch(self, sock: zmq.Socket[bytes]) -> None:
        """Add ``sock``'s ``ZMQ_FD`` to the epoll set."""
        self.epoll.register(cast(int, sock.getsockopt(zmq.FD)), select.EPOLLIN)

    def connect(self, own_id: str, peers: dict[str, str]) -> None:
        """As :meth:`_Exchange.connect`, then put each DEALER's ``ZMQ_FD`` in the epoll set."""
        super().connect(own_id, peers)
        for dealer in self.dealers.values():
            self._watch(dealer)

    def drain(self) -> bool:
        """Receive and file everything queued on every socket; return whether anything came."""
        got = False
        for sock in self.sockets:
            # Filing a halo sends an ACK on the ROUTER, which may consume its
            # signal: EVENTS is read again before each recv.
            while cast(int, sock.getsockopt(zmq.EVENTS)) & _POLLIN:
                self.file(sock, sock.recv_multipart(_NOBLOCK))
                got = True
        return got

    async def pump(self) -> None:
        """Drain every socket; if nothing was queued, sleep until some socket signals."""
        if not self.drain():
            await trio.lowlevel.wait_readable(self.epoll.fileno())

    async def send(self, key: Key, data: dict[str, bytes]) -> None:
        """Send ``data[peer]`` to every neighbour, tagged with ``key``."""
        header = _HEADER.pack(*key)
        for peer, payload in data.items():
            while True:
                try:
                    self.dealers[peer].send_multipart([header, payload], _NOBLOCK)
                    break
                except zmq.Again:
                    # The DEALER's queue is full (not with one exchange in
                    # flight): keep serving the others until it has room.
                    await self.pump()

    async def wait_halos(self, key: Key) -> dict[str, bytes]:
        """The neighbours' halos tagged ``key``, once all have arrived."""
        while not self.has_halos(key):
            await self.pump()
        return self.halos.pop(key, {})

    async def wait_acks(self, key: Key) -> None:
        """Return once every neighbour has ACKed our message tagged ``key``."""
        while not self.has_acks(key):
            await self.pump()
        self.acks.pop(key, None)

    def close(self) -> None:
        """Close the epoll set and every socket."""
        self.epoll.close()
        super().close()


def _start_tile(
    decomp: Decomposition, node_id: str, size: int, depth: int
) -> tuple[DeepTile, dict[str, Direction]]:
    """The tile's start grid and the direction of each neighbour, by node id."""
    tile = decomp.tile_of(node_id)
    cells = DeepTile(
        LIFE, decomp, tile, LIFE.initial((size, size), 1)[decomp.tile_slices(tile)], depth
    )
    return cells, {decomp.node_id(other): d for d, other in cells.neighbours.items()}


def _run(
    net: _Blocking,
    decomp: Decomposition,
    node_id: str,
    rep: int,
    size: int,
    frames: int,
    depth: int,
    deadline: float,
) -> tuple[DeepTile, float]:
    """One repetition from the start grid: the tile after ``frames`` steps and the seconds."""
    cells, towards = _start_tile(decomp, node_id, size, depth)
    # Round one proves every link works both ways; round two tells each
    # neighbour we finished round one (as node.neighbour_barrier in the demo).
    for ready in _READY:
        net.send((rep, ready), dict.fromkeys(towards, b""))
        net.wait_halos((rep, ready), deadline)
        net.wait_acks((rep, ready), deadline)
    started = time.perf_counter()
    previous: Key | None = None
    for frame in range(frames):
        exchange = cells.needs_halos
        if exchange:
            key = (rep, frame)
            net.send(key, {peer: cells.edge(d).tobytes() for peer, d in towards.items()})
            for peer, data in net.wait_halos(key, deadline).items():
                cells.fill(towards[peer], data)
        cells.step()
        if exchange:
            # One exchange in flight: confirm the one before.
            if previous is not None:
                net.wait_acks(previous, deadline)
            previous = key
    elapsed = time.perf_counter() - started
    if previous is not None:
        net.wait_acks(previous, deadline)
    return cells, elapsed


async def _run_trio(
    net: _Trio, decomp: Decomposition, node_id: str, rep: int, size: int, frames: int, depth: int
) -> tuple[DeepTile, float]:
    """:func:`_run` on Trio (the caller bounds the time)."""
    cells, towards = _start_tile(decomp, node_id, size, depth)
    for ready in _READY:
        await net.send((rep, ready), dict.fromkeys(towards, b""))
        await net.wait_halos((rep, ready))
        await net.wait_acks((rep, ready))
    started = time.perf_counter()
    previous: Key | None = None
    for frame in range(frames):
        exchange = cells.needs_halos
        if exchange:
            key = (rep, frame)
            await net.send(key, {peer: cells.edge(d).tobytes() for peer, d in towards.items()})
            for peer, data in (await net.wait_halos(key)).items():
                cells.fill(towards[peer], data)
        cells.step()
        if exchange:
            if previous is not None:
                await net.wait_acks(previous)
            previous = key
    elapsed = time.perf_counter() - started
    if previous is not None:
        await net.wait_acks(previous)
    return cells, elapsed


def _report(args: argparse.Namespace, depth: int, seconds: list[float], cells: DeepTile) -> None:
    """Print the process's JSON report on stdout."""
    report = {
        "node": args.id,
        "loop": "trio" if args.trio else "blocking",
        "size": args.size,
        "frames": args.frames,
        "depth": depth,
        "seconds": seconds,
        "fps": [args.frames / s for s in seconds],
        "sha256": grid_digest(np.ascontiguousarray(cells.cells())),
        "zmq": zmq.zmq_version(),
    }
    print(json.dumps(report), flush=True)


def _serve_blocking(
    net: _Blocking, decomp: Decomposition, args: argparse.Namespace, depth: int
) -> None:
    """Every repetition on the blocking loop, the report, then a second of ACKing."""
    deadline = time.monotonic() + args.timeout
    seconds: list[float] = []
    cells: DeepTile | None = None
    for rep in range(args.reps + 1):
        cells, elapsed = _run(net, decomp, args.id, rep, args.size, args.frames, depth, deadline)
        if rep > 0:
            seconds.append(elapsed)
    assert cells is not None
    _report(args, depth, seconds, cells)
    end = time.monotonic() + _LINGER_S
    while (left := end - time.monotonic()) > 0:
        net.pump(max(1, int(left * 1000)))


async def _serve_trio(
    net: _Trio, decomp: Decomposition, args: argparse.Namespace, depth: int
) -> None:
    """Every repetition on Trio, the report, then a second of ACKing.

    Raises:
        TimeoutError: the run took longer than ``--timeout``.
    """
    seconds: list[float] = []
    cells: DeepTile | None = None
    try:
        # One deadline for the whole run, as the blocking loop's: a cancel
        # scope per wait would cost more and bound nothing more.
        with trio.fail_after(args.timeout):
            for rep in range(args.reps + 1):
                cells, elapsed = await _run_trio(
                    net, decomp, args.id, rep, args.size, args.frames, depth
                )
                if rep > 0:
                    seconds.append(elapsed)
    except trio.TooSlowError:
        raise TimeoutError("a neighbour stopped answering") from None
    assert cells is not None
    _report(args, depth, seconds, cells)
    with trio.move_on_after(_LINGER_S):
        while True:
            await net.pump()


def main(argv: list[str] | None = None) -> int:
    """Run one tile node; print its JSON report; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--topology", required=True, help="the topology file (TOML)")
    parser.add_argument("--id", required=True, help="this process's node id")
    parser.add_argument("--size", type=int, default=1024, help="grid side (default 1024)")
    parser.add_argument("--frames", type=int, default=300, help="frames per repetition")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (after 1 warm-up)")
    parser.add_argument(
        "--depth", type=int, default=0, help="frames per halo exchange (default 0: auto_depth)"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="give up after this many seconds"
    )
    parser.add_argument(
        "--trio", action="store_true", help="run the loop on Trio (default: blocking pyzmq)"
    )
    args = parser.parse_args(argv)

    topology = Topology.load(args.topology)
    decomp = Decomposition.for_nodes((args.size, args.size), len(topology.ids), names=topology.ids)
    depth = args.depth or auto_depth(decomp, LIFE)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    bind = topology.endpoint_of(args.id)
    peers = dict(topology.peers_of(args.id))
    try:
        if args.trio:
            trio_net = _Trio(ctx, bind)
            try:
                trio_net.connect(args.id, peers)
                trio.run(_serve_trio, trio_net, decomp, args, depth)
            finally:
                trio_net.close()
        else:
            net = _Blocking(ctx, bind)
            try:
                net.connect(args.id, peers)
                _serve_blocking(net, decomp, args, depth)
            finally:
                net.close()
    finally:
        ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
