"""Requirement 6: out-of-order arrivals appear in order; a frame that never comes.

Part 1 is the exact case of the requirement, on the protocol core alone
(sans-IO, no sockets): frames 1 and 2 arrive, then 4, 5 and 6 are buffered
until 3 arrives, and then 3, 4, 5, 6 are handed over in that order.

Part 2 runs two real nodes over a wire that delays every message by a random
0-30 ms, which reorders them. The receiving compute actor still sees frames
1..N in order; the stream's counters show how many arrived early and how many
were buffered at most.

Part 3 is the frame that never arrives: the wire from the sender to the
receiver is cut while frame 3 is sent (nodes on ``actors.testing``'s
in-memory network, whose ``cut`` loses every message on one link), so every
try of frame 3 is lost and the sender gives it up at its deadline. The link
heals; the receiver learns from the sender that frame 3 was given up and its
compute actor gets an explicit ``Gap`` event for frame 3, then frames 4, 5,
6. Nothing is silently dropped. The receiver can also ask the sender directly
(``node.query``, the optional REQ semantics).

Part 4 shows what the receiver does when nobody can say what became of
frame 3 (the sender went silent), under each gap policy: ``wait`` keeps
asking and holds 4-6, ``skip`` gives 3 up after ``skip_after`` and moves on,
``fail`` stops the stream once 3 is known lost and answers 4-6 with ERR.

Run: ``.venv/bin/python examples/in_order.py``
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
    Gap,
    NodeConfig,
    SendHandle,
    open_node,
)
from actors.testing import open_test_network
from transport import (
    GapPolicy,
    NodeId,
    SenderConfig,
    SequencerConfig,
    StreamId,
    StreamSeq,
    StreamSequencer,
)
from transport.events import (
    AskMissing,
    GapEvent,
    Release,
    StreamFailed,
)
from transport.frames import (
    MissingItem,
    MissingStatus,
)
from transport.testing import (
    FaultPlan,
)

#: Bound on the whole demo, so a broken build fails instead of hanging.
DEADLINE = 20.0
FRAMES = 100


def describe(events: list[Any]) -> list[str]:
    """Short words for sequencer events."""
    out = []
    for event in events:
        if type(event) is Release:
            out.append(f"deliver {event.item}")
        elif type(event) is GapEvent:
            out.append(f"GAP {event.first}..{event.last} ({event.reason.value})")
        elif type(event) is StreamFailed:
            out.append(f"STREAM FAILED at {event.first_missing}, ERR for {list(event.undelivered)}")
        elif type(event) is AskMissing:
            out.append(f"REQ {list(event.missing)}")
    return out


def frame_three_is_late() -> None:
    """Part 1: the requirement's own example, on the sans-IO sequencer."""
    print("part 1: frame 3 arrives after 4, 5 and 6 (protocol core, no sockets)")
    seq: StreamSequencer[str] = StreamSequencer()
    delivered: list[str] = []
    for frame in (1, 2, 4, 5, 6, 3):
        seq.offer(StreamSeq(frame), StreamSeq(1), f"frame {frame}", now=0.0)
        events = seq.take_events()
        delivered.extend(e.item for e in events if type(e) is Release)
        stats = seq.statistics()
        what = describe(events) or ["hold"]
        print(f"    frame {frame} arrives -> {what}, buffered={stats.buffered}")
    assert delivered == [f"frame {n}" for n in range(1, 7)]
    print(f"    delivered in order: {delivered}\n")


class Frames(Actor[Any, Any]):
    """Records what the compute layer is handed, in the order it is handed."""

    def __init__(self, log: list[Any]) -> None:
        self.log = log

    async def receive(self, msg: Any) -> Any:
        if isinstance(msg, Gap):
            self.log.append(("gap", msg.first, msg.last, msg.reason))
        else:
            assert isinstance(msg, Delivery)
            self.log.append(msg.frame_no)
        return None


async def reordering_wire(tmp: str) -> None:
    """Part 2: a wire that reorders; the compute actor still sees 1..N."""
    print(f"part 2: {FRAMES} frames over a wire that delays each message by 0-30 ms")
    log: list[Any] = []
    a_config = NodeConfig(
        faults=FaultPlan(delay=0.03, seed=5),
        # One DATA per ZeroMQ message, so the delays reorder single frames.
        sender=SenderConfig(max_batch=1),
    )
    async with (
        open_node(
            "b", bind=f"ipc://{tmp}/b2.sock", peers={"a": None}, compute=lambda: Frames(log)
        ) as b,
        open_node("a", bind=f"ipc://{tmp}/a2.sock", peers={"b": b.endpoint}, config=a_config) as a,
    ):
        handles: list[SendHandle] = []
        for frame in range(1, FRAMES + 1):
            await a.wait_window("b")
            handles.append(a.send_nowait("b", b"cells", stream="halo", frame_no=frame, timeout=10))
            # A new frame every 2 ms, as a simulation step would produce them.
            await trio.sleep(0.002)
        for handle in handles:
            await handle.wait()
        halo = b.statistics().streams[NodeId("a")][StreamId("halo")]
    print(
        f"    receiver's stream counters: delivered={halo.delivered} "
        f"arrived early (reordered)={halo.reordered} max buffered={halo.max_buffered} "
        f"gaps waited on={halo.gaps_seen}"
    )
    print(f"    compute actor saw frames {log[:8]} ... {log[-3:]}")
    assert log == list(range(1, FRAMES + 1))
    assert halo.reordered > 0
    assert halo.max_buffered > 0
    print("    in order despite the reordering\n")


