"""Sparse messages: the CPU one confirmed message costs when messages do not stream.

The grid demo swaps halos once per ``depth`` frames: each node sends a few
8 KiB messages, waits for its neighbours' messages, confirms the previous
exchange's sends, then computes for a while with the event loop blocked.
Nothing is batched, every message pays its full per-message cost. This
harness reproduces that pattern between two node processes, "a" (this
process) and "b" (a child), over tcp loopback:

* a round: send ``K`` messages of ``SIZE`` bytes to the peer
  (``send_nowait``), wait until the compute actor has filed the peer's ``K``
  messages of the same round (an inbox, as the demo's ``_HaloActor``), await
  the previous round's handles, then a gap: ``busy`` blocks the event loop
  for ``GAP`` ms (the demo's compute steps), ``sleep`` idles in
  ``trio.sleep`` (timers may fire), ``none`` goes straight on;
* both nodes measure ``time.process_time()`` (all threads, the ZMQ I/O
  thread included) over the timed rounds, minus the busy gaps' own CPU, and
  count Trio task steps and I/O waits with an instrument;
* per message = per round / K: the node both sent and received K confirmed
  messages, so this is the demo's "CPU per halo per neighbour per exchange".

Run: ``.venv/bin/python bench/sparse.py [--rounds 400] [--gap-ms 5] [--mode busy]``;
writes ``bench/results/sparse.json``. ``--by-task`` adds steps per round by
task name.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# Run as a script, this directory would come first on the path and
# ``import transport`` would find bench/transport.py instead of the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import trio  # noqa: E402

from actors import (  # noqa: E402
    Actor,
    Delivery,
    NodeConfig,
    open_node,
)
from bench._common import machine_info, median, print_table, write_json  # noqa: E402
from transport import (  # noqa: E402
    SenderConfig,
)

#: Rounds before the timed ones (connections, sessions, first allocations).
WARMUP = 20
#: Bound on a whole run, so it always ends.
RUN_DEADLINE = 300.0


class _Counter(trio.abc.Instrument):
    """Counts Trio task steps and I/O waits (the scheduler's passes).

    With ``by_task`` it also adds up the thread's CPU time inside each task's
    steps (by task name) and inside the I/O waits (the epoll syscall).
    """

    def __init__(self, by_task: bool) -> None:
        self.steps = 0
        self.io_waits = 0
        self.by_task: collections.Counter[str] | None = collections.Counter() if by_task else None
        self.cpu_by_task: collections.Counter[str] = collections.Counter()
        # None until a step or wait began under this instrument: the step
        # that adds it ends without having begun here.
        self._mark: float | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        if self.by_task is not None:
            self.by_task[_task_name(task)] += 1
            self._mark = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.by_task is not None and self._mark is not None:
            self.cpu_by_task[_task_name(task)] += time.thread_time() - self._mark

    def before_io_wait(self, timeout: float) -> None:
        self.io_waits += 1
        if self.by_task is not None:
            self._mark = time.thread_time()

    def after_io_wait(self, timeout: float) -> None:
        if self.by_task is not None and self._mark is not None:
            self.cpu_by_task["(I/O wait)"] += time.thread_time() - self._mark


def _task_name(task: trio.lowlevel.Task) -> str:
    return task.name.rsplit(".", 1)[-1]


class _Inbox:
    """Messages by round, with a wake-up when one arrives (as the demo's)."""

    def __init__(self) -> None:
        self.rounds: dict[int, int] = {}
        self.changed = trio.Event()

    def put(self, round_no: int) -> None:
        self.rounds[round_no] = self.rounds.get(round_no, 0) + 1
        self.changed.set()

    async def take(self, round_no: int, count: int) -> None:
        while self.rounds.get(round_no, 0) < count:
            self.changed = trio.Event()
            await self.changed.wait()
        del self.rounds[round_no]


class _Files(Actor[Any, None]):
    """The compute actor: copies each payload out and files it, like the demo's."""

    def __init__(self, inbox: _Inbox) -> None:
        self._inbox = inbox

    async def receive(self, msg: Any) -> None:
        if isinstance(msg, Delivery) and msg.frame_no is not None:
            bytes(msg.payload)
            self._inbox.put(msg.frame_no)


def _busy(seconds: float) -> float:
    """Block the event loop for ``seconds`` of CPU; return the CPU it took."""
    start = time.thread_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return time.thread_time() - start


async def _side(me: str, ports: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    peer = "b" if me == "a" else "a"
    inbox = _Inbox()
    # The demo's sender settings.
    config = NodeConfig(
        sender=SenderConfig(retry_timeout=0.1, retry_ceiling=0.5, send_timeout=120.0)
    )
    if args.spin is not None:
        config = replace(config, spin=args.spin)
    payload = bytes(args.size)
    counter = _Counter(args.by_task)
    with trio.fail_after(RUN_DEADLINE):
        async with open_node(
            me,
            bind=f"tcp://127.0.0.1:{ports[me]}",
            peers={peer: f"tcp://127.0.0.1:{ports[peer]}"},
            compute=lambda: _Files(inbox),
            config=config,
        ) as node:
            await node.wait_all_up()
            previous: list[Any] = []
            cpu: list[float] = []
            thread_cpu: list[float] = []
            steps: list[int] = []
            io_waits: list[int] = []
            total = WARMUP + args.rounds
            usage0: resource.struct_rusage | None = None
            for round_no in range(total):
                timed = round_no >= WARMUP
                if round_no == WARMUP:
                    trio.lowlevel.add_instrument(counter)
                    usage0 = resource.getrusage(resource.RUSAGE_SELF)
                c0 = time.process_time()
                t0 = time.thread_time()
                s0, w0 = counter.steps, counter.io_waits
                sent = [
                    node.send_nowait(peer, payload, stream="halo", frame_no=round_no)
                    for _ in range(args.k)
                ]
                await inbox.take(round_no, args.k)
                for handle in previous:
                    await handle.wait()
                previous = sent
                gap_cpu = 0.0
                if args.mode == "busy":
                    gap_cpu = _busy(args.gap_ms / 1000.0)
                elif args.mode == "sleep":
                    await trio.sleep(args.gap_ms / 1000.0)
                if timed:
                    cpu.append(time.process_time() - c0 - gap_cpu)
                    thread_cpu.append(time.thread_time() - t0 - gap_cpu)
                    steps.append(counter.steps - s0)
                    io_waits.append(counter.io_waits - w0)
            trio.lowlevel.remove_instrument(counter)
            usage1 = resource.getrusage(resource.RUSAGE_SELF)
            assert usage0 is not None
            for handle in previous:
                await handle.wait()
            # The peer may still wait for our ACK of its last messages.
            await trio.sleep(0.3)
            stats = node.statistics().links[node.peers[0]].protocol
            # What a progress report costs (the demo sends ten a second).
            c0 = time.process_time()
            for _ in range(100):
                node.statistics()
            statistics_us = (time.process_time() - c0) / 100 * 1e6
    by_task = {}
    cpu_by_task = {}
    if counter.by_task is not None:
        by_task = {name: count / args.rounds for name, count in counter.by_task.most_common()}
        cpu_by_task = {
            name: cpu / args.rounds * 1e6 for name, cpu in counter.cpu_by_task.most_common()
        }
    return {
        "node": me,
        "cpu_us_per_round_median": median(cpu) * 1e6,
        "cpu_us_per_round_mean": sum(cpu) / len(cpu) * 1e6,
        "thread_cpu_us_per_round_median": median(thread_cpu) * 1e6,
        "steps_per_round_median": median(steps),
        "io_waits_per_round_median": median(io_waits),
        "steps_by_task_per_round": by_task,
        "cpu_us_by_task_per_round": cpu_by_task,
        # Whole process over the timed rounds, busy gaps included (user time).
        "user_us_per_round": (usage1.ru_utime - usage0.ru_utime) / args.rounds * 1e6,
        "sys_us_per_round": (usage1.ru_stime - usage0.ru_stime) / args.rounds * 1e6,
        "ctx_switches_per_round": (
            usage1.ru_nvcsw - usage0.ru_nvcsw + usage1.ru_nivcsw - usage0.ru_nivcsw
        )
        / args.rounds,
        "statistics_us": statistics_us,
        "resent": stats.resent,
        "acked": stats.acked,
    }


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("-k", type=int, default=3, help="messages per round each way")
    parser.add_argument("--size", type=int, default=8192, help="payload bytes")
    parser.add_argument("--gap-ms", type=float, default=5.0)
    parser.add_argument("--mode", choices=("busy", "sleep", "none"), default="busy")
    parser.add_argument("--by-task", action="store_true")
    parser.add_argument(
        "--spin",
        type=float,
        default=None,
        metavar="SECONDS",
        help="NodeConfig.spin of both nodes (default: NodeConfig's; 0: never poll before parking)",
    )
    parser.add_argument("--no-json", action="store_true", help="print only")
    parser.add_argument("--child", nargs=2, metavar=("PORT_A", "PORT_B"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    """Run node a here and node b in a child process; print and save the table."""
    args = _parse()
    if args.child:
        ports = {"a": int(args.child[0]), "b": int(args.child[1])}
        print(json.dumps(trio.run(_side, "b", ports, args)), flush=True)
        return
    port_a, port_b = _free_ports(2)
    child_argv = [a for a in sys.argv[1:] if a != "--no-json"]
    child = subprocess.Popen(
        [sys.executable, __file__, *child_argv, "--child", str(port_a), str(port_b)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        mine = trio.run(_side, "a", {"a": port_a, "b": port_b}, args)
        out, _ = child.communicate(timeout=RUN_DEADLINE)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    theirs = json.loads(out.strip().splitlines()[-1])
    sides = [mine, theirs]
    rows = [
        [
            s["node"],
            s["cpu_us_per_round_median"],
            s["cpu_us_per_round_median"] / args.k,
            s["cpu_us_per_round_mean"] / args.k,
            s["thread_cpu_us_per_round_median"] / args.k,
            s["steps_per_round_median"] / args.k,
            s["io_waits_per_round_median"] / args.k,
            s["resent"],
        ]
        for s in sides
    ]
    print_table(
        f"Sparse messages: K={args.k} x {args.size} B each way per round, "
        f"{args.rounds} rounds, gap {args.gap_ms} ms ({args.mode})",
        [
            "node",
            "CPU µs/round",
            "CPU µs/msg p50",
            "CPU µs/msg mean",
            "main thread µs/msg",
            "task steps/msg",
            "I/O waits/msg",
            "resent",
        ],
        rows,
    )
    if args.by_task:
        for s in sides:
            top = ", ".join(
                f"{name} {n / args.k:.1f}"
                for name, n in list(s["steps_by_task_per_round"].items())[:10]
            )
            print(f"  {s['node']} steps/msg by task: {top}")
            top = ", ".join(
                f"{name} {us / args.k:.0f}"
                for name, us in list(s["cpu_us_by_task_per_round"].items())[:10]
            )
            print(f"  {s['node']} CPU µs/msg by task: {top}")
    for s in sides:
        print(
            f"  {s['node']} per msg (busy gaps included): "
            f"user {s['user_us_per_round'] / args.k:.0f} µs, "
            f"sys {s['sys_us_per_round'] / args.k:.0f} µs, "
            f"context switches {s['ctx_switches_per_round'] / args.k:.1f}; "
            f"node.statistics() {s['statistics_us']:.0f} µs"
        )
    if not args.no_json:
        path = write_json(
            "sparse",
            {
                "machine": machine_info(),
                "params": {
                    **{k: getattr(args, k) for k in ("rounds", "k", "size", "gap_ms", "mode")},
                    "spin": NodeConfig().spin if args.spin is None else args.spin,
                },
                "sides": sides,
            },
        )
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
