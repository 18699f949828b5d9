"""A fault-injecting proxy between real processes on real ZeroMQ sockets.

``NodeConfig(faults=...)`` and the memory network put faults inside one Trio
program. This proxy puts them on the wire between programs: a client (node
"a") is given the proxy's endpoint instead of the target's (node "b"), and
every message either way passes through a seeded :class:`FaultInjector`
that drops, duplicates and delays it, or is lost while the proxy is cut.

How it is built: a ROUTER bound at ``listen`` (the *front*) and, for each
routing id seen on the front, one DEALER connected to the target with the
same routing id, because a cellmesh ROUTER takes the sender's node id from
the routing id (design.md §5) and must see the client, not the proxy. One
Trio task owns each socket (design.md §5: one waiter per ``ZMQ_FD``); a
message crossing from one socket to another is handed over in a bounded
queue and the owner of the sending socket is woken. The fault injector of a
direction belongs to the task that sends in that direction, so its timers
(delayed messages) are that task's deadlines and nothing else touches it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import trio
import zmq

from ._errors import LocalProtocolError
from ._faults import FaultInjector, FaultPlan, FaultStatistics
from ._socket import Socket, Unroutable, dealer_socket, router_socket

__all__ = ["FaultProxy", "ProxyStatistics", "open_fault_proxy"]

#: Messages taken from one socket per wake before its owner looks at its other
#: work, so a flood one way cannot starve the other.
_RECV_BUDGET: Final = 256

_NO_FAULTS: Final = FaultStatistics(passed=0, dropped=0, duplicated=0, delayed=0, held=0)


@dataclass(frozen=True, slots=True)
class ProxyStatistics:
    """What a :class:`FaultProxy` did so far, as returned by ``statistics()``.

    Attributes:
        clients: routing ids seen on the front, each with its own DEALER.
        from_clients: messages taken from clients (front ROUTER).
        from_target: messages taken from the target (all DEALERs).
        to_target: messages handed to the target, duplicates included.
        to_clients: messages handed back to clients, duplicates included.
        upstream: the fault plan's work on client -> target messages, summed
            over clients and over plan changes (``held``: delayed right now).
        downstream: the same for target -> client messages.
        cut: messages lost because the proxy was cut, when they arrived or
            when their delay ended.
        lost: messages lost for want of room: a new client past
            ``max_clients``, a full hand-over queue or delay buffer, a full
            socket queue, or a client that disconnected before its answer.
    """

    clients: int
    from_clients: int
    from_target: int
    to_target: int
    to_clients: int
    upstream: FaultStatistics
    downstream: FaultStatistics
    cut: int
    lost: int


class _Leg:
    """One direction of one client's traffic: its injector, swapped on plan changes."""

    __slots__ = ("_retired", "_salt", "injector", "version")

    def __init__(self, plan: FaultPlan, version: int, salt: str) -> None:
        self._salt = salt
        self._retired = _NO_FAULTS
        self.version = version
        self.injector: FaultInjector[list[bytes]] = FaultInjector(plan, salt=f"{salt}:{version}")

    def replan(self, plan: FaultPlan, version: int) -> list[list[bytes]]:
        """Switch to ``plan``; returns the old plan's delayed messages, due now."""
        released = self.injector.due(math.inf)
        self._retired = _add(self._retired, self.injector.statistics())
        self.version = version
        self.injector = FaultInjector(plan, salt=f"{self._salt}:{version}")
        return released

    def statistics(self) -> FaultStatistics:
        return _add(self._retired, self.injector.statistics())


def _add(a: FaultStatistics, b: FaultStatistics) -> FaultStatistics:
    return FaultStatistics(
        passed=a.passed + b.passed,
        dropped=a.dropped + b.dropped,
        duplicated=a.duplicated + b.duplicated,
        delayed=a.delayed + b.delayed,
        held=a.held + b.held,
    )


class _Client:
    """A routing id seen on the front, and the DEALER that speaks for it."""

    __slots__ = ("down", "inbox", "routing_id", "socket", "up")

    def __init__(self, routing_id: bytes, socket: Socket, plan: FaultPlan, version: int) -> None:
        self.routing_id = routing_id
        self.socket = socket
        # Messages from the client, waiting for the DEALER's owner task.
        self.inbox: deque[list[bytes]] = deque()
        name = routing_id.hex()
        self.up = _Leg(plan, version, f"{name}>")
        self.down = _Leg(plan, version, f"{name}<")


