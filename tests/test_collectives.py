"""The node's collectives: barrier, broadcast, gather, allreduce, neighbour_barrier.

Virtual time on the in-memory network for the algorithms, the faults and the
errors; one real ZeroMQ run on 127.0.0.1 for allreduce.
"""

from __future__ import annotations

import operator
import random
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from actors import DEFAULT_STREAM, Node, NodeClosed, NodeConfig, PeerError, open_node
from actors.collectives import COLLECTIVE_STREAM, CollectiveTimeout
from actors.testing import Inbox, TestNetwork, open_test_network
from transport import ErrCode, LocalProtocolError, SenderConfig
from transport.testing import FaultPlan

SIZES = [1, 2, 3, 5, 8]


def names(n: int) -> list[str]:
    return [f"r{i}" for i in range(n)]


async def mesh(net: TestNetwork, n: int, inbox: Inbox | None = None) -> list[Node]:
    """``n`` nodes, each a peer of every other (a group needs a full mesh)."""
    ids = names(n)
    nodes = []
    for me in ids:
        compute = inbox.compute if inbox is not None else None
        nodes.append(await net.start_node(me, peers=[p for p in ids if p != me], compute=compute))
    return nodes


async def on_every_rank(
    nodes: list[Node], body: Callable[[int, Node], Awaitable[Any]]
) -> list[Any]:
    """Run ``body(rank, node)`` on every rank at once; the results in rank order."""
    results: list[Any] = [None] * len(nodes)

    async def one(rank: int, node: Node) -> None:
        results[rank] = await body(rank, node)

    async with trio.open_nursery() as nursery:
        for rank, node in enumerate(nodes):
            nursery.start_soon(one, rank, node)
    return results


def concat(a: list[int], b: list[int]) -> list[int]:
    """Associative, not commutative: the result shows the order it was applied in."""
    return [*a, *b]