async def frame_three_given_up() -> None:
    """Part 3: the sender gives frame 3 up; the receiver sees a Gap."""
    print("part 3: frame 3 never arrives (the wire is cut; the sender gives it up)")
    log: list[Any] = []
    async with open_test_network() as net:
        b = await net.start_node("b", peers={"a": None}, compute=lambda: Frames(log))
        a = await net.start_node("a", peers=["b"])
        for frame in (1, 2):
            await a.send("b", b"cells", stream="halo", frame_no=frame, timeout=5)
        # Everything a sends to b is lost now, each retry of frame 3 too.
        net.network.cut("a", "b")
        lost = a.send_nowait("b", b"cells", stream="halo", frame_no=3, timeout=0.05)
        try:
            await lost.wait()
        except DeliveryFailed as exc:
            print(
                f"    sender: frame 3 (message #{exc.seq}) -> DeliveryFailed "
                f"({lost.attempts} transmission(s) lost on the cut wire): {exc.reason}"
            )
        else:
            raise AssertionError("frame 3 was acknowledged although the wire was cut")
        net.heal()
        later = [
            a.send_nowait("b", b"cells", stream="halo", frame_no=frame, timeout=5)
            for frame in (4, 5, 6)
        ]
        acks = [await h.wait() for h in later]
        print(f"    sender: frames 4, 5, 6 -> ACK #{[ack.seq for ack in acks]}")
        print(f"    receiver's compute actor saw: {log}")
        print(
            "    (frame 4 carried the sender's stream floor, 'everything below 4 has an outcome',"
        )
        print("     so b knew at once that 3 would never come; otherwise b's REQ would ask)")
        answer = await b.query("a")
        [status] = [s for s in answer.streams if s.stream == "halo"]
        print(
            f"    b asks a (REQ): stream 'halo' last_sent={status.last_sent} "
            f"in_flight={status.in_flight} given_up={status.given_up}"
        )
        assert log[:2] == [1, 2]
        assert log[2][:3] == ("gap", 3, 3)
        assert log[3:] == [4, 5, 6]
        assert (status.last_sent, status.in_flight, status.given_up) == (6, 0, 1)
    print("    an explicit Gap for frame 3, then 4, 5, 6: nothing silently dropped\n")


def policies() -> None:
    """Part 4: nobody says what became of frame 3; each policy's answer (virtual time)."""
    print("part 4: frame 3 missing and the sender silent, per gap policy (gap_timeout=0.5 s)")
    for policy in GapPolicy:
        config = SequencerConfig(policy=policy, gap_timeout=0.5)
        seq: StreamSequencer[str] = StreamSequencer(config=config)
        for frame in (1, 2, 4, 5, 6):
            seq.offer(StreamSeq(frame), StreamSeq(1), f"{frame}", now=0.0)
        story = describe(seq.take_events())
        now = 0.0
        while now < 3.0:
            deadline = seq.next_deadline()
            if deadline is None or deadline > 3.0:
                break
            now = deadline
            seq.poll(now)
            story += [f"t={now:g}: {e}" for e in describe(seq.take_events())]
        if policy is GapPolicy.FAIL:
            # FAIL waits like WAIT until frame 3 is known lost; here the
            # sender finally answers that it gave frame 3 up.
            seq.on_missing_answer((MissingItem(StreamSeq(3), MissingStatus.GIVEN_UP),), now)
            story += [f"sender says GIVEN_UP: {e}" for e in describe(seq.take_events())]
        if policy is GapPolicy.SKIP:
            late = seq.offer(StreamSeq(3), StreamSeq(1), "3", now)
            story.append(f"frame 3 arrives late -> {late.name} (answered ERR SKIPPED)")
        stats = seq.statistics()
        print(f"    {policy.value}:")
        for line in story:
            print(f"        {line}")
        print(f"        -> buffered={stats.buffered} gap events={stats.gap_events}")
        if policy is GapPolicy.WAIT:
            assert stats.buffered == 3
            assert stats.gap_events == 0
        elif policy is GapPolicy.SKIP:
            assert stats.skips == 1
            assert stats.delivered == 5
        else:
            assert stats.failed
    print()


async def main() -> None:
    frame_three_is_late()
    with tempfile.TemporaryDirectory() as tmp, trio.fail_after(DEADLINE):
        await reordering_wire(tmp)
        await frame_three_given_up()
    policies()
    print("OK: in order, buffered while out of order, and gaps reported explicitly")


if __name__ == "__main__":
    trio.run(main)
    sys.exit(0)
