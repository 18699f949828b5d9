"""Pluggable networks: the socket API the node's shells drive, over ZeroMQ or in memory.

The node's actors (PeerLink, Receiver) only need a handful of calls from a
socket: the owner-task API of :class:`transport.Socket`. :class:`SocketLike`
names that API and :class:`Network` names the two factories a node needs, so
the same shells run over real ZeroMQ (:class:`ZmqNetwork`, the default) or
over :class:`MemoryNetwork`, an in-process network for tests.

The memory network behaves like the ZeroMQ setup the shells are written for
(design.md §5): a DEALER connects to a ROUTER's endpoint and may send only
once that ROUTER is bound (``IMMEDIATE``), a ROUTER prefixes what it receives
with the sender's routing id, consumes that id when it sends and raises
:class:`Unroutable` for an id nobody connected with (``ROUTER_MANDATORY``),
the newest DEALER with a routing id takes the route over (``ROUTER_HANDOVER``),
queues are bounded (``WouldBlock`` at the high-water mark) and whatever a
socket still holds when it closes is lost (``LINGER=0``).

On top of that the test controls the wire, per direction between two nodes:
seeded drop, duplicate and delay (which reorders) from a :class:`FaultPlan`,
a fixed latency, and partitions that cut links until :meth:`heal`. Messages
carry the virtual time at which they become receivable, and a waiting owner
sleeps until exactly then, so under Trio's ``autojump_clock`` a scenario of
minutes of retries runs in milliseconds, the same way every time (after
trio's ``_tests/test_dtls.py::test_handshake_over_terrible_network``).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import trio

from ._errors import LocalProtocolError
from ._faults import FaultDraws, FaultPlan
from ._socket import BytesLike, PollerStatistics, SocketStatistics, Unroutable

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "MemoryNetwork",
    "MemoryPoller",
    "MemorySocket",
    "Network",
    "NetworkStatistics",
    "Poller",
    "SocketLike",
]

#: The scheme of memory endpoints: ``mem://<node>``.
MEM_SCHEME: Final = "mem://"


class SocketLike(Protocol):
    """The owner-task API of a socket, as the node's shells use it.

    :class:`transport.Socket` (ZeroMQ) and :class:`MemorySocket` implement it;
    see :class:`transport.Socket` for the full contract of each call.
    """

    def bind(self, endpoint: str) -> str:
        """Listen on ``endpoint``; returns the endpoint actually bound."""
        ...

    def connect(self, endpoint: str) -> None:
        """Connect to a peer's endpoint (the peer may bind later)."""
        ...

    def close(self, *, linger: float = 0.0) -> None:
        """Close now, dropping anything unreceived. Idempotent.

        ``linger``: seconds what was sent may still take to leave (ZeroMQ's
        I/O thread writes it after the call); 0 drops it.
        """
        ...

    def recv_multipart_nowait(self) -> list[bytes]:
        """Take one message or raise ``trio.WouldBlock``."""
        ...

    def recv_authenticated_nowait(self) -> tuple[str | None, list[bytes]]:
        """Take one message with the ZAP User-Id of its connection, or raise ``WouldBlock``."""
        ...

    def send_multipart_nowait(self, parts: Sequence[BytesLike]) -> None:
        """Queue one message or raise ``trio.WouldBlock`` / :class:`Unroutable`."""
        ...

    async def wait_ready(self, *, readable: bool = True, writable: bool = False) -> None:
        """Wait until readable/writable or until :meth:`wake` is called."""
        ...

    def wake(self) -> None:
        """Make the owner's pending or next :meth:`wait_ready` return."""
        ...


class Poller(Protocol):
    """One wait on many sockets of one network, for the one task that owns them.

    :class:`transport.SocketPoller` (ZeroMQ) and :class:`MemoryPoller`
    implement it; see :class:`transport.SocketPoller` for the contract.
    """

    def add(self, sock: Any) -> None:
        """Watch ``sock`` too."""
        ...

    def discard(self, sock: Any) -> None:
        """Stop watching ``sock``; call it before closing the socket."""
        ...

    def wake(self) -> None:
        """Make the owner's pending or next :meth:`wait` return."""
        ...

    def ready(self, sock: Any, *, writable: bool = False) -> bool:
        """Whether ``sock`` is readable (or writable, if asked) now."""
        ...

    def poll_nowait(self) -> list[Any]:
        """The sockets that may have become ready since the last look, without sleeping."""
        ...

    async def wait(self, *, spin: float = 0.0) -> list[Any]:
        """Sleep until a watched socket may be ready or a wake; those sockets.

        ``spin``: seconds a real-time poller may poll before parking
        (:mod:`transport._spin`); a virtual-time one ignores it.
        """
        ...

    def close(self) -> None:
        """Release what the poller holds. Idempotent."""
        ...

    def statistics(self) -> PollerStatistics:
        """The poller's counters."""
        ...


