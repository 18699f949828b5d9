"""Keys for a cluster: only the topology's nodes get in, and nobody poses as another.

What an operator does, in one program on 127.0.0.1:

1. make a key pair per node (``cellmesh keys`` does this from the shell) and
   write the public keys into the topology;
2. open each node with ``security=load_security(topology, node_id, keys_dir)``;
3. send: every link is CURVE-encrypted, and the receiver knows who sent a
   message from the key that proved it.

Then two intruders try: "mallory" holds a key the topology does not list,
and a plaintext process claims to be node "a". Node "b" refuses both,
counts each by reason, and carries on serving "a".

Run: ``.venv/bin/python examples/secure_nodes.py``
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any

import trio

from actors import (
    Actor,
    Delivery,
    DeliveryFailed,
    Node,
    NodeSpec,
    Topology,
    load_security,
    open_node,
)
from transport.security import (
    Security,
    generate_key_pair,
    write_key_pair,
)

#: Bound on the whole demo, so a broken build fails instead of hanging.
DEADLINE = 30.0


class Echo(Actor[Any, Any]):
    """Node b's compute actor: answers each halo with its length."""

    async def receive(self, msg: Any) -> Any:
        assert isinstance(msg, Delivery)
        return len(msg.payload)


async def refused(node: Node, reason: str) -> int:
    """Wait until ``node`` has refused someone for ``reason``; the count."""
    # libzmq's handshakes happen in its own thread: poll the counter.
    while not node.statistics().security.refused.get(reason):  # noqa: ASYNC110
        await trio.sleep(0.02)
    return node.statistics().security.refused[reason]


async def main() -> None:
    with tempfile.TemporaryDirectory() as keys_dir:
        # 1. One key pair per node; the secret files are created mode 0600.
        public = {}
        for name in ("a", "b"):
            pair = generate_key_pair()
            write_key_pair(keys_dir, name, pair)
            public[name] = pair.public
        topology = Topology.build(
            [NodeSpec(n, f"ipc://{keys_dir}/{n}.sock") for n in ("a", "b")],
            [("a", "b")],
        ).with_public_keys(public)

        with trio.fail_after(DEADLINE):
            # 2. Each node loads its own secret key and its peers' public keys.
            async with (
                open_node(
                    "b",
                    bind=topology.endpoint_of("b"),
                    peers={"a": None},
                    compute=Echo,
                    security=load_security(topology, "b", keys_dir),
                ) as b,
                open_node(
                    "a",
                    bind=topology.endpoint_of("a"),
                    peers=topology.peers_of("a"),
                    security=load_security(topology, "a", keys_dir),
                ) as a,
            ):
                # 3. Encrypted and authenticated sends.
                acks = [await a.send("b", b"halo row %d" % i) for i in range(5)]
                results = [ack.result for ack in acks]
                print(f"a -> b over CURVE: {len(acks)} sends ACKed, results {results}")

                # An intruder with a key of its own that the topology does not list.
                mallory = Security(generate_key_pair(), {"b": public["b"]})
                async with open_node(
                    "a", bind="tcp://127.0.0.1:*", peers={"b": b.endpoint}, security=mallory
                ) as intruder:
                    attempt = intruder.send_nowait("b", b"let me in", timeout=1.0)
                    print(f"mallory's key: refused {await refused(b, 'unknown-key')}x by ZAP")
                    try:
                        await attempt.wait()
                        sys.exit("FAILED: b answered an unknown key")
                    except DeliveryFailed:
                        print("mallory's send: no answer, DeliveryFailed at its deadline")

                # A plaintext process claiming to be "a".
                async with open_node(
                    "a", bind="tcp://127.0.0.1:*", peers={"b": b.endpoint}
                ) as plaintext:
                    attempt = plaintext.send_nowait("b", b"I am a, honest", timeout=1.0)
                    print(f"plaintext 'a': refused {await refused(b, 'plaintext')}x at handshake")
                    try:
                        await attempt.wait()
                        sys.exit("FAILED: b answered a plaintext peer")
                    except DeliveryFailed:
                        print("plaintext send: no answer, DeliveryFailed at its deadline")

                # The real a is still served.
                ack = await a.send("b", b"still here")
                stats = b.statistics().security
                print(f"a -> b again: ACK {ack.result}; b's gate: {stats}")
                if ack.result != 10 or stats.refused.get("impersonation", 0):
                    sys.exit("FAILED: the real node a was not served, or was refused")
    print("OK: only keys in the topology get in; intruders are refused and counted")


if __name__ == "__main__":
    trio.run(main)
