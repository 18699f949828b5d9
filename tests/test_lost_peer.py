"""Lost ranks surface fast: a peer DOWN for ``lost_grace`` fails every send to it at once.

The core's rule in plain floats (no Trio), then the node's: pending and later
sends end in DeliveryFailed naming the peer and how long it was down,
``wait_state(peer, PeerState.LOST)`` is the event, and sends work again once
the peer is heard. All in virtual time.
"""

from __future__ import annotations

import math

import pytest
import trio

from actors import DeliveryFailed, NodeConfig
from actors.testing import Inbox, open_test_network
from transport import Incarnation, LocalProtocolError, NodeId, SenderConfig, StreamId
from transport._proto_link import GaveUp, PeerState, PeerStateChanged
from transport._proto_sender import LinkSender
from transport.frames import Data, Hello

A = NodeId("a")
B = NodeId("b")
HALO = StreamId("halo")

#: DOWN at 5 s of silence, LOST 2 s later; retries and heartbeats far away,
#: so that next_deadline() shows the liveness timers.
CFG = SenderConfig(
    retry_timeout=50.0,
    retry_ceiling=50.0,
    heartbeat_interval=100.0,
    suspect_after=1.5,
    down_after=5.0,
    lost_grace=2.0,
)


def test_lost_grace_must_be_positive() -> None:
    with pytest.raises(LocalProtocolError, match="lost_grace"):
        SenderConfig(lost_grace=0.0)
    with pytest.raises(LocalProtocolError, match="lost_grace"):
        SenderConfig(lost_grace=math.nan)
    assert SenderConfig(lost_grace=math.inf).lost_grace == math.inf


def test_core_gives_up_every_message_when_the_peer_is_lost() -> None:
    s = LinkSender(A, Incarnation(1), B, now=0.0, rng=lambda: 0.5, config=CFG)
    s.receive_frame(Hello(B, Incarnation(9), 1, False), 1.0)
    s.send(HALO, b"x", now=1.0, deadline=math.inf)
    s.send(HALO, b"y", now=1.0, deadline=100.0)
    s.frames_to_send(1.0)
    # Heard at 1.0: SUSPECT at 2.5, DOWN at 6.0, LOST at 8.0; each one a timer.
    for when in (2.5, 6.0):
        assert s.next_deadline() == when
        s.poll(when)
    assert s.peer_state is PeerState.DOWN
    assert s.next_deadline() == 8.0
    s.poll(7.9)
    assert s.in_flight == 2
    s.poll(8.0)
    assert s.statistics().peer_state is PeerState.LOST
    events = s.take_events()
    gave_up = [e for e in events if isinstance(e, GaveUp)]
    assert [g.seq for g in gave_up] == [1, 2]
    assert all(g.down_for == 2.0 for g in gave_up)
    assert "peer b is lost: DOWN for 2.0 s (nothing heard for 7.0 s)" in gave_up[0].reason
    assert PeerStateChanged(PeerState.DOWN, PeerState.LOST) in events
    assert s.in_flight == 0
    # A later send is given up on the next step, never transmitted.
    s.send(HALO, b"z", now=9.0)
    assert not [f for f in s.frames_to_send(9.0) if isinstance(f, Data)]
    assert [e.seq for e in s.take_events() if isinstance(e, GaveUp)] == [3]
    # Heard again: UP, and a send goes out.
    s.receive_frame(Hello(B, Incarnation(9), 2, False), 10.0)
    assert s.statistics().peer_state is PeerState.UP
    seq = s.send(HALO, b"w", now=10.0)
    assert [f.seq for f in s.frames_to_send(10.0) if isinstance(f, Data)] == [seq]
    assert s.in_flight == 1


def test_core_a_peer_never_heard_is_down_not_lost() -> None:
    s = LinkSender(A, Incarnation(1), B, now=0.0, rng=lambda: 0.5, config=CFG)
    s.send(HALO, b"x", now=0.0, deadline=math.inf)
    s.poll(1000.0)
    assert s.peer_state is PeerState.DOWN
    assert s.in_flight == 1
    assert not [e for e in s.take_events() if isinstance(e, GaveUp)]


