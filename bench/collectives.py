"""Allreduce latency: N ranks in one Trio program over real ZeroMQ on 127.0.0.1.

Every rank opens a node on its own TCP port, linked to every other (a
group's members must be peers of one another), waits for its links, runs
``--warmup`` allreduces, then times ``--rounds`` back-to-back allreduces of
one float (``op="sum"``). One process means one core's worth of CPU for
all ranks: the numbers are an upper bound on what separate processes see.

    .venv/bin/python bench/collectives.py --ranks 4 16
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

# Run as a script, this directory would come first on the path and
# ``import transport`` would find bench/transport.py instead of the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import trio  # noqa: E402

from actors import NodeConfig, open_node  # noqa: E402
from bench._common import median, percentile, print_table  # noqa: E402
from transport import SenderConfig  # noqa: E402


def _free_ports(n: int) -> list[int]:
    """Ports below the ephemeral range (design.md §5), by asking the OS in turn."""
    ports: list[int] = []
    port = 21000
    while len(ports) < n:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                pass
            else:
                ports.append(port)
        port += 1
    return ports


async def _run(ranks: int, rounds: int, warmup: int) -> list[float]:
    ids = [f"r{i}" for i in range(ranks)]
    endpoints = {me: f"tcp://127.0.0.1:{p}" for me, p in zip(ids, _free_ports(ranks), strict=True)}
    times: list[float] = []
    config = NodeConfig(sender=SenderConfig(retry_timeout=0.2))

    async def rank(me: str) -> None:
        peers = {p: e for p, e in endpoints.items() if p != me}
        async with open_node(me, bind=endpoints[me], peers=peers, config=config) as node:
            await node.wait_all_up(timeout=30)
            for _ in range(warmup):
                await node.allreduce(1.0)
            await node.barrier()
            for _ in range(rounds):
                started = time.perf_counter()
                total = await node.allreduce(1.0)
                if me == "r0":
                    times.append(time.perf_counter() - started)
                assert total == float(ranks)
            await node.barrier()

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for me in ids:
                nursery.start_soon(rank, me)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    rows = []
    for n in args.ranks:
        times = trio.run(_run, n, args.rounds, args.warmup)
        ms = [t * 1000.0 for t in times]
        rows.append((n, args.rounds, median(ms), percentile(ms, 90), min(ms)))
    print_table(
        "allreduce of one float, op='sum', one process, tcp 127.0.0.1",
        ["ranks", "rounds", "median ms", "p90 ms", "min ms"],
        rows,
    )


if __name__ == "__main__":
    main()
