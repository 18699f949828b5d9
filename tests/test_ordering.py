"""Per-peer sequencers in virtual time: order per stream, isolation between streams and peers.

Node "b" runs on a :class:`MemoryNetwork` with no latency; peers "p" and "q"
are raw DEALERs the test drives, sending DATA frames in whatever order a
test needs and reading b's answers (RETRY_LATER, REQ, ERR) off the wire.
"""

from __future__ import annotations

import random
from typing import Any

import trio

from actors import (
    Actor,
    Delivery,
    Gap,
    Node,
    NodeConfig,
    open_node,
)
from transport import (
    ErrCode,
    GapPolicy,
    Incarnation,
    LinkSeq,
    NodeId,
    ReceiverConfig,
    SequencerConfig,
    StreamId,
    StreamSeq,
    decode,
    encode,
)
from transport.frames import (
    Batch,
    Data,
    ErrFrame,
    Frame,
    Req,
    RetryLater,
    RetryReason,
)
from transport.testing import (
    MemoryNetwork,
)

P, Q = NodeId("p"), NodeId("q")
INC = Incarnation(1)


class Log(Actor[Any, None]):
    def __init__(self, seen: list[tuple[float, str, str, int | str]]) -> None:
        self.seen = seen

    async def receive(self, msg: Any) -> None:
        now = trio.current_time()
        if isinstance(msg, Delivery):
            self.seen.append((now, msg.peer, msg.stream, msg.stream_seq))
        elif isinstance(msg, Gap):
            self.seen.append(
                (now, msg.peer, msg.stream, f"gap {msg.first}-{msg.last} {msg.reason}")
            )


class Harness:
    """Node b, and p and q as raw DEALERs sending it DATA."""

    def __init__(self, nursery: trio.Nursery, seen: list[Any], policy: GapPolicy) -> None:
        self.net = MemoryNetwork()
        self.nursery = nursery
        self.seen = seen
        self.config = SequencerConfig(gap_timeout=0.5, policy=policy)
        self.link_seq = {P: 0, Q: 0}
        self.dealers = {peer: self.net.dealer(peer.encode()) for peer in (P, Q)}
        for dealer in self.dealers.values():
            dealer.connect("mem://b")
        self._node: Node | None = None

    @property
    def node(self) -> Node:
        assert self._node is not None
        return self._node

    async def start(self, compute_factory: Any = None) -> None:
        self._node = await self.nursery.start(
            self._run, compute_factory or (lambda: Log(self.seen))
        )

    async def _run(self, compute: Any, task_status: trio.TaskStatus[Node]) -> None:
        config = NodeConfig(receiver=ReceiverConfig(received_delay=0.0), stream=self.config)
        async with open_node(
            "b",
            bind="mem://b",
            peers={P: None, Q: None},
            compute=compute,
            config=config,
            network=self.net,
        ) as node:
            task_status.started(node)
            await trio.sleep_forever()

    def data(self, peer: NodeId, stream: str, stream_seq: int, floor: int = 1) -> None:
        """One DATA from ``peer`` to b."""
        self.link_seq[peer] += 1
        seq = self.link_seq[peer]
        frame = Data(
            peer,
            INC,
            LinkSeq(seq),
            StreamId(stream),
            StreamSeq(stream_seq),
            StreamSeq(floor),
            None,
            f"{stream}{stream_seq}",
            LinkSeq(1),
        )
        self.dealers[peer].send_multipart_nowait(encode(frame))

    def answers(self) -> list[tuple[NodeId, Frame]]:
        """What b has sent p and q so far and nobody read yet, frame by frame."""
        got = []
        for peer, dealer in self.dealers.items():
            while True:
                try:
                    frame = decode(dealer.recv_multipart_nowait())
                except trio.WouldBlock:
                    break
                # Answers due together travel as one BATCH.
                inner = frame.frames if isinstance(frame, Batch) else (frame,)
                got.extend((peer, f) for f in inner)
        return got


