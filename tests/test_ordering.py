"""Per-peer sequencer actors in virtual time: order per stream, isolation between streams and peers.

The Receiver's protocol core and the PeerSequencer actors run as in a node,
minus the sockets: DATA frames go into the core, its Deliver events into the
peer's sequencer, exactly as ``Receiver._route`` does.
"""

from __future__ import annotations

import random
from typing import Any

import trio

from actors import (
    Actor,
    Delivery,
    Gap,
    spawn,
)
from actors._inbound import InboundState, PeerSequencer, Receiver
from transport import (
    ErrCode,
    GapPolicy,
    Incarnation,
    Limits,
    LinkSeq,
    NodeId,
    ReceiverConfig,
    SequencerConfig,
    StreamId,
    StreamSeq,
)
from transport.frames import (
    Data,
    ErrFrame,
    Req,
    RetryLater,
    RetryReason,
)
from transport.testing import (
    FaultPlan,
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
    def __init__(self, nursery: trio.Nursery, seen: list[Any], policy: GapPolicy) -> None:
        self.inbound = InboundState(
            NodeId("b"),
            Incarnation(9),
            "inproc://unused",
            frozenset({P, Q}),
            config=ReceiverConfig(received_delay=0.0),
            faults=FaultPlan(),
            limits=Limits(),
        )
        self.nursery = nursery
        self.seen = seen
        self.config = SequencerConfig(gap_timeout=0.5, policy=policy)
        self.link_seq = {P: 0, Q: 0}

    async def start(self, compute_factory: Any = None, compute_mailbox: int = 64) -> None:
        compute = await spawn(
            self.nursery,
            compute_factory or (lambda: Log(self.seen)),
            mailbox_size=compute_mailbox,
        )
        for peer in (P, Q):
            self.inbound.sequencers[peer] = await spawn(
                self.nursery,
                lambda peer=peer: PeerSequencer(self.inbound, peer, compute, {}, self.config),
            )

    def data(self, peer: NodeId, stream: str, stream_seq: int, floor: int = 1) -> None:
        """One DATA from ``peer`` through the core and on to its sequencer."""
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
        self.inbound.core.receive_frame(peer, frame, trio.current_time())
        Receiver._route(self.inbound)


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
        assert not [
            f for _, f in h.inbound.core.frames_to_send(trio.current_time()) if isinstance(f, Req)
        ]
        await trio.sleep(0.2)
        reqs = [
            f for _, f in h.inbound.core.frames_to_send(trio.current_time()) if isinstance(f, Req)
        ]
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
        refused = [
            f
            for _, f in h.inbound.core.frames_to_send(trio.current_time())
            if isinstance(f, RetryLater)
        ]
        stats = h.inbound.sequencer_stats[P]()[StreamId("halo")]
        nursery.cancel_scope.cancel()
    assert stats.buffered <= 8
    # Within the bound (k = 2..9) held; every later one answered RETRY_LATER.
    assert len(refused) == 60 - 2 - 8
    assert {f.reason for f in refused} == {RetryReason.BUFFER_FULL}
    assert seen == []


async def test_fail_policy_tells_the_compute_actor_and_fails_the_sequencer(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Message 1 never came, and the sender's stream floor moving to 2 says it
    # has its outcome there (given up): it never will. Under "fail" the
    # compute actor gets an explicit Gap and the peer's sequencer actor fails,
    # which a supervisor sees; unsupervised here, the crash reaches the nursery.
    from actors import ActorCrashed, StreamFailedError

    seen: list[Any] = []
    holder: list[Harness] = []

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            h = Harness(nursery, seen, GapPolicy.FAIL)
            holder.append(h)
            await h.start()
            h.data(P, "halo", 2, floor=1)
            h.data(P, "halo", 4, floor=2)
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()

    crashes: list[BaseException] = []
    try:
        await scenario()
    except* ActorCrashed as group:
        crashes.extend(group.exceptions)
    [h] = holder
    [crash] = crashes
    assert isinstance(crash.__cause__, StreamFailedError)
    assert crash.__cause__.stream == "halo"
    assert [k for _, _, _, k in seen] == ["gap 1-1 stream-failed"]
    # The messages held behind the loss were answered, not dropped.
    errs = [
        f for _, f in h.inbound.core.frames_to_send(trio.current_time()) if isinstance(f, ErrFrame)
    ]
    assert [e.code for e in errs] == [ErrCode.GAP_FAILED, ErrCode.GAP_FAILED]


class SlowLog(Log):
    """Logs like :class:`Log`, after a seeded random compute time (virtual)."""

    def __init__(self, seen: list[Any], rng: random.Random) -> None:
        super().__init__(seen)
        self.rng = rng

    async def receive(self, msg: Any) -> None:
        await trio.sleep(self.rng.choice([0.0, 0.0, 0.0005, 0.002]))
        await super().receive(msg)


async def test_in_order_messages_skip_the_sequencer_actor(
    autojump_clock: trio.abc.Clock,
) -> None:
    seen: list[Any] = []
    async with trio.open_nursery() as nursery:
        h = Harness(nursery, seen, GapPolicy.WAIT)
        await h.start()
        for k in range(1, 6):
            h.data(P, "halo", k)
            await trio.sleep(0.01)
        processed = h.inbound.sequencers[P].statistics().processed
        stats = h.inbound.sequencer_stats[P]()[StreamId("halo")]
        nursery.cancel_scope.cancel()
    assert [k for _, _, _, k in seen] == [1, 2, 3, 4, 5]
    # The session's first message went through the sequencer's mailbox; the
    # others, in order with nothing held, went straight to the compute actor.
    assert processed == 1
    assert stats.delivered == 5


async def test_fast_path_keeps_order_while_the_sequencer_is_busy(
    autojump_clock: trio.abc.Clock,
) -> None:
    # A compute actor with a tiny mailbox and uneven compute times keeps the
    # sequencer blocked mid-hand-over; arrivals out of order make it hold and
    # release runs. In-order arrivals meanwhile must not overtake what the
    # sequencer has released but not yet handed over.
    rng = random.Random(7)
    seen: list[Any] = []
    per_stream = 100
    async with trio.open_nursery() as nursery:
        h = Harness(nursery, seen, GapPolicy.WAIT)
        await h.start(lambda: SlowLog(seen, rng), compute_mailbox=2)
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
        refused = [
            f
            for _, f in h.inbound.core.frames_to_send(trio.current_time())
            if isinstance(f, RetryLater)
        ]
        nursery.cancel_scope.cancel()
    assert refused == []
    for stream in ("x", "y"):
        got = [k for _, _, s, k in seen if s == stream]
        assert got == list(range(1, per_stream + 1))


async def test_fast_path_waits_for_a_sequencer_still_handing_over(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The sequencer releases 1..5 at once into a compute mailbox of one: it
    # blocks in the hand-over, and once the compute actor drains the mailbox
    # it is runnable but may not have run yet when 6 arrives. 6 is then "in
    # order" for the stream's state, yet 4 and 5 are not handed over. Each
    # round lets the scheduler run a different number of steps before 6.
    for steps in [s for s in range(12) for _ in range(4)]:
        seen: list[Any] = []
        async with trio.open_nursery() as nursery:
            h = Harness(nursery, seen, GapPolicy.WAIT)
            await h.start(compute_mailbox=1)
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
