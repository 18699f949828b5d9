"""Questions 3, 4, 5 and 6: one-to-one sends, fan-out, message ids, backpressure.

A "centre" node has four neighbours (north, east, south, west), each its own
node. Every node binds one ROUTER and keeps one link (a DEALER) per neighbour
it sends to, so:

* Q3: no send/receive lockstep. ``send_nowait`` starts a send and returns a
  handle at once; any number of sends are in flight together and their ACKs
  come back asynchronously. ``await handle.wait()`` collects each outcome;
* Q4: each message goes to exactly the peer it is addressed to, and its ACK
  comes from that peer (the ACK carries the value the peer's compute returned);
* Q5: the centre's single ROUTER receives from all four neighbours at once;
* Q6: serial sends pay one round trip each, concurrent sends overlap. Each
  message gets an id (its sequence number on the link), carried in the
  ``Delivery`` the peer sees and in the ``Ack`` the sender gets. Backpressure:
  at most ``max_in_flight`` unanswered messages per link; ``send_nowait``
  raises ``trio.WouldBlock`` past that and ``send``/``wait_window`` wait.

Run: ``.venv/bin/python examples/fan_out.py``
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from functools import partial
from typing import Any

import trio

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
    SenderConfig,
)

#: Bound on the whole demo, so a broken build fails instead of hanging.
DEADLINE = 20.0
NEIGHBOURS = ("north", "east", "south", "west")
#: Messages per neighbour in the serial and concurrent rounds.
PER_PEER = 25
#: The centre's per-link bound on unanswered messages (backpressure).
MAX_IN_FLIGHT = 32
#: Each neighbour's compute step takes this long (seconds).
COMPUTE_TIME = 0.002


class Neighbour(Actor[Any, Any]):
    """Records every delivery; its return value travels back in the ACK."""

    def __init__(self, name: str, log: list[tuple[str, NodeId, int, Any]]) -> None:
        self.name = name
        self.log = log

    async def receive(self, msg: Any) -> Any:
        assert isinstance(msg, Delivery)
        await trio.sleep(COMPUTE_TIME)
        self.log.append((self.name, msg.peer, msg.seq, msg.payload))
        return f"{self.name} took cell {msg.payload['cell']}"


def payload_for(peer: str, cell: int) -> dict[str, Any]:
    return {"to": peer, "cell": cell}


async def serial(centre: Node) -> float:
    """Q6, one at a time: every send waits for its ACK before the next starts."""
    start = trio.current_time()
    for cell in range(PER_PEER):
        for peer in NEIGHBOURS:
            ack = await centre.send(peer, payload_for(peer, cell), stream="serial", timeout=5)
            assert ack.peer == peer
    return trio.current_time() - start


async def concurrent(centre: Node) -> tuple[float, int, list[tuple[SendHandle, Ack]]]:
    """Q3/Q6, all at once: start every send, then collect the ACKs."""
    start = trio.current_time()
    handles: list[SendHandle] = []
    for cell in range(PER_PEER):
        for peer in NEIGHBOURS:
            # No checkpoint while the window is open: all sends start now.
            await centre.wait_window(peer)
            handles.append(centre.send_nowait(peer, payload_for(peer, cell), stream="c", timeout=5))
    in_flight = sum(link.protocol.in_flight for link in centre.statistics().links.values())
    acks = [(h, await h.wait()) for h in handles]
    return trio.current_time() - start, in_flight, acks


async def backpressure(centre: Node) -> tuple[int, int]:
    """Q6, backpressure: the window of one link is bounded."""
    peer = "north"
    handles = []
    refused_at = -1
    for i in range(MAX_IN_FLIGHT + 10):
        try:
            handles.append(centre.send_nowait(peer, payload_for(peer, 1000 + i), stream="bp"))
        except trio.WouldBlock:
            refused_at = i
            break
    peak = centre.statistics().links[NodeId(peer)].protocol.in_flight
    # The waiting form: send() (or wait_window) paces the caller instead.
    for i in range(3 * MAX_IN_FLIGHT):
        await centre.wait_window(peer)
        handles.append(centre.send_nowait(peer, payload_for(peer, 2000 + i), stream="bp"))
        peak = max(peak, centre.statistics().links[NodeId(peer)].protocol.in_flight)
    for h in handles:
        await h.wait()
    return refused_at, peak


async def main() -> None:
    log: list[tuple[str, NodeId, int, Any]] = []
    centre_log: list[tuple[str, NodeId, int, Any]] = []
    config = NodeConfig(sender=SenderConfig(max_in_flight=MAX_IN_FLIGHT))
    with tempfile.TemporaryDirectory() as tmp, trio.fail_after(DEADLINE):
        # ipc endpoints in a private directory are known before any node
        # starts, so every node can name the others up front.
        where = {name: f"ipc://{tmp}/{name}.sock" for name in ("centre", *NEIGHBOURS)}
        async with contextlib.AsyncExitStack() as stack:
            centre = await stack.enter_async_context(
                open_node(
                    "centre",
                    bind=where["centre"],
                    peers={n: where[n] for n in NEIGHBOURS},
                    compute=lambda: Neighbour("centre", centre_log),
                    config=config,
                )
            )
            nodes = {}
            for name in NEIGHBOURS:
                nodes[name] = await stack.enter_async_context(
                    open_node(
                        name,
                        bind=where[name],
                        peers={"centre": where["centre"]},
                        compute=lambda name=name: Neighbour(name, log),  # type: ignore[misc]
                    )
                )
            await centre.wait_all_up()

            print(f"the centre node sends {PER_PEER} cells to each of {len(NEIGHBOURS)} peers\n")
            serial_time = await serial(centre)
            print(f"[Q6] serially:     {PER_PEER * 4} sends, one at a time:  {serial_time:.3f} s")
            concurrent_time, in_flight, acks = await concurrent(centre)
            print(
                f"[Q6] concurrently: {PER_PEER * 4} sends, {in_flight} in flight at once: "
                f"{concurrent_time:.3f} s ({serial_time / concurrent_time:.1f}x faster)"
            )
            assert in_flight == PER_PEER * len(NEIGHBOURS)

            print("\n[Q3/Q4] message ids and confirmations (the first two per peer; each link")
            print("        numbers its messages 1, 2, 3, ..., so these follow the serial round):")
            for handle, ack in acks:
                assert (ack.peer, ack.seq, ack.stream_seq) == (
                    handle.peer,
                    handle.seq,
                    handle.stream_seq,
                )
                if ack.stream_seq <= 2:
                    print(
                        f"    to {handle.peer:<5} message id #{handle.seq:<3} -> ACK #{ack.seq:<3} "
                        f"from {ack.peer:<5}: {ack.result!r}"
                    )
            # Q4: each neighbour saw only its own cells, and its ACK carried its name.
            for name in NEIGHBOURS:
                mine = [p for (who, _, _, p) in log if who == name]
                assert all(p["to"] == name for p in mine)
                assert len(mine) == 2 * PER_PEER
            assert all(ack.result.startswith(f"{ack.peer} took") for _, ack in acks)
            # The id the receiver saw is the id the sender's handle had.
            seen_ids = {(who, seq) for (who, _, seq, _) in log}
            assert all((h.peer, h.seq) in seen_ids for h, _ in acks)
            print("    every ACK matched its message id, and came from the addressed peer only")

            print("\n[Q5] fan-in: every neighbour sends to the centre at the same time")
            async with trio.open_nursery() as nursery:
                for node in nodes.values():
                    for cell in range(3):
                        nursery.start_soon(
                            partial(node.send, "centre", payload_for("centre", cell), timeout=5)
                        )
            senders = sorted({str(peer) for (_, peer, _, _) in centre_log})
            print(f"    the centre's one ROUTER took {len(centre_log)} messages from {senders}")
            assert senders == sorted(NEIGHBOURS)
            assert len(centre_log) == 3 * len(NEIGHBOURS)

            print(f"\n[Q6] backpressure: max_in_flight={MAX_IN_FLIGHT} per link")
            refused_at, peak = await backpressure(centre)
            print(
                f"    send_nowait raised trio.WouldBlock at message {refused_at + 1}; "
                f"with wait_window the peak in flight stayed at {peak}"
            )
            assert refused_at == MAX_IN_FLIGHT
            assert peak <= MAX_IN_FLIGHT

            stats = centre.statistics()
            totals = [
                (str(p), s.protocol.sent, s.protocol.acked, s.protocol.resent)
                for p, s in sorted(stats.links.items())
            ]
            print("\n    centre's links (peer, sent, acked, resent):", totals)
            assert all(sent == acked for (_, sent, acked, _) in totals)
    print("\nOK: concurrent one-to-one sends, each confirmed by its own id")


if __name__ == "__main__":
    trio.run(main)
    sys.exit(0)
