"""A cellmesh node as a separate OS process, for tests/test_processes.py.

Run as::

    python tests/_peer.py receiver --id b --bind tcp://127.0.0.1:PORT --peer a \\
        --record FILE [--err-every K] [--slow MS] [--stall-on I] [--window N]

It opens a node whose compute actor appends one JSON line per delivery to
FILE (flushed before the answer goes out, so a line exists for every message
that was ACKed or ERRed, even if the process is then killed), prints
``READY <endpoint> <incarnation>`` once the node is open, and runs until its
stdin closes; it then closes the node and prints ``STATS <json>``.

Payloads are texts ``"<stream>:<i>"``; :func:`err_rule` decides, from ``i``
alone, which ones are refused, so the test knows the expected ERR code and
detail without asking the process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import IO, Any

import trio

from actors import (
    Actor,
    Delivery,
    Gap,
    NodeConfig,
    Reject,
    open_node,
)
from transport import (
    ReceiverConfig,
)
from transport.security import (
    Security,
    public_key_path,
    read_key_pair,
    read_public_key,
    secret_key_path,
)


def payload_index(payload: str) -> int:
    """The ``i`` of a ``"<stream>:<i>"`` payload."""
    return int(payload.rpartition(":")[2])


def err_rule(payload: str, err_every: int) -> tuple[int, str] | None:
    """The ERR code and detail the receiver answers for ``payload``, or None for ACK.

    Every ``err_every``-th index (0, K, 2K, ...) is refused; the code cycles
    through 400..409 so the test sees more than one application code.
    """
    if err_every <= 0:
        return None
    i = payload_index(payload)
    if i % err_every:
        return None
    return 400 + (i // err_every) % 10, f"rule {err_every} refuses {payload}"


class Recorder(Actor[Any, Any]):
    """Writes every delivery (and gap) as a JSON line, then answers by the rule."""

    def __init__(
        self, out: IO[str], incarnation: int, err_every: int, slow: float, stall_on: int | None
    ) -> None:
        self._out = out
        self._incarnation = incarnation
        self._err_every = err_every
        self._slow = slow
        self._stall_on = stall_on

    def _write(self, line: dict[str, Any]) -> None:
        self._out.write(json.dumps(line) + "\n")
        # Flushed to the kernel before answering: a SIGKILL right after the
        # ACK cannot lose the line (the page cache outlives the process).
        self._out.flush()

    async def receive(self, msg: Any) -> Any:
        if isinstance(msg, Gap):
            self._write(
                {
                    "inc": self._incarnation,
                    "gap": [msg.stream, msg.first, msg.last, msg.reason],
                }
            )
            return None
        assert isinstance(msg, Delivery)
        payload = msg.payload
        assert isinstance(payload, str)
        if self._slow:
            await trio.sleep(self._slow)
        verdict = err_rule(payload, self._err_every)
        self._write(
            {
                "inc": self._incarnation,
                "stream": msg.stream,
                "stream_seq": msg.stream_seq,
                "payload": payload,
                "seq": msg.seq,
                "err": verdict is not None,
            }
        )
        if payload_index(payload) == self._stall_on:
            # Recorded but never answered: a test kills the process here to
            # catch it between processing a message and confirming it.
            await trio.sleep_forever()
        if verdict is not None:
            raise Reject(*verdict)
        return {"i": payload_index(payload), "inc": self._incarnation}


def _stats_line(node: Any) -> str:
    """The receiving side's counters that tests check, as one JSON text."""
    proto = node.statistics().inbound.protocol
    return json.dumps(
        {
            "incarnation": node.incarnation,
            "sessions": [
                {
                    "peer": s.peer,
                    "incarnation": s.incarnation,
                    "delivered": s.delivered,
                    "duplicates": s.duplicates,
                }
                for s in proto.sessions
            ],
            "sessions_ended": proto.sessions_ended,
            "stale_refused": proto.stale_refused,
        }
    )


async def _wait_stdin_closed() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while await stdin.receive_some(1024):
            pass


async def run_receiver(args: argparse.Namespace, out: IO[str]) -> None:
    """Serve as node ``args.id``, recording to ``out``, until stdin closes."""
    incarnation = time.time_ns()
    config = NodeConfig(
        receiver=ReceiverConfig(window=args.window, max_entries=2 * args.window),
    )
    security = None
    if args.keys is not None:
        security = Security(
            read_key_pair(secret_key_path(args.keys, args.id)),
            {peer: read_public_key(public_key_path(args.keys, peer)) for peer in args.peer},
        )
    async with open_node(
        args.id,
        bind=args.bind,
        peers=dict.fromkeys(args.peer),
        compute=lambda: Recorder(out, incarnation, args.err_every, args.slow / 1000, args.stall_on),
        config=config,
        incarnation=incarnation,
        security=security,
    ) as node:
        print(f"READY {node.endpoint} {incarnation}", flush=True)
        await _wait_stdin_closed()
        stats = _stats_line(node)
    print(f"STATS {stats}", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen role."""
    parser = argparse.ArgumentParser(description=__doc__)
    roles = parser.add_subparsers(dest="role", required=True)
    rx = roles.add_parser("receiver", help="a node that records what it is sent")
    rx.add_argument("--id", required=True)
    rx.add_argument("--bind", required=True)
    rx.add_argument("--peer", action="append", required=True, help="a node that sends to us")
    rx.add_argument("--record", required=True, help="append one JSON line per delivery here")
    rx.add_argument("--err-every", type=int, default=0, help="ERR for every K-th index")
    rx.add_argument("--slow", type=float, default=0.0, help="milliseconds of compute per message")
    rx.add_argument("--stall-on", type=int, help="record index I, then never answer it")
    rx.add_argument("--window", type=int, default=256, help="the receiver's credit window")
    rx.add_argument("--keys", help="run CURVE: DIR/<id>.key_secret and DIR/<peer>.key")
    args = parser.parse_args(argv)
    with open(args.record, "a", encoding="utf-8") as out:
        trio.run(run_receiver, args, out)


if __name__ == "__main__":
    main()