class FaultProxy:
    """A faulty wire between clients and one target; see :func:`open_fault_proxy`.

    Controls are sync and take effect at once, from any task: :meth:`set_plan`,
    :meth:`cut`, :meth:`heal`.
    """

    def __init__(
        self,
        target: str,
        plan: FaultPlan,
        *,
        context: zmq.Context[zmq.Socket[bytes]],
        max_clients: int,
        max_held: int,
    ) -> None:
        self._target = target
        self._plan = plan
        self._version = 0
        self._ctx = context
        self._max_clients = max_clients
        self._max_held = max_held
        self._endpoint = ""
        self._cut = False
        self._front: Socket | None = None
        self._clients: dict[bytes, _Client] = {}
        # Answers from the target, waiting for the front's owner task.
        self._replies: deque[tuple[_Client, list[bytes]]] = deque()
        self._from_clients = self._from_target = 0
        self._to_target = self._to_clients = 0
        self._cut_count = self._lost = 0

    @property
    def endpoint(self) -> str:
        """Where clients connect instead of the target (the bound endpoint)."""
        return self._endpoint

    @property
    def target(self) -> str:
        """The endpoint every client's messages are forwarded to."""
        return self._target

    @property
    def plan(self) -> FaultPlan:
        """The fault plan applied now to both directions."""
        return self._plan

    @property
    def is_cut(self) -> bool:
        """Whether :meth:`cut` is in force."""
        return self._cut

    def set_plan(self, plan: FaultPlan) -> None:
        """Apply ``plan`` to both directions of every client from now on.

        Messages the old plan was delaying are released at once (each
        direction restarts its seeded pattern, salted with the change count).

        Args:
            plan: The new faults; ``FaultPlan()`` passes everything unchanged.
        """
        self._plan = plan
        self._version += 1
        self._wake_all()

    def cut(self) -> None:
        """Lose every message either way until :meth:`heal`.

        Messages that arrive during the cut, and delayed messages that fall
        due during it, are dropped and counted in ``statistics().cut``. The
        TCP connections stay up, as when a switch drops packets: the peers
        only notice the silence.
        """
        self._cut = True

    def heal(self) -> None:
        """End a :meth:`cut`; messages pass (through the plan) again."""
        self._cut = False

    def statistics(self) -> ProxyStatistics:
        """Return a snapshot of the proxy's counters."""
        upstream = downstream = _NO_FAULTS
        for client in self._clients.values():
            upstream = _add(upstream, client.up.statistics())
            downstream = _add(downstream, client.down.statistics())
        return ProxyStatistics(
            clients=len(self._clients),
            from_clients=self._from_clients,
            from_target=self._from_target,
            to_target=self._to_target,
            to_clients=self._to_clients,
            upstream=upstream,
            downstream=downstream,
            cut=self._cut_count,
            lost=self._lost,
        )

    # -- owner tasks ------------------------------------------------------

    def _wake_all(self) -> None:
        if self._front is not None and not self._front.closed:
            self._front.wake()
        for client in self._clients.values():
            if not client.socket.closed:
                client.socket.wake()

    def _admit(self, injector: FaultInjector[list[bytes]], parts: list[bytes]) -> list[list[bytes]]:
        """Run one arriving message through the cut and the plan."""
        if self._cut:
            self._cut_count += 1
            return []
        if injector.active and injector.statistics().held >= self._max_held:
            self._lost += 1
            return []
        return injector.submit(parts, trio.current_time())

    async def _serve_front(self, front: Socket, nursery: trio.Nursery) -> None:
        """Own the front ROUTER: clients' messages in, the target's answers out."""
        replies = self._replies
        clients = self._clients
        while True:
            now = trio.current_time()
            for _ in range(_RECV_BUDGET):
                try:
                    routing_id, *parts = front.recv_multipart_nowait()
                except trio.WouldBlock:
                    break
                self._from_clients += 1
                client = clients.get(routing_id)
                if client is None:
                    client = self._open_client(routing_id, nursery)
                    if client is None:
                        self._lost += 1
                        continue
                if len(client.inbox) >= self._max_held:
                    self._lost += 1
                    continue
                client.inbox.append(parts)
                client.socket.wake()
            while replies:
                client, parts = replies.popleft()
                leg = client.down
                if leg.version != self._version:
                    self._send_front(front, client, leg.replan(self._plan, self._version))
                self._send_front(front, client, self._admit(leg.injector, parts))
            deadline = math.inf
            for client in clients.values():
                leg = client.down
                if leg.version != self._version:
                    self._send_front(front, client, leg.replan(self._plan, self._version))
                self._send_front(front, client, leg.injector.due(now))
                due = leg.injector.next_deadline()
                if due is not None:
                    deadline = min(deadline, due)
            with trio.move_on_at(deadline):
                await front.wait_ready()

    def _send_front(self, front: Socket, client: _Client, messages: list[list[bytes]]) -> None:
        for parts in messages:
            if self._cut:
                self._cut_count += 1
                continue
            try:
                front.send_multipart_nowait([client.routing_id, *parts])
            except (trio.WouldBlock, Unroutable):
                # A client that stopped reading (10k queued) or went away: a
                # wire would lose these too, and the protocol resends.
                self._lost += 1
            else:
                self._to_clients += 1

    def _open_client(self, routing_id: bytes, nursery: trio.Nursery) -> _Client | None:
        """A DEALER for a new routing id, or None past ``max_clients``."""
        if len(self._clients) >= self._max_clients:
            return None
        # Ids starting with a zero byte are the ones libzmq makes up for
        # anonymous peers and may not be set; the target sees a fresh one.
        chosen = None if routing_id.startswith(b"\x00") else routing_id
        # IMMEDIATE=0: like a wire, the proxy accepts messages before its
        # connection to the target is up (libzmq queues them, up to SNDHWM),
        # so a client's first messages are not lost to the proxy's own start.
        sock = dealer_socket(self._ctx, routing_id=chosen, immediate=0)
        try:
            sock.connect(self._target)
        except BaseException:
            sock.close()
            raise
        client = _Client(routing_id, sock, self._plan, self._version)
        self._clients[routing_id] = client
        nursery.start_soon(self._serve_client, client)
        return client

    async def _serve_client(self, client: _Client) -> None:
        """Own one client's DEALER: its messages out, the target's answers in."""
        sock = client.socket
        inbox = client.inbox
        replies = self._replies
        try:
            while True:
                now = trio.current_time()
                leg = client.up
                if leg.version != self._version:
                    self._send_back(sock, leg.replan(self._plan, self._version))
                while inbox:
                    self._send_back(sock, self._admit(leg.injector, inbox.popleft()))
                self._send_back(sock, leg.injector.due(now))
                woke_front = False
                for _ in range(_RECV_BUDGET):
                    try:
                        parts = sock.recv_multipart_nowait()
                    except trio.WouldBlock:
                        break
                    self._from_target += 1
                    if len(replies) >= self._max_held:
                        self._lost += 1
                        continue
                    replies.append((client, parts))
                    woke_front = True
                if woke_front and self._front is not None:
                    self._front.wake()
                due = leg.injector.next_deadline()
                with trio.move_on_at(math.inf if due is None else due):
                    await sock.wait_ready()
        finally:
            sock.close()

    def _send_back(self, sock: Socket, messages: list[list[bytes]]) -> None:
        for parts in messages:
            if self._cut:
                self._cut_count += 1
                continue
            try:
                sock.send_multipart_nowait(parts)
            except trio.WouldBlock:
                # SNDHWM messages queued for a target that is not reading.
                self._lost += 1
            else:
                self._to_target += 1


