"""Two nodes in one Trio program over real ZeroMQ sockets (tcp and ipc)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from _crash import CrashingPollers

from actors import (
    Actor,
    Delivery,
    DeliveryFailed,
    Gap,
    Node,
    NodeConfig,
    PeerError,
    Reject,
    open_node,
)
from transport import (
    ErrCode,
    LocalProtocolError,
    PeerState,
    SenderConfig,
    ZmqNetwork,
)
from transport.testing import (
    FaultPlan,
)


class Recorder(Actor[Any, Any]):
    """Answers ACK with the payload's length; Reject for b"bad"; crashes on b"boom"."""

    seen: list[tuple[str, int, Any]]

    def __init__(self, seen: list[tuple[str, int, Any]]) -> None:
        self.seen = seen

    async def receive(self, msg: Any) -> Any:
        if isinstance(msg, Gap):
            self.seen.append(("gap", msg.first, msg.reason))
            return None
        assert isinstance(msg, Delivery)
        if msg.payload == b"bad":
            raise Reject(417, "bad payload")
        if msg.payload == b"boom":
            raise RuntimeError("compute blew up")
        self.seen.append((msg.stream, msg.stream_seq, msg.payload))
        return len(msg.payload) if isinstance(msg.payload, bytes) else None


@asynccontextmanager
async def pair(
    endpoint: str, seen: list[tuple[str, int, Any]], config: NodeConfig | None = None
) -> AsyncIterator[tuple[Node, Node]]:
    async with (
        open_node(
            "b", bind=endpoint, peers={"a": None}, compute=lambda: Recorder(seen), config=config
        ) as b,
        open_node("a", bind="tcp://127.0.0.1:*", peers={"b": b.endpoint}, config=config) as a,
    ):
        yield a, b