class Network(Protocol):
    """Where a node gets its sockets: ``open_node(..., network=...)``."""

    def dealer(self, routing_id: bytes, *, peer: str | None = None) -> SocketLike:
        """A new, unconnected DEALER that ROUTER peers address as ``routing_id``.

        ``peer`` names the node it will connect to, so that a secure network
        can pin that node's CURVE server key.
        """
        ...

    def router(self) -> SocketLike:
        """A new, unbound ROUTER."""
        ...

    def poller(self) -> Poller:
        """A new poller for sockets of this network."""
        ...


@dataclass(frozen=True, slots=True)
class NetworkStatistics:
    """What a :class:`MemoryNetwork` did with the messages it was given.

    Attributes:
        sent: messages sockets handed to the network.
        received: messages sockets took from their queues.
        dropped: lost to a fault plan's ``drop``.
        duplicated: sent twice by a fault plan's ``duplicate``.
        delayed: copies held back by a fault plan's ``delay``.
        cut: lost because a partition separated sender and receiver, when
            sent or when due.
        queued: messages waiting in sockets' queues now (delayed ones included).
    """

    sent: int
    received: int
    dropped: int
    duplicated: int
    delayed: int
    cut: int
    queued: int


class MemoryNetwork:
    """An in-process network of DEALER/ROUTER endpoints with seeded faults.

    Endpoints are ``mem://<node>``: a ROUTER bound there belongs to that node,
    and a DEALER belongs to the node its routing id names, which is how the
    node's sockets are made (``routing_id`` = the node id). Faults and cuts
    are set per direction between node names.

    Every call is synchronous and cheap; only :meth:`MemorySocket.wait_ready`
    sleeps, in Trio's (virtual) time. Use it from one Trio run.

    Args:
        seed: makes every fault decision repeatable; each direction draws
            from its own generator, so adding traffic on one link does not
            change the faults on another.
        latency: seconds every message spends on the wire, before any delay.
        hwm: the most messages one socket's queue holds (delayed ones
            included); a send to a full queue raises ``trio.WouldBlock``.

    Raises:
        LocalProtocolError: a negative latency or a high-water mark below 1.
    """

    def __init__(self, *, seed: int = 0, latency: float = 0.0, hwm: int = 1000) -> None:
        if not (latency >= 0.0 and math.isfinite(latency)):
            raise LocalProtocolError(f"latency must be >= 0 seconds, got {latency!r}")
        if hwm < 1:
            raise LocalProtocolError(f"hwm must be >= 1 message, got {hwm!r}")
        self.seed = seed
        self.latency = latency
        self.hwm = hwm
        self._routers: dict[str, MemorySocket] = {}
        # Every DEALER connected to an endpoint (to wake them when it binds),
        # and the one each routing id routes to (the newest: ROUTER_HANDOVER).
        self._dealers: dict[str, list[MemorySocket]] = {}
        self._routes: dict[str, dict[bytes, MemorySocket]] = {}
        self._plans: dict[tuple[str | None, str | None], FaultPlan] = {}
        # One generator per direction, kept when the plan in force changes.
        self._draws: dict[tuple[str, str], FaultDraws] = {}
        self._cuts: set[tuple[str, str]] = set()
        self._order = itertools.count()
        self._sent = self._received = self._cut = 0

    # -- sockets ------------------------------------------------------------

    def poller(self) -> MemoryPoller:
        """A poller for this network's sockets."""
        return MemoryPoller()

    def dealer(self, routing_id: bytes, *, peer: str | None = None) -> MemorySocket:
        """A new, unconnected DEALER; its node is ``routing_id`` decoded.

        ``peer`` is accepted for the :class:`Network` protocol; the memory
        network has no keys to pin.
        """
        return MemorySocket(self, "DEALER", bytes(routing_id))

    def router(self) -> MemorySocket:
        """A new, unbound ROUTER; its node is the name it binds as."""
        return MemorySocket(self, "ROUTER", None)

    @staticmethod
    def endpoint(node: str) -> str:
        """The endpoint a node named ``node`` binds: ``mem://<node>``."""
        return f"{MEM_SCHEME}{node}"

    # -- faults -------------------------------------------------------------

    def set_faults(
        self, plan: FaultPlan, *, src: str | None = None, dst: str | None = None
    ) -> None:
        """Apply ``plan`` to messages from ``src`` to ``dst`` (None: any node).

        The most specific plan wins: (src, dst), then (src, any), then
        (any, dst), then (any, any). ``FaultPlan()`` turns faults off again.
        The plan's own ``seed`` is mixed with the network's.

        Args:
            plan: drop / duplicate probabilities and the largest extra delay.
            src: the sending node, or None for every node.
            dst: the receiving node, or None for every node.
        """
        self._plans[(src, dst)] = plan

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every link between nodes of different groups, both ways.

        ``partition({"a"}, {"b", "c"})`` separates a from b and c; b and c
        still talk, and nodes named in no group are not affected. Messages
        across a cut are lost, including those already on the wire when they
        fall due. Cuts add up until :meth:`heal`.

        Args:
            groups: two or more sets of node names.

        Raises:
            LocalProtocolError: fewer than two groups, or a node in two groups.
        """
        sets = [frozenset(g) for g in groups]
        if len(sets) < 2:
            raise LocalProtocolError("a partition needs at least two groups of nodes")
        seen: set[str] = set()
        for group in sets:
            if seen & group:
                raise LocalProtocolError(f"nodes {sorted(seen & group)} are in two groups")
            seen |= group
        for one, other in itertools.permutations(sets, 2):
            self._cuts.update(itertools.product(one, other))

    def cut(self, src: str, dst: str) -> None:
        """Cut the link from ``src`` to ``dst`` only (the other way still works)."""
        self._cuts.add((src, dst))

    def heal(self) -> None:
        """Restore every link cut by :meth:`partition` or :meth:`cut`."""
        self._cuts.clear()

    def is_cut(self, src: str, dst: str) -> bool:
        """Whether messages from ``src`` to ``dst`` are lost now."""
        return (src, dst) in self._cuts

    def statistics(self) -> NetworkStatistics:
        """Counters of the whole network."""
        queued = sum(len(s._queue) for s in self._routers.values())
        queued += sum(len(s._queue) for ds in self._dealers.values() for s in ds)
        draws = self._draws.values()
        return NetworkStatistics(
            sent=self._sent,
            received=self._received,
            dropped=sum(d.dropped for d in draws),
            duplicated=sum(d.duplicated for d in draws),
            delayed=sum(d.delayed for d in draws),
            cut=self._cut,
            queued=queued,
        )

    # -- internals ----------------------------------------------------------

    def _plan(self, src: str, dst: str) -> FaultPlan | None:
        plans = self._plans
        for key in ((src, dst), (src, None), (None, dst), (None, None)):
            plan = plans.get(key)
            if plan is not None:
                return plan if plan.active else None
        return None

    def _transmit(self, src: str, target: MemorySocket, message: list[bytes]) -> None:
        """Put one message on the wire to ``target``, through cuts and faults."""
        assert target._node is not None
        dst = target._node
        self._sent += 1
        if (src, dst) in self._cuts:
            self._cut += 1
            return
        due = trio.current_time() + self.latency
        plan = self._plan(src, dst)
        if plan is None:
            target._enqueue(due, next(self._order), src, message)
            return
        draws = self._draws.get((src, dst))
        if draws is None:
            draws = self._draws[(src, dst)] = FaultDraws(f"{self.seed}:{plan.seed}:{src}->{dst}")
        for extra in draws.copies(plan):
            target._enqueue(due + extra, next(self._order), src, message)

    def _bind(self, sock: MemorySocket, endpoint: str) -> str:
        if not endpoint.startswith(MEM_SCHEME) or len(endpoint) == len(MEM_SCHEME):
            raise LocalProtocolError(f"memory endpoints look like 'mem://<node>', got {endpoint!r}")
        if endpoint in self._routers:
            raise LocalProtocolError(f"{endpoint} is already bound")
        self._routers[endpoint] = sock
        for dealer in self._dealers.get(endpoint, ()):
            dealer._notify()
        return endpoint

    def _connect(self, sock: MemorySocket, endpoint: str) -> None:
        assert sock._routing_id is not None
        self._dealers.setdefault(endpoint, []).append(sock)
        self._routes.setdefault(endpoint, {})[sock._routing_id] = sock

    def _forget(self, sock: MemorySocket) -> None:
        endpoint = sock._endpoint
        if endpoint is None:
            return
        if sock._kind == "ROUTER":
            if self._routers.get(endpoint) is sock:
                del self._routers[endpoint]
            return
        dealers = self._dealers.get(endpoint, [])
        if sock in dealers:
            dealers.remove(sock)
        routes = self._routes.get(endpoint, {})
        assert sock._routing_id is not None
        if routes.get(sock._routing_id) is sock:
            del routes[sock._routing_id]
            # An older DEALER with the same id that is still open gets the
            # route back, as it would by reconnecting to a real ROUTER.
            for other in reversed(dealers):
                if other._routing_id == sock._routing_id:
                    routes[sock._routing_id] = other
                    break


class MemorySocket:
    """A DEALER or ROUTER of a :class:`MemoryNetwork`; implements :class:`SocketLike`.

    Made by :meth:`MemoryNetwork.dealer` and :meth:`MemoryNetwork.router`.
    One task owns it, as with :class:`transport.Socket`.
    """

    def __init__(self, network: MemoryNetwork, kind: str, routing_id: bytes | None) -> None:
        self._net = network
        self._kind = kind
        self._routing_id = routing_id
        self._node: str | None = None if routing_id is None else routing_id.decode(errors="replace")
        self._endpoint: str | None = None
        self._closed = False
        # (due, order, sender node, parts): a heap, so a delayed copy is
        # received after later messages that were not delayed.
        self._queue: list[tuple[float, int, str, list[bytes]]] = []
        self._event: trio.Event | None = None
        self._poller: MemoryPoller | None = None
        self._waiting = False
        self._wake_pending = False
        self._sent = self._received = self._sleeps = self._wakes = 0

    @property
    def kind(self) -> str:
        """``"DEALER"`` or ``"ROUTER"``."""
        return self._kind

    @property
    def node(self) -> str | None:
        """The node this socket belongs to (None for a ROUTER not bound yet)."""
        return self._node

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def bind(self, endpoint: str) -> str:
        """Bind a ROUTER to ``mem://<node>``; DEALERs connected there may now send.

        Returns:
            ``endpoint``, unchanged.

        Raises:
            trio.ClosedResourceError: the socket is closed.
            LocalProtocolError: not a ROUTER, already bound, a malformed
                endpoint, or another open ROUTER is bound there.
        """
        self._check_open()
        if self._kind != "ROUTER" or self._endpoint is not None:
            raise LocalProtocolError("only an unbound ROUTER can bind in a MemoryNetwork")
        bound = self._net._bind(self, endpoint)
        self._endpoint = bound
        self._node = bound[len(MEM_SCHEME) :]
        return bound

    def connect(self, endpoint: str) -> None:
        """Connect a DEALER to ``endpoint``; the ROUTER there may bind later.

        Raises:
            trio.ClosedResourceError: the socket is closed.
            LocalProtocolError: not a DEALER, or already connected (a
                memory DEALER talks to one ROUTER).
        """
        self._check_open()
        if self._kind != "DEALER" or self._endpoint is not None:
            raise LocalProtocolError("only an unconnected DEALER can connect in a MemoryNetwork")
        self._endpoint = endpoint
        self._net._connect(self, endpoint)

    def close(self, *, linger: float = 0.0) -> None:
        """Close now; queued messages are lost and a waiting owner gets
        :class:`trio.ClosedResourceError`. Idempotent.

        ``linger`` is for :class:`transport.Socket`'s sake: what this socket
        sent is in its peer's queue already.
        """
        if self._closed:
            return
        self._closed = True
        self._net._forget(self)
        self._queue.clear()
        if self._event is not None:
            self._event.set()

    def recv_authenticated_nowait(self) -> tuple[str | None, list[bytes]]:
        """Like :meth:`recv_multipart_nowait`; the user id is always None.

        The memory network authenticates nobody: a node on it is a plaintext node.
        """
        return None, self.recv_multipart_nowait()

    def recv_multipart_nowait(self) -> list[bytes]:
        """Take the next message that is due, without blocking.

        Returns:
            Its parts; on a ROUTER the sender's routing id first.

        Raises:
            trio.WouldBlock: nothing is due yet.
            trio.ClosedResourceError: the socket is closed.
        """
        self._check_open()
        queue = self._queue
        now = trio.current_time()
        net = self._net
        assert self._node is not None or not queue
        while queue and queue[0][0] <= now:
            was_full = len(queue) >= net.hwm
            _, _, src, parts = heapq.heappop(queue)
            if was_full and self._kind == "ROUTER":
                # Room again: DEALERs blocked on this queue may send.
                for dealer in net._dealers.get(self._endpoint or "", ()):
                    dealer._notify()
            if net.is_cut(src, cast(str, self._node)):
                net._cut += 1
                continue
            self._received += 1
            net._received += 1
            return parts
        raise trio.WouldBlock

    def send_multipart_nowait(self, parts: Sequence[BytesLike]) -> None:
        """Put one message on the wire, without blocking.

        Parts are copied, so the caller may reuse its buffers at once.

        Args:
            parts: at least one part; on a ROUTER the first is the routing id.

        Raises:
            trio.WouldBlock: (DEALER) no ROUTER is bound at the endpoint yet;
                or the receiving socket's queue is at the high-water mark.
            Unroutable: (ROUTER) no open DEALER with that routing id is
                connected to this ROUTER's endpoint.
            trio.ClosedResourceError: the socket is closed.
            ValueError: ``parts`` is empty.
        """
        self._check_open()
        if not parts:
            raise ValueError("a message needs at least one part")
        copies = [bytes(cast("Buffer", part)) for part in parts]
        net = self._net
        if self._kind == "DEALER":
            target = net._routers.get(self._endpoint) if self._endpoint else None
            if target is None or len(target._queue) >= net.hwm:
                raise trio.WouldBlock
            assert self._routing_id is not None
            assert self._node is not None
            message = [self._routing_id, *copies]
            src = self._node
        else:
            routes = net._routes.get(self._endpoint) if self._endpoint else None
            dealer = routes.get(copies[0]) if routes else None
            if dealer is None:
                raise Unroutable(copies[0])
            if len(dealer._queue) >= net.hwm:
                raise trio.WouldBlock
            target, message, src = dealer, copies[1:], cast(str, self._node)
        self._sent += 1
        net._transmit(src, target, message)

    async def wait_ready(self, *, readable: bool = True, writable: bool = False) -> None:
        """Wait until a message is due, there is room to send, or :meth:`wake`.

        Always a checkpoint; returns at once if the condition holds or a wake
        is pending, and consumes the pending wake. A ROUTER counts as always
        writable (its sends fail per target, as with ROUTER_MANDATORY).

        Args:
            readable: return when a message can be received.
            writable: return when a message can be sent.

        Raises:
            trio.ClosedResourceError: the socket is closed, before or during
                the wait.
            trio.BusyResourceError: another task is already waiting on it.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        if self._waiting:
            raise trio.BusyResourceError("another task is already waiting on this socket")
        if self._ready(readable, writable):
            self._wake_pending = False
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._waiting = True
        try:
            while True:
                event = self._event = trio.Event()
                # A delayed message wakes its receiver exactly when it falls due.
                at = self._queue[0][0] if readable and self._queue else math.inf
                self._sleeps += 1
                with trio.move_on_at(at):
                    await event.wait()
                if self._closed:
                    raise trio.ClosedResourceError("socket was closed while waiting")
                if self._ready(readable, writable):
                    break
        finally:
            self._waiting = False
            self._event = None
        self._wake_pending = False

    def wake(self) -> None:
        """Make the owner's pending or next :meth:`wait_ready` return promptly."""
        self._wakes += 1
        self._wake_pending = True
        self._notify()

    def statistics(self) -> SocketStatistics:
        """Counters of this socket (``fd_waits`` counts its sleeps)."""
        return SocketStatistics(
            messages_sent=self._sent,
            messages_received=self._received,
            fd_waits=self._sleeps,
            wakes=self._wakes,
        )

    # -- internals ----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("socket is closed")

    def _ready(self, readable: bool, writable: bool) -> bool:
        if self._wake_pending:
            return True
        if readable and self._queue and self._queue[0][0] <= trio.current_time():
            return True
        return writable and self._writable()

    def _writable(self) -> bool:
        if self._kind == "ROUTER":
            return True
        target = self._net._routers.get(self._endpoint) if self._endpoint else None
        return target is not None and len(target._queue) < self._net.hwm

    def _enqueue(self, due: float, order: int, src: str, message: list[bytes]) -> None:
        heapq.heappush(self._queue, (due, order, src, message))
        self._notify()

    def _notify(self) -> None:
        if self._event is not None:
            self._event.set()
        if self._poller is not None:
            self._poller._signal(self)

    def _due(self, now: float) -> bool:
        return bool(self._queue) and self._queue[0][0] <= now