@asynccontextmanager
async def open_fault_proxy(
    target: str,
    *,
    listen: str = "tcp://127.0.0.1:*",
    plan: FaultPlan | None = None,
    max_clients: int = 64,
    max_held: int = 10_000,
    context: zmq.Context[zmq.Socket[bytes]] | None = None,
) -> AsyncIterator[FaultProxy]:
    """Run a fault-injecting proxy in front of ``target`` for the block's lifetime.

    Give clients ``proxy.endpoint`` where they would have used ``target``
    (e.g. ``open_node("a", peers={"b": proxy.endpoint})``). Each client's
    routing id is kept, so the target sees the client's own node id. Use it
    in a test, or in a small helper process between real nodes.

    Args:
        target: The endpoint of the ROUTER to forward to (a node's endpoint).
        listen: Where to bind the front ROUTER; ``tcp://127.0.0.1:*`` picks a
            free port, ``ipc://`` paths work too.
        plan: Faults applied to each direction of each client, with its own
            seeded pattern per client and direction; None means no faults.
        max_clients: Routing ids served at most; messages from further ones
            are dropped and counted as ``lost``.
        max_held: Bound on each hand-over queue and on each direction's
            delayed messages; beyond it messages are counted as ``lost``.
        context: A synchronous zmq context for the sockets; by default a new
            one, destroyed on exit.

    Yields:
        The running :class:`FaultProxy`.

    Raises:
        LocalProtocolError: ``max_clients`` or ``max_held`` is below 1.
        zmq.ZMQError: ``listen`` or ``target`` is refused by libzmq.
    """
    if max_clients < 1 or max_held < 1:
        raise LocalProtocolError(
            f"max_clients and max_held must be >= 1, got {max_clients} and {max_held}"
        )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context() if context is None else context
    proxy = FaultProxy(
        target,
        FaultPlan() if plan is None else plan,
        context=ctx,
        max_clients=max_clients,
        max_held=max_held,
    )
    pending: BaseException | None = None
    try:
        front = router_socket(ctx)
        try:
            proxy._endpoint = front.bind(listen)
            proxy._front = front
            async with trio.open_nursery() as nursery:
                nursery.start_soon(proxy._serve_front, front, nursery)
                try:
                    yield proxy
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # An error raised by the block itself comes out as it is, not
            # wrapped in our nursery's ExceptionGroup.
            pending = _single_error(group)
            if pending is None:
                raise
        finally:
            front.close()
            for client in proxy._clients.values():
                client.socket.close()
    finally:
        if context is None:
            ctx.destroy(linger=0)
    # Raised outside the except block so it does not gain the group as context.
    if pending is not None:
        raise pending


def _single_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one non-cancellation leaf of ``group``, or None if there is not exactly one."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else None
