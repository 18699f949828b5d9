"""Rules of the sending side of a link, one test per rule, in virtual time.

Time is a plain float passed in; jitter comes from a constant ``rng`` (0.5 means
"no jitter") so every retry time is asserted exactly.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport import (
    PROTOCOL_VERSION,
    Incarnation,
    LinkSeq,
    LocalProtocolError,
    NodeId,
    StreamId,
    StreamSeq,
)
from transport._proto_link import (
    Answered,
    GaveUp,
    Held,
    PeerRestarted,
    PeerState,
    PeerStateChanged,
    SenderConfig,
    jittered,
)
from transport._proto_sender import LinkSender
from transport.frames import (
    AckFrame,
    AckRange,
    Batch,
    Data,
    ErrFrame,
    Frame,
    Hello,
    MissingItem,
    MissingStatus,
    Received,
    Req,
    ReqAnswer,
    RetryLater,
    RetryReason,
    StreamStatus,
)

A = NodeId("a")
B = NodeId("b")
INC_A = Incarnation(7)
INC_B = Incarnation(50)
HALO = StreamId("halo")
CTL = StreamId("ctl")

#: Timers far away, so that only the timer under test shows in next_deadline().
QUIET = {"heartbeat_interval": 100.0, "suspect_after": 1000.0, "down_after": 2000.0}


def make(rng_value: float = 0.5, **config: Any) -> LinkSender:
    return LinkSender(
        A, INC_A, B, now=0.0, rng=lambda: rng_value, config=SenderConfig(**{**QUIET, **config})
    )


def datas(frames: list[Frame]) -> list[Data]:
    return [f for f in frames if isinstance(f, Data)]


def seqs(frames: list[Frame]) -> list[int]:
    return [f.seq for f in datas(frames)]


def received(seq: int, credit: int = 1000, inc: Incarnation = INC_B) -> Received:
    return Received(B, inc, INC_A, LinkSeq(seq), LinkSeq(credit))


def ack(seq: int, credit: int = 1000, inc: Incarnation = INC_B, result: object = None) -> AckFrame:
    return AckFrame(B, inc, INC_A, LinkSeq(seq), LinkSeq(credit), result)


def ack_range(first: int, last: int, credit: int = 1000, inc: Incarnation = INC_B) -> AckRange:
    return AckRange(B, inc, INC_A, LinkSeq(first), LinkSeq(last), LinkSeq(credit))


def err(seq: int, code: int = 100, credit: int = 1000) -> ErrFrame:
    return ErrFrame(B, INC_B, INC_A, LinkSeq(seq), LinkSeq(credit), code, "no")


def retry_later(seq: int, credit: int = 1000) -> RetryLater:
    return RetryLater(B, INC_B, INC_A, LinkSeq(seq), LinkSeq(credit), RetryReason.WINDOW_FULL)


# --- numbering, watermark, floors ---------------------------------------------------


def test_numbers_links_and_streams_from_one() -> None:
    s = make()
    assert [s.send(HALO, i, now=0.0) for i in range(3)] == [1, 2, 3]
    assert s.send(CTL, "c", now=0.0, frame_no=42) == 4
    frames = datas(s.frames_to_send(0.0))
    assert [(f.seq, f.stream, f.stream_seq) for f in frames] == [
        (1, HALO, 1),
        (2, HALO, 2),
        (3, HALO, 3),
        (4, CTL, 1),
    ]
    assert all(f.node == A and f.incarnation == INC_A and f.watermark == 1 for f in frames)
    assert frames[3].frame_no == 42
    assert frames[3].payload == "c"


def test_watermark_and_stream_floor_follow_lowest_unfinished() -> None:
    s = make(retry_timeout=1.0, retry_ceiling=1.0)
    for i in range(4):
        s.send(HALO, i, now=0.0)
    s.frames_to_send(0.0)
    s.receive_frame(ack(2), 0.1)
    s.receive_frame(ack(3), 0.1)
    assert s.watermark == 1
    s.receive_frame(ack(1), 0.1)
    assert s.watermark == 4
    # The resend of 4 tells the receiver both floors.
    (resend,) = datas(s.frames_to_send(1.0))
    assert (resend.seq, resend.watermark, resend.stream_floor) == (4, 4, 4)
    s.receive_frame(ack(4), 1.1)
    assert s.watermark == 5
    assert s.statistics().in_flight == 0


def test_ack_range_is_an_ack_without_result_for_each_number_in_it() -> None:
    s = make()
    for i in range(6):
        s.send(HALO, i, now=0.0)
    s.frames_to_send(0.0)
    s.receive_frame(ack_range(2, 4, credit=300), 0.01)
    events = [e for e in s.take_events() if isinstance(e, Answered)]
    assert [e.seq for e in events] == [2, 3, 4]
    assert all(e.answer == ack_range(2, 4, credit=300) for e in events)
    stats = s.statistics()
    assert (stats.acked, stats.in_flight, stats.watermark, stats.credit) == (3, 3, 1, 300)
    assert s.in_flight == 3
    assert stats.rtt == 0.01
    # Overlapping an answered number and one never sent: those are duplicates.
    s.receive_frame(ack_range(1, 7), 0.02)
    assert [e.seq for e in s.take_events() if isinstance(e, Answered)] == [1, 5, 6]
    stats = s.statistics()
    assert (stats.acked, stats.in_flight, stats.watermark) == (6, 0, 7)
    assert s.in_flight == 0
    assert stats.duplicate_answers == 4


def test_ack_range_from_the_network_costs_at_most_the_window() -> None:
    s = make()
    s.send(HALO, "x", now=0.0)
    s.frames_to_send(0.0)
    s.receive_frame(ack_range(0, 2**63 - 1), 0.01)
    assert [e.seq for e in s.take_events() if isinstance(e, Answered)] == [1]
    # A range from an older incarnation of the peer proves nothing.
    s.send(HALO, "y", now=0.02)
    s.frames_to_send(0.02)
    s.receive_frame(ack_range(2, 2, inc=Incarnation(49)), 0.03)
    assert s.take_events() == []
    assert s.statistics().stale_answers == 1


def test_ack_and_err_are_final_answers_reported_once() -> None:
    s = make()
    s.send(HALO, "x", now=0.0)
    s.send(HALO, "y", now=0.0)
    s.frames_to_send(0.0)
    s.receive_frame(ack(1, result=b"ok"), 0.01)
    s.receive_frame(err(2, code=123), 0.01)
    s.receive_frame(ack(1), 0.02)
    events = [e for e in s.take_events() if isinstance(e, Answered)]
    assert [(e.seq, type(e.answer).__name__) for e in events] == [(1, "AckFrame"), (2, "ErrFrame")]
    assert isinstance(events[0].answer, AckFrame)
    assert events[0].answer.result == b"ok"
    assert isinstance(events[1].answer, ErrFrame)
    assert events[1].answer.code == 123
    stats = s.statistics()
    assert (stats.acked, stats.erred, stats.duplicate_answers) == (1, 1, 1)


# --- credit and window --------------------------------------------------------------


def test_initial_credit_then_credit_from_answers() -> None:
    s = make(initial_credit=3)
    for i in range(3):
        s.send(HALO, i, now=0.0)
    assert not s.window_open()
    with pytest.raises(LocalProtocolError, match="window_open"):
        s.send(HALO, 3, now=0.0)
    s.frames_to_send(0.0)
    s.receive_frame(received(1, credit=5), 0.01)
    assert s.credit == 5
    assert s.window_open()
    # Credit is a monotone maximum: a reordered older grant does not shrink it.
    s.receive_frame(received(2, credit=4), 0.01)
    assert s.credit == 5
    s.send(HALO, 3, now=0.02)
    s.send(HALO, 4, now=0.02)
    assert not s.window_open()
    assert seqs(s.frames_to_send(0.02)) == [4, 5]


def test_max_in_flight_bounds_window_past_watermark() -> None:
    s = make(max_in_flight=2)
    s.send(HALO, 0, now=0.0)
    s.send(HALO, 1, now=0.0)
    assert not s.window_open()
    s.frames_to_send(0.0)
    s.receive_frame(ack(2), 0.01)
    assert not s.window_open(), "seq 1 still holds the watermark"
    s.receive_frame(ack(1), 0.01)
    assert s.window_open()


def test_window_probe_past_stale_credit_when_nothing_outstanding() -> None:
    # Two sends give up before any answer: the receiver's credit can only move
    # once it sees the new watermark, so one DATA goes out past the credit.
    s = make(initial_credit=2)
    s.send(HALO, 0, now=0.0, deadline=1.0)
    s.send(HALO, 1, now=0.0, deadline=1.0)
    s.frames_to_send(0.0)
    s.poll(1.0)
    assert s.watermark == 3
    assert s.credit == 2
    assert s.window_open()
    s.send(HALO, 2, now=1.0)
    assert not s.window_open(), "only one probe at a time"
    (probe,) = datas(s.frames_to_send(1.0))
    assert (probe.seq, probe.watermark) == (3, 3)


def test_max_batch_caps_data_per_call() -> None:
    s = make(max_batch=2)
    for i in range(5):
        s.send(HALO, i, now=0.0)
    assert seqs(s.frames_to_send(0.0)) == [1, 2]
    assert s.next_deadline() == 0.0, "more is ready: call again at once"
    assert seqs(s.frames_to_send(0.0)) == [3, 4]
    assert seqs(s.frames_to_send(0.0)) == [5]
    assert s.next_deadline() > 0.0


# --- retransmission -----------------------------------------------------------------


def test_backoff_doubles_up_to_the_ceiling_exactly() -> None:
    s = make(retry_timeout=0.2, backoff=2.0, retry_ceiling=1.0)
    s.send(HALO, "x", now=0.0)
    assert seqs(s.frames_to_send(0.0)) == [1]
    now = 0.0
    for wait in (0.2, 0.4, 0.8, 1.0, 1.0, 1.0):
        due = now + wait
        assert s.next_deadline() == due
        assert seqs(s.frames_to_send(math.nextafter(due, 0.0))) == []
        assert seqs(s.frames_to_send(due)) == [1]
        now = due
    assert s.statistics().resent == 6


@pytest.mark.parametrize("rng_value", [0.0, 0.25, 0.5, 0.999999])
def test_jitter_scales_every_wait(rng_value: float) -> None:
    s = make(rng_value, retry_timeout=0.2, backoff=2.0, retry_ceiling=0.4, jitter=0.1)
    s.send(HALO, "x", now=0.0)
    s.frames_to_send(0.0)
    first = jittered(0.2, 0.1, lambda: rng_value)
    assert s.next_deadline() == first
    s.frames_to_send(first)
    assert s.next_deadline() == first + jittered(0.4, 0.1, lambda: rng_value)


@settings(max_examples=50)
@given(base=st.floats(0.001, 100.0), jitter=st.floats(0.0, 0.99), u=st.floats(0.0, 0.9999999))
def test_jittered_stays_within_bounds(base: float, jitter: float, u: float) -> None:
    value = jittered(base, jitter, lambda: u)
    assert base * (1 - jitter) * (1 - 1e-12) <= value <= base * (1 + jitter)


def test_retry_later_is_not_held_and_backs_off() -> None:
    s = make(retry_timeout=0.2, retry_ceiling=2.0)
    s.send(HALO, "x", now=0.0)
    s.frames_to_send(0.0)
    s.receive_frame(retry_later(1), 0.05)
    assert s.take_events() == [PeerStateChanged(PeerState.SUSPECT, PeerState.UP)]
    assert s.next_deadline() == 0.2, "the timer armed at send is the backoff"
    assert seqs(s.frames_to_send(0.2)) == [1]
    stats = s.statistics()
    assert (stats.retry_later, stats.held, stats.resent, stats.held_probes) == (1, 0, 1, 0)


def test_received_holds_and_reprobes_at_the_ceiling_without_failing() -> None:
    s = make(retry_timeout=0.2, retry_ceiling=2.0)
    s.send(HALO, "x", now=0.0)
    s.send(HALO, "y", now=0.0)
    s.frames_to_send(0.0)
    s.receive_frame(received(1), 0.05)
    s.receive_frame(received(1), 0.06)
    assert [e for e in s.take_events() if isinstance(e, Held)] == [Held(LinkSeq(1))]
    # 2 is unanswered: normal backoff. 1 is held: only the ceiling.
    assert seqs(s.frames_to_send(0.2)) == [2]
    assert s.next_deadline() == 0.2 + 0.4
    assert seqs(s.frames_to_send(0.2 + 0.4)) == [2]
    s.receive_frame(ack(2), 0.61)
    assert s.next_deadline() == 0.06 + 2.0
    assert seqs(s.frames_to_send(2.06)) == [1]
    stats = s.statistics()
    assert (stats.resent, stats.held_probes, stats.held) == (2, 1, 1)
    # A RETRY_LATER cannot undo "held" within one receiver incarnation.
    s.receive_frame(retry_later(1), 2.1)
    assert s.statistics().held == 1
    assert s.statistics().retry_later == 0


def test_held_message_blocking_a_shut_window_is_probed_on_the_backoff() -> None:
    s = make(max_in_flight=2, retry_timeout=0.2, retry_ceiling=2.0)
    s.send(HALO, 0, now=0.0)
    s.frames_to_send(0.0)
    s.receive_frame(received(1), 0.01)
    assert s.next_deadline() == 0.01 + 2.0
    s.send(HALO, 1, now=0.02)
    assert not s.window_open()
    assert seqs(s.frames_to_send(0.02)) == [2]
    s.receive_frame(received(2), 0.03)
    # 1's final answer may be lost and it keeps the window shut: it is probed
    # after retry_timeout. 2 is held too but blocks nothing: the ceiling.
    assert s.next_deadline() == 0.02 + 0.2
    assert seqs(s.frames_to_send(0.02 + 0.2)) == [1]
    # Still the blocker: its probes back off as usual.
    assert s.next_deadline() == 0.02 + 0.2 + 0.4
    assert s.statistics().held_probes == 1


def test_give_up_exactly_at_deadline_and_never_resend() -> None:
    s = make(retry_timeout=0.2)
    s.send(HALO, "x", now=0.0, deadline=1.0)
    s.frames_to_send(0.0)
    s.take_events()
    s.poll(math.nextafter(1.0, 0.0))
    assert s.take_events() == []
    s.poll(1.0)
    assert s.take_events() == [GaveUp(LinkSeq(1), HALO, StreamSeq(1))]
    assert s.watermark == 2
    assert datas(s.frames_to_send(100.0)) == []
    s.receive_frame(ack(1), 100.0)
    assert [e for e in s.take_events() if isinstance(e, Answered)] == []
    stats = s.statistics()
    assert (stats.gave_up, stats.duplicate_answers, stats.in_flight) == (1, 1, 0)


def test_held_message_still_gives_up_at_its_deadline() -> None:
    s = make()
    s.send(HALO, "x", now=0.0, deadline=5.0)
    s.frames_to_send(0.0)
    s.receive_frame(received(1), 0.01)
    assert s.next_deadline() == 2.01
    s.frames_to_send(2.01)
    s.frames_to_send(4.01)
    assert s.next_deadline() == 5.0
    s.poll(5.0)
    assert GaveUp(LinkSeq(1), HALO, StreamSeq(1)) in s.take_events()


def test_queued_message_gives_up_without_ever_being_sent() -> None:
    s = make(initial_credit=1)
    s.send(HALO, 0, now=0.0)
    s.frames_to_send(0.0)
    s.receive_frame(received(1, credit=2), 0.0)
    s.send(HALO, 1, now=0.0, deadline=0.5)
    s.receive_frame(received(1, credit=1), 0.0)
    s.poll(0.5)
    assert GaveUp(LinkSeq(2), HALO, StreamSeq(2)) in s.take_events()
    assert s.statistics().sent == 1


# --- incarnations -------------------------------------------------------------------


def test_receiver_restart_resends_everything_unanswered_at_once() -> None:
    s = make(initial_credit=10, retry_ceiling=2.0)
    for i in range(3):
        s.send(HALO, i, now=0.0)
    s.frames_to_send(0.0)
    s.receive_frame(ack(1, credit=500), 0.01)
    s.receive_frame(received(2, credit=500), 0.01)
    s.receive_frame(received(3, credit=500), 0.01)
    s.take_events()
    new = Incarnation(51)
    s.receive_frame(Hello(B, new, 9, False), 0.5)
    assert s.take_events() == [PeerRestarted(INC_B, new)]
    assert s.peer_incarnation == new
    # The answer to 1 stands; 2 and 3 (only "held" by the dead process) go again now.
    assert seqs(s.frames_to_send(0.5)) == [2, 3]
    stats = s.statistics()
    assert (stats.held, stats.credit, stats.peer_restarts) == (0, 2 + 10 - 1, 1)
    # RECEIVED from the old incarnation proves nothing any more.
    s.receive_frame(ack(2, inc=INC_B), 0.6)
    assert s.statistics().stale_answers == 1
    s.receive_frame(ack(2, inc=new), 0.6)
    assert [type(e) for e in s.take_events()] == [Answered]


def test_answers_for_another_sender_incarnation_are_ignored() -> None:
    s = make()
    s.send(HALO, "x", now=0.0)
    s.frames_to_send(0.0)
    s.receive_frame(AckFrame(B, INC_B, Incarnation(6), LinkSeq(1), LinkSeq(1000), None), 0.01)
    assert s.statistics().stale_answers == 1
    assert s.statistics().in_flight == 1


def test_frames_from_another_node_are_refused() -> None:
    s = make()
    s.send(HALO, "x", now=0.0)
    s.frames_to_send(0.0)
    s.receive_frame(AckFrame(NodeId("c"), INC_B, INC_A, LinkSeq(1), LinkSeq(9), None), 0.01)
    s.receive_frame(Batch((Batch(()),)), 0.01)
    stats = s.statistics()
    assert stats.rejected == {"wrong-peer": 1, "nested-batch": 1}
    assert stats.in_flight == 1
    assert stats.peer_incarnation is None


# --- protocol version (protocol.md §5.7) --------------------------------------------


def test_heartbeats_carry_the_protocol_version() -> None:
    s = make(heartbeat_interval=0.5)
    (hello,) = s.frames_to_send(0.0)
    assert hello.version == PROTOCOL_VERSION == 1  # type: ignore[union-attr]
    s.receive_frame(Hello(B, INC_B, 77, False), 0.1)
    (reply,) = s.frames_to_send(0.1)
    assert reply == Hello(A, INC_A, 77, True, PROTOCOL_VERSION)


def test_peer_of_another_version_fails_every_send_at_once() -> None:
    s = make(heartbeat_interval=0.5)
    s.send(HALO, "sent", now=0.0)
    s.frames_to_send(0.0)
    s.receive_frame(received(1), 0.01)
    s.send(HALO, "queued", now=0.01, deadline=30.0)
    s.take_events()
    reason = "peer speaks protocol version 2, this node speaks 1"
    # Another incarnation too: in another version it may mean something else.
    s.receive_frame(Hello(B, Incarnation(99), 0, True, 2), 0.02)
    # Held and queued alike end now, not at their deadlines.
    assert s.take_events() == [
        GaveUp(LinkSeq(1), HALO, StreamSeq(1), reason),
        GaveUp(LinkSeq(2), HALO, StreamSeq(2), reason),
    ]
    assert s.peer_version == 2
    # A later send is accepted, and given up at the next step: never transmitted.
    assert s.window_open()
    seq = s.send(HALO, "later", now=0.03)
    assert s.stream_seq_of(seq) == 3
    assert datas(s.frames_to_send(0.03)) == []
    assert s.take_events() == [GaveUp(seq, HALO, StreamSeq(3), reason)]
    stats = s.statistics()
    assert (stats.gave_up, stats.in_flight, stats.sent) == (3, 0, 1)
    assert (stats.peer_version, stats.rejected) == (2, {"bad-version": 1})
    # Nothing of the other version's frame is taken but its version.
    assert (stats.peer_incarnation, stats.peer_restarts) == (INC_B, 0)


def test_peer_of_another_version_is_not_heard_and_gets_our_reply() -> None:
    s = make(heartbeat_interval=0.5, suspect_after=1.5, down_after=5.0)
    s.receive_frame(Hello(B, Incarnation(99), 41, False, 7), 0.1)
    assert s.peer_incarnation is None
    assert s.peer_state is PeerState.SUSPECT
    assert s.frames_to_send(0.1) == [Hello(A, INC_A, 41, True, PROTOCOL_VERSION)]
    assert s.peer_version == 7
    assert s.statistics().rejected == {"bad-version": 1}


def test_peer_upgraded_to_our_version_is_taken_up_again() -> None:
    s = make(heartbeat_interval=0.5)
    assert s.frames_to_send(0.0) == [Hello(A, INC_A, 1, False)]
    s.receive_frame(Hello(B, INC_B, 1, True, 2), 0.01)
    assert s.peer_version == 2
    # Heartbeats go on while the link is incompatible.
    assert s.frames_to_send(0.5) == [Hello(A, INC_A, 2, False)]
    s.receive_frame(Hello(B, Incarnation(60), 2, True), 0.52)
    assert s.peer_version is None
    assert s.peer_state is PeerState.UP
    s.send(HALO, "x", now=0.6)
    assert seqs(s.frames_to_send(0.6)) == [1]
    s.receive_frame(ack(1, inc=Incarnation(60)), 0.61)
    assert [type(e) for e in s.take_events()] == [PeerStateChanged, Answered]


# --- heartbeats, RTT, liveness ------------------------------------------------------


def test_heartbeat_when_idle_and_rtt_from_reply() -> None:
    s = LinkSender(A, INC_A, B, now=0.0, rng=lambda: 0.5)
    (hello,) = s.frames_to_send(0.0)
    assert hello == Hello(A, INC_A, 1, False)
    assert s.next_deadline() == 0.5
    s.receive_frame(Hello(B, INC_B, 1, True), 0.004)
    assert s.rtt == 0.004
    assert s.frames_to_send(0.3) == []
    (again,) = s.frames_to_send(0.5)
    assert again == Hello(A, INC_A, 2, False)
    # A reply to an old ping says nothing about the round trip.
    s.receive_frame(Hello(B, INC_B, 1, True), 0.6)
    assert s.rtt == 0.004


def test_no_heartbeat_while_data_flows() -> None:
    s = LinkSender(A, INC_A, B, now=0.0, rng=lambda: 0.5)
    s.send(HALO, "x", now=0.0)
    assert [type(f) for f in s.frames_to_send(0.0)] == [Data]


def test_answers_a_peer_hello_with_same_nonce() -> None:
    s = make()
    s.receive_frame(Hello(B, INC_B, 77, False), 1.0)
    assert Hello(A, INC_A, 77, True) in s.frames_to_send(1.0)


def test_rtt_follows_karns_rule() -> None:
    s = make(retry_timeout=0.2)
    s.send(HALO, 0, now=0.0)
    s.send(HALO, 1, now=0.0)
    s.frames_to_send(0.0)
    s.receive_frame(received(1), 0.01)
    assert s.rtt == 0.01
    s.frames_to_send(0.2)
    s.receive_frame(ack(2), 0.25)
    assert s.rtt == 0.01, "no sample from a resent message"
    s.receive_frame(ack(1), 0.5)
    assert s.rtt == 0.01, "only the first answer is a round trip"


def test_peer_state_up_suspect_down() -> None:
    s = LinkSender(
        A,
        INC_A,
        B,
        now=0.0,
        rng=lambda: 0.5,
        config=SenderConfig(heartbeat_interval=100.0, suspect_after=1.5, down_after=5.0),
    )
    assert s.statistics().peer_state is PeerState.SUSPECT
    s.receive_frame(Hello(B, INC_B, 1, False), 1.0)
    assert s.peer_state is PeerState.UP
    s.frames_to_send(1.0)
    assert s.next_deadline() == 2.5
    s.poll(2.5)
    assert s.next_deadline() == 6.0
    s.poll(6.0)
    assert s.statistics().peer_state is PeerState.DOWN
    s.receive_frame(Hello(B, INC_B, 2, False), 7.0)
    assert [e for e in s.take_events() if isinstance(e, PeerStateChanged)] == [
        PeerStateChanged(PeerState.SUSPECT, PeerState.UP),
        PeerStateChanged(PeerState.UP, PeerState.SUSPECT),
        PeerStateChanged(PeerState.SUSPECT, PeerState.DOWN),
        PeerStateChanged(PeerState.DOWN, PeerState.UP),
    ]


# --- REQ ------------------------------------------------------------------------


def test_req_missing_gets_one_status_per_item() -> None:
    s = make(initial_credit=4, retry_timeout=0.2)
    for i in range(3):
        s.send(HALO, i, now=0.0, deadline=0.15 if i == 1 else math.inf)
    s.frames_to_send(0.0)
    s.receive_frame(ack(1), 0.01)
    s.poll(0.15)
    s.send(HALO, 3, now=0.15)
    s.take_events()
    s.receive_frame(Req(B, INC_B, 5, HALO, (StreamSeq(1), StreamSeq(2), StreamSeq(3))), 0.15)
    s.receive_frame(Req(B, INC_B, 6, HALO, (StreamSeq(4), StreamSeq(9))), 0.15)
    out = s.frames_to_send(0.15)
    answers = [f for f in out if isinstance(f, ReqAnswer)]
    assert answers[0] == ReqAnswer(
        A,
        INC_A,
        5,
        HALO,
        (
            MissingItem(StreamSeq(1), MissingStatus.ANSWERED),
            MissingItem(StreamSeq(2), MissingStatus.GIVEN_UP),
            MissingItem(StreamSeq(3), MissingStatus.RESENT),
        ),
        (),
    )
    assert answers[1].missing == (
        MissingItem(StreamSeq(4), MissingStatus.IN_FLIGHT),
        MissingItem(StreamSeq(9), MissingStatus.NEVER_SENT),
    )
    # RESENT means now: 3 goes in this very call, with the queued 4.
    assert seqs(out) == [3, 4]


def test_status_req_reports_every_stream() -> None:
    s = make(retry_timeout=0.2)
    s.send(HALO, 0, now=0.0, deadline=0.1)
    s.send(HALO, 1, now=0.0)
    s.send(CTL, 2, now=0.0)
    s.frames_to_send(0.0)
    s.poll(0.1)
    s.receive_frame(Req(B, INC_B, 1, None, ()), 0.1)
    (answer,) = [f for f in s.frames_to_send(0.1) if isinstance(f, ReqAnswer)]
    assert answer.streams == (
        StreamStatus(HALO, StreamSeq(2), 1, 1),
        StreamStatus(CTL, StreamSeq(1), 1, 0),
    )
    s.receive_frame(Req(B, INC_B, 2, CTL, ()), 0.1)
    (answer,) = [f for f in s.frames_to_send(0.1) if isinstance(f, ReqAnswer)]
    assert answer.streams == (StreamStatus(CTL, StreamSeq(1), 1, 0),)


# --- misuse ---------------------------------------------------------------------


def test_misuse_raises_local_protocol_error() -> None:
    s = make()
    with pytest.raises(LocalProtocolError, match="deadline"):
        s.send(HALO, "x", now=1.0, deadline=1.0)
    with pytest.raises(LocalProtocolError, match="deadline"):
        s.send(HALO, "x", now=1.0, deadline=math.nan)
    with pytest.raises(LocalProtocolError, match="stream"):
        s.send(StreamId(""), "x", now=1.0)
    with pytest.raises(LocalProtocolError, match="backwards"):
        s.poll(0.5)
    for bad in (
        {"retry_timeout": -1.0},
        {"jitter": 1.0},
        {"backoff": 0.5},
        {"retry_ceiling": 0.1},
        {"down_after": 1.0},
        {"max_batch": 0},
    ):
        with pytest.raises(LocalProtocolError):
            SenderConfig(**bad)


def test_timer_heaps_stay_bounded_by_in_flight() -> None:
    # Answered messages leave stale entries in the lazy heaps; compaction keeps
    # them proportional to what is in flight, not to what was ever sent.
    s = make(initial_credit=10_000, max_in_flight=10_000)
    for round_ in range(50):
        now = round_ * 0.01
        for i in range(100):
            s.send(HALO, i, now=now)
        sent = seqs(s.frames_to_send(now))
        for seq in sent:
            s.receive_frame(ack(seq, credit=100_000), now)
    assert s.statistics().in_flight == 0
    assert len(s._timers) <= 2 * 100 + 64
    assert len(s._deadlines) <= 2 * 100 + 64


def test_retry_timer_adapts_to_a_slow_round_trip() -> None:
    # RFC 6298 §2: after samples of 0.5 s the first resend waits
    # SRTT + 4 RTTVAR (capped by the ceiling), not the 0.2 s floor.
    s = make(jitter=0.0, retry_timeout=0.2, retry_ceiling=4.0)
    s.send(HALO, "a", now=0.0)
    s.frames_to_send(0.0)
    s.receive_frame(ack(1), 0.5)
    assert s.rtt == 0.5
    s.send(HALO, "b", now=0.5)
    assert seqs(s.frames_to_send(0.5)) == [2]
    # SRTT 0.5 and RTTVAR 0.25 on the first sample: RTO = 1.5 s.
    assert s.next_deadline() == 0.5 + 1.5
    assert seqs(s.frames_to_send(1.99)) == []
    assert seqs(s.frames_to_send(2.0)) == [2]


def test_retry_timer_never_goes_below_the_configured_floor() -> None:
    s = make(jitter=0.0, retry_timeout=0.2)
    s.send(HALO, "a", now=0.0)
    s.frames_to_send(0.0)
    s.receive_frame(ack(1), 0.001)
    s.send(HALO, "b", now=0.001)
    s.frames_to_send(0.001)
    assert s.next_deadline() == 0.001 + 0.2
