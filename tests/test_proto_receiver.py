"""Rules of the receiving side of links, one test per rule."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport import (
    APP_ERR_MIN,
    PROTOCOL_VERSION,
    ErrCode,
    Incarnation,
    LinkSeq,
    LocalProtocolError,
    NodeId,
    StreamId,
    StreamSeq,
    decode,
    encode,
)
from transport._proto_link import (
    QueryAnswered,
    ReceiverConfig,
    Rejected,
    SessionEnded,
    SessionStarted,
    SessionStatistics,
)
from transport._proto_receiver import LinkReceiver
from transport._proto_sender import LinkSender
from transport.events import (
    Admitted,
    CachedAnswer,
    SessionSnapshot,
)
from transport.frames import (
    AckFrame,
    AckRange,
    Batch,
    Data,
    DataItems,
    ErrFrame,
    Frame,
    Hello,
    ItemAck,
    ItemErr,
    MissingItem,
    MissingStatus,
    Received,
    Req,
    ReqAnswer,
    RetryLater,
    RetryReason,
)

A = NodeId("a")
B = NodeId("b")
C = NodeId("c")
INC_A = Incarnation(7)
INC_B = Incarnation(50)
HALO = StreamId("halo")


def make(window: int = 8, max_entries: int = 16, received_delay: float = 0.0) -> LinkReceiver:
    # Most rules are easiest to see with RECEIVED sent at once; the delayed
    # RECEIVED has its own tests below.
    config = ReceiverConfig(window=window, max_entries=max_entries, received_delay=received_delay)
    return LinkReceiver(B, INC_B, config=config)


def data(
    seq: int,
    watermark: int = 1,
    inc: Incarnation = INC_A,
    node: NodeId = A,
    payload: object = None,
) -> Data:
    return Data(
        node,
        inc,
        LinkSeq(seq),
        HALO,
        StreamSeq(seq),
        StreamSeq(1),
        seq * 10,
        payload if payload is not None else f"p{seq}",
        LinkSeq(watermark),
    )


def flush(r: LinkReceiver, now: float = 0.0) -> list[Frame]:
    pairs = r.frames_to_send(now)
    assert all(peer == A for peer, _ in pairs)
    return [frame for _, frame in pairs]


def session(r: LinkReceiver) -> SessionStatistics:
    (s,) = r.statistics().sessions
    return s


def test_first_copy_is_delivered_and_received_is_queued() -> None:
    r = make()
    r.receive_frame(A, data(1), 0.0)
    assert r.take_events() == [
        SessionStarted(A, INC_A),
        Admitted(A, INC_A, LinkSeq(1), HALO, StreamSeq(1), StreamSeq(1), 10, "p1"),
    ]
    assert r.next_deadline() == 0.0
    assert flush(r) == [Received(B, INC_B, INC_A, LinkSeq(1), LinkSeq(8))]
    assert r.next_deadline() is None
    assert r.complete(A, INC_A, LinkSeq(1), result="r1")
    assert flush(r) == [AckFrame(B, INC_B, INC_A, LinkSeq(1), LinkSeq(9), "r1")]


def test_final_answer_known_at_flush_replaces_received() -> None:
    r = make()
    r.receive_frame(A, data(1), 0.0)
    r.receive_frame(A, data(2), 0.0)
    r.complete(A, INC_A, LinkSeq(1))
    r.fail(A, INC_A, LinkSeq(2), APP_ERR_MIN + 1, "bad cell")
    assert flush(r) == [
        AckFrame(B, INC_B, INC_A, LinkSeq(1), LinkSeq(10), None),
        ErrFrame(B, INC_B, INC_A, LinkSeq(2), LinkSeq(10), APP_ERR_MIN + 1, "bad cell"),
    ]


def test_duplicate_gets_received_then_the_same_final_answer() -> None:
    r = make()
    r.receive_frame(A, data(1), 0.0)
    flush(r)
    r.receive_frame(A, data(1), 0.1)
    assert flush(r, 0.1) == [Received(B, INC_B, INC_A, LinkSeq(1), LinkSeq(8))]
    r.complete(A, INC_A, LinkSeq(1), result=[1, 2])
    first = flush(r, 0.2)
    r.receive_frame(A, data(1), 0.3)
    r.receive_frame(A, data(1), 0.3)
    assert flush(r, 0.3) == first == [AckFrame(B, INC_B, INC_A, LinkSeq(1), LinkSeq(9), [1, 2])]
    delivers = [e for e in r.take_events() if isinstance(e, Admitted)]
    assert len(delivers) == 1
    assert session(r).duplicates == 3


def test_plain_acks_due_together_go_as_ranges_of_consecutive_numbers() -> None:
    r = make(window=16, max_entries=32)
    for seq in range(1, 10):
        r.receive_frame(A, data(seq), 0.0)
    flush(r)
    # Completed out of order; 5 returns a result and 8 fails: both break runs.
    for seq in (3, 1, 2, 4, 7, 6, 9):
        r.complete(A, INC_A, LinkSeq(seq))
    r.complete(A, INC_A, LinkSeq(5), result="r5")
    r.fail(A, INC_A, LinkSeq(8), APP_ERR_MIN, "no")
    credit = LinkSeq(1 + 9 + 16 - 1)
    assert flush(r) == [
        AckRange(B, INC_B, INC_A, LinkSeq(1), LinkSeq(4), credit),
        AckRange(B, INC_B, INC_A, LinkSeq(6), LinkSeq(7), credit),
        AckFrame(B, INC_B, INC_A, LinkSeq(9), credit, None),
        AckFrame(B, INC_B, INC_A, LinkSeq(5), credit, "r5"),
        ErrFrame(B, INC_B, INC_A, LinkSeq(8), credit, APP_ERR_MIN, "no"),
    ]
    # A duplicate of a message inside a range gets its own answer again.
    r.receive_frame(A, data(2), 0.1)
    assert flush(r, 0.1) == [AckFrame(B, INC_B, INC_A, LinkSeq(2), credit, None)]


def test_watermark_prunes_cached_answers_and_drops_old_copies() -> None:
    r = make()
    for seq in (1, 2, 3):
        r.receive_frame(A, data(seq), 0.0)
        r.complete(A, INC_A, LinkSeq(seq))
    flush(r)
    assert session(r).cached_answers == 3
    r.receive_frame(A, data(4, watermark=3), 0.1)
    s = session(r)
    assert (s.cached_answers, s.held, s.watermark) == (1, 1, 3)
    flush(r, 0.1)
    r.receive_frame(A, data(2, watermark=2), 0.2)
    assert flush(r, 0.2) == [], "below the watermark: nobody waits for that answer"
    assert session(r).dropped_below_watermark == 1


def test_beyond_credit_gets_retry_later_and_is_not_held() -> None:
    r = make(window=2, max_entries=4)
    r.receive_frame(A, data(1), 0.0)
    r.receive_frame(A, data(2), 0.0)
    r.receive_frame(A, data(3), 0.0)
    out = flush(r)
    assert RetryLater(B, INC_B, INC_A, LinkSeq(3), LinkSeq(2), RetryReason.WINDOW_FULL) in out
    assert [e.seq for e in r.take_events() if isinstance(e, Admitted)] == [1, 2]
    # The compute layer drains: the floor advances and the credit with it.
    r.complete(A, INC_A, LinkSeq(2))
    assert flush(r) == [AckFrame(B, INC_B, INC_A, LinkSeq(2), LinkSeq(2), None)]
    r.complete(A, INC_A, LinkSeq(1))
    assert flush(r) == [AckFrame(B, INC_B, INC_A, LinkSeq(1), LinkSeq(4), None)]
    r.receive_frame(A, data(3), 0.1)
    assert [e.seq for e in r.take_events() if isinstance(e, Admitted)] == [3]
    assert session(r).retry_later_sent == 1


def test_table_cap_needs_the_watermark_to_move() -> None:
    r = make(window=2, max_entries=2)
    for seq in (1, 2):
        r.receive_frame(A, data(seq), 0.0)
        r.complete(A, INC_A, LinkSeq(seq))
    flush(r)
    assert session(r).credit == 4
    # Within the credit, but two unconfirmed answers fill the table.
    r.receive_frame(A, data(3), 0.0)
    assert [type(f) for f in flush(r)] == [RetryLater]
    # The same DATA with a watermark past 1 and 2 frees the room first.
    r.receive_frame(A, data(3, watermark=3), 0.0)
    assert [type(f) for f in flush(r)] == [Received]
    assert session(r).cached_answers + session(r).held == 1


def test_new_sender_incarnation_ends_the_old_session() -> None:
    r = make()
    r.receive_frame(A, data(1), 0.0)
    r.receive_frame(A, data(2), 0.0)
    r.receive_frame(A, data(3), 0.0)
    r.complete(A, INC_A, LinkSeq(2))
    r.take_events()
    new = Incarnation(8)
    r.receive_frame(A, data(1, inc=new, payload="fresh"), 1.0)
    events = r.take_events()
    assert events[:2] == [
        SessionEnded(A, INC_A, (LinkSeq(1), LinkSeq(3))),
        SessionStarted(A, new),
    ]
    assert isinstance(events[2], Admitted)
    assert (events[2].peer_incarnation, events[2].payload) == (new, "fresh")
    # Nothing of the old session is answered or mixed in.
    assert flush(r, 1.0) == [Received(B, INC_B, new, LinkSeq(1), LinkSeq(8))]
    assert not r.complete(A, INC_A, LinkSeq(1))
    assert r.statistics().ignored_completions == 1
    assert r.session_incarnation(A) == new


def test_older_sender_incarnation_is_refused_stale() -> None:
    r = make()
    r.receive_frame(A, data(1, inc=Incarnation(8)), 0.0)
    r.take_events()
    flush(r)
    r.receive_frame(A, data(5, inc=INC_A), 0.1)
    assert r.take_events() == []
    (answer,) = flush(r, 0.1)
    assert isinstance(answer, ErrFrame)
    assert (answer.code, answer.peer_incarnation, answer.seq) == (
        ErrCode.STALE_SESSION,
        INC_A,
        5,
    )
    assert r.statistics().stale_refused == 1
    assert r.session_incarnation(A) == Incarnation(8)


def test_frame_naming_another_node_is_impersonation() -> None:
    r = make()
    r.receive_frame(C, data(1, node=A), 0.0)
    assert r.take_events() == [Rejected(C, "impersonation")]
    assert flush(r) == []
    assert r.statistics().rejected == {"impersonation": 1}
    assert r.statistics().sessions == ()


def test_malformed_and_unexpected_frames_are_counted_not_raised() -> None:
    r = make()
    r.receive_frame(A, data(3, watermark=4), 0.0)
    r.receive_frame(
        A, Data(A, INC_A, LinkSeq(1), HALO, StreamSeq(1), StreamSeq(2), 0, 0, LinkSeq(1)), 0.0
    )
    r.receive_frame(A, AckFrame(A, INC_A, INC_B, LinkSeq(1), LinkSeq(1), None), 0.0)
    r.receive_frame(A, Batch((Batch(()),)), 0.0)
    assert r.statistics().rejected == {"bad-data": 2, "unexpected-frame": 1, "nested-batch": 1}
    assert not any(isinstance(e, Admitted) for e in r.take_events())


def test_batch_is_unpacked_in_order() -> None:
    r = make()
    r.receive_frame(A, Batch((data(1), data(2), Hello(A, INC_A, 3, False))), 0.0)
    assert [e.seq for e in r.take_events() if isinstance(e, Admitted)] == [1, 2]
    out = flush(r)
    assert Hello(B, INC_B, 3, True) in out
    assert [f.seq for f in out if isinstance(f, Received)] == [1, 2]


def test_hello_from_newer_incarnation_ends_the_session() -> None:
    r = make()
    r.receive_frame(A, data(1), 0.0)
    r.take_events()
    r.receive_frame(A, Hello(A, Incarnation(9), 1, False), 0.5)
    assert r.take_events() == [SessionEnded(A, INC_A, (LinkSeq(1),))]
    assert r.session_incarnation(A) is None
    assert Hello(B, INC_B, 1, True) in flush(r, 0.5)


def test_hello_of_another_version_gets_our_version_and_changes_nothing() -> None:
    # protocol.md §5.7: the peer learns at once which version we speak; its
    # frame's other fields are not taken (no session ends, no incarnation noted).
    r = make()
    r.receive_frame(A, data(1), 0.0)
    r.take_events()
    r.receive_frame(A, Hello(A, Incarnation(9), 5, False, 2), 0.1)
    assert r.take_events() == [Rejected(A, "bad-version")]
    assert r.statistics().rejected == {"bad-version": 1}
    assert r.session_incarnation(A) == INC_A
    assert flush(r, 0.1) == [
        Hello(B, INC_B, 5, True, PROTOCOL_VERSION),
        Received(B, INC_B, INC_A, LinkSeq(1), LinkSeq(8)),
    ]
    # The peer's other frames are handled as usual.
    r.receive_frame(A, data(2), 0.2)
    assert [e.seq for e in r.take_events() if isinstance(e, Admitted)] == [2]
    # A reply of another version is unexpected at a receiver, as any reply is.
    r.receive_frame(A, Hello(A, INC_A, 6, True, 2), 0.3)
    assert r.statistics().rejected == {"bad-version": 1, "unexpected-frame": 1}


def test_completion_misuse_raises() -> None:
    r = make()
    r.receive_frame(A, data(1), 0.0)
    with pytest.raises(LocalProtocolError, match="never"):
        r.complete(A, INC_A, LinkSeq(2))
    r.complete(A, INC_A, LinkSeq(1))
    with pytest.raises(LocalProtocolError, match="already"):
        r.fail(A, INC_A, LinkSeq(1), ErrCode.COMPUTE_FAILED)
    with pytest.raises(LocalProtocolError, match="reserved"):
        r.fail(A, INC_A, LinkSeq(1), 42)
    with pytest.raises(LocalProtocolError, match="stream"):
        r.request(A, None, [StreamSeq(1)], 0.0)


def test_completion_after_sender_gave_up_is_ignored() -> None:
    r = make()
    r.receive_frame(A, data(1), 0.0)
    r.receive_frame(A, data(2, watermark=2), 0.1)
    assert not r.complete(A, INC_A, LinkSeq(1))
    assert session(r).held == 1


def test_request_and_route_the_answer() -> None:
    r = make()
    qid = r.request(A, HALO, [StreamSeq(4)], 0.0)
    assert r.frames_to_send(0.0) == [(A, Req(B, INC_B, qid, HALO, (StreamSeq(4),)))]
    answer = ReqAnswer(
        A, INC_A, qid, HALO, (MissingItem(StreamSeq(4), MissingStatus.GIVEN_UP),), ()
    )
    r.receive_frame(C, ReqAnswer(C, INC_A, qid, HALO, (), ()), 0.1)
    r.receive_frame(A, answer, 0.1)
    r.receive_frame(A, answer, 0.1)
    assert r.take_events() == [
        Rejected(C, "unknown-query"),
        QueryAnswered(A, answer),
        Rejected(A, "unknown-query"),
    ]
    assert r.statistics().queries_answered == 1


def test_status_query_round_trip_with_a_real_sender() -> None:
    sender = LinkSender(A, INC_A, B, now=0.0, rng=lambda: 0.5)
    r = make()
    sender.send(HALO, "x", now=0.0)
    for frame in sender.frames_to_send(0.0):
        r.receive_frame(A, frame, 0.0)
    qid = r.request(A, None, (), 0.0)
    for peer, frame in r.frames_to_send(0.0):
        assert peer == A
        sender.receive_frame(frame, 0.01)
    for frame in sender.frames_to_send(0.01):
        r.receive_frame(A, frame, 0.02)
    (answered,) = [e for e in r.take_events() if isinstance(e, QueryAnswered)]
    assert answered.answer.query_id == qid
    # Held (RECEIVED went with the REQ) but not answered: still in flight.
    assert [(s.stream, s.last_sent, s.in_flight) for s in answered.answer.streams] == [(HALO, 1, 1)]
    assert sender.statistics().held == 1


def test_memory_stays_within_max_entries_over_a_long_session() -> None:
    r = make(window=8, max_entries=16)
    watermark = 1
    for seq in range(1, 5001):
        r.receive_frame(A, data(seq, watermark=watermark), seq * 0.001)
        r.complete(A, INC_A, LinkSeq(seq))
        flush(r, seq * 0.001)
        # The sender learns answers a few messages late.
        watermark = max(1, seq - 5)
        s = session(r)
        assert s.cached_answers + s.held <= 7
    assert session(r).delivered == 5000


def test_received_waits_for_the_delay_and_is_skipped_when_the_answer_is_ready() -> None:
    r = make(received_delay=0.01)
    r.receive_frame(A, data(1), 0.0)
    r.receive_frame(A, data(2), 0.0)
    r.take_events()
    assert r.next_deadline() == 0.01
    assert r.frames_to_send(0.005) == []
    r.complete(A, INC_A, LinkSeq(1), "r1")
    [(peer, ack)] = r.frames_to_send(0.006)
    assert peer == A
    assert isinstance(ack, AckFrame)
    assert ack.seq == 1
    assert r.next_deadline() == 0.01
    [(_, received)] = r.frames_to_send(0.01)
    assert isinstance(received, Received)
    assert received.seq == 2
    assert r.next_deadline() is None


def test_answered_messages_leave_no_received_timer_behind() -> None:
    # Sparse messages: each is answered long before its RECEIVED would be
    # due; a timer left armed would wake the shell for nothing after each.
    r = make(received_delay=0.01)
    r.receive_frame(A, data(1), 0.0)
    r.receive_frame(A, data(2), 0.0)
    r.receive_frame(A, data(3), 0.0)
    r.take_events()
    r.complete(A, INC_A, LinkSeq(1))
    r.complete(A, INC_A, LinkSeq(2))
    [(_, ack)] = r.frames_to_send(0.001)
    assert isinstance(ack, AckRange)
    assert (ack.first, ack.last) == (1, 2)
    # 3 is still processing: its RECEIVED stays due at 0.01.
    assert r.next_deadline() == 0.01
    r.complete(A, INC_A, LinkSeq(3))
    [(_, ack3)] = r.frames_to_send(0.002)
    assert isinstance(ack3, AckFrame)
    assert r.next_deadline() is None
    assert r.frames_to_send(0.02) == []


def test_duplicate_of_a_message_in_processing_gets_received_at_once() -> None:
    r = make(received_delay=0.01)
    r.receive_frame(A, data(1), 0.0)
    r.frames_to_send(0.0)
    r.receive_frame(A, data(1), 0.001)
    [(_, received)] = r.frames_to_send(0.001)
    assert isinstance(received, Received)
    assert received.seq == 1


def test_refuse_answers_retry_later_and_takes_the_resend_as_new() -> None:
    r = make()
    r.receive_frame(A, data(1), 0.0)
    r.take_events()
    assert r.refuse(A, INC_A, LinkSeq(1), RetryReason.BUFFER_FULL)
    [(_, answer)] = r.frames_to_send(0.0)
    assert isinstance(answer, RetryLater)
    assert answer.reason is RetryReason.BUFFER_FULL
    r.receive_frame(A, data(1), 0.1)
    [event] = r.take_events()
    assert isinstance(event, Admitted)
    assert event.seq == 1


def test_late_data_of_an_incarnation_replaced_by_hello_is_refused() -> None:
    # The peer restarted and said so with a HELLO before any new DATA: a late
    # DATA of its old life must not open a session again.
    r = make()
    r.receive_frame(A, data(1), 0.0)
    r.take_events()
    newer = Incarnation(INC_A + 1)
    r.receive_frame(A, Hello(A, newer, 1, False), 0.1)
    r.receive_frame(A, data(2), 0.2)
    events = r.take_events()
    assert not [e for e in events if isinstance(e, Admitted)]
    refusals = [f for _, f in r.frames_to_send(0.2) if isinstance(f, ErrFrame)]
    assert [f.code for f in refusals] == [ErrCode.STALE_SESSION]
    assert r.statistics().stale_refused == 1


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("data"), st.integers(1, 40), st.integers(0, 39)),
        st.tuples(st.sampled_from(["complete", "fail", "refuse"]), st.integers(0, 40)),
        st.tuples(st.just("flush"), st.just(0)),
    ),
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(_OPS)
def test_every_answer_names_both_sides_and_credit_never_falls(ops: list[tuple[Any, ...]]) -> None:
    # protocol.md §11.2: every answer carries the receiver's own node id and
    # incarnation, the DATA's incarnation as peer_incarnation, and a credit
    # that never decreases within a session (§6.4), whatever the sender and
    # the compute layer do.
    r = make(window=8, max_entries=16)
    delivered: list[LinkSeq] = []
    credits: list[int] = []
    now = 0.0
    for op in ops:
        now += 0.001
        if op[0] == "data":
            seq = op[1]
            r.receive_frame(A, data(seq, watermark=max(1, seq - op[2])), now)
            delivered += [e.seq for e in r.take_events() if isinstance(e, Admitted)]
        elif op[0] == "flush":
            for frame in flush(r, now):
                assert isinstance(frame, Received | AckFrame | AckRange | ErrFrame | RetryLater)
                assert (frame.node, frame.incarnation, frame.peer_incarnation) == (B, INC_B, INC_A)
                credits.append(frame.credit)
        elif delivered:
            seq = delivered.pop(op[1] % len(delivered))
            if op[0] == "complete":
                r.complete(A, INC_A, seq)
            elif op[0] == "fail":
                r.fail(A, INC_A, seq, APP_ERR_MIN, "no")
            else:
                r.refuse(A, INC_A, seq, RetryReason.BUFFER_FULL)
    assert credits == sorted(credits)


# -- fields at the limits of the wire ----------------------------------------------

#: The greatest u63 (docs/protocol.md §3.2): the top of every number a peer sends.
MAX = 2**63 - 1


def encodes(frame: Frame) -> None:
    """``frame`` encodes and decodes back to itself (the shell sends exactly this)."""
    assert decode(encode(frame)) == frame


def test_credit_is_capped_at_the_top_of_the_u63_range() -> None:
    # A peer whose numbers reach 2**63 - 1 (valid by §3.2 and §6.2): the floor
    # passes the u63 range once that message is finalised, and floor + window - 1
    # would leave it even before. Every answer carries credit 2**63 - 1 (§6.4).
    r = make()
    r.receive_frame(A, data(MAX, watermark=MAX), 0.0)
    assert flush(r) == [Received(B, INC_B, INC_A, LinkSeq(MAX), LinkSeq(MAX))]
    assert r.complete(A, INC_A, LinkSeq(MAX), result="r")
    assert flush(r) == [AckFrame(B, INC_B, INC_A, LinkSeq(MAX), LinkSeq(MAX), "r")]
    assert session(r).credit == MAX
    # The duplicate gets the cached answer, with the same capped credit.
    r.receive_frame(A, data(MAX, watermark=MAX), 0.0)
    assert flush(r) == [AckFrame(B, INC_B, INC_A, LinkSeq(MAX), LinkSeq(MAX), "r")]


@pytest.mark.parametrize("finish", ["ack", "ack-range", "err", "retry-later", "window-full"])
def test_every_answer_at_the_top_of_the_range_encodes(finish: str) -> None:
    r = make(window=8, max_entries=16)
    first = MAX - 1
    r.receive_frame(A, data(first, watermark=first), 0.0)
    r.receive_frame(A, data(MAX, watermark=first), 0.0)
    flush(r)
    if finish == "ack":
        r.complete(A, INC_A, LinkSeq(MAX))
        want: list[Frame] = [AckFrame(B, INC_B, INC_A, LinkSeq(MAX), LinkSeq(MAX))]
    elif finish == "ack-range":
        r.complete(A, INC_A, LinkSeq(MAX))
        r.complete(A, INC_A, LinkSeq(first))
        want = [AckRange(B, INC_B, INC_A, LinkSeq(first), LinkSeq(MAX), LinkSeq(MAX))]
    elif finish == "err":
        r.fail(A, INC_A, LinkSeq(MAX), APP_ERR_MIN, "no")
        want = [ErrFrame(B, INC_B, INC_A, LinkSeq(MAX), LinkSeq(MAX), APP_ERR_MIN, "no")]
    elif finish == "retry-later":
        r.refuse(A, INC_A, LinkSeq(MAX), RetryReason.BUFFER_FULL)
        want = [RetryLater(B, INC_B, INC_A, LinkSeq(MAX), LinkSeq(MAX), RetryReason.BUFFER_FULL)]
    else:
        # A watermark far below: MAX is past the credit, which itself is far
        # below the cap, and the RETRY_LATER says so exactly.
        r = make(window=8, max_entries=16)
        r.receive_frame(A, data(MAX, watermark=MAX - 100), 0.0)
        credit = LinkSeq(MAX - 100 + 8 - 1)
        want = [RetryLater(B, INC_B, INC_A, LinkSeq(MAX), credit, RetryReason.WINDOW_FULL)]
    out = flush(r)
    assert out == want
    for frame in out:
        encodes(frame)


#: Every u63 field takes one of these: both ends of the range and their neighbours.
LIMIT_VALUES = st.sampled_from([0, 1, 2, 255, MAX - 256, MAX - 2, MAX - 1, MAX])

_data_op = st.tuples(
    st.just("data"),
    st.sampled_from([A, C]),
    LIMIT_VALUES,  # incarnation
    LIMIT_VALUES,  # seq
    LIMIT_VALUES,  # watermark
    LIMIT_VALUES,  # stream_seq
    LIMIT_VALUES,  # stream_floor
    st.one_of(st.none(), LIMIT_VALUES),  # frame_no
    st.integers(0, 3),  # items of a DATA_ITEMS; 0 for a DATA
)
_hello_op = st.tuples(st.just("hello"), st.sampled_from([A, C]), LIMIT_VALUES, LIMIT_VALUES)
_answer_op = st.tuples(st.just("req-answer"), st.sampled_from([A, C]), LIMIT_VALUES)
_finish_op = st.tuples(
    st.just("finish"),
    st.integers(0, 20),
    st.sampled_from(["ack", "result", "err", "items", "refuse"]),
)
_request_op = st.tuples(
    st.just("request"), st.sampled_from([A, C]), st.lists(LIMIT_VALUES, max_size=4)
)
_flush_op = st.tuples(st.just("flush"), st.sampled_from([0.0, 0.005, 0.02]))


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.one_of(_data_op, _hello_op, _answer_op, _finish_op, _request_op, _flush_op),
        max_size=40,
    ),
    window=st.sampled_from([1, 8, 256]),
    delay=st.sampled_from([0.0, 0.01]),
)
def test_every_frame_the_core_emits_encodes_with_every_field_at_its_limits(
    ops: list[tuple[Any, ...]], window: int, delay: float
) -> None:
    # Nothing a peer can put in a valid frame makes this node produce a frame
    # it cannot encode: each answer's fields stay u63 (§3.2, §6.4).
    r = LinkReceiver(
        B,
        INC_B,
        config=ReceiverConfig(window=window, max_entries=2 * window, received_delay=delay),
    )
    now = 0.0
    pending: list[Admitted] = []

    def drain() -> None:
        for _, frame in r.frames_to_send(now):
            encodes(frame)
        pending.extend(e for e in r.take_events() if isinstance(e, Admitted))

    for op in ops:
        kind = op[0]
        if kind == "data":
            _, node, inc, seq, wm, sseq, sfloor, frame_no, items = op
            frame: Frame
            if items:
                frame = DataItems(node, inc, seq, HALO, sseq, sfloor, frame_no, ("x",) * items, wm)
            else:
                frame = Data(node, inc, seq, HALO, sseq, sfloor, frame_no, b"x", wm)
            # What the wire can carry, exactly as the shell hands it over.
            r.receive_frame(node, decode(encode(frame)), now)
        elif kind == "hello":
            _, node, inc, nonce = op
            r.receive_frame(node, decode(encode(Hello(node, inc, nonce, False))), now)
        elif kind == "req-answer":
            _, node, query_id = op
            r.receive_frame(node, ReqAnswer(node, INC_A, query_id, HALO, (), ()), now)
        elif kind == "finish" and pending:
            _, index, how = op
            item = pending.pop(index % len(pending))
            key = (item.peer, item.peer_incarnation, item.seq)
            if how == "refuse":
                r.refuse(*key, RetryReason.BUFFER_FULL)
            elif how == "err":
                r.fail(*key, APP_ERR_MIN, "no")
            elif item.items:
                outcomes = tuple(
                    ItemAck(MAX) if how == "result" else ItemAck() for _ in item.payload
                )
                r.complete_items(*key, outcomes)
            else:
                r.complete(*key, MAX if how == "result" else None)
        elif kind == "request":
            _, node, missing = op
            r.request(node, HALO, [StreamSeq(m) for m in missing], now)
        elif kind == "flush":
            now += op[1]
        drain()
    now += 1.0
    drain()


# --- surviving a restart: snapshot and restore (a durable node's journal) -------------


def _answered(r: LinkReceiver) -> LinkReceiver:
    """``r`` with seqs 1..4 from A delivered: 1 ACK, 2 ERR, 3 ACK with a result, 4 processing."""
    for seq in range(1, 5):
        r.receive_frame(A, data(seq), 0.0)
    r.take_events()
    r.complete(A, INC_A, LinkSeq(1))
    r.fail(A, INC_A, LinkSeq(2), APP_ERR_MIN, "no")
    r.complete(A, INC_A, LinkSeq(3), result={"x": 1})
    flush(r)
    return r


def test_snapshot_holds_final_answers_not_work_in_progress() -> None:
    (snap,) = _answered(make()).snapshot()
    assert (snap.peer, snap.incarnation, snap.watermark) == (A, INC_A, 1)
    assert [(a.seq, a.items, a.outcome) for a in snap.answers] == [
        (1, 0, ItemAck(None)),
        (2, 0, ItemErr(APP_ERR_MIN, "no")),
        (3, 0, ItemAck({"x": 1})),
    ]


def test_restored_receiver_answers_resends_from_the_snapshot_and_delivers_the_rest() -> None:
    snap = _answered(make()).snapshot()
    # The node's next process: a new incarnation of B, the same sessions.
    r = LinkReceiver(B, Incarnation(INC_B + 1), config=ReceiverConfig(window=8, max_entries=16))
    r.restore(snap)
    for seq in range(1, 6):
        r.receive_frame(A, data(seq), 1.0)
    admitted = [e for e in r.take_events() if isinstance(e, Admitted)]
    # 1-3 were answered by the previous process: answered again, not delivered.
    assert [e.seq for e in admitted] == [4, 5]
    out = flush(r, 1.0)
    finals = {f.seq: f for f in out if isinstance(f, AckFrame | ErrFrame)}
    assert isinstance(finals[2], ErrFrame)
    assert finals[2].code == APP_ERR_MIN
    assert isinstance(finals[3], AckFrame)
    assert finals[3].result == {"x": 1}
    assert any(isinstance(f, AckRange | AckFrame) and f.seq == 1 for f in out)
    # Every answer comes from the new incarnation; the floor is past 1-3.
    assert all(f.incarnation == INC_B + 1 for f in out)
    assert session(r).floor == 4
    assert r.statistics().sessions[0].duplicates == 3


def test_restored_session_refuses_an_older_incarnation_and_ends_for_a_newer() -> None:
    r = make()
    r.restore(_answered(make()).snapshot())
    r.receive_frame(A, data(9, inc=Incarnation(INC_A - 1)), 0.0)
    (stale,) = flush(r)
    assert isinstance(stale, ErrFrame)
    assert stale.code == ErrCode.STALE_SESSION
    r.receive_frame(A, data(1, inc=Incarnation(INC_A + 1)), 0.0)
    events = r.take_events()
    # The restored session held nothing unfinished: 4 was never journaled.
    assert SessionEnded(A, INC_A, ()) in events
    assert any(isinstance(e, Admitted) and e.seq == 1 for e in events)


def test_snapshot_of_a_batch_answer_round_trips() -> None:
    r = make()
    frame = DataItems(
        A, INC_A, LinkSeq(1), HALO, StreamSeq(1), StreamSeq(1), 0, ("x", "y"), LinkSeq(1)
    )
    r.receive_frame(A, frame, 0.0)
    r.take_events()
    outcomes = (ItemAck(None), ItemErr(APP_ERR_MIN, "bad"))
    r.complete_items(A, INC_A, LinkSeq(1), outcomes)
    snap = r.snapshot()
    assert snap[0].answers[0].outcome == outcomes
    fresh = make()
    fresh.restore(snap)
    assert fresh.snapshot() == snap


def test_restore_misuse_raises() -> None:
    r = make()
    r.receive_frame(A, data(1), 0.0)
    with pytest.raises(LocalProtocolError, match="before the receiver takes its first frame"):
        r.restore(())
    far = SessionSnapshot(A, INC_A, LinkSeq(1), (CachedAnswer(LinkSeq(99), 0, ItemAck(None)),))
    with pytest.raises(LocalProtocolError, match="outside"):
        make().restore((far,))
    misfit = SessionSnapshot(A, INC_A, LinkSeq(1), (CachedAnswer(LinkSeq(1), 2, (ItemAck(),)),))
    with pytest.raises(LocalProtocolError, match="does not fit"):
        make().restore((misfit,))
    twice = SessionSnapshot(A, INC_A, LinkSeq(1), ())
    with pytest.raises(LocalProtocolError, match="twice"):
        make().restore((twice, twice))
