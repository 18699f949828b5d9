"""A peer of another protocol version is known at once, end to end (protocol.md §5.7).

Node ``a`` sends to ``b``; ``b`` is first a raw ROUTER that answers every
HELLO request as a version 2 node would, and never answers DATA. Then a real
version 1 node takes its endpoint, as an upgraded peer would. Virtual time
throughout: "at once" is asserted on the clock.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from actors import (
    DeliveryFailed,
    open_node,
)
from actors.testing import (
    Inbox,
)
from transport import (
    PROTOCOL_VERSION,
    Incarnation,
    NodeId,
    PeerState,
    SocketLike,
    decode,
    encode,
)
from transport.frames import (
    Hello,
)
from transport.testing import (
    MemoryNetwork,
)

B_INC = Incarnation(77)
REASON = "peer speaks protocol version 2, this node speaks 1"


def _hellos(frame: object) -> list[Hello]:
    frames = getattr(frame, "frames", (frame,))
    return [f for f in frames if isinstance(f, Hello)]


async def _version_2_peer(router: SocketLike, *, task_status: trio.TaskStatus[None]) -> None:
    """Answer HELLO requests with a version 2 HELLO reply; ignore everything else."""
    task_status.started()
    while True:
        await router.wait_ready()
        while True:
            try:
                routing_id, *parts = router.recv_multipart_nowait()
            except trio.WouldBlock:
                break
            for hello in _hellos(decode(parts)):
                if not hello.reply:
                    reply = Hello(NodeId("b"), B_INC, hello.nonce, True, 2)
                    router.send_multipart_nowait([routing_id, *encode(reply)])


async def test_sends_to_a_peer_of_another_version_fail_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    assert PROTOCOL_VERSION == 1
    net = MemoryNetwork(latency=0.1)
    router = net.router()
    router.bind("mem://b")
    async with trio.open_nursery() as nursery:
        await nursery.start(_version_2_peer, router)
        async with open_node("a", bind="mem://a", peers={"b": "mem://b"}, network=net) as a:
            # A send made before the peer's version is known ends when the
            # peer's HELLO reply arrives, not at its 30 s deadline. Its DATA
            # went first, so that is the first heartbeat: 0.5 s after the
            # resends at 0.2 and 0.6 (jittered by 10 %), plus the round trip.
            pending = a.send_nowait("b", b"early", timeout=30.0)
            with pytest.raises(DeliveryFailed) as early:
                await pending.wait()
            assert early.value.reason == REASON
            assert early.value.held is False
            known_at = trio.current_time()
            assert known_at < 0.66 + 0.5 + 0.2 + 0.01
            assert a.statistics().links[NodeId("b")].protocol.peer_version == 2
            assert a.state("b") is PeerState.SUSPECT
            # Every later send fails in the call itself, with no time passing.
            with pytest.raises(DeliveryFailed) as later:
                await a.send("b", b"later", timeout=30.0)
            assert later.value.reason == REASON
            with pytest.raises(DeliveryFailed):
                await a.send_batch("b", [1, 2], timeout=30.0)
            assert trio.current_time() == known_at
            stats = a.statistics().links[NodeId("b")].protocol
            assert (stats.sent, stats.gave_up) == (1, 3)

            # The peer is upgraded: a version 1 node takes its endpoint, and
            # the link's heartbeats take it up again.
            nursery.cancel_scope.cancel()
            router.close()
            inbox = Inbox()
            async with open_node(
                "b", bind="mem://b", peers={"a": None}, compute=inbox.compute, network=net
            ):
                # A HELLO of another version is not "heard": the link was not
                # UP with the old peer, and is with the upgraded one.
                with trio.fail_after(5.0):
                    await a.wait_state("b", PeerState.UP)
                assert a.statistics().links[NodeId("b")].protocol.peer_version is None
                ack = await a.send("b", b"after upgrade", timeout=30.0)
                assert ack.attempts == 1
                assert inbox.payloads() == [b"after upgrade"]