@pytest.fixture(params=["tcp", "ipc"])
def endpoint(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "tcp":
        return "tcp://127.0.0.1:*"
    return f"ipc://{tmp_path}/b.sock"


async def test_send_is_acked_with_the_result(endpoint: str) -> None:
    seen: list[tuple[str, int, Any]] = []
    with trio.fail_after(10):
        async with pair(endpoint, seen) as (a, _):
            ack = await a.send("b", b"hello", stream="halo", frame_no=7)
            assert (ack.peer, ack.seq, ack.stream, ack.stream_seq, ack.result) == (
                "b",
                1,
                "halo",
                1,
                5,
            )
            assert seen == [("halo", 1, b"hello")]


async def test_reject_becomes_peer_error_and_crash_is_answered_too() -> None:
    seen: list[tuple[str, int, Any]] = []
    with trio.fail_after(10):
        async with pair("tcp://127.0.0.1:*", seen) as (a, b):
            with pytest.raises(PeerError) as info:
                await a.send("b", b"bad")
            assert (info.value.code, info.value.detail) == (417, "bad payload")
            with pytest.raises(PeerError) as crash:
                await a.send("b", b"boom")
            assert crash.value.code == ErrCode.COMPUTE_FAILED
            assert "compute blew up" in crash.value.detail
            # The supervisor restarted the compute actor: the link still works.
            assert (await a.send("b", b"after")).result == 5
            compute = b.supervisor.actor("compute").statistics()
            assert compute.restarts == 1


async def test_a_payload_no_peer_could_take_fails_the_send_not_the_link() -> None:
    # Checked before anything is queued: the call raises, the link goes on.
    seen: list[tuple[str, int, Any]] = []
    with trio.fail_after(20):
        async with pair("tcp://127.0.0.1:*", seen) as (a, _):
            assert (await a.send("b", b"before")).result == 6
            for bad in (object(), {"cells": {1, 2}}, b"x" * (65 * 1024 * 1024)):
                with pytest.raises(LocalProtocolError):
                    a.send_nowait("b", bad)
                with pytest.raises(LocalProtocolError):
                    await a.send("b", bad)
            with pytest.raises(LocalProtocolError, match="got object"):
                a.send_batch_nowait("b", [b"ok", object()])
            assert (await a.send("b", b"after")).result == 5
            assert a.statistics().links["b"].protocol.in_flight == 0
    assert [p for (_, _, p) in seen] == [b"before", b"after"]


async def test_many_in_flight_each_delivered_once_in_order() -> None:
    seen: list[tuple[str, int, Any]] = []
    with trio.fail_after(30):
        async with pair("tcp://127.0.0.1:*", seen) as (a, _):
            handles = []
            for i in range(2000):
                await a.wait_window("b")
                handles.append(a.send_nowait("b", i.to_bytes(4, "big"), stream="s"))
            acks = [await h.wait() for h in handles]
            assert [ack.seq for ack in acks] == list(range(1, 2001))
            assert [p for (_, _, p) in seen] == [i.to_bytes(4, "big") for i in range(2000)]


async def test_faulty_wire_still_delivers_exactly_once_in_order() -> None:
    seen: list[tuple[str, int, Any]] = []
    config = NodeConfig(
        faults=FaultPlan(drop=0.2, duplicate=0.2, delay=0.02, seed=3),
        sender=SenderConfig(retry_timeout=0.05, retry_ceiling=0.2),
    )
    with trio.fail_after(60):
        async with pair("tcp://127.0.0.1:*", seen, config) as (a, _):
            async with trio.open_nursery() as nursery:
                for stream in ("x", "y"):

                    async def feed(stream: str = stream) -> None:
                        handles = []
                        for i in range(150):
                            await a.wait_window("b")
                            handles.append(a.send_nowait("b", f"{stream}{i}", stream=stream))
                        for h in handles:
                            await h.wait()

                    nursery.start_soon(feed)
            for stream in ("x", "y"):
                got = [p for (s, _, p) in seen if s == stream]
                assert got == [f"{stream}{i}" for i in range(150)]
            stats = a.statistics().links["b"].protocol
            assert stats.resent > 0


async def test_fan_out_to_many_peers() -> None:
    seen: list[tuple[str, int, Any]] = []
    with trio.fail_after(15):
        async with (
            open_node(
                "p1", bind="tcp://127.0.0.1:*", peers={"hub": None}, compute=lambda: Recorder(seen)
            ) as p1,
            open_node(
                "p2", bind="tcp://127.0.0.1:*", peers={"hub": None}, compute=lambda: Recorder(seen)
            ) as p2,
            open_node(
                "hub",
                bind="tcp://127.0.0.1:*",
                peers={"p1": p1.endpoint, "p2": p2.endpoint, "p3": "tcp://127.0.0.1:9"},
            ) as hub,
        ):
            results = await hub.send_many(
                {"p1": b"one", "p2": b"two!", "p3": b"nobody"}, timeout=1.0
            )
            assert results["p1"].result == 3  # type: ignore[union-attr]
            assert results["p2"].result == 4  # type: ignore[union-attr]
            assert isinstance(results["p3"], DeliveryFailed)
            assert hub.state("p3") is not PeerState.UP


async def test_peer_that_never_comes_up_fails_at_the_deadline() -> None:
    with trio.fail_after(10):
        async with open_node("a", bind="tcp://127.0.0.1:*", peers={"b": "tcp://127.0.0.1:9"}) as a:
            start = trio.current_time()
            with pytest.raises(DeliveryFailed):
                await a.send("b", b"x", timeout=0.5)
            assert 0.5 <= trio.current_time() - start < 2.0


async def test_query_reports_the_senders_view() -> None:
    seen: list[tuple[str, int, Any]] = []
    with trio.fail_after(10):
        async with pair("tcp://127.0.0.1:*", seen) as (a, b):
            await a.send("b", b"1", stream="halo")
            await a.send("b", b"2", stream="halo")
            answer = await b.query("a")
            [status] = [s for s in answer.streams if s.stream == "halo"]
            assert status.last_sent == 2
            assert status.in_flight == 0


async def _send_through_a_crash(
    a: Node, n: int, crashes: CrashingPollers, seen: list[tuple[str, int, Any]]
) -> None:
    """Send ``n`` numbered messages a→b, crashing an I/O task halfway; all arrive once, in order."""
    handles = []
    for i in range(n):
        await a.wait_window("b")
        handles.append(a.send_nowait("b", i.to_bytes(4, "big"), stream="s"))
        if i == n // 2:
            crashes.arm()
    acks = [await h.wait() for h in handles]
    assert len(acks) == n
    assert [p for (_, _, p) in seen] == [i.to_bytes(4, "big") for i in range(n)]


async def test_a_sending_nodes_io_task_crash_keeps_its_pending_messages() -> None:
    # The node's I/O task (the dispatcher) crashes with 300 sends in flight,
    # and its supervisor restarts it with a fresh DEALER. The protocol actors
    # outlive it, so every send started before the crash still completes,
    # in order.
    seen: list[tuple[str, int, Any]] = []
    net = ZmqNetwork()
    crashes = CrashingPollers(net)
    try:
        with trio.fail_after(20):
            async with (
                open_node(
                    "b", bind="tcp://127.0.0.1:*", peers={"a": None}, compute=lambda: Recorder(seen)
                ) as b,
                open_node("a", bind="tcp://127.0.0.1:*", peers={"b": b.endpoint}, network=net) as a,
            ):
                await _send_through_a_crash(a, 600, crashes, seen)
                assert a.supervisor.actor("dispatcher").statistics().restarts == 1
    finally:
        net.close()


async def test_a_receiving_nodes_io_task_crash_rebinds_and_loses_nothing() -> None:
    seen: list[tuple[str, int, Any]] = []
    net = ZmqNetwork()
    crashes = CrashingPollers(net)
    try:
        with trio.fail_after(20):
            async with (
                open_node(
                    "b",
                    bind="tcp://127.0.0.1:*",
                    peers={"a": None},
                    compute=lambda: Recorder(seen),
                    network=net,
                ) as b,
                open_node("a", bind="tcp://127.0.0.1:*", peers={"b": b.endpoint}) as a,
            ):
                endpoint = b.endpoint
                await _send_through_a_crash(a, 400, crashes, seen)
                assert b.supervisor.actor("dispatcher").statistics().restarts == 1
                # Rebound where the peers already know it.
                assert b.endpoint == endpoint
    finally:
        net.close()
