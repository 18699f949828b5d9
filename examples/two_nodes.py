"""Two processes on 127.0.0.1 talking through cellmesh's Trio zmq sockets.

``make demo`` runs this until the grid demo exists. This script starts two
copies of itself:

* node A binds a ROUTER on ``tcp://127.0.0.1:*`` and answers every numbered
  request. It is written the way the node's socket actors are: one owner
  task drains the socket with the ``_nowait`` calls and sleeps in
  ``wait_ready``;
* node B connects a DEALER and sends the numbered requests one at a time,
  checking every reply, with the simple ``await send_multipart`` /
  ``await recv_multipart`` calls.

Then it prints what happened and ``OK``, or exits non-zero.

Usage: ``python examples/two_nodes.py [--messages N]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from typing import Any

import trio
import zmq

from transport import Socket, dealer_socket, router_socket

NODE_B_ID = b"node-b"
#: Bound on the whole demo, so a broken build fails instead of hanging.
DEADLINE = 30.0


# -- node A: the ROUTER ---------------------------------------------------------


async def node_a() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    async with router_socket(ctx) as sock:
        # The parent reads this line to learn where node B should connect.
        print("ENDPOINT", sock.bind("tcp://127.0.0.1:*"), flush=True)
        with trio.fail_after(DEADLINE):
            report = await _serve(sock)
        report["socket"] = _stats(sock)
    ctx.term()
    print(json.dumps(report), flush=True)


async def _serve(sock: Socket) -> dict[str, Any]:
    """Answer ``ping <n>`` with ``pong <n>`` until a peer says ``bye``."""
    expected: dict[bytes, int] = {}
    in_order = True
    answered = 0
    while True:
        try:
            peer, verb, *rest = sock.recv_multipart_nowait()
        except trio.WouldBlock:
            await sock.wait_ready()
            continue
        if verb == b"bye":
            return {"answered": answered, "in_order": in_order, "peers": len(expected)}
        number = int(rest[0])
        in_order = in_order and number == expected.get(peer, 0)
        expected[peer] = number + 1
        # Lockstep peers never fill the queue; a real actor would keep the
        # reply and retry after wait_ready(writable=True) on WouldBlock.
        sock.send_multipart_nowait([peer, b"pong", rest[0]])
        answered += 1


# -- node B: the DEALER ---------------------------------------------------------


async def node_b(endpoint: str, messages: int) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    rtts_us: list[float] = []
    in_order = True
    async with dealer_socket(ctx, routing_id=NODE_B_ID) as sock:
        sock.connect(endpoint)
        with trio.fail_after(DEADLINE):
            for n in range(messages):
                start = time.perf_counter()
                await sock.send_multipart([b"ping", b"%d" % n])
                reply = await sock.recv_multipart()
                rtts_us.append((time.perf_counter() - start) * 1e6)
                in_order = in_order and reply == [b"pong", b"%d" % n]
            await sock.send_multipart([b"bye"])
        report = {
            "sent": messages,
            "replies": len(rtts_us),
            "in_order": in_order,
            "rtt_median_us": statistics.median(rtts_us),
            "rtt_max_us": max(rtts_us),
            "socket": _stats(sock),
        }
    ctx.term()
    print(json.dumps(report), flush=True)


def _stats(sock: Socket) -> dict[str, int]:
    stats = sock.statistics()
    return {"sent": stats.messages_sent, "received": stats.messages_received}


# -- the parent: start both, tell the story ----------------------------------------


async def parent(messages: int) -> bool:
    me = [sys.executable, __file__]
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            # run_process under nursery.start hands back the Process, raises
            # if node A exits non-zero, and kills it if the demo is cancelled.
            a_proc: trio.Process = await nursery.start(
                partial(trio.run_process, [*me, "--role", "a"], stdout=subprocess.PIPE)
            )
            a_out = _Lines(a_proc)
            endpoint = (await a_out.next_line()).split()[1]
            print("cellmesh transport demo: two processes on 127.0.0.1")
            print(f"  node A (pid {a_proc.pid}) ROUTER bound at {endpoint}")
            b = await trio.run_process(
                [*me, "--role", "b", "--endpoint", endpoint, "--messages", str(messages)],
                capture_stdout=True,
            )
            a = json.loads(await a_out.next_line())
    b_report = json.loads(b.stdout)
    print(f"  node B DEALER {NODE_B_ID.decode()!r} connected, sent {messages} numbered pings")
    print(
        f"  B got {b_report['replies']} pongs, "
        f"{'all' if b_report['in_order'] else 'NOT all'} matching and in order"
    )
    print(
        f"  A answered {a['answered']} pings from {a['peers']} peer(s), "
        f"{'in order' if a['in_order'] else 'OUT OF ORDER'}"
    )
    print(
        f"  round trip: median {b_report['rtt_median_us']:.0f} us, "
        f"max {b_report['rtt_max_us']:.0f} us"
    )
    print(
        f"  socket counters: A sent {a['socket']['sent']} / received {a['socket']['received']}, "
        f"B sent {b_report['socket']['sent']} / received {b_report['socket']['received']}"
    )
    return bool(
        b_report["replies"] == messages
        and b_report["in_order"]
        and a["answered"] == messages
        and a["in_order"]
    )


class _Lines:
    """Read a child's stdout line by line."""

    def __init__(self, proc: trio.Process) -> None:
        assert proc.stdout is not None
        self._stream = proc.stdout
        self._buffer = b""

    async def next_line(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                raise RuntimeError("child process ended before writing its line")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description="Two cellmesh nodes exchange messages.")
    parser.add_argument("--messages", type=_positive, default=1000)
    parser.add_argument("--role", choices=["a", "b"], help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "a":
        trio.run(node_a)
        return 0
    if args.role == "b":
        trio.run(node_b, args.endpoint, args.messages)
        return 0
    ok = trio.run(parent, args.messages)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