@pytest.mark.parametrize("n", SIZES)
async def test_every_collective_on_every_size(n: int, autojump_clock: trio.abc.Clock) -> None:
    async with open_test_network() as net:
        nodes = await mesh(net, n)
        root = names(n)[n // 2]

        async def body(rank: int, node: Node) -> dict[str, Any]:
            await node.barrier()
            return {
                "bcast": await node.broadcast({"from": node.id, "x": [1.5, rank]}, root=root),
                "gather": await node.gather(rank * 10, root=root),
                "sum": await node.allreduce(rank + 1),
                "fsum": await node.allreduce(0.1 * (rank + 1), op="sum"),
                "min": await node.allreduce(rank - 3, op="min"),
                "max": await node.allreduce(f"s{rank}", op="max"),
                "concat": await node.allreduce([rank], op=concat),
                "mul": await node.allreduce(rank + 2, op=operator.mul),
            }

        results = await on_every_rank(nodes, body)
    root_rank = n // 2
    fsums = {r["fsum"] for r in results}
    for rank, got in enumerate(results):
        assert got["bcast"] == {"from": root, "x": [1.5, root_rank]}
        assert got["gather"] == ([r * 10 for r in range(n)] if rank == root_rank else None)
        assert got["sum"] == n * (n + 1) // 2
        assert got["min"] == -3
        assert got["max"] == max(f"s{r}" for r in range(n))
        assert got["concat"] == list(range(n))
        product = 1
        for r in range(n):
            product *= r + 2
        assert got["mul"] == product
    # The same expression on every rank: floats agree bit for bit.
    assert len(fsums) == 1
    assert fsums.pop() == pytest.approx(0.1 * n * (n + 1) / 2)


async def test_a_barrier_lets_nobody_out_before_everyone_is_in(
    autojump_clock: trio.abc.Clock,
) -> None:
    n = 5
    entered: list[float] = []
    left: list[float] = []
    async with open_test_network(latency=0.01) as net:
        nodes = await mesh(net, n)

        async def body(rank: int, node: Node) -> None:
            await trio.sleep(rank * 0.7)
            entered.append(trio.current_time())
            await node.barrier()
            left.append(trio.current_time())

        await on_every_rank(nodes, body)
    assert min(left) >= max(entered)


@pytest.mark.parametrize("seed", range(12))
async def test_collectives_on_a_terrible_network(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """Drop, duplicate, reorder, pause (a rank cut off, then back), late ranks."""
    rng = random.Random(seed)
    n = rng.choice([3, 5, 6, 8])
    async with open_test_network(seed=seed, latency=0.001) as net:
        nodes = await mesh(net, n)
        net.set_faults(FaultPlan(drop=0.25, duplicate=0.25, delay=0.05, seed=seed))
        paused = rng.choice(names(n))
        starts = [rng.uniform(0.0, 1.0) for _ in range(n)]

        async def pause() -> None:
            await trio.sleep(rng.uniform(0.0, 1.0))
            net.partition([paused], [m for m in names(n) if m != paused])
            await trio.sleep(rng.uniform(0.5, 3.0))
            net.heal()

        async def body(rank: int, node: Node) -> list[Any]:
            await trio.sleep(starts[rank])
            out = []
            for round_no in range(3):
                await node.barrier(timeout=60)
                out.append(await node.broadcast(round_no * 100 + rank, root="r1", timeout=60))
                out.append(await node.gather([rank, round_no], root="r0", timeout=60))
                out.append(await node.allreduce([rank], op=concat, timeout=60))
            return out

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pause)
            results = await on_every_rank(nodes, body)
        stats = [node.statistics().collectives for node in nodes]
    for rank, out in enumerate(results):
        for round_no in range(3):
            bcast, gathered, reduced = out[3 * round_no : 3 * round_no + 3]
            assert bcast == round_no * 100 + 1
            expected = [[r, round_no] for r in range(n)] if rank == 0 else None
            assert gathered == expected
            assert reduced == list(range(n))
    assert all(s.buffered == 0 and not s.refused and s.stale == 0 for s in stats)
    wire = net.statistics()
    assert wire.dropped > 0
    assert wire.duplicated > 0


async def test_back_to_back_and_concurrent_groups(autojump_clock: trio.abc.Clock) -> None:
    """Different groups run at once on one node; each group's calls stay in step."""
    async with open_test_network(seed=3) as net:
        net.set_faults(FaultPlan(delay=0.05, seed=3))
        nodes = await mesh(net, 6)
        evens = ["r0", "r2", "r4"]

        async def body(rank: int, node: Node) -> tuple[list[int], list[int]]:
            everyone: list[int] = []
            mine: list[int] = []

            async def on_all() -> None:
                for i in range(10):
                    everyone.append(await node.allreduce(rank * i))

            async def on_evens() -> None:
                for i in range(10):
                    mine.append(await node.allreduce(i, op="max", group=evens))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(on_all)
                if node.id in evens:
                    nursery.start_soon(on_evens)
            return everyone, mine

        results = await on_every_rank(nodes, body)
    for rank, (everyone, mine) in enumerate(results):
        assert everyone == [15 * i for i in range(10)]
        assert mine == (list(range(10)) if f"r{rank}" in evens else [])


async def test_one_group_runs_one_collective_at_a_time(autojump_clock: trio.abc.Clock) -> None:
    async with open_test_network() as net:
        a, _b = await mesh(net, 2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.barrier)
            await trio.sleep(0.1)
            with pytest.raises(LocalProtocolError, match="already running"):
                await a.allreduce(1)
            nursery.cancel_scope.cancel()


async def test_a_rank_that_never_arrives_is_named(autojump_clock: trio.abc.Clock) -> None:
    async with open_test_network() as net:
        nodes = await mesh(net, 3)
        errors: list[CollectiveTimeout] = []

        async def body(rank: int, node: Node) -> None:
            if rank == 2:
                return
            with pytest.raises(CollectiveTimeout) as caught:
                await node.barrier(timeout=5)
            errors.append(caught.value)
            assert trio.current_time() == pytest.approx(5, abs=0.01)

        await on_every_rank(nodes, body)
    assert len(errors) == 2
    for error in errors:
        assert error.waiting_for == ("r2",)
        assert error.collective == "barrier"
        assert isinstance(error, trio.TooSlowError)
        assert "r2" in str(error)


async def test_a_late_rank_after_a_timeout_does_not_mix_collectives(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A timed-out collective's messages are dropped, never taken by the next one."""
    async with open_test_network() as net:
        a, b = await mesh(net, 2)
        with pytest.raises(CollectiveTimeout):
            await a.allreduce(1, timeout=1)
        # b comes late to the collective a gave up on: a's part had left, so
        # b completes it (the group is out of step, as CollectiveTimeout says).
        assert await b.allreduce(2, timeout=1) == 3
        # a dropped b's part of the abandoned one: the next is theirs alone.
        both = await on_every_rank([a, b], lambda r, node: node.allreduce(10 * (r + 1)))
        assert both == [30, 30]
        assert a.statistics().collectives.stale == 1
        assert a.statistics().collectives.buffered == 0


async def test_groups_must_be_peers_of_one_another(autojump_clock: trio.abc.Clock) -> None:
    async with open_test_network() as net:
        a = await net.start_node("a", peers=["b"])
        await net.start_node("b", peers=["a"])
        with pytest.raises(LocalProtocolError, match=r"\['c'\] are not peers"):
            await a.barrier(group=["a", "b", "c"])
        with pytest.raises(LocalProtocolError, match="does not hold this node"):
            await a.barrier(group=["b"])
        with pytest.raises(LocalProtocolError, match="root 'c'"):
            await a.broadcast(1, root="c")
        with pytest.raises(LocalProtocolError, match="unknown reduction"):
            await a.allreduce(1, op="avg")


async def test_collective_messages_never_reach_the_compute_actor(
    autojump_clock: trio.abc.Clock,
) -> None:
    inbox = Inbox()
    async with open_test_network() as net:
        nodes = await mesh(net, 3, inbox)
        await on_every_rank(nodes, lambda rank, node: node.allreduce(rank))
        await nodes[0].send("r1", b"app")
        with pytest.raises(LocalProtocolError, match="reserved"):
            await nodes[0].send("r1", b"x", stream=COLLECTIVE_STREAM)
        with pytest.raises(LocalProtocolError, match="reserved"):
            nodes[0].send_batch_nowait("r1", [b"x"], stream=COLLECTIVE_STREAM)
    assert [(d.stream, d.payload) for d in inbox.deliveries] == [(DEFAULT_STREAM, b"app")]


async def test_a_malformed_collective_message_is_refused_and_counted(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_network() as net:
        a, b = await mesh(net, 2)
        handle = await a._send_collective("r1", ["not", "a", "tag", 1], None)
        with pytest.raises(PeerError, match="not a collective message") as caught:
            await handle.wait()
        assert caught.value.code == ErrCode.NO_HANDLER
        assert b.statistics().collectives.refused == {"malformed": 1}
        # The link and the collectives go on.
        assert await on_every_rank([a, b], lambda r, node: node.allreduce(r)) == [1, 1]


async def test_neighbour_barrier_on_a_line(autojump_clock: trio.abc.Clock) -> None:
    """A topology that is no mesh: each node waits for its neighbours only."""
    ids = names(5)
    entered: dict[str, float] = {}
    left: dict[str, float] = {}
    async with open_test_network(seed=1) as net:
        net.set_faults(FaultPlan(drop=0.2, duplicate=0.2, delay=0.02, seed=1))
        nodes = []
        for i, me in enumerate(ids):
            nodes.append(
                await net.start_node(me, peers=ids[max(0, i - 1) : i] + ids[i + 1 : i + 2])
            )

        async def body(rank: int, node: Node) -> None:
            for _ in range(3):
                await trio.sleep(rank * 0.3)
                entered[node.id] = trio.current_time()
                await node.neighbour_barrier(timeout=60)
                left[node.id] = trio.current_time()

        await on_every_rank(nodes, body)
        with pytest.raises(LocalProtocolError, match="not a peer"):
            await nodes[0].neighbour_barrier(peers=["r3"])
    # Two rounds: a node leaves after its neighbours' neighbours entered.
    for i, me in enumerate(ids):
        near = ids[max(0, i - 2) : i + 3]
        assert left[me] >= max(entered[p] for p in near)


async def test_a_neighbour_that_never_arrives_is_named(autojump_clock: trio.abc.Clock) -> None:
    async with open_test_network() as net:
        a = await net.start_node("a", peers=["b", "c"])
        await net.start_node("b", peers=["a"])
        c = await net.start_node("c", peers=["a"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.neighbour_barrier)
            with pytest.raises(CollectiveTimeout) as caught:
                await a.neighbour_barrier(timeout=2)
            nursery.cancel_scope.cancel()
    assert caught.value.waiting_for == ("b",)


async def test_a_closed_node_ends_its_collective(autojump_clock: trio.abc.Clock) -> None:
    async with open_test_network() as net:
        a, _b = await mesh(net, 2)

        async def close_soon() -> None:
            await trio.sleep(1)
            await net.stop_node("r0")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_soon)
            with pytest.raises(NodeClosed):
                await a.barrier()
        with pytest.raises(NodeClosed):
            await a.allreduce(1)


def _free_ports(n: int) -> list[int]:
    """Free TCP ports on 127.0.0.1 below the ephemeral range (design.md §5)."""
    rng = random.Random()
    ports: list[int] = []
    for _ in range(400):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError("no free TCP ports on 127.0.0.1 in 20000..32000")


async def test_allreduce_over_real_zeromq() -> None:
    n = 4
    endpoints = {f"z{i}": f"tcp://127.0.0.1:{p}" for i, p in enumerate(_free_ports(n))}
    config_sender = SenderConfig(retry_timeout=0.05)
    results: dict[str, list[Any]] = {}

    async def rank(me: str) -> None:
        peers = {p: e for p, e in endpoints.items() if p != me}
        async with open_node(
            me, bind=endpoints[me], peers=peers, config=NodeConfig(sender=config_sender)
        ) as node:
            await node.wait_all_up(timeout=10)
            value = int(me[1:])
            results[me] = [
                await node.allreduce(value),
                await node.allreduce([value], op=concat),
                await node.allreduce(float(value), op="max"),
            ]
            await node.barrier()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for me in endpoints:
                nursery.start_soon(rank, me)
    assert results == {me: [6, [0, 1, 2, 3], 3.0] for me in endpoints}


def _guide_example() -> dict[str, Any]:
    """The code of docs/guide.md's "Collectives" section, run as written."""
    guide = (Path(__file__).resolve().parent.parent / "docs" / "guide.md").read_text()
    section = guide.split("\n## Collectives\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert code is not None
    namespace: dict[str, Any] = {"Any": Any, "operator": operator, "open_node": open_node}
    exec(code.group(1), namespace)
    return namespace


async def test_the_guides_example_runs(tmp_path: Path) -> None:
    run_rank = _guide_example()["run_rank"]
    endpoints = {f"r{i}": f"ipc://{tmp_path}/r{i}.sock" for i in range(3)}
    results: dict[str, Any] = {}

    async def one(me: str) -> None:
        results[me] = await run_rank(me, endpoints)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for me in endpoints:
                nursery.start_soon(one, me)
    for me, got in results.items():
        assert got["total"] == 1.5
        assert got["hottest"] == [1.0, "r2"]
        assert got["merged"] == {"r0": 0.0, "r1": 0.5, "r2": 1.0}
        assert got["values"] == ([0.0, 0.5, 1.0] if me == "r0" else None)