class MemoryPoller:
    """One wait on many :class:`MemorySocket`\\ s: :class:`Poller` for a :class:`MemoryNetwork`.

    A socket signals the poller whenever it may have become ready (a message
    queued, a ROUTER bound, room freed); :meth:`wait` also sleeps only until
    the next delayed message falls due, so virtual time runs as with one
    socket's :meth:`MemorySocket.wait_ready`.
    """

    def __init__(self) -> None:
        self._socks: dict[MemorySocket, None] = {}
        self._signalled: dict[MemorySocket, None] = {}
        self._event: trio.Event | None = None
        self._pending = False
        self._sleeps = 0
        self._wakes = 0

    def add(self, sock: Any) -> None:
        """Watch ``sock`` (a :class:`MemorySocket`) too."""
        assert isinstance(sock, MemorySocket)
        sock._poller = self
        self._socks[sock] = None
        self._signalled[sock] = None

    def discard(self, sock: Any) -> None:
        """Stop watching ``sock``."""
        if self._socks.pop(sock, 0) is None:
            sock._poller = None
        self._signalled.pop(sock, None)

    def wake(self) -> None:
        """Make the owner's pending or next :meth:`wait` return promptly."""
        if not self._pending:
            self._pending = True
            self._wakes += 1
            if self._event is not None:
                self._event.set()

    def poll_nowait(self) -> list[Any]:
        """The sockets signalled or with a message due, without sleeping."""
        now = trio.current_time()
        ready = dict(self._signalled)
        self._signalled.clear()
        for sock in self._socks:
            if sock._due(now):
                ready[sock] = None
        return list(ready)

    def ready(self, sock: Any, *, writable: bool = False) -> bool:
        """Whether ``sock`` has a message due (or room to send, if asked)."""
        return bool(sock._due(trio.current_time()) or (writable and sock._writable()))

    async def wait(self, *, spin: float = 0.0) -> list[Any]:
        """Sleep until a socket may be ready or :meth:`wake`; the sockets that may be.

        Always a checkpoint. The caller's cancel scope bounds the sleep.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        slept = False
        while True:
            now = trio.current_time()
            ready = dict(self._signalled)
            self._signalled.clear()
            for sock in self._socks:
                if sock._due(now):
                    ready[sock] = None
            if ready or self._pending:
                self._pending = False
                if not slept:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return list(ready)
            due = [sock._queue[0][0] for sock in self._socks if sock._queue]
            event = self._event = trio.Event()
            self._sleeps += 1
            try:
                with trio.move_on_at(min(due, default=math.inf)):
                    await event.wait()
            finally:
                self._event = None
            slept = True

    def close(self) -> None:
        """Forget every socket. Idempotent."""
        for sock in self._socks:
            sock._poller = None
        self._socks.clear()
        self._signalled.clear()

    def statistics(self) -> PollerStatistics:
        """This poller's counters."""
        return PollerStatistics(sleeps=self._sleeps, wakes=self._wakes)

    def _signal(self, sock: MemorySocket) -> None:
        self._signalled[sock] = None
        if self._event is not None:
            self._event.set()
