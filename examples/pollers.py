"""Question 2: what is a ZeroMQ Poller, and do I need one?

A ``zmq.Poller`` is ZeroMQ's ``select``: you register several sockets, call
``poll(timeout)``, and it blocks until at least one of them has a message (or
room to send), then tells you which ones. It is how a single-threaded program
serves many sockets without getting stuck in a ``recv`` on a quiet one.

Part 1 runs a tiny raw-pyzmq poller over two sockets (a PULL on
tcp://127.0.0.1 and a ROUTER on inproc://) and prints which socket each
message arrived on.

Part 2 shows why a cellmesh user never writes one: every ZeroMQ socket of a
node is owned by the node's one I/O task, which sleeps on one epoll set
holding all of its sockets' file descriptors (a poller of its own that never
blocks Trio), and Trio's scheduler waits on every node's set at once. Four
nodes exchange messages in one process (fan-in and fan-out at once); the
script prints how many file descriptors Trio is waiting on while idle: one
per node, however many sockets each has.
A blocking ``zmq.Poller.poll`` inside a Trio program would freeze every other
task, so do not mix the two; use a Poller only in plain (non-Trio) code.

Run: ``.venv/bin/python examples/pollers.py``
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from typing import Any

import trio
import zmq

from actors import Ack, Actor, Delivery, Node, open_node

#: Bound on the whole demo, so a broken build fails instead of hanging.
DEADLINE = 15.0


def raw_poller() -> None:
    """Part 1: one thread, two sockets, one ``zmq.Poller``."""
    print("part 1: a raw zmq.Poller over two sockets")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        pull = ctx.socket(zmq.PULL)
        router = ctx.socket(zmq.ROUTER)
        push = ctx.socket(zmq.PUSH)
        dealer = ctx.socket(zmq.DEALER)
        for sock in (pull, router, push, dealer):
            sock.linger = 0
        endpoint = pull.bind("tcp://127.0.0.1:*").addr
        router.bind("inproc://pollers-demo")
        push.connect(endpoint)
        dealer.setsockopt(zmq.ROUTING_ID, b"dealer-1")
        dealer.connect("inproc://pollers-demo")
        for i in range(3):
            push.send(b"push %d" % i)
            dealer.send(b"dealer %d" % i)

        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        poller.register(router, zmq.POLLIN)
        names = {pull: f"PULL   {endpoint}", router: "ROUTER inproc://pollers-demo"}
        got: list[tuple[str, bytes]] = []
        polls = 0
        # Bounded: at most 20 polls of at most 1 s each.
        while len(got) < 6 and polls < 20:
            polls += 1
            ready = dict(poller.poll(timeout=1000))
            for sock in (pull, router):
                if ready.get(sock, 0) & zmq.POLLIN:
                    # Drain what is there now; the poller says "readable", not "how many".
                    while True:
                        try:
                            parts = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        got.append((names[sock], parts[-1]))
                        print(f"    poll #{polls}: {names[sock]} -> {parts[-1].decode()}")
        for sock in (pull, router, push, dealer):
            sock.close()
    finally:
        ctx.term()
    assert sorted(body for _, body in got) == sorted(
        [b"push %d" % i for i in range(3)] + [b"dealer %d" % i for i in range(3)]
    )
    print(f"    {len(got)} messages from two sockets in {polls} poll calls\n")


class Count(Actor[Any, Any]):
    """Counts deliveries per sender."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    async def receive(self, msg: Any) -> Any:
        assert isinstance(msg, Delivery)
        self.counts[msg.peer] = self.counts.get(msg.peer, 0) + 1
        return None


async def trio_is_the_poller() -> None:
    """Part 2: four nodes, ten sockets, no poller in sight."""
    print("part 2: cellmesh nodes, where Trio's scheduler is the poller")
    waiting_before = trio.lowlevel.current_statistics().io_statistics.tasks_waiting_read
    counts: dict[str, int] = {}
    spokes = ("p1", "p2", "p3")
    with tempfile.TemporaryDirectory() as tmp, trio.fail_after(DEADLINE):
        # ipc endpoints in a private directory are known before any node
        # starts, so every node can list the others' endpoints up front.
        where = {name: f"ipc://{tmp}/{name}.sock" for name in ("hub", *spokes)}
        async with contextlib.AsyncExitStack() as stack:
            hub = await stack.enter_async_context(
                open_node(
                    "hub",
                    bind=where["hub"],
                    peers={p: where[p] for p in spokes},
                    compute=lambda: Count(counts),
                )
            )
            nodes = [
                await stack.enter_async_context(
                    open_node(
                        p, bind=where[p], peers={"hub": where["hub"]}, compute=lambda: Count(counts)
                    )
                )
                for p in spokes
            ]
            results: dict[str, object] = {}

            async def spoke_sends(node: Node) -> None:
                ack = await node.send("hub", f"from {node.id}".encode(), timeout=5)
                results[f"{node.id}->hub"] = ack

            async with trio.open_nursery() as nursery:
                # Fan-in (three peers -> hub) and fan-out (hub -> three peers)
                # at the same time; the hub's ROUTER serves all three DEALERs.
                for node in nodes:
                    nursery.start_soon(spoke_sends, node)
                out = await hub.send_many(dict.fromkeys(spokes, b"from hub"), timeout=5)
                results.update({f"hub->{p}": ack for p, ack in out.items()})
            assert all(isinstance(r, Ack) for r in results.values()), results
            print(f"    {len(results)} sends, all ACKed: {sorted(results)}")
            per_sender = dict(sorted(counts.items()))
            print(f"    deliveries per sender seen by the compute actors: {per_sender}")
            sockets = 4 + 3 + 3  # one ROUTER per node, one DEALER per link
            # Sample a few times: an I/O task may be awake for a heartbeat.
            waiting = 0
            for _ in range(10):
                await trio.sleep(0.01)
                stats = trio.lowlevel.current_statistics().io_statistics
                waiting = max(waiting, stats.tasks_waiting_read - waiting_before)
            print(
                f"    {sockets} zmq sockets in 4 nodes; Trio tasks sleeping on a readable fd "
                f"right now: {waiting} (backend: {stats.backend})"
            )
            assert counts == {"hub": 3, "p1": 1, "p2": 1, "p3": 1}
            assert 4 <= waiting < sockets
    print("    no Poller to write: each node's I/O task owns its sockets, Trio waits on them all\n")


def main() -> int:
    raw_poller()
    trio.run(trio_is_the_poller)
    print("OK: a Poller multiplexes sockets; in cellmesh, Trio does that for you")
    return 0


if __name__ == "__main__":
    sys.exit(main())
