"""Transport benchmark: our Trio-driven zmq Socket against blocking pyzmq.

Two processes on tcp loopback, same socket types and options for every
driver (a ROUTER here, a DEALER in a child process), one driver at a time:

* one-way throughput: the child sends N 64-byte messages, this process
  counts them; msgs/s from the first to the last message;
* lockstep round trip: this process sends one 64-byte message, the child
  echoes it, repeat; p50 and p99 per repetition.

Drivers: ``pyzmq`` (blocking calls), ``trio-nowait`` (the owner-task drain
loop the node's I/O task uses: ``_nowait`` calls plus ``wait_ready``, which
polls for up to ``--spin`` seconds before it parks, as the node does:
default ``NodeConfig.spin``, 0 parks at once),
``trio-async`` (``await send_multipart`` / ``recv_multipart``) and
``trio-floor``: not our code at all, the least any Trio glue must do
(NOBLOCK pyzmq calls, ``EVENTS``, ``trio.lowlevel.wait_readable(ZMQ_FD)``),
so the run shows how much of the gap to blocking pyzmq is Trio's own. Each
figure is the median over the repetitions, after one warm-up repetition.
The round trip runs in ``--rounds`` rounds in which the drivers take turns;
its ratio to pyzmq is the median of the per-round ratios, so a burst of
load on the shared machine hits both sides of a ratio.

Run: ``make bench`` or ``.venv/bin/python bench/transport.py``; writes
``bench/results/transport.json``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

# This file is named like the package it measures: put the repository root,
# not this directory, first on the path so ``import transport`` finds the
# package (and ``bench._common`` the helpers).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import trio  # noqa: E402
import zmq  # noqa: E402

from actors import NodeConfig  # noqa: E402
from bench._common import machine_info, median, percentile, print_table, write_json  # noqa: E402
from transport import Socket, dealer_socket, router_socket  # noqa: E402

DRIVERS = ("pyzmq", "trio-nowait", "trio-async", "trio-floor")
PAYLOAD = bytes(range(64))
PEER_ID = b"bench-peer"
THROUGHPUT_N = 100_000
LATENCY_N = 2_000
REPS = 5
#: Rounds of the round-trip test, the drivers taking turns in each.
ROUNDS = 3
#: No single blocking call may hang the run: pyzmq's own receive timeout (ms).
BLOCKING_TIMEOUT_MS = 20_000
#: Bound on each driver's whole measurement, so ``make bench`` always ends.
RUN_DEADLINE = 40.0

#: ``--spin``: seconds ``trio-nowait`` polls before parking (the node's default).
_SPIN = [NodeConfig().spin]

Ctx = zmq.Context[zmq.Socket[bytes]]


# -- the child process: a DEALER that sends bursts or echoes ------------------


def _peer(driver: str, test: str, endpoint: str, n: int, reps: int) -> None:
    ctx: Ctx = zmq.Context()
    sock = dealer_socket(ctx, routing_id=PEER_ID)
    sock.connect(endpoint)
    try:
        if driver == "pyzmq":
            _peer_blocking(sock.zmq_socket, test, n, reps)
        else:
            trio.run(_peer_trio, sock, driver, test, n, reps)
    finally:
        sock.close()
        ctx.term()


def _peer_blocking(zs: zmq.Socket[bytes], test: str, n: int, reps: int) -> None:
    zs.setsockopt(zmq.RCVTIMEO, BLOCKING_TIMEOUT_MS)
    zs.send_multipart([b"hello"])
    message = [PAYLOAD]
    for _ in range(reps):
        if test == "throughput":
            for _ in range(n):
                zs.send_multipart(message)
            zs.recv_multipart()  # "next": the parent has counted this burst
        else:
            for _ in range(n):
                zs.send_multipart(zs.recv_multipart())


async def _peer_trio(sock: Socket, driver: str, test: str, n: int, reps: int) -> None:
    message = [PAYLOAD]
    with trio.fail_after(RUN_DEADLINE):
        await sock.send_multipart([b"hello"])
        for _ in range(reps):
            if driver == "trio-floor":
                await _peer_floor(sock.zmq_socket, test, n)
            elif test == "throughput" and driver == "trio-nowait":
                sent = 0
                while sent < n:
                    try:
                        sock.send_multipart_nowait(message)
                    except trio.WouldBlock:
                        await sock.wait_ready(readable=False, writable=True, spin=_SPIN[0])
                        continue
                    sent += 1
                await sock.recv_multipart()
            elif test == "throughput":
                for _ in range(n):
                    await sock.send_multipart(message)
                await sock.recv_multipart()
            elif driver == "trio-nowait":
                for _ in range(n):
                    sock.send_multipart_nowait(await _recv_owner(sock))
            else:
                for _ in range(n):
                    await sock.send_multipart(await sock.recv_multipart())


async def _peer_floor(zs: zmq.Socket[bytes], test: str, n: int) -> None:
    fd = cast(int, zs.getsockopt(zmq.FD))
    if test == "throughput":
        for _ in range(n):
            await _send_floor(zs, fd, [PAYLOAD])
        await _recv_floor(zs, fd)
    else:
        for _ in range(n):
            await _send_floor(zs, fd, await _recv_floor(zs, fd))


async def _recv_floor(zs: zmq.Socket[bytes], fd: int) -> list[bytes]:
    """The least a Trio receive can do: NOBLOCK, EVENTS, sleep on the fd."""
    while True:
        try:
            return zs.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            if not cast(int, zs.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                await trio.lowlevel.wait_readable(fd)


async def _send_floor(zs: zmq.Socket[bytes], fd: int, message: list[bytes]) -> None:
    while True:
        try:
            zs.send_multipart(message, zmq.NOBLOCK)
            return
        except zmq.Again:
            if not cast(int, zs.getsockopt(zmq.EVENTS)) & zmq.POLLOUT:
                await trio.lowlevel.wait_readable(fd)


async def _recv_owner(sock: Socket) -> list[bytes]:
    """Receive the way an owner task does: nowait first, sleep only if empty."""
    while True:
        try:
            return sock.recv_multipart_nowait()
        except trio.WouldBlock:
            await sock.wait_ready(spin=_SPIN[0])


# -- this process: the ROUTER that counts and times ---------------------------


def _main_blocking(zs: zmq.Socket[bytes], test: str, n: int, reps: int) -> list[Any]:
    zs.setsockopt(zmq.RCVTIMEO, BLOCKING_TIMEOUT_MS)
    zs.recv_multipart()  # hello: the peer is connected and routable
    results: list[Any] = []
    message = [PEER_ID, PAYLOAD]
    for _ in range(reps):
        if test == "throughput":
            zs.recv_multipart()
            start = time.perf_counter()
            for _ in range(n - 1):
                zs.recv_multipart()
            results.append((n - 1) / (time.perf_counter() - start))
            zs.send_multipart([PEER_ID, b"next"])
        else:
            rtts = []
            for _ in range(n):
                t0 = time.perf_counter_ns()
                zs.send_multipart(message)
                zs.recv_multipart()
                rtts.append((time.perf_counter_ns() - t0) / 1000.0)
            results.append(rtts)
    return results


async def _main_trio(sock: Socket, driver: str, test: str, n: int, reps: int) -> list[Any]:
    zs = sock.zmq_socket
    fd = cast(int, zs.getsockopt(zmq.FD))
    recv: Callable[[], Awaitable[list[bytes]]]
    if driver == "trio-floor":
        recv = lambda: _recv_floor(zs, fd)  # noqa: E731
    elif driver == "trio-nowait":
        recv = lambda: _recv_owner(sock)  # noqa: E731
    else:
        recv = sock.recv_multipart
    results: list[Any] = []
    message = [PEER_ID, PAYLOAD]
    with trio.fail_after(RUN_DEADLINE):
        await recv()
        for _ in range(reps):
            if test == "throughput":
                await recv()
                start = time.perf_counter()
                for _ in range(n - 1):
                    await recv()
                results.append((n - 1) / (time.perf_counter() - start))
                await sock.send_multipart([PEER_ID, b"next"])
            else:
                rtts = []
                for _ in range(n):
                    t0 = time.perf_counter_ns()
                    if driver == "trio-floor":
                        await _send_floor(zs, fd, message)
                    elif driver == "trio-nowait":
                        sock.send_multipart_nowait(message)
                    else:
                        await sock.send_multipart(message)
                    await recv()
                    rtts.append((time.perf_counter_ns() - t0) / 1000.0)
                results.append(rtts)
    return results


def _measure(driver: str, test: str, n: int, reps: int) -> list[Any]:
    """One driver, one test, in a fresh peer process; the warm-up rep dropped."""
    ctx: Ctx = zmq.Context()
    router = router_socket(ctx)
    endpoint = router.bind("tcp://127.0.0.1:*")
    argv = [sys.executable, __file__, "--spin", str(_SPIN[0])]
    argv += ["--peer", driver, test, endpoint, str(n), str(reps + 1)]
    peer = subprocess.Popen(argv)
    try:
        if driver == "pyzmq":
            results = _main_blocking(router.zmq_socket, test, n, reps + 1)
        else:
            results = trio.run(_main_trio, router, driver, test, n, reps + 1)
        if peer.wait(timeout=RUN_DEADLINE) != 0:
            raise RuntimeError(f"{driver} {test} peer exited with {peer.returncode}")
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
        router.close()
        ctx.term()
    return results[1:]


def _ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=REPS)
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help="alternating rounds of the round-trip test"
    )
    parser.add_argument("--throughput-n", type=int, default=THROUGHPUT_N)
    parser.add_argument("--latency-n", type=int, default=LATENCY_N)
    parser.add_argument(
        "--spin",
        type=float,
        default=_SPIN[0],
        metavar="SECONDS",
        help="how long trio-nowait polls before parking (default: NodeConfig.spin; 0: never)",
    )
    parser.add_argument("--peer", nargs=5, metavar=("DRIVER", "TEST", "ENDPOINT", "N", "REPS"))
    args = parser.parse_args()
    _SPIN[0] = args.spin
    if args.peer:
        driver, test, endpoint, n, reps = args.peer
        _peer(driver, test, endpoint, int(n), int(reps))
        return

    began = time.perf_counter()
    throughput: dict[str, dict[str, Any]] = {}
    latency: dict[str, dict[str, Any]] = {}
    for driver in DRIVERS:
        rates = _measure(driver, "throughput", args.throughput_n, args.reps)
        throughput[driver] = {"runs_msgs_per_s": rates, "median_msgs_per_s": median(rates)}
    # Round trips are what the load of a shared machine moves most (pyzmq's
    # own p50 ranged 59-160 µs between runs of one afternoon), so the drivers
    # take turns, round after round, and each ratio is taken within a round.
    p50s: dict[str, list[float]] = {driver: [] for driver in DRIVERS}
    p99s: dict[str, list[float]] = {driver: [] for driver in DRIVERS}
    round_p50: list[dict[str, float]] = []
    for _ in range(args.rounds):
        this_round: dict[str, float] = {}
        for driver in DRIVERS:
            reps = _measure(driver, "latency", args.latency_n, args.reps)
            p50s[driver] += [percentile(r, 50) for r in reps]
            p99s[driver] += [percentile(r, 99) for r in reps]
            this_round[driver] = median([percentile(r, 50) for r in reps])
        round_p50.append(this_round)
    for driver in DRIVERS:
        latency[driver] = {
            "runs_p50_us": p50s[driver],
            "runs_p99_us": p99s[driver],
            "median_p50_us": median(p50s[driver]),
            "median_p99_us": median(p99s[driver]),
            "round_ratios_p50": [_ratio(r[driver], r["pyzmq"]) for r in round_p50],
        }

    base_rate = throughput["pyzmq"]["median_msgs_per_s"]
    ratios = {
        driver: {
            "throughput": _ratio(throughput[driver]["median_msgs_per_s"], base_rate),
            # The median of the per-round ratios: each compares drivers that
            # ran back to back under the same load.
            "rtt_p50": median(latency[driver]["round_ratios_p50"]),
        }
        for driver in DRIVERS
    }
    rows = [
        [
            driver,
            throughput[driver]["median_msgs_per_s"],
            ratios[driver]["throughput"],
            latency[driver]["median_p50_us"],
            latency[driver]["median_p99_us"],
            ratios[driver]["rtt_p50"],
        ]
        for driver in DRIVERS
    ]
    print_table(
        f"Transport, tcp loopback, 64-byte messages, median of {args.reps} reps"
        f" ({args.rounds} alternating rounds of them for the round trip;"
        " its ratio is the median of the per-round ratios)",
        ["driver", "one-way msgs/s", "x pyzmq", "rtt p50 us", "rtt p99 us", "x pyzmq"],
        rows,
    )
    goals = {
        "trio-nowait throughput >= 0.6x pyzmq": ratios["trio-nowait"]["throughput"] >= 0.6,
        "trio-nowait rtt p50 <= 1.3x pyzmq": ratios["trio-nowait"]["rtt_p50"] <= 1.3,
        "trio-async rtt p50 <= 1.3x pyzmq": ratios["trio-async"]["rtt_p50"] <= 1.3,
    }
    for goal, met in goals.items():
        print(f"  {'met ' if met else 'MISS'} {goal}")
    floor = ratios["trio-floor"]["rtt_p50"]
    print(
        f"  Trio's own floor (wait_readable on ZMQ_FD, no cellmesh code): rtt p50 "
        f"{floor:.2f}x pyzmq; trio-nowait is {_ratio(ratios['trio-nowait']['rtt_p50'], floor):.2f}x"
        " that floor"
    )
    elapsed = time.perf_counter() - began
    path = write_json(
        "transport",
        {
            "machine": {
                **machine_info(),
                "pyzmq": zmq.__version__,
                "libzmq": zmq.zmq_version(),
                "trio": trio.__version__,
            },
            "params": {
                "spin": _SPIN[0],
                "payload_bytes": len(PAYLOAD),
                "throughput_n": args.throughput_n,
                "latency_n": args.latency_n,
                "reps": args.reps,
                "latency_rounds": args.rounds,
                "warmup_reps": 1,
            },
            "throughput": throughput,
            "latency": latency,
            "ratios_vs_pyzmq": ratios,
            "goals": goals,
            "elapsed_s": elapsed,
        },
    )
    print(f"\n  {elapsed:.1f} s; results in {path}")


if __name__ == "__main__":
    main()