async def test_stalled_stream_delays_neither_other_streams_nor_other_peers(
    autojump_clock: trio.abc.Clock,
) -> None:
    seen: list[Any] = []
    async with trio.open_nursery() as nursery:
        h = Harness(nursery, seen, GapPolicy.WAIT)
        await h.start()
        # p/halo misses its first message; p/ctl and q/halo are complete.
        for k in (2, 3, 4):
            h.data(P, "halo", k)
        for k in (1, 2):
            h.data(P, "ctl", k)
        for k in (1, 2, 3):
            h.data(Q, "halo", k)
        await trio.sleep(5.0)
        # The missing message finally arrives (a resend), five seconds late.
        h.data(P, "halo", 1)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()

    at_zero = sorted((peer, stream, k) for t, peer, stream, k in seen if t == 0.0)
    assert at_zero == [
        ("p", "ctl", 1),
        ("p", "ctl", 2),
        ("q", "halo", 1),
        ("q", "halo", 2),
        ("q", "halo", 3),
    ]
    late = [(t, k) for t, peer, stream, k in seen if (peer, stream) == ("p", "halo")]
    assert late == [(5.0, 1), (5.0, 2), (5.0, 3), (5.0, 4)]


async def test_open_gap_asks_the_sender_after_the_gap_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    seen: list[Any] = []
    async with trio.open_nursery() as nursery:
        h = Harness(nursery, seen, GapPolicy.WAIT)
        await h.start()
        h.data(P, "halo", 2)
        await trio.sleep(0.4)
        assert not [f for _, f in h.answers() if isinstance(f, Req)]
        await trio.sleep(0.2)
        reqs = [f for _, f in h.answers() if isinstance(f, Req)]
        assert [(r.stream, r.missing) for r in reqs] == [("halo", (1,))]
        nursery.cancel_scope.cancel()


async def test_skip_policy_hands_over_an_explicit_gap(autojump_clock: trio.abc.Clock) -> None:
    seen: list[Any] = []
    async with trio.open_nursery() as nursery:
        h = Harness(nursery, seen, GapPolicy.SKIP)
        await h.start()
        h.data(P, "halo", 1)
        h.data(P, "halo", 3)
        await trio.sleep(3.0)
        nursery.cancel_scope.cancel()
    kinds = [k for _, _, _, k in seen]
    assert kinds[0] == 1
    assert isinstance(kinds[1], str)
    assert kinds[1].startswith("gap 2-2")
    assert kinds[2] == 3


async def test_flood_of_far_future_frames_is_refused_not_held(
    autojump_clock: trio.abc.Clock,
) -> None:
    seen: list[Any] = []
    async with trio.open_nursery() as nursery:
        h = Harness(nursery, seen, GapPolicy.WAIT)
        h.config = SequencerConfig(gap_timeout=0.5, buffer_limit=8)
        await h.start()
        for k in range(2, 60):
            h.data(P, "halo", k)
        await trio.sleep(0.01)
        refused = [f for _, f in h.answers() if isinstance(f, RetryLater)]
        stats = h.node.statistics().streams[P][StreamId("halo")]
        nursery.cancel_scope.cancel()
    assert stats.buffered <= 8
    # Within the bound (k = 2..9) held; every later one answered RETRY_LATER.
    assert len(refused) == 60 - 2 - 8
    assert {f.reason for f in refused} == {RetryReason.BUFFER_FULL}
    assert seen == []


