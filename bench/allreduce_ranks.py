"""Allreduce latency over separate processes: one rank per process, under ``cellmesh run``.

    .venv/bin/cellmesh run -n 64 -- .venv/bin/python bench/allreduce_ranks.py --rounds 20

Every rank opens its node from the launcher's environment (all ranks linked
to all, which a collective's group needs), passes a barrier, runs
``--warmup`` allreduces, then times ``--rounds`` back-to-back allreduces of
one float (``op="sum"``); rank 0 prints the median and the 90th percentile
of what it saw, and each rank's start-up (process start to past the
barrier) and file descriptors. ``bench/collectives.py`` runs the ranks in
one process instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Run as a script, this directory would come first on the path and
# ``import transport`` would find bench/transport.py instead of the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import trio  # noqa: E402

from actors import open_node_from_env  # noqa: E402
from actors.launch import topology_from_env  # noqa: E402
from bench._common import median, percentile  # noqa: E402

#: The launcher's wall clock when it started us is unknown; the process's own
#: start (from /proc) stands in for it.
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _process_age() -> float:
    """Seconds since this process started (Linux /proc)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / _CLK_TCK


def _elementwise_max(a: list[float], b: list[float]) -> list[float]:
    return [max(x, y) for x, y in zip(a, b, strict=True)]


async def main(rounds: int, warmup: int) -> None:
    ranks = list(topology_from_env().ids)
    async with open_node_from_env() as node:
        await node.wait_all_up(timeout=120)
        await node.barrier(group=ranks, timeout=120)
        ready = _process_age()
        for _ in range(warmup):
            await node.allreduce(1.0, group=ranks)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            total = await node.allreduce(1.0, group=ranks)
            times.append((time.perf_counter() - start) * 1000.0)
            assert total == len(ranks), total
        fds = len(os.listdir("/proc/self/fd")) - 1
        mine = [ready, fds, percentile(times, 90)]
        worst = await node.allreduce(mine, op=_elementwise_max, group=ranks)
        await trio.sleep(1.0)  # our last ACKs leave before the node closes
    if node.id == ranks[0]:
        print(
            f"{len(ranks)} ranks: allreduce median {median(times):.1f} ms, "
            f"p90 {percentile(times, 90):.1f} ms on rank 0 (worst rank's p90 {worst[2]:.1f} ms); "
            f"start-up {worst[0]:.1f} s, {worst[1]} fds at most per rank"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    opts = parser.parse_args()
    trio.run(main, opts.rounds, opts.warmup)
