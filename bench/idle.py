"""What an idle node costs: CPU while its links only keep each other alive.

Two nodes in one process, linked both ways over tcp loopback, each link UP,
then nothing sent for ``--seconds``: the process's CPU time (all threads:
the Trio loop and libzmq's) over that wall time, as a share of one core.
Measured with polling before parking on (``NodeConfig.spin``'s default) and
off (``spin=0``), alternating ``--rounds`` times, so docs/performance.md can
say what the spin costs a node that has nothing to do. A third row keeps a
trickle going (one confirmed send each way every ``--trickle-ms``): a spin
is re-armed by each message that follows a short park, so this is where
polling could cost most.

Run: ``.venv/bin/python bench/idle.py``; writes ``bench/results/idle.json``.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

# Run as a script, this directory would come first on the path and
# ``import transport`` would find bench/transport.py instead of the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import trio  # noqa: E402

from actors import Actor, Delivery, NodeConfig, open_node  # noqa: E402
from bench._common import machine_info, median, print_table, write_json  # noqa: E402


class _Sink(Actor[Delivery, None]):
    async def receive(self, msg: Delivery) -> None:
        return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


async def _cpu_share(spin: float, seconds: float, trickle_ms: float) -> float:
    """The process's CPU seconds per wall second over ``seconds`` of idling (or trickling)."""
    config = replace(NodeConfig(), spin=spin)
    port_a, port_b = _free_ports(2)
    ends = {"a": f"tcp://127.0.0.1:{port_a}", "b": f"tcp://127.0.0.1:{port_b}"}
    async with (
        open_node("a", bind=ends["a"], peers={"b": ends["b"]}, compute=_Sink, config=config) as a,
        open_node("b", bind=ends["b"], peers={"a": ends["a"]}, compute=_Sink, config=config) as b,
    ):
        with trio.fail_after(10):
            await a.send("b", b"hello")  # both links are up
            await b.send("a", b"hello")
        cpu, wall = time.process_time(), time.perf_counter()
        end = trio.current_time() + seconds
        if trickle_ms:
            with trio.fail_after(seconds * 4 + 10):
                while trio.current_time() < end:
                    await a.send("b", b"tick")
                    await b.send("a", b"tock")
                    await trio.sleep(trickle_ms / 1000)
        else:
            await trio.sleep_until(end)
        return (time.process_time() - cpu) / (time.perf_counter() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0, help="idle time per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds, spin on/off")
    parser.add_argument("--trickle-ms", type=float, default=5.0, help="gap of the trickle row")
    args = parser.parse_args()
    spin = NodeConfig().spin
    cases = {
        f"idle, spin {spin * 1e6:.0f} µs": (spin, 0.0),
        "idle, spin off": (0.0, 0.0),
        f"trickle every {args.trickle_ms:g} ms, spin {spin * 1e6:.0f} µs": (spin, args.trickle_ms),
        f"trickle every {args.trickle_ms:g} ms, spin off": (0.0, args.trickle_ms),
    }
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (limit, trickle) in cases.items():
            runs[name].append(trio.run(_cpu_share, limit, args.seconds, trickle))
    rows = [
        [name, f"{100 * median(v):.2f}", f"{100 * min(v):.2f}-{100 * max(v):.2f}"]
        for name, v in runs.items()
    ]
    print_table(
        f"CPU of one process holding two linked nodes, {args.seconds:g} s each, "
        f"{args.rounds} alternating rounds",
        ["case", "% of a core, median", "range"],
        rows,
    )
    path = write_json(
        "idle",
        {
            "machine": machine_info(),
            "params": {
                "seconds": args.seconds,
                "rounds": args.rounds,
                "spin": spin,
                "trickle_ms": args.trickle_ms,
            },
            "cpu_share_runs": runs,
            "cpu_share_median": {name: median(v) for name, v in runs.items()},
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