async def test_fail_policy_tells_the_compute_actor_and_starts_the_stream_over(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Message 1 never came, and the sender's stream floor moving to 2 says it
    # has its outcome there (given up): it never will. Under "fail" the
    # compute actor gets an explicit Gap, the messages held behind the loss
    # are answered ERR GAP_FAILED, and the stream starts over at the
    # sender's floor: its next message is delivered. Nothing restarts.
    seen: list[Any] = []
    async with trio.open_nursery() as nursery:
        h = Harness(nursery, seen, GapPolicy.FAIL)
        await h.start()
        h.data(P, "halo", 2, floor=1)
        h.data(P, "halo", 4, floor=2)
        await trio.sleep(1.0)
        errs = [f for _, f in h.answers() if isinstance(f, ErrFrame)]
        h.data(P, "halo", 5, floor=5)
        await trio.sleep(0.1)
        restarts = [c.restarts for c in h.node.supervisor.statistics().children]
        nursery.cancel_scope.cancel()
    assert [k for _, _, _, k in seen] == ["gap 1-1 stream-failed", 5]
    # The messages held behind the loss were answered, not dropped.
    assert [e.code for e in errs] == [ErrCode.GAP_FAILED, ErrCode.GAP_FAILED]
    assert set(restarts) == {0}


class SlowLog(Log):
    """Logs like :class:`Log`, after a seeded random compute time (virtual)."""

    def __init__(self, seen: list[Any], rng: random.Random) -> None:
        super().__init__(seen)
        self.rng = rng

    async def receive(self, msg: Any) -> None:
        await trio.sleep(self.rng.choice([0.0, 0.0, 0.0005, 0.002]))
        await super().receive(msg)


async def test_in_order_messages_are_delivered_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    seen: list[Any] = []
    async with trio.open_nursery() as nursery:
        h = Harness(nursery, seen, GapPolicy.WAIT)
        await h.start()
        for k in range(1, 6):
            h.data(P, "halo", k)
            await trio.sleep(0.01)
        stats = h.node.statistics().streams[P][StreamId("halo")]
        nursery.cancel_scope.cancel()
    # Each as it arrived: no wait on anything but the compute actor.
    assert [(round(t, 3), k) for t, _, _, k in seen] == [(0.01 * i, i + 1) for i in range(5)]
    assert stats.delivered == 5


async def test_order_holds_while_the_compute_actor_is_busy(
    autojump_clock: trio.abc.Clock,
) -> None:
    # A compute actor with uneven compute times falls behind; arrivals out
    # of order make the sequencer hold and release runs. In-order arrivals
    # meanwhile must not overtake what it has released but the compute
    # actor has not taken yet, and nothing is refused.
    rng = random.Random(7)
    seen: list[Any] = []
    per_stream = 100
    async with trio.open_nursery() as nursery:
        h = Harness(nursery, seen, GapPolicy.WAIT)
        await h.start(lambda: SlowLog(seen, rng))
        arrivals: list[tuple[str, int]] = []
        for stream in ("x", "y"):
            ks = list(range(1, per_stream + 1))
            for i in range(len(ks) - 1):
                if rng.random() < 0.3:
                    ks[i], ks[i + 1] = ks[i + 1], ks[i]
            arrivals.extend((stream, k) for k in ks)
        # Interleave the two streams, keeping each one's own arrival order.
        x = [a for a in arrivals if a[0] == "x"]
        y = [a for a in arrivals if a[0] == "y"]
        mixed: list[tuple[str, int]] = []
        while x or y:
            source = x if (x and (not y or rng.random() < 0.5)) else y
            mixed.append(source.pop(0))
        for stream, k in mixed:
            h.data(P, stream, k)
            await trio.sleep(rng.choice([0.0, 0.001, 0.002]))
        await trio.sleep(5.0)
        refused = [f for _, f in h.answers() if isinstance(f, RetryLater)]
        nursery.cancel_scope.cancel()
    assert refused == []
    for stream in ("x", "y"):
        got = [k for _, _, s, k in seen if s == stream]
        assert got == list(range(1, per_stream + 1))


async def test_a_released_run_is_not_overtaken_by_the_next_arrival(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The sequencer releases 1..5 at once when 1 arrives; 6 arrives while the
    # compute actor is still taking them. Each round lets the scheduler run a
    # different number of steps before 6.
    for steps in [s for s in range(12) for _ in range(4)]:
        seen: list[Any] = []
        async with trio.open_nursery() as nursery:
            h = Harness(nursery, seen, GapPolicy.WAIT)
            await h.start()
            for k in (2, 3, 4, 5):
                h.data(P, "halo", k)
            await trio.sleep(0.01)
            h.data(P, "halo", 1)
            for _ in range(steps):
                await trio.lowlevel.checkpoint()
            h.data(P, "halo", 6)
            await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert [k for _, _, _, k in seen] == [1, 2, 3, 4, 5, 6], f"after {steps} steps"
