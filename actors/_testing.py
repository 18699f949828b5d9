"""Test helpers: nodes on an in-memory network, under virtual time, with faults.

``open_test_network`` gives a :class:`TestNetwork`: a
:class:`~transport.MemoryNetwork` plus the nodes started on it. Each
node runs in its own task and can be stopped and started again (a process
restart, with a greater incarnation). :class:`Inbox` is a ready-made compute
layer that records what a node received and lets the test wait for it.

Used with pytest-trio's ``autojump_clock`` fixture, every retry timer,
heartbeat and delay jumps ahead: a ten-second partition costs milliseconds.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from transport import (
    LocalProtocolError,
    Payload,
)
from transport.testing import (
    FaultPlan,
    MemoryNetwork,
    NetworkStatistics,
)

from ._actor import Actor
from ._node import ComputeFactory, Node, NodeConfig, open_node
from ._outcomes import Delivery, Gap

__all__ = ["Inbox", "TestNetwork", "open_test_network"]


class Inbox:
    """Records the :class:`Delivery` and :class:`Gap` messages a node receives.

    Pass ``compute=inbox.compute`` to a node. Each delivery is answered ACK
    with whatever ``answer`` returns (None by default); ``answer`` may raise
    :class:`Reject` to answer ERR.

    Args:
        answer: called with each delivery, in order; its return value is the
            ACK's result.
    """

    def __init__(self, answer: Callable[[Delivery], Any] | None = None) -> None:
        self.deliveries: list[Delivery] = []
        self.gaps: list[Gap] = []
        self._answer = answer
        self._lot = trio.lowlevel.ParkingLot()

    def compute(self) -> Actor[Any, Any]:
        """A new compute actor feeding this inbox (a node's ``compute`` factory)."""
        return _InboxActor(self)

    def payloads(self, peer: str | None = None, stream: str | None = None) -> list[Payload]:
        """The payloads delivered so far, in delivery order, optionally filtered."""
        return [
            d.payload
            for d in self.deliveries
            if (peer is None or d.peer == peer) and (stream is None or d.stream == stream)
        ]

    async def wait_deliveries(self, count: int) -> None:
        """Wait until at least ``count`` messages have been delivered."""
        while len(self.deliveries) < count:
            await self._lot.park()

    def _record(self, msg: Delivery | Gap) -> Any:
        if isinstance(msg, Gap):
            self.gaps.append(msg)
            result = None
        else:
            result = None if self._answer is None else self._answer(msg)
            self.deliveries.append(msg)
        self._lot.unpark_all()
        return result


class _InboxActor(Actor[Any, Any]):
    """The compute actor behind an :class:`Inbox`."""

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox

    async def receive(self, msg: Any) -> Any:
        return self._inbox._record(msg)


@dataclass(slots=True)
class _Running:
    node: Node
    scope: trio.CancelScope
    stopped: trio.Event


class TestNetwork:
    """A :class:`MemoryNetwork` and the nodes running on it.

    Made by :func:`open_test_network`; valid inside its block. Node ``x``
    listens on ``mem://x``, so peers are named, not addressed.
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, network: MemoryNetwork, nursery: trio.Nursery) -> None:
        self.network = network
        self._nursery = nursery
        self._nodes: dict[str, _Running] = {}
        # Deterministic incarnations that still grow on every (re)start.
        self._incarnations = itertools.count(1)

    def __getitem__(self, node_id: str) -> Node:
        """The running node ``node_id``."""
        running = self._nodes.get(node_id)
        if running is None:
            raise LocalProtocolError(f"no node {node_id!r} is running; running: {self.nodes}")
        return running.node

    @property
    def nodes(self) -> tuple[str, ...]:
        """The ids of the nodes running now."""
        return tuple(self._nodes)

    async def start_node(
        self,
        node_id: str,
        *,
        peers: Iterable[str] | Mapping[str, str | None] = (),
        compute: ComputeFactory | None = None,
        config: NodeConfig | None = None,
        incarnation: int | None = None,
    ) -> Node:
        """Start a node on this network; it runs until :meth:`stop_node` or the end.

        Args:
            node_id: the node's id; it binds ``mem://<node_id>``.
            peers: the nodes it sends to (and accepts from), by name; or, as
                for :func:`open_node`, a mapping with None for peers that only
                send to it.
            compute: the compute actor factory (e.g. ``inbox.compute``).
            config: node tuning.
            incarnation: default: the next of 1, 2, 3, ... on this network,
                so a restarted node always shows a greater one.

        Returns:
            The running :class:`Node`.

        Raises:
            LocalProtocolError: a node with that id is already running.
        """
        if node_id in self._nodes:
            raise LocalProtocolError(f"node {node_id!r} is already running; stop it first")
        if isinstance(peers, Mapping):
            peer_map = dict(peers)
        else:
            peer_map = {p: self.network.endpoint(p) for p in peers}
        inc = incarnation if incarnation is not None else next(self._incarnations)

        async def run(task_status: trio.TaskStatus[Node]) -> None:
            stopped = trio.Event()
            try:
                with trio.CancelScope() as scope:
                    async with open_node(
                        node_id,
                        bind=self.network.endpoint(node_id),
                        peers=peer_map,
                        compute=compute,
                        config=config,
                        incarnation=inc,
                        network=self.network,
                    ) as node:
                        self._nodes[node_id] = _Running(node, scope, stopped)
                        task_status.started(node)
                        await trio.sleep_forever()
            finally:
                self._nodes.pop(node_id, None)
                stopped.set()

        node: Node = await self._nursery.start(run)
        return node

    async def stop_node(self, node_id: str) -> None:
        """Stop a node as a process exit would: its unanswered sends fail,
        its queued messages are lost. Returns once it is fully closed."""
        running = self._nodes.get(node_id)
        if running is None:
            raise LocalProtocolError(f"no node {node_id!r} is running")
        running.scope.cancel()
        await running.stopped.wait()

    def set_faults(
        self, plan: FaultPlan, *, src: str | None = None, dst: str | None = None
    ) -> None:
        """Seeded drop/duplicate/delay from ``src`` to ``dst``; see
        :meth:`MemoryNetwork.set_faults`."""
        self.network.set_faults(plan, src=src, dst=dst)

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every link between the groups; see :meth:`MemoryNetwork.partition`."""
        self.network.partition(*groups)

    def heal(self) -> None:
        """Restore every cut link."""
        self.network.heal()

    def statistics(self) -> NetworkStatistics:
        """The network's counters."""
        return self.network.statistics()


@asynccontextmanager
async def open_test_network(
    *, seed: int = 0, latency: float = 0.0, hwm: int = 1000
) -> AsyncIterator[TestNetwork]:
    """Open an in-memory network for nodes of one Trio program.

    Leaving the block stops every node still running.

    Args:
        seed: seeds every fault decision (see :class:`MemoryNetwork`).
        latency: one-way seconds on every link.
        hwm: per-socket queue bound, in messages.

    Yields:
        The :class:`TestNetwork`.
    """
    network = MemoryNetwork(seed=seed, latency=latency, hwm=hwm)
    async with trio.open_nursery() as nursery:
        test_network = TestNetwork(network, nursery)
        try:
            yield test_network
        finally:
            nursery.cancel_scope.cancel()
