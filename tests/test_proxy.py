"""The fault-injecting proxy between real sockets and real processes.

Node "a" is given the proxy's endpoint for "b"; the proxy forwards to b's
real endpoint through seeded faults, or loses everything while cut. These
tests run in real time on 127.0.0.1: every wait is bounded by
``trio.fail_after``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq
from _peer import payload_index
from test_processes import QUICK, free_port, read_record, receiver

from actors import (
    Ack,
    Actor,
    Delivery,
    Node,
    NodeConfig,
    SendHandle,
    open_node,
)
from transport import (
    NodeId,
    PeerState,
    router_socket,
)
from transport._socket import dealer_socket
from transport.testing import (
    FaultPlan,
    open_fault_proxy,
)

pytestmark = pytest.mark.slow

#: Quick failure detection (for the cut) and quick resends (for the drops).
CONFIG = NodeConfig(sender=replace(QUICK, retry_timeout=0.05, retry_ceiling=0.2))
FAULTS = FaultPlan(drop=0.2, duplicate=0.2, delay=0.01, seed=7)


class Recorder(Actor[Any, Any]):
    """Records (sending peer, stream, payload) of every delivery; ACKs with the payload."""

    def __init__(self, seen: list[tuple[str, str, Any]]) -> None:
        self._seen = seen

    async def receive(self, msg: Any) -> Any:
        assert isinstance(msg, Delivery)
        self._seen.append((msg.peer, msg.stream, msg.payload))
        return msg.payload


async def send_in_rounds(a: Node, payloads: list[str], size: int = 5) -> list[Ack]:
    """Send ``size`` payloads at a time, each round waiting for its ACKs.

    Many small rounds make many wire messages each way: a whole window sent
    at once travels in a few batches, too few for a 20 % fault rate to be
    sure to show.
    """
    acks: list[Ack] = []
    for start in range(0, len(payloads), size):
        handles = await send_all(a, payloads[start : start + size])
        acks.extend([await h.wait() for h in handles])
    return acks


async def send_all(a: Node, payloads: list[str]) -> list[SendHandle]:
    """Queue every payload on stream "s" to "b", waiting for window as needed."""
    handles = []
    for payload in payloads:
        await a.wait_window("b")
        handles.append(a.send_nowait("b", payload, stream="s"))
    return handles


async def test_the_target_sees_the_clients_routing_id_and_extra_clients_are_refused() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        with trio.fail_after(10):
            async with router_socket(ctx) as target:
                endpoint = target.bind("tcp://127.0.0.1:*")
                async with (
                    open_fault_proxy(endpoint, max_clients=1, context=ctx) as proxy,
                    dealer_socket(ctx, routing_id=b"x") as x,
                    dealer_socket(ctx, routing_id=b"y") as y,
                ):
                    assert proxy.target == endpoint
                    assert proxy.endpoint.startswith("tcp://127.0.0.1:")
                    x.connect(proxy.endpoint)
                    await x.send_multipart([b"hello", b"world"])
                    assert await target.recv_multipart() == [b"x", b"hello", b"world"]
                    await target.send_multipart([b"x", b"answer"])
                    assert await x.recv_multipart() == [b"answer"]
                    # A second routing id is past max_clients: counted, never forwarded.
                    y.connect(proxy.endpoint)
                    await y.send_multipart([b"from y"])
                    for _ in range(500):
                        if proxy.statistics().lost:
                            break
                        await trio.sleep(0.01)
                    stats = proxy.statistics()
                    assert (stats.clients, stats.from_clients, stats.to_target) == (1, 2, 1)
                    assert (stats.from_target, stats.to_clients, stats.cut) == (1, 1, 0)
                    assert stats.upstream.passed == stats.downstream.passed == 1
                    with trio.move_on_after(0.2):
                        await target.recv_multipart()
                        pytest.fail("the refused client's message reached the target")
    finally:
        ctx.destroy(linger=0)


async def test_set_plan_and_cut_take_effect_at_once() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        with trio.fail_after(10):
            async with router_socket(ctx) as target:
                endpoint = target.bind("tcp://127.0.0.1:*")
                async with (
                    open_fault_proxy(endpoint, context=ctx) as proxy,
                    dealer_socket(ctx, routing_id=b"x") as x,
                ):
                    x.connect(proxy.endpoint)
                    await x.send_multipart([b"1"])
                    assert await target.recv_multipart() == [b"x", b"1"]
                    # Seeded: duplicate=0.999 duplicates this message (and
                    # would duplicate all but one in a thousand).
                    proxy.set_plan(FaultPlan(duplicate=0.999, seed=1))
                    assert proxy.plan.duplicate == 0.999
                    await x.send_multipart([b"2"])
                    assert await target.recv_multipart() == [b"x", b"2"]
                    assert await target.recv_multipart() == [b"x", b"2"]
                    proxy.set_plan(FaultPlan())
                    proxy.cut()
                    assert proxy.is_cut
                    await x.send_multipart([b"lost"])
                    await target.send_multipart([b"x", b"lost too"])
                    for _ in range(500):
                        if proxy.statistics().cut == 2:
                            break
                        await trio.sleep(0.01)
                    proxy.heal()
                    await x.send_multipart([b"3"])
                    assert await target.recv_multipart() == [b"x", b"3"]
                    await target.send_multipart([b"x", b"answer"])
                    assert await x.recv_multipart() == [b"answer"]
                    stats = proxy.statistics()
                    assert (stats.from_clients, stats.to_target) == (4, 4)
                    assert (stats.from_target, stats.to_clients) == (2, 1)
                    assert (stats.cut, stats.lost, stats.upstream.duplicated) == (2, 0, 1)
    finally:
        ctx.destroy(linger=0)


async def test_faulty_proxy_still_delivers_each_send_once_in_order() -> None:
    seen: list[tuple[str, str, Any]] = []
    payloads = [f"s:{i}" for i in range(300)]
    with trio.fail_after(60):
        async with (
            open_node(
                "b", bind="tcp://127.0.0.1:*", peers={"a": None}, compute=lambda: Recorder(seen)
            ) as b,
            open_fault_proxy(b.endpoint, plan=FAULTS) as proxy,
            open_node(
                "a", bind="tcp://127.0.0.1:*", peers={"b": proxy.endpoint}, config=CONFIG
            ) as a,
        ):
            acks = await send_in_rounds(a, payloads)
            stats = proxy.statistics()
            link = a.statistics().links[NodeId("b")].protocol

    assert [ack.result for ack in acks] == payloads
    # b saw "a" as the sender: the proxy kept a's routing id.
    assert seen == [("a", "s", p) for p in payloads]
    assert stats.clients == 1
    for direction in (stats.upstream, stats.downstream):
        assert direction.dropped > 0
        assert direction.duplicated > 0
    assert stats.to_target == stats.upstream.passed
    assert link.resent > 0
    print(f"proxy: {stats}")


async def test_cut_then_heal_completes_the_sends_made_during_the_cut() -> None:
    seen: list[tuple[str, str, Any]] = []
    states: list[tuple[PeerState, float]] = []
    with trio.fail_after(60):
        async with (
            open_node(
                "b", bind="tcp://127.0.0.1:*", peers={"a": None}, compute=lambda: Recorder(seen)
            ) as b,
            open_fault_proxy(b.endpoint) as proxy,
            open_node(
                "a", bind="tcp://127.0.0.1:*", peers={"b": proxy.endpoint}, config=CONFIG
            ) as a,
        ):
            before = [await h.wait() for h in await send_all(a, [f"s:{i}" for i in range(50)])]
            assert a.state("b") is PeerState.UP

            async def watch() -> None:
                await a.wait_state("b", PeerState.SUSPECT)
                states.append((PeerState.SUSPECT, trio.current_time()))
                await a.wait_state("b", PeerState.UP)
                states.append((PeerState.UP, trio.current_time()))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                await trio.lowlevel.checkpoint()
                proxy.cut()
                cut_at = trio.current_time()
                during = await send_all(a, [f"s:{i}" for i in range(50, 100)])
                await trio.sleep(2.0)
                assert not any(h.done for h in during)
                assert a.state("b") in (PeerState.SUSPECT, PeerState.DOWN)
                assert len(seen) == 50
                proxy.heal()
                healed_at = trio.current_time()
                after = [await h.wait() for h in during]
            stats = proxy.statistics()

    assert [ack.result for ack in before + after] == [f"s:{i}" for i in range(100)]
    assert seen == [("a", "s", f"s:{i}") for i in range(100)]
    assert stats.cut > 0
    [(suspect, suspect_at), (up, up_at)] = states
    assert (suspect, up) == (PeerState.SUSPECT, PeerState.UP)
    assert cut_at < suspect_at < healed_at < up_at


async def test_proxy_between_real_processes(tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    total = 200
    with trio.fail_after(60):
        async with (
            receiver(tmp_path, free_port(), record) as peer,
            open_fault_proxy(peer.endpoint, plan=FAULTS) as proxy,
            open_node(
                "a", bind="tcp://127.0.0.1:*", peers={"b": proxy.endpoint}, config=CONFIG
            ) as a,
        ):
            acks = await send_in_rounds(a, [f"s:{i}" for i in range(total)])
            stats = proxy.statistics()
            peer_stats = await peer.stop()

    assert [ack.result for ack in acks] == [{"i": i, "inc": peer.incarnation} for i in range(total)]
    lines, gaps = read_record(record)
    assert gaps == []
    assert [payload_index(line.payload) for line in lines] == list(range(total))
    assert set(Counter(line.payload for line in lines).values()) == {1}
    [session] = peer_stats["sessions"]
    assert (session["peer"], session["delivered"]) == ("a", total)
    # The proxy's duplicates and a's resends reached b, which suppressed them.
    assert session["duplicates"] > 0
    for direction in (stats.upstream, stats.downstream):
        assert direction.dropped > 0
        assert direction.duplicated > 0
