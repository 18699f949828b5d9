"""Question 1: the server goes offline, sends time out, the server comes back.

Do I need to reconnect the client? No. This script shows it with two real
processes on 127.0.0.1:

1. a *server* node runs in a child process (this same script with ``--serve``)
   on a fixed port; the client node sends to it and gets ACKs;
2. the server process is killed (SIGKILL, no goodbye). The client notices the
   silence (its link goes SUSPECT, then DOWN). One send with a short timeout
   ends in ``DeliveryFailed``; another one, with a longer timeout, simply
   stays in flight: the link keeps retransmitting it with backoff;
3. a new server process starts on the same port. The *same* client node, with
   no reconnect code at all, gets the in-flight message answered and sends
   new ones. The client sees the new incarnation (a new session).

Why a REQ socket breaks here: REQ enforces send/recv/send/recv. When the
server dies between the two, the REQ socket waits forever for a reply that
will never come and refuses the next send ("lazy pirate": close and reopen
it). cellmesh uses DEALER sockets, which have no lockstep, and puts the
reliability in its own protocol: message ids, retransmission with backoff,
dedup, and sessions. See docs/faq.md, question 1.

Run: ``.venv/bin/python examples/q1_server_offline.py``
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
from functools import partial
from typing import Any

import trio

from actors import (
    Actor,
    Delivery,
    DeliveryFailed,
    NodeConfig,
    open_node,
)
from transport import (
    NodeId,
    PeerState,
    SenderConfig,
)

#: The server's node id (statistics are keyed by NodeId).
SERVER = NodeId("server")

#: Bound on the whole demo, so a broken build fails instead of hanging.
DEADLINE = 25.0

#: Short timers so the outage and the recovery take seconds, not minutes.
CLIENT_CONFIG = NodeConfig(
    sender=SenderConfig(
        retry_timeout=0.1,
        retry_ceiling=0.5,
        heartbeat_interval=0.2,
        suspect_after=0.6,
        down_after=1.2,
        # The default 5 s would declare a server that is away longer LOST and
        # fail the sends in flight (a dead rank); here they wait for it.
        lost_grace=30.0,
    )
)


class Echo(Actor[Any, Any]):
    """The server's compute actor: answers ACK with who processed what."""

    async def receive(self, msg: Any) -> Any:
        assert isinstance(msg, Delivery)
        return f"pid {os.getpid()} processed {msg.payload!r}"


async def serve(port: int) -> None:
    """The child process: one server node, until it is killed."""
    async with open_node(
        "server", bind=f"tcp://127.0.0.1:{port}", peers={"client": None}, compute=Echo
    ):
        print("READY", flush=True)
        await trio.sleep_forever()


def free_port() -> int:
    """A free TCP port below 32768.

    Ports in the kernel's ephemeral range (32768 and up on Linux) are avoided:
    a client redialling a dead local port there can be handed that very port
    as its own source port and connect to itself (design.md §5).
    """
    rng = random.Random(os.getpid())
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found in 20000-32000")


async def start_server(nursery: trio.Nursery, port: int) -> trio.Process:
    """Start the server process and wait until its node is bound."""
    command = [sys.executable, __file__, "--serve", str(port)]
    proc: trio.Process = await nursery.start(
        partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
    )
    assert proc.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        chunk = await proc.stdout.receive_some(1)
        if not chunk:
            raise RuntimeError("the server process ended before it was ready")
        line += chunk
    assert line.strip() == b"READY", line
    return proc


async def main(port: int) -> None:
    endpoint = f"tcp://127.0.0.1:{port}"
    print(f"question 1: the server at {endpoint} goes offline and comes back\n")
    with trio.fail_after(DEADLINE):
        async with (
            trio.open_nursery() as nursery,
            open_node(
                "client", bind="tcp://127.0.0.1:*", peers={"server": endpoint}, config=CLIENT_CONFIG
            ) as client,
        ):
            server = await start_server(nursery, port)
            print(f"[1] server process started (pid {server.pid})")
            for i in (1, 2, 3):
                ack = await client.send("server", f"cell {i}", timeout=5)
                print(f"    send 'cell {i}' -> ACK #{ack.seq}: {ack.result}")
            first_incarnation = client.statistics().links[SERVER].protocol.peer_incarnation

            server.kill()
            await server.wait()
            print(f"\n[2] server process killed (pid {server.pid}, SIGKILL)")
            # A send with a long deadline is simply in flight while the peer is away.
            patient = client.send_nowait("server", "cell 4 (sent during the outage)", timeout=15)
            await client.wait_state("server", PeerState.DOWN)
            print("    the client's link to the server is now", client.state("server").name)
            start = trio.current_time()
            try:
                await client.send("server", "cell 5 (short timeout)", timeout=0.8)
            except DeliveryFailed as exc:
                print(
                    f"    send 'cell 5' with timeout=0.8 s -> DeliveryFailed after "
                    f"{trio.current_time() - start:.1f} s (message #{exc.seq}, held={exc.held})"
                )
            else:
                raise AssertionError("a send to a dead server was acknowledged")
            stats = client.statistics().links[SERVER].protocol
            print(
                f"    'cell 4' is still in flight: in_flight={stats.in_flight}, "
                f"resent so far={stats.resent}"
            )
            assert not patient.done

            server = await start_server(nursery, port)
            print(f"\n[3] a new server process started on the same port (pid {server.pid})")
            print("    the client does nothing special: no reconnect, no new socket")
            ack = await patient.wait()
            print(
                f"    'cell 4' -> ACK #{ack.seq} after {ack.attempts} transmissions, "
                f"{ack.rtt:.1f} s after it was first sent: {ack.result}"
            )
            for i in (6, 7):
                ack = await client.send("server", f"cell {i}", timeout=5)
                print(f"    send 'cell {i}' -> ACK #{ack.seq} in {ack.rtt * 1000:.1f} ms")
            stats = client.statistics().links[SERVER].protocol
            print(
                f"\n    link counters: sent={stats.sent} resent={stats.resent} "
                f"acked={stats.acked} gave_up={stats.gave_up} "
                f"peer_restarts={stats.peer_restarts} state={client.state('server').name}"
            )
            assert stats.acked == 6
            assert stats.gave_up == 1
            assert stats.resent > 0
            assert stats.peer_restarts == 1
            assert stats.peer_incarnation != first_incarnation
            assert client.state("server") is PeerState.UP
            server.kill()
            await server.wait()
            nursery.cancel_scope.cancel()
    print("\nOK: the same client node carried on after the server came back")


def cli() -> int:
    parser = argparse.ArgumentParser(description="cellmesh FAQ, question 1")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        trio.run(serve, args.serve)
        return 0
    trio.run(main, free_port())
    return 0


if __name__ == "__main__":
    sys.exit(cli())
