"""Every rank greets its neighbours: one program, whoever launches it.

    cellmesh run -n 3 -- python examples/hello_ranks.py
    cellmesh run --grid 2x3 -- python examples/hello_ranks.py
    mpiexec -n 3 python examples/hello_ranks.py

Each rank opens its node with ``open_node_from_env`` (its id, endpoint and
neighbours come from the launcher's environment), sends one greeting to every
neighbour, prints the greeting each neighbour sent it, and exits 0; or exits 1
if a neighbour stays silent for 30 s. Under ``cellmesh run`` every neighbour
of every rank is another rank of the job (all of them, or its 8 tile
neighbours with ``--grid``).
"""

from __future__ import annotations

import math
import sys

import trio

from actors import Actor, Delivery, Gap, open_node_from_env
from actors.launch import topology_from_env

#: Seconds to wait for the neighbours' greetings (they start within a second).
TIMEOUT = 30.0
#: Seconds to stay after the last greeting, so that a neighbour whose ACK from
#: us was lost gets its resend answered (guide.md, "Clean shutdown and linger").
LINGER = 1.0


class Greetings(Actor[Delivery | Gap, None]):
    """Hands each greeting to the main task."""

    def __init__(self, inbox: trio.MemorySendChannel[tuple[str, str]]) -> None:
        self._inbox = inbox

    async def receive(self, msg: Delivery | Gap) -> None:
        if isinstance(msg, Delivery):
            self._inbox.send_nowait((msg.peer, str(msg.payload)))


async def main() -> int:
    topology = topology_from_env()
    inbox, greetings = trio.open_memory_channel[tuple[str, str]](math.inf)
    async with open_node_from_env(compute=lambda: Greetings(inbox)) as node:
        rank = topology.rank_of(node.id)
        heard: dict[str, str] = {}
        with trio.move_on_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for peer in node.peers:
                    nursery.start_soon(node.send, peer, f"hello from rank {rank}")
                while len(heard) < len(node.peers):
                    peer, text = await greetings.receive()
                    heard[peer] = text
        for peer in node.peers:
            print(f"rank {rank} ({node.id}): {peer} says {heard.get(peer, 'nothing')!r}")
        silent = [peer for peer in node.peers if peer not in heard]
        if silent:
            print(f"rank {rank}: no greeting from {', '.join(silent)} in {TIMEOUT:.0f} s")
            return 1
        await trio.sleep(LINGER)
    print(f"rank {rank} of {len(topology)}: greeted by all {len(node.peers)} neighbours")
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
