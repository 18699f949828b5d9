"""The in-memory network: its sockets behave like the ZeroMQ ones, its faults
are seeded, and whole nodes run on it in virtual time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import (
    DeliveryFailed,
    Node,
    NodeConfig,
    PeerError,
    Reject,
    SendHandle,
    open_node,
)
from actors.statistics import (
    LinkStatistics,
)
from actors.testing import (
    Inbox,
    open_test_network,
)
from transport import (
    LocalProtocolError,
    NodeId,
    PeerState,
    SenderConfig,
    Unroutable,
)
from transport.testing import (
    FaultPlan,
    MemoryNetwork,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "test_my_node.py"


def _link(node: Node, peer: str) -> LinkStatistics:
    return node.statistics().links[NodeId(peer)]


# -- sockets ------------------------------------------------------------------


async def test_router_prepends_the_routing_id_and_consumes_it_to_reply() -> None:
    net = MemoryNetwork()
    router = net.router()
    assert router.bind("mem://b") == "mem://b"
    dealer = net.dealer(b"a")
    dealer.connect("mem://b")
    dealer.send_multipart_nowait([b"hi", memoryview(b"there")])
    assert router.recv_multipart_nowait() == [b"a", b"hi", b"there"]
    router.send_multipart_nowait([b"a", b"back"])
    assert dealer.recv_multipart_nowait() == [b"back"]
    with pytest.raises(trio.WouldBlock):
        dealer.recv_multipart_nowait()
    with pytest.raises(Unroutable) as info:
        router.send_multipart_nowait([b"nobody", b"x"])
    assert info.value.routing_id == b"nobody"
    dealer.close()
    with pytest.raises(Unroutable):
        router.send_multipart_nowait([b"a", b"after close"])


async def test_dealer_waits_for_the_router_to_bind(autojump_clock: trio.abc.Clock) -> None:
    net = MemoryNetwork()
    dealer = net.dealer(b"a")
    dealer.connect("mem://b")
    with pytest.raises(trio.WouldBlock):
        dealer.send_multipart_nowait([b"early"])
    router = net.router()

    async def bind_later() -> None:
        await trio.sleep(1.5)
        router.bind("mem://b")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bind_later)
        await dealer.wait_ready(readable=False, writable=True)
        assert trio.current_time() == 1.5
    dealer.send_multipart_nowait([b"now"])
    assert router.recv_multipart_nowait() == [b"a", b"now"]


async def test_queues_are_bounded_and_draining_reopens_them(
    autojump_clock: trio.abc.Clock,
) -> None:
    net = MemoryNetwork(hwm=3)
    router = net.router()
    router.bind("mem://b")
    dealer = net.dealer(b"a")
    dealer.connect("mem://b")
    for i in range(3):
        dealer.send_multipart_nowait([bytes([i])])
    with pytest.raises(trio.WouldBlock):
        dealer.send_multipart_nowait([b"full"])

    async def drain_later() -> None:
        await trio.sleep(2)
        assert router.recv_multipart_nowait() == [b"a", b"\x00"]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain_later)
        await dealer.wait_ready(readable=False, writable=True)
        assert trio.current_time() == 2
    dealer.send_multipart_nowait([b"fits"])
    assert [router.recv_multipart_nowait()[1] for _ in range(3)] == [b"\x01", b"\x02", b"fits"]


async def test_latency_makes_a_message_due_exactly_later(autojump_clock: trio.abc.Clock) -> None:
    net = MemoryNetwork(latency=0.25)
    router = net.router()
    router.bind("mem://b")
    dealer = net.dealer(b"a")
    dealer.connect("mem://b")
    dealer.send_multipart_nowait([b"x"])
    with pytest.raises(trio.WouldBlock):
        router.recv_multipart_nowait()
    await router.wait_ready()
    assert trio.current_time() == 0.25
    assert router.recv_multipart_nowait() == [b"a", b"x"]


async def test_wake_close_and_one_waiter(autojump_clock: trio.abc.Clock) -> None:
    net = MemoryNetwork()
    router = net.router()
    router.bind("mem://b")
    # A wake before the wait is remembered, and consumed by one return.
    router.wake()
    await router.wait_ready()
    assert trio.current_time() == 0
    assert router.statistics().wakes == 1

    async def wake_at(when: float) -> None:
        await trio.sleep_until(when)
        router.wake()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wake_at, 3.0)
        await router.wait_ready()
        assert trio.current_time() == 3.0

    async def second_waiter() -> None:
        with pytest.raises(trio.BusyResourceError):
            await router.wait_ready()
        await trio.sleep(1)
        router.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second_waiter)
        with pytest.raises(trio.ClosedResourceError):
            await router.wait_ready()
        assert trio.current_time() == 4.0
    with pytest.raises(trio.ClosedResourceError):
        router.recv_multipart_nowait()


async def test_handover_routes_to_the_newest_dealer_with_an_id() -> None:
    net = MemoryNetwork()
    router = net.router()
    router.bind("mem://b")
    old, new = net.dealer(b"a"), net.dealer(b"a")
    old.connect("mem://b")
    new.connect("mem://b")
    router.send_multipart_nowait([b"a", b"1"])
    assert new.recv_multipart_nowait() == [b"1"]
    new.close()
    router.send_multipart_nowait([b"a", b"2"])
    assert old.recv_multipart_nowait() == [b"2"]


async def test_bad_use_is_refused() -> None:
    net = MemoryNetwork()
    router = net.router()
    router.bind("mem://b")
    with pytest.raises(LocalProtocolError, match="already bound"):
        net.router().bind("mem://b")
    with pytest.raises(LocalProtocolError, match="mem://<node>"):
        net.router().bind("tcp://127.0.0.1:5000")
    with pytest.raises(LocalProtocolError, match="two groups"):
        net.partition({"a", "b"}, {"b"})
    with pytest.raises(ValueError, match="at least one part"):
        router.send_multipart_nowait([])


def _run_faulty_wire(seed: int) -> tuple[list[bytes], tuple[int, ...]]:
    """60 messages a->b through drop/dup/delay; what b received and the counters."""

    async def main() -> tuple[list[bytes], tuple[int, ...]]:
        net = MemoryNetwork(seed=seed)
        net.set_faults(FaultPlan(drop=0.2, duplicate=0.2, delay=0.5))
        router = net.router()
        router.bind("mem://b")
        dealer = net.dealer(b"a")
        dealer.connect("mem://b")
        for i in range(60):
            dealer.send_multipart_nowait([bytes([i])])
        got: list[bytes] = []
        with trio.move_on_after(1.0):
            while True:
                await router.wait_ready()
                got.append(router.recv_multipart_nowait()[1])
        s = net.statistics()
        return got, (s.sent, s.received, s.dropped, s.duplicated, s.delayed, s.queued)

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_faults_are_seeded_and_delay_reorders() -> None:
    got, (sent, received, dropped, duplicated, delayed, queued) = _run_faulty_wire(7)
    assert (got, sent, received) == (_run_faulty_wire(7)[0], 60, len(got))
    assert got != _run_faulty_wire(8)[0]
    assert received == sent - dropped + duplicated
    assert delayed == received
    assert queued == 0
    assert dropped > 0
    assert duplicated > 0
    assert got != sorted(got), "a uniform delay of up to 0.5 s must reorder 60 messages"


async def test_a_partition_loses_messages_already_on_the_wire(
    autojump_clock: trio.abc.Clock,
) -> None:
    net = MemoryNetwork(latency=1.0)
    router = net.router()
    router.bind("mem://b")
    dealer = net.dealer(b"a")
    dealer.connect("mem://b")
    dealer.send_multipart_nowait([b"in flight"])
    await trio.sleep(0.5)
    net.partition({"a"}, {"b"})
    dealer.send_multipart_nowait([b"into the cut"])
    await trio.sleep(1.0)
    with pytest.raises(trio.WouldBlock):
        router.recv_multipart_nowait()
    assert net.statistics().cut == 2
    net.heal()
    dealer.send_multipart_nowait([b"healed"])
    await router.wait_ready()
    assert trio.current_time() == 2.5
    assert router.recv_multipart_nowait() == [b"a", b"healed"]
    # One direction only: b can still answer a.
    net.cut("a", "b")
    router.send_multipart_nowait([b"a", b"reply"])
    await dealer.wait_ready()
    assert dealer.recv_multipart_nowait() == [b"reply"]
    assert net.is_cut("a", "b")
    assert not net.is_cut("b", "a")


# -- nodes --------------------------------------------------------------------


async def test_two_nodes_send_is_acked_in_one_round_trip(autojump_clock: trio.abc.Clock) -> None:
    inbox = Inbox(answer=lambda d: len(d.payload))
    async with open_test_network(latency=0.005) as tn:
        await tn.start_node("b", peers={"a": None}, compute=inbox.compute)
        a = await tn.start_node("a", peers=["b"])
        start = trio.current_time()
        ack = await a.send("b", b"hello", stream="halo", frame_no=3)
        assert trio.current_time() - start == pytest.approx(0.010, abs=1e-9)
        assert (ack.result, ack.attempts, ack.stream_seq) == (5, 1, 1)
        assert [(d.peer, d.stream, d.frame_no, d.payload) for d in inbox.deliveries] == [
            ("a", "halo", 3, b"hello")
        ]
        assert _link(a, "b").protocol.resent == 0
        assert a.state("b") is PeerState.UP
        a.send_nowait("b", b"more")
        await inbox.wait_deliveries(2)
        assert inbox.payloads() == [b"hello", b"more"]


async def test_open_node_takes_the_network_directly(autojump_clock: trio.abc.Clock) -> None:
    net = MemoryNetwork()

    def answer(d: object) -> None:
        raise Reject(450, "nope")

    inbox = Inbox(answer=answer)
    async with (
        open_node("b", bind="mem://b", peers={"a": None}, compute=inbox.compute, network=net),
        open_node("a", bind="mem://a", peers={"b": "mem://b"}, network=net) as a,
    ):
        with pytest.raises(PeerError) as info:
            await a.send("b", b"x")
        assert info.value.code == 450
    assert net.statistics().queued == 0


async def _mesh(seed: int, count: int) -> None:
    """Three nodes all sending to each other through drop/dup/delay."""
    names = ("a", "b", "c")
    inboxes = {n: Inbox() for n in names}
    async with open_test_network(seed=seed, latency=0.001) as tn:
        tn.set_faults(FaultPlan(drop=0.2, duplicate=0.2, delay=0.05))
        nodes = {
            n: await tn.start_node(
                n, peers=[p for p in names if p != n], compute=inboxes[n].compute
            )
            for n in names
        }

        async def sender(src: str, dst: str) -> None:
            node = nodes[src]
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    await node.wait_window(dst)
                    handle = node.send_nowait(dst, i.to_bytes(2, "big"), stream="s")
                    nursery.start_soon(handle.wait)
                    # Spread the sends so that each is its own wire message.
                    await trio.sleep(0.01)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for src in names:
                for dst in names:
                    if src != dst:
                        nursery.start_soon(sender, src, dst)
        # Every send got its ACK (a failure would have raised out of the nursery).
        assert trio.current_time() - start < 30.0
        for dst in names:
            for src in names:
                if src != dst:
                    got = [int.from_bytes(p, "big") for p in inboxes[dst].payloads(peer=src)]
                    assert got == list(range(count)), (src, dst)
            assert inboxes[dst].gaps == []
        stats = tn.statistics()
        assert stats.dropped > 0
        assert stats.duplicated > 0
        assert (
            sum(
                nodes[n].statistics().links[p].protocol.resent
                for n in names
                for p in nodes[n].peers
            )
            > 0
        )


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_three_nodes_deliver_exactly_once_in_order_through_faults(seed: int) -> None:
    trio.run(_mesh, seed, 25, clock=trio.testing.MockClock(autojump_threshold=0))


# The 10 s partition below outlasts the default lost_grace (DOWN at 5 s, LOST
# at 10 s, tests/test_lost_peer.py); here the sends must wait it out.
FAST = NodeConfig(
    sender=SenderConfig(retry_timeout=0.2, retry_ceiling=2.0, down_after=5.0, lost_grace=30.0)
)


async def test_partition_then_heal(autojump_clock: trio.abc.Clock) -> None:
    inbox = Inbox()
    async with open_test_network(seed=3) as tn:
        await tn.start_node("b", peers={"a": None, "c": None}, compute=inbox.compute)
        a = await tn.start_node("a", peers=["b"], config=FAST)
        c = await tn.start_node("c", peers=["b"], config=FAST)
        await a.send("b", b"before")
        t0 = trio.current_time()
        tn.partition({"a"}, {"b", "c"})
        states: list[tuple[PeerState, float]] = []
        done: list[float] = []

        async def watch() -> None:
            for state in (PeerState.DOWN, PeerState.UP):
                await a.wait_state("b", state)
                states.append((state, trio.current_time() - t0))

        async def wait(handle: SendHandle) -> None:
            await handle.wait()
            done.append(trio.current_time() - t0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            for i in range(5):
                nursery.start_soon(wait, a.send_nowait("b", bytes([i]), timeout=30))
            # c is on b's side of the cut: its link stays up throughout.
            await c.send("b", b"from c")
            assert trio.current_time() - t0 < 0.1
            await trio.sleep_until(t0 + 10.0)
            assert done == []
            tn.heal()
        # Nothing was heard from b since t0 (its answer to "before"): DOWN at down_after.
        assert states[0] == (PeerState.DOWN, 5.0)
        # After healing, the next retry goes within one ceiling (plus jitter).
        assert states[1][0] is PeerState.UP
        assert 10.0 < states[1][1] <= 10.0 + 2.0 * 1.1
        assert len(done) == 5
        assert all(10.0 < t <= 10.0 + 2.0 * 1.1 for t in done)
        assert _link(a, "b").protocol.resent > 0
        assert inbox.payloads(peer="a") == [b"before", *(bytes([i]) for i in range(5))]


async def test_send_deadline_during_a_partition_fails_exactly_then(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_network() as tn:
        await tn.start_node("b", peers={"a": None}, compute=Inbox().compute)
        a = await tn.start_node("a", peers=["b"])
        await a.wait_all_up()
        tn.partition({"a"}, {"b"})
        t0 = trio.current_time()
        with pytest.raises(DeliveryFailed) as info:
            await a.send("b", b"lost", timeout=3.0)
        assert trio.current_time() == t0 + 3.0
        assert info.value.held is False
        assert _link(a, "b").protocol.gave_up == 1


async def test_a_restarted_node_is_a_new_session(autojump_clock: trio.abc.Clock) -> None:
    first, second = Inbox(), Inbox()
    async with open_test_network() as tn:
        b = await tn.start_node("b", peers={"a": None}, compute=first.compute)
        a = await tn.start_node("a", peers=["b"])
        await a.send("b", b"one")
        assert b.incarnation == 1
        await tn.stop_node("b")
        assert tn.nodes == ("a",)

        async def restart_later() -> None:
            await trio.sleep(4.0)
            b2 = await tn.start_node("b", peers={"a": None}, compute=second.compute)
            assert b2.incarnation == 3

        async with trio.open_nursery() as nursery:
            nursery.start_soon(restart_later)
            t0 = trio.current_time()
            await a.send("b", b"two")
            # The link sends the moment b binds again; if that DATA beats the
            # new b's sequencer it is answered retry-later, and the one retry
            # comes after retry_timeout (0.2 s, plus 10% jitter at most).
            assert 4.0 <= trio.current_time() - t0 <= 4.0 + 0.2 * 1.1
        assert first.payloads() == [b"one"]
        assert second.payloads() == [b"two"]
        assert _link(a, "b").protocol.peer_restarts == 1


def test_the_documented_example_passes_under_pytest() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "examples/test_my_node.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout.splitlines()[-1]
