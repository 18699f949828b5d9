"""How to test your own cellmesh compute logic: nodes on a memory network.

The nodes run in this one Trio program, over :mod:`actors.testing`'s
in-memory network instead of ZeroMQ, and pytest-trio's ``autojump_clock``
makes time virtual: retries, heartbeats and partitions of many seconds take
milliseconds, and the same seed gives the same run every time.

Run it with ``pytest examples/test_my_node.py`` (needs pytest-trio with
``trio_mode = true``, as in this repository's pyproject.toml).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from actors import (
    Actor,
    Delivery,
    DeliveryFailed,
    Gap,
    PeerError,
    Reject,
)
from actors.testing import (
    open_test_network,
)
from transport import (
    NodeId,
)
from transport.testing import (
    FaultPlan,
)


class Accumulator(Actor[Any, Any]):
    """The compute logic under test: keeps a running total per sender.

    Answers ACK with the new total; refuses values over 1000 with ERR 422.
    """

    def __init__(self, totals: dict[str, int]) -> None:
        self.totals = totals

    async def receive(self, msg: Any) -> Any:
        if isinstance(msg, Gap):
            return None
        assert isinstance(msg, Delivery)
        value = int.from_bytes(msg.payload, "big")
        if value > 1000:
            raise Reject(422, f"{value} is too large")
        self.totals[msg.peer] = self.totals.get(msg.peer, 0) + value
        return self.totals[msg.peer]


async def test_each_ack_carries_the_running_total(autojump_clock: trio.abc.Clock) -> None:
    totals: dict[str, int] = {}
    async with open_test_network(latency=0.001) as net:
        await net.start_node("server", peers={"client": None}, compute=lambda: Accumulator(totals))
        client = await net.start_node("client", peers=["server"])
        results = [(await client.send("server", v.to_bytes(2, "big"))).result for v in (1, 2, 3)]
        assert results == [1, 3, 6]
        # Three round trips of 2 x 1 ms, in virtual time.
        assert trio.current_time() == pytest.approx(0.006)


async def test_a_bad_value_is_refused_with_its_code(autojump_clock: trio.abc.Clock) -> None:
    totals: dict[str, int] = {}
    async with open_test_network() as net:
        await net.start_node("server", peers={"client": None}, compute=lambda: Accumulator(totals))
        client = await net.start_node("client", peers=["server"])
        with pytest.raises(PeerError) as info:
            await client.send("server", (5000).to_bytes(2, "big"))
        assert info.value.code == 422
        assert totals == {}


async def test_every_value_counts_once_on_a_terrible_network(
    autojump_clock: trio.abc.Clock,
) -> None:
    totals: dict[str, int] = {}
    async with open_test_network(seed=42, latency=0.001) as net:
        # Both directions: 30% lost, 30% sent twice, up to 200 ms of jitter.
        net.set_faults(FaultPlan(drop=0.3, duplicate=0.3, delay=0.2))
        await net.start_node("server", peers={"client": None}, compute=lambda: Accumulator(totals))
        client = await net.start_node("client", peers=["server"])
        for v in range(1, 41):
            await client.send("server", v.to_bytes(2, "big"))
        assert totals == {"client": sum(range(1, 41))}
        stats = net.statistics()
        assert stats.dropped > 0
        assert stats.duplicated > 0
        assert client.statistics().links[NodeId("server")].protocol.resent > 0


async def test_a_partition_fails_a_send_at_its_deadline(autojump_clock: trio.abc.Clock) -> None:
    totals: dict[str, int] = {}
    async with open_test_network() as net:
        await net.start_node("server", peers={"client": None}, compute=lambda: Accumulator(totals))
        client = await net.start_node("client", peers=["server"])
        net.partition({"client"}, {"server"})
        start = trio.current_time()
        with pytest.raises(DeliveryFailed):
            await client.send("server", (7).to_bytes(2, "big"), timeout=2.0)
        assert trio.current_time() == start + 2.0
        net.heal()
        ack = await client.send("server", (8).to_bytes(2, "big"))
        # The failed send never reached the server: only 8 counts.
        assert ack.result == 8
