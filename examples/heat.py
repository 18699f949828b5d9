"""Heat along a rod, a strip per rank: ``cellmesh run -n 3 -- python examples/heat.py``."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import trio

from actors import Actor, Delivery, Gap, open_node_from_env
from actors.launch import topology_from_env

CELLS, STEPS, K = 60, 200, 0.25
START = [100.0 if CELLS // 3 <= i < CELLS // 2 else 0.0 for i in range(CELLS)]


def step(u: list[float]) -> list[float]:  # u' = K u'' on all but u's first and last cell
    return [u[i] + K * (u[i - 1] - 2 * u[i] + u[i + 1]) for i in range(1, len(u) - 1)]


class Edges(Actor[Delivery | Gap, None]):  # queues end cells per sender, in send order
    def __init__(self, inbox: defaultdict[str, Any]) -> None:
        self.inbox = inbox

    async def receive(self, msg: Delivery | Gap) -> None:
        if isinstance(msg, Delivery):
            self.inbox[msg.peer][0].send_nowait(msg.payload)


async def main() -> int:
    ranks = list(topology_from_env().ids)
    inbox: defaultdict[str, Any] = defaultdict(lambda: trio.open_memory_channel(math.inf))
    async with open_node_from_env(compute=lambda: Edges(inbox)) as node:
        me, n = ranks.index(node.id), len(ranks)
        u = START[me * CELLS // n : (me + 1) * CELLS // n]
        left, right = ranks[me - 1] if me > 0 else None, ranks[me + 1] if me + 1 < n else None
        await node.barrier(group=ranks)  # every rank is up
        for _ in range(STEPS):
            async with trio.open_nursery() as nursery:  # both sends in flight at once
                for peer, edge in ((left, u[0]), (right, u[-1])):
                    if peer is not None:
                        nursery.start_soon(node.send, peer, edge)
            ghosts = [await inbox[p][1].receive() if p else 0.0 for p in (left, right)]
            u = step([ghosts[0], *u, ghosts[1]])
        hottest = await node.allreduce(max(u), op="max", group=ranks)
        strips = await node.gather(u, root=ranks[0], group=ranks)
    if strips is None:  # not rank 0
        return 0
    rod, serial = [x for strip in strips for x in strip], START
    for _ in range(STEPS):
        serial = step([0.0, *serial, 0.0])  # the rod's ends stay at 0
    same = rod == serial and hottest == max(serial)
    print(f"{'MATCH' if same else 'MISMATCH'}: {n} ranks, {STEPS} steps, {CELLS} cells, {rod=}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(trio.run(main))
