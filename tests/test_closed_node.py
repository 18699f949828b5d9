"""A closed node says so: every call raises NodeClosed at once, nothing hangs (issue 14)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from _crash import CrashingPollers

from actors import (
    Ack,
    BindError,
    DeliveryFailed,
    Node,
    NodeClosed,
    NodeConfig,
    PeersNotUp,
    Status,
    open_node,
)
from actors.testing import Inbox, TestNetwork, open_test_network
from transport import (
    LocalProtocolError,
    NodeId,
    PeerState,
    SenderConfig,
)

#: Every public call of a Node, with a timeout wherever it takes one: a closed
#: node must refuse each at once, long before any timeout.
CALLS: dict[str, Callable[[Node], Awaitable[Any]]] = {
    "send": lambda n: n.send("b", b"x", timeout=1),
    "send_batch": lambda n: n.send_batch("b", [b"x", b"y"], timeout=1),
    "send_many": lambda n: n.send_many({"b": b"x"}, timeout=1),
    "wait_window": lambda n: n.wait_window("b"),
    "query": lambda n: n.query("b", timeout=1),
    "wait_state": lambda n: n.wait_state("b", PeerState.DOWN),
    "wait_all_up": lambda n: n.wait_all_up(timeout=1),
}

SYNC_CALLS: dict[str, Callable[[Node], object]] = {
    "send_nowait": lambda n: n.send_nowait("b", b"x", timeout=1),
    "send_batch_nowait": lambda n: n.send_batch_nowait("b", [b"x"], timeout=1),
    "state": lambda n: n.state("b"),
}


async def _closed_a(net: TestNetwork, inbox: Inbox) -> Node:
    """Node "a", linked to a running "b", once its block has ended."""
    await net.start_node("b", peers={"a": None}, compute=inbox.compute)
    a = await net.start_node("a", peers=["b"])
    await a.wait_all_up()
    await a.send("b", b"before")
    await net.stop_node("a")
    return a


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_every_async_call_raises_at_once(name: str, autojump_clock: trio.abc.Clock) -> None:
    async with open_test_network() as net:
        a = await _closed_a(net, Inbox())
        t0 = trio.current_time()
        # Virtual time: a call that waited would fail here, not hang the run.
        with trio.fail_after(5), pytest.raises(NodeClosed) as caught:
            await CALLS[name](a)
        assert trio.current_time() == t0
        assert caught.value.node == "a"
        assert "'a'" in str(caught.value)


@pytest.mark.parametrize("name", sorted(SYNC_CALLS))
async def test_every_sync_call_raises(name: str, autojump_clock: trio.abc.Clock) -> None:
    async with open_test_network() as net:
        a = await _closed_a(net, Inbox())
        with pytest.raises(NodeClosed, match="node 'a' is closed"):
            SYNC_CALLS[name](a)


async def test_statistics_say_closed(autojump_clock: trio.abc.Clock) -> None:
    async with open_test_network() as net:
        inbox = Inbox()
        await net.start_node("b", peers={"a": None}, compute=inbox.compute)
        a = await net.start_node("a", peers=["b"])
        await a.send("b", b"one")
        assert (a.closed, a.statistics().closed) == (False, False)
        await net.stop_node("a")
        stats = a.statistics()
        assert (a.closed, stats.closed) == (True, True)
        # The counters are kept for a post-mortem.
        assert stats.links[NodeId("b")].protocol.sent == 1


async def test_a_handle_awaited_after_close_gives_its_outcome(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_network() as net:
        inbox = Inbox()
        await net.start_node("b", peers={"a": None}, compute=inbox.compute)
        a = await net.start_node("a", peers=["b"])
        answered = a.send_nowait("b", b"answered")
        first = await answered.wait()
        net.partition(["a"], ["b"])
        unanswered = a.send_nowait("b", b"lost in the partition", timeout=30)
        await trio.sleep(1.0)
        await net.stop_node("a")
        t0 = trio.current_time()
        assert await answered.wait() == first
        assert isinstance(first, Ack)
        with pytest.raises(DeliveryFailed, match="the sending node shut down"):
            await unanswered.wait()
        assert trio.current_time() == t0


async def test_sends_waiting_at_close_fail_promptly(autojump_clock: trio.abc.Clock) -> None:
    # A window of one: the second send waits for room, the first for its answer.
    config = NodeConfig(sender=SenderConfig(max_in_flight=1))
    outcomes: dict[str, tuple[type[BaseException], float]] = {}

    async def call(label: str, fn: Callable[[], Awaitable[Any]]) -> None:
        try:
            await fn()
        except (DeliveryFailed, NodeClosed) as exc:
            outcomes[label] = (type(exc), trio.current_time())

    async with open_test_network() as net:
        await net.start_node("b", peers={"a": None})
        # Cut before a starts: its link to b can never come up, whichever
        # order Trio's scheduler runs the handshake in (it shuffles).
        net.partition(["a"], ["b"])
        a = await net.start_node("a", peers=["b"], config=config)
        # Every wait below lasts 60 s unless the close ends it: fail, not hang.
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "answer", lambda: a.send("b", b"1", timeout=60))
                await trio.sleep(0.5)
                nursery.start_soon(call, "window", lambda: a.send("b", b"2", timeout=60))
                nursery.start_soon(call, "batch", lambda: a.send_batch("b", [b"3"], timeout=60))
                nursery.start_soon(call, "wait_window", lambda: a.wait_window("b"))
                nursery.start_soon(call, "wait_state", lambda: a.wait_state("b", PeerState.UP))
                nursery.start_soon(call, "wait_all_up", a.wait_all_up)
                nursery.start_soon(call, "query", lambda: a.query("b", timeout=60))
                await trio.sleep(2.0)
                assert outcomes == {}
                closed_at = trio.current_time()
                await net.stop_node("a")
    assert outcomes == {
        "answer": (DeliveryFailed, closed_at),
        "window": (DeliveryFailed, closed_at),
        "batch": (DeliveryFailed, closed_at),
        "wait_window": (NodeClosed, closed_at),
        "wait_state": (NodeClosed, closed_at),
        "wait_all_up": (NodeClosed, closed_at),
        "query": (NodeClosed, closed_at),
    }


async def test_send_many_waiting_at_close_reports_each_failure(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_network() as net:
        await net.start_node("b", peers={"a": None})
        await net.start_node("c", peers={"a": None})
        a = await net.start_node("a", peers=["b", "c"])
        net.partition(["a"], ["b", "c"])
        got: dict[Any, Any] = {}

        async def fan_out() -> None:
            got.update(await a.send_many({"b": b"x", "c": b"y"}, timeout=60))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fan_out)
            await trio.sleep(1.0)
            await net.stop_node("a")
    assert sorted(got) == ["b", "c"]
    for outcome in got.values():
        assert isinstance(outcome, DeliveryFailed)
        assert outcome.reason == "the sending node shut down"


async def test_a_busy_port_names_the_endpoint() -> None:
    with trio.fail_after(10):
        async with open_node("first", bind="tcp://127.0.0.1:*") as first:
            endpoint = first.endpoint
            with pytest.raises(BindError) as caught:
                async with open_node("second", bind=endpoint):
                    pytest.fail("a second node bound a port already in use")
            assert caught.value.endpoint == endpoint
            assert endpoint in str(caught.value)
            assert "receiver" not in str(caught.value)
            # The first node is unharmed.
            assert not first.closed


async def test_a_timeout_holds_while_the_io_task_restarts(autojump_clock: trio.abc.Clock) -> None:
    # Crashes in a row grow the supervisor's restart backoff (0.05 s, doubling):
    # for a while no I/O task runs the link's timers.
    async with open_test_network() as net:
        crashes = CrashingPollers(net.network, node="a")
        await net.start_node("b", peers={"a": None})
        a = await net.start_node("a", peers=["b"])
        net.partition(["a"], ["b"])
        crashes.arm(6)
        handle = a.send_nowait("b", b"waits through the crashes", timeout=1)
        await a.supervisor.actor("dispatcher").status.wait_value(Status.RESTARTING)
        t0 = trio.current_time()
        with pytest.raises(DeliveryFailed, match="deadline passed"):
            await a.send("b", b"x", timeout=1)
        assert trio.current_time() == t0 + 1
        with pytest.raises(DeliveryFailed, match="deadline passed"):
            await handle.wait()
        assert a.supervisor.actor("dispatcher").statistics().restarts >= 3


async def test_wait_all_up_names_the_peers_still_missing(autojump_clock: trio.abc.Clock) -> None:
    async with open_test_network() as net:
        await net.start_node("b", peers={"a": None})
        a = await net.start_node("a", peers=["b", "c"])
        t0 = trio.current_time()
        with pytest.raises(PeersNotUp) as caught:
            await a.wait_all_up(timeout=2)
        assert trio.current_time() == t0 + 2
        assert caught.value.missing == {"c": net.network.endpoint("c")}
        assert isinstance(caught.value, trio.TooSlowError)
        assert "c (mem://c)" in str(caught.value)
        with pytest.raises(LocalProtocolError, match="timeout must be > 0"):
            await a.wait_all_up(timeout=0)
        await net.start_node("c", peers={"a": None})
        with trio.fail_after(5):
            await a.wait_all_up(timeout=5)


async def test_the_issues_case_over_real_zeromq() -> None:
    # Issue 14, point 3: after the block, send(timeout=1) was pending after 4 s.
    # (The exact "at once" is checked in virtual time above.)
    with trio.fail_after(10):
        async with open_node("b", bind="tcp://127.0.0.1:*", peers={"a": None}) as b:
            async with open_node("a", bind="tcp://127.0.0.1:*", peers={"b": b.endpoint}) as a:
                await a.wait_all_up(timeout=5)
            with pytest.raises(NodeClosed, match="node 'a' is closed"):
                await a.send("b", b"x", timeout=1)
            with pytest.raises(NodeClosed):
                a.send_nowait("b", b"x")
            with pytest.raises(NodeClosed):
                a.state("b")
            assert a.statistics().closed
