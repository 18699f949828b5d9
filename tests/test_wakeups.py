"""What the node's one I/O task per node costs, counted in what users can see.

Each node runs its protocol actors on one I/O task (actors/_dispatch.py),
which sleeps until a socket, a wake or a timer needs it. These tests count
Trio task steps (a Trio instrument; no task is named) and the messages on a
:class:`MemoryNetwork`, under virtual time: a burst goes out in a few
messages, an idle node does not run, and a lone send costs a small, steady
number of task steps from the send to its Ack.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing

from actors import (
    Actor,
    Delivery,
    Node,
    NodeConfig,
    open_node,
)
from transport import (
    SenderConfig,
)
from transport.testing import (
    MemoryNetwork,
)


class _Steps(trio.abc.Instrument):
    """Counts task steps, whichever task takes them."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


class _Echo(Actor[Any, Any]):
    async def receive(self, msg: Any) -> Any:
        return bytes(msg.payload) if isinstance(msg, Delivery) else None


@asynccontextmanager
async def _pair(net: MemoryNetwork, config: NodeConfig | None = None) -> AsyncIterator[Node]:
    """Node a sending to node b on ``net``; yields a once its link is up."""
    async with (
        open_node(
            "b", bind="mem://b", peers={"a": None}, compute=_Echo, network=net, config=config
        ) as b,
        open_node("a", bind="mem://a", peers={"b": b.endpoint}, network=net, config=config) as a,
    ):
        await a.send("b", b"warm-up")
        yield a


async def _counted(steps: _Steps, body: Any) -> int:
    """Task steps ``body()`` and everything it woke took, until all is quiet again."""
    await trio.testing.wait_all_tasks_blocked()
    before = steps.steps
    await body()
    await trio.testing.wait_all_tasks_blocked()
    return steps.steps - before


async def test_a_burst_of_sends_goes_out_in_a_few_messages(autojump_clock: trio.abc.Clock) -> None:
    net = MemoryNetwork()
    async with _pair(net) as a:
        await trio.testing.wait_all_tasks_blocked()
        sent_before = net.statistics().sent
        handles = [a.send_nowait("b", b"%d" % i) for i in range(200)]
        acks = [await handle.wait() for handle in handles]
        sent = net.statistics().sent - sent_before
    assert [ack.result for ack in acks] == [b"%d" % i for i in range(200)]
    # One BATCH of DATA per wake-up of a's I/O task, one of answers per
    # wake-up of b's: 200 sends and their 200 ACKs take a handful of
    # messages, not 400.
    assert sent <= 10, sent


async def test_an_idle_node_makes_no_task_steps(autojump_clock: trio.abc.Clock) -> None:
    steps = _Steps()
    net = MemoryNetwork()
    # Heartbeats far apart: on a quiet link they are the only timer.
    sender = SenderConfig(heartbeat_interval=10.0, suspect_after=30.0, down_after=100.0)
    async with _pair(net, NodeConfig(sender=sender)):
        # The warm-up's retransmission timer, disarmed by its ACK, may still
        # wake each I/O task once: a sleep's deadline only moves earlier
        # (actors/_dispatch.py). After that, nothing before the heartbeat.
        await trio.sleep(2.0)
        trio.lowlevel.add_instrument(steps)
        try:

            async def quiet() -> None:
                await trio.sleep(5.0)

            took = await _counted(steps, quiet)
        finally:
            trio.lowlevel.remove_instrument(steps)
    # Only the test's own sleep: no I/O task runs while nothing happens.
    assert took <= 2, took


async def test_a_lone_send_costs_a_few_task_steps(autojump_clock: trio.abc.Clock) -> None:
    steps = _Steps()
    net = MemoryNetwork()
    async with _pair(net) as a:
        trio.lowlevel.add_instrument(steps)
        try:

            async def lone() -> None:
                await a.send("b", b"lone")

            took = [await _counted(steps, lone) for _ in range(5)]
        finally:
            trio.lowlevel.remove_instrument(steps)
    # The caller, a's I/O task (flush), b's I/O task (drain), b's compute
    # actor, b's I/O task (flush), a's I/O task (drain), the caller: about
    # one step each, and no more for later sends. An I/O task that yields to
    # the task it just woke may get one step more or less, as Trio shuffles
    # the order of the tasks it runs together.
    assert max(took) - min(took) <= 1, took
    assert took[0] <= 10, took