async def test_pending_and_later_sends_fail_when_the_peer_is_lost(
    autojump_clock: trio.abc.Clock,
) -> None:
    inbox = Inbox()
    async with open_test_network() as net:
        await net.start_node("b", peers={"a": None}, compute=inbox.compute)
        a = await net.start_node("a", peers=["b"])
        await a.send("b", b"before")
        await net.stop_node("b")
        t0 = trio.current_time()
        pending = a.send_nowait("b", b"pending", timeout=60)
        lost_at: list[float] = []

        async def watch() -> None:
            await a.wait_state("b", PeerState.LOST)
            lost_at.append(trio.current_time() - t0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            with pytest.raises(DeliveryFailed) as info:
                await pending.wait()
        failed_at = trio.current_time() - t0
        # Last heard at t0 (the answer to "before"): DOWN at 5 s, LOST 5 s later
        # (the defaults), long before the send's own 60 s deadline.
        assert failed_at == pytest.approx(10.0, abs=0.01)
        assert lost_at == [pytest.approx(10.0, abs=0.01)]
        error = info.value
        assert error.peer == "b"
        assert error.peer_lost
        assert error.down_for == pytest.approx(5.0, abs=0.01)
        assert "peer b is lost: DOWN for 5.0 s" in str(error)
        # A later send fails at once, with the time the peer has been down now.
        await trio.sleep(3.0)
        start = trio.current_time()
        with pytest.raises(DeliveryFailed) as later:
            await a.send("b", b"later", timeout=60)
        assert trio.current_time() == start
        assert later.value.down_for == pytest.approx(8.0, abs=0.01)
        assert a.state("b") is PeerState.LOST
        # The peer comes back: heard again, UP, and sends work.
        await net.start_node("b", peers={"a": None}, compute=inbox.compute)
        await a.wait_state("b", PeerState.UP)
        ack = await a.send("b", b"after", timeout=10)
        assert ack.peer == "b"
        got = inbox.payloads(peer="a")
        # DeliveryFailed means "may have arrived": a copy of "pending" that was
        # on the wire may reach the restarted b. "later" was never sent.
        assert got[0] == b"before"
        assert got[-1] == b"after"
        assert b"later" not in got


async def test_a_partition_longer_than_the_grace_fails_sends_then_heals(
    autojump_clock: trio.abc.Clock,
) -> None:
    config = NodeConfig(sender=SenderConfig(lost_grace=1.0))
    inbox = Inbox()
    async with open_test_network() as net:
        await net.start_node("b", peers={"a": None}, compute=inbox.compute)
        a = await net.start_node("a", peers=["b"], config=config)
        await a.wait_all_up()
        net.partition(["a"], ["b"])
        handles = [a.send_nowait("b", bytes([i]), timeout=60) for i in range(3)]
        await a.wait_state("b", PeerState.LOST)
        for handle in handles:
            with pytest.raises(DeliveryFailed) as info:
                await handle.wait()
            assert info.value.down_for is not None
        assert a.statistics().links[NodeId("b")].protocol.gave_up == 3
        net.heal()
        await a.wait_state("b", PeerState.UP)
        await a.send("b", b"healed", timeout=10)
        assert inbox.payloads(peer="a")[-1] == b"healed"


async def test_lost_grace_inf_keeps_sends_waiting_for_their_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    config = NodeConfig(sender=SenderConfig(lost_grace=math.inf))
    async with open_test_network() as net:
        await net.start_node("b", peers={"a": None}, compute=Inbox().compute)
        a = await net.start_node("a", peers=["b"], config=config)
        await a.wait_all_up()
        await net.stop_node("b")
        t0 = trio.current_time()
        with pytest.raises(DeliveryFailed) as info:
            await a.send("b", b"x", timeout=40)
        assert trio.current_time() == t0 + 40
        assert not info.value.peer_lost
        assert a.state("b") is PeerState.DOWN
