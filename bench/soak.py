"""Soak benchmark: a million confirmed messages, both nodes' memory sampled as they go.

Two processes on tcp loopback. This process opens node "a" and sends 64-byte
payloads to node "b" in a child process, keeping the window full with
``await wait_window`` + ``send_nowait``; b's compute actor checks that each
message is the next of its stream and answers ACK. Every ``--every``
messages the sender lets its window drain, so that every sample sees the
same protocol state (nothing in flight); then both processes collect garbage
and report their RSS (``/proc/self/statm``) and live pymalloc blocks
(``sys.getallocatedblocks()``), and b its receiving state (cached answers,
messages held). Samples before ``--warm-up`` messages only warm up; the
summary gives each node's growth from the first sample after it to the last.

Run: ``.venv/bin/python bench/soak.py`` (about a minute on 2 cores); writes
``bench/results/soak.json``. ``--messages`` and ``--every`` shorten it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

# Run as a script, this directory would come first on the path and
# ``import transport`` would find bench/transport.py instead of the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import trio  # noqa: E402
import zmq  # noqa: E402

from actors import Actor, Delivery, SendHandle, open_node  # noqa: E402
from bench._common import machine_info, print_table, write_json  # noqa: E402
from transport import NodeId  # noqa: E402

PAYLOAD = bytes(range(64))
MESSAGES = 1_000_000
EVERY = 50_000
WARM_UP = 100_000
#: Bound on the whole run, so it always ends.
RUN_DEADLINE = 900.0
_PAGE = os.sysconf("SC_PAGE_SIZE")
_MIB = 1024 * 1024


def _memory() -> dict[str, int]:
    """This process's RSS and live pymalloc blocks, after a full collection."""
    gc.collect()
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * _PAGE
    return {"rss": rss, "blocks": sys.getallocatedblocks()}


class _Lines:
    """Newline-terminated lines from a Trio receive stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def readline(self) -> str:
        """The next line without its newline; "" at end of stream."""
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                return ""
            self._buffer += chunk
        line, _, rest = self._buffer.partition(b"\n")
        self._buffer = bytearray(rest)
        return line.decode()


# -- the child process: node "b" ------------------------------------------------


class _InOrder(Actor[Delivery, None]):
    """b's compute actor: every message must be the next of its stream."""

    def __init__(self, count: list[int]) -> None:
        self._count = count

    async def receive(self, msg: Delivery) -> None:
        if msg.stream_seq != self._count[0] + 1:
            raise RuntimeError(f"got #{msg.stream_seq} after #{self._count[0]}")
        self._count[0] += 1


async def _serve() -> None:
    """Run node b; answer each "sample" line on stdin with one JSON line."""
    count = [0]
    stdin = _Lines(trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())))
    with trio.fail_after(RUN_DEADLINE):
        async with open_node(
            "b", bind="tcp://127.0.0.1:*", peers={"a": None}, compute=lambda: _InOrder(count)
        ) as node:
            print(node.endpoint, flush=True)
            while await stdin.readline() == "sample":
                stats = node.statistics().inbound.protocol
                [session] = stats.sessions
                report = {
                    **_memory(),
                    "delivered": count[0],
                    "cached_answers": session.cached_answers,
                    "held": session.held,
                }
                print(json.dumps(report), flush=True)


# -- this process: node "a" -----------------------------------------------------


