"""Durable node processes for tests/test_durable.py.

Run as::

    python tests/_durable_peer.py receiver --id b --bind ENDPOINT --peer a \\
        --journal FILE --effects FILE
    python tests/_durable_peer.py sender --id a --bind ENDPOINT --peer b=ENDPOINT \\
        --count N --acked FILE

The receiver opens a node with ``journal=FILE`` whose compute actor counts,
in its committed state, how many times it processed each number (payloads
are ints), and notes every gap it is told of. It also appends each number
to ``--effects`` as it processes it: a side effect outside the state, which
a kill may repeat. It prints
``READY <endpoint> <incarnation>`` once the node is open and runs until its
stdin closes.

The sender sends the numbers 0..N-1 that ``--acked`` does not list yet
(its earlier incarnations' ACKs), 256 in flight, appending each number to
``--acked`` (flushed) when its ACK arrives, and prints ``DONE`` when every
send is answered; then it waits for its stdin to close.

:func:`committed` and :func:`committed_counts` read the receiver's committed
state from its journal.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import IO, Any

import cbor2
import trio

from actors import Ack, Actor, Delivery, Gap, NodeConfig, SendHandle, open_node
from transport import ReceiverConfig, SenderConfig

#: Fast failure detection: a restarted peer is found within a heartbeat.
QUICK = SenderConfig(
    retry_timeout=0.1,
    retry_ceiling=0.4,
    heartbeat_interval=0.2,
    suspect_after=0.6,
    down_after=1.5,
    send_timeout=120.0,
)


def committed(journal: Path) -> dict[str, Any]:
    """The Counter's state as the journal's last commit holds it."""
    db = sqlite3.connect(journal)
    try:
        row = db.execute("SELECT blob FROM state WHERE id = 1").fetchone()
    finally:
        db.close()
    state: dict[str, Any] = {"counts": [], "gaps": []} if row is None else cbor2.loads(row[0])
    return state


def committed_counts(journal: Path) -> dict[int, int]:
    """Number -> times processed, as the journal's last commit holds it."""
    return dict(committed(journal)["counts"])


class Counter(Actor[Any, None]):
    """Counts each number it processes, and notes each gap; both are its durable state."""

    def __init__(self, effects: IO[str] | None = None) -> None:
        self.counts: dict[int, int] = {}
        self.gaps: list[list[Any]] = []
        self._effects = effects

    async def receive(self, msg: Any) -> None:
        if isinstance(msg, Gap):
            # The tests' streams lose nothing: a gap here is a bug they report.
            self.gaps.append([msg.stream, msg.first, msg.last, msg.reason])
            return
        assert isinstance(msg, Delivery)
        n = msg.payload
        assert isinstance(n, int)
        self.counts[n] = self.counts.get(n, 0) + 1
        if self._effects is not None:
            self._effects.write(f"{n}\n")

    def snapshot(self) -> dict[str, Any]:
        return {"counts": [[n, c] for n, c in self.counts.items()], "gaps": self.gaps}

    def restore(self, state: dict[str, Any]) -> None:
        self.counts = dict(state["counts"])
        self.gaps = state["gaps"]


async def _wait_stdin_closed() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while await stdin.receive_some(1024):
            pass


async def run_receiver(args: argparse.Namespace, effects: IO[str]) -> None:
    """Serve as the durable node ``args.id`` until stdin closes."""
    incarnation = time.time_ns()
    async with open_node(
        args.id,
        bind=args.bind,
        peers=dict.fromkeys(args.peer),
        compute=lambda: Counter(effects),
        config=NodeConfig(receiver=ReceiverConfig(), journal_sync=args.sync),
        incarnation=incarnation,
        journal=args.journal,
    ) as node:
        print(f"READY {node.endpoint} {incarnation}", flush=True)
        await _wait_stdin_closed()


async def run_sender(args: argparse.Namespace, acked: IO[str], todo: list[int]) -> None:
    """Send ``todo``; record each ACK in ``acked`` as it arrives."""
    peer, _, endpoint = args.peer.partition("=")
    async with open_node(
        args.id, bind=args.bind, peers={peer: endpoint}, config=NodeConfig(sender=QUICK)
    ) as node:
        print("READY", flush=True)

        async def settle(n: int, handle: SendHandle) -> None:
            outcome = await handle.wait()
            assert isinstance(outcome, Ack)
            acked.write(f"{n}\n")
            acked.flush()

        async with trio.open_nursery() as nursery:
            for n in todo:
                await node.wait_window(peer)
                nursery.start_soon(settle, n, node.send_nowait(peer, n))
        print("DONE", flush=True)
        await _wait_stdin_closed()


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen role."""
    parser = argparse.ArgumentParser(description=__doc__)
    roles = parser.add_subparsers(dest="role", required=True)
    rx = roles.add_parser("receiver")
    rx.add_argument("--id", required=True)
    rx.add_argument("--bind", required=True)
    rx.add_argument("--peer", action="append", required=True)
    rx.add_argument("--journal", required=True)
    rx.add_argument("--effects", required=True)
    rx.add_argument("--sync", default="normal", choices=["normal", "full"])
    tx = roles.add_parser("sender")
    tx.add_argument("--id", required=True)
    tx.add_argument("--bind", required=True)
    tx.add_argument("--peer", required=True, help="PEER=ENDPOINT")
    tx.add_argument("--count", type=int, required=True)
    tx.add_argument("--acked", required=True)
    args = parser.parse_args(argv)
    if args.role == "receiver":
        # Line-buffered: each effect reaches the page cache as it happens.
        with open(args.effects, "a", buffering=1, encoding="utf-8") as effects:
            trio.run(run_receiver, args, effects)
        return
    acked_path = Path(args.acked)
    done = set()
    if acked_path.exists():
        done = {int(line) for line in acked_path.read_text().split()}
    todo = [n for n in range(args.count) if n not in done]
    with acked_path.open("a", encoding="utf-8") as acked:
        trio.run(run_sender, args, acked, todo)


if __name__ == "__main__":
    main()