async def _soak(messages: int, every: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    samples: list[dict[str, Any]] = []
    child = await trio.lowlevel.open_process(
        [sys.executable, __file__, "--child"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdin is not None
    assert child.stdout is not None
    replies = _Lines(child.stdout)
    try:
        with trio.fail_after(RUN_DEADLINE):
            endpoint = await replies.readline()
            async with open_node("a", bind="tcp://127.0.0.1:*", peers={"b": endpoint}) as node:
                # Only unanswered handles are kept, so the sender's own
                # bookkeeping cannot grow with the run.
                pending: deque[SendHandle] = deque()
                started = last = time.perf_counter()
                for sent in range(1, messages + 1):
                    await node.wait_window("b")
                    pending.append(node.send_nowait("b", PAYLOAD, stream="soak"))
                    while pending and pending[0].done:
                        await pending.popleft().wait()
                    if sent % every:
                        continue
                    while pending:
                        await pending.popleft().wait()
                    now = time.perf_counter()
                    await child.stdin.send_all(b"sample\n")
                    b_report = json.loads(await replies.readline())
                    link = node.statistics().links[NodeId("b")].protocol
                    samples.append(
                        {
                            "sent": sent,
                            "elapsed_s": now - started,
                            "msgs_per_s": every / (now - last),
                            "a": {**_memory(), "in_flight": link.in_flight},
                            "b": b_report,
                        }
                    )
                    _print_sample(samples[-1])
                    last = time.perf_counter()
                stats = node.statistics().links[NodeId("b")].protocol
                counters = {
                    "acked": stats.acked,
                    "erred": stats.erred,
                    "resent": stats.resent,
                    "retry_later": stats.retry_later,
                    "gave_up": stats.gave_up,
                }
    finally:
        await child.stdin.aclose()
        with trio.move_on_after(10):
            await child.wait()
        if child.returncode is None:
            child.kill()
            await child.wait()
    return samples, counters


def _print_sample(s: dict[str, Any]) -> None:
    print(
        f"  {s['sent']:>9,} sent  {s['msgs_per_s']:>7,.0f} msgs/s"
        f"  a {s['a']['rss'] / _MIB:6.2f} MiB  b {s['b']['rss'] / _MIB:6.2f} MiB",
        flush=True,
    )


def _growth(samples: list[dict[str, Any]], warm_up: int) -> dict[str, Any]:
    """Each node's growth from the first sample after warm-up to the last."""
    measured = [s for s in samples if s["sent"] >= warm_up]
    first, last = measured[0], measured[-1]
    span = last["sent"] - first["sent"]
    out: dict[str, Any] = {"from_sent": first["sent"], "to_sent": last["sent"]}
    for node in ("a", "b"):
        rss = last[node]["rss"] - first[node]["rss"]
        peak = max(s[node]["rss"] for s in measured) - first[node]["rss"]
        blocks = last[node]["blocks"] - first[node]["blocks"]
        out[node] = {
            "rss_bytes": rss,
            "rss_peak_bytes": peak,
            "blocks": blocks,
            "rss_bytes_per_message": rss / span if span else 0.0,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--every", type=int, default=EVERY)
    parser.add_argument("--warm-up", type=int, default=WARM_UP)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        trio.run(_serve)
        return
    if args.messages < args.warm_up + 2 * args.every:
        parser.error("--messages must leave at least two samples after --warm-up")

    print(f"Soak: {args.messages:,} messages, a sample every {args.every:,}")
    samples, counters = trio.run(_soak, args.messages, args.every)
    growth = _growth(samples, args.warm_up)
    print_table(
        "RSS and live pymalloc blocks vs messages sent (window drained at each sample)",
        ["sent", "msgs/s", "a RSS MiB", "a blocks", "b RSS MiB", "b blocks", "b cached"],
        [
            [
                s["sent"],
                s["msgs_per_s"],
                s["a"]["rss"] / _MIB,
                s["a"]["blocks"],
                s["b"]["rss"] / _MIB,
                s["b"]["blocks"],
                s["b"]["cached_answers"],
            ]
            for s in samples
        ],
    )
    print_table(
        f"Growth from {growth['from_sent']:,} to {growth['to_sent']:,} messages sent",
        ["node", "RSS KiB", "peak RSS KiB", "blocks", "RSS bytes/msg"],
        [
            [
                node,
                growth[node]["rss_bytes"] / 1024,
                growth[node]["rss_peak_bytes"] / 1024,
                growth[node]["blocks"],
                growth[node]["rss_bytes_per_message"],
            ]
            for node in ("a", "b")
        ],
    )
    print(f"  link counters: {counters}")
    elapsed = samples[-1]["elapsed_s"]
    path = write_json(
        "soak",
        {
            "machine": {
                **machine_info(),
                "pyzmq": zmq.__version__,
                "libzmq": zmq.zmq_version(),
                "trio": trio.__version__,
            },
            "params": {
                "messages": args.messages,
                "every": args.every,
                "warm_up": args.warm_up,
                "payload_bytes": len(PAYLOAD),
            },
            "samples": samples,
            "growth": growth,
            "link_counters": counters,
            "msgs_per_s": args.messages / elapsed,
            "elapsed_s": elapsed,
        },
    )
    print(f"\n  {args.messages / elapsed:,.0f} msgs/s over {elapsed:.1f} s; results in {path}")


if __name__ == "__main__":
    main()
