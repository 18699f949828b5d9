"""The stream sequencer: ordered, exactly-once delivery with explicit gaps.

Pure state machine, so time is a float the tests advance themselves; the
numbers used (0.5, 1.0, 4.0, ...) are exact in binary floating point, so
deadlines are asserted with ``==``.
"""

from __future__ import annotations

import dataclasses
import random
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport import (
    Incarnation,
    LinkReceiver,
    LinkSender,
    LocalProtocolError,
    NodeId,
    ReceiverConfig,
    RemoteProtocolError,
    SenderConfig,
    StreamId,
    decode,
    encode,
)
from transport._ids import StreamSeq
from transport._proto_sequencer import (
    AskMissing,
    GapPolicy,
    GapReason,
    OfferResult,
    Release,
    SequencerConfig,
    SequencerEvent,
    StreamFailed,
    StreamSequencer,
)
from transport.events import (
    GapEvent,
)
from transport.frames import (
    MissingItem,
    MissingStatus,
    Req,
)

S = StreamSeq
T = TypeVar("T")
ACCEPTED = OfferResult.ACCEPTED


def make(**kwargs: object) -> StreamSequencer[str]:
    return StreamSequencer(config=SequencerConfig(**kwargs))  # type: ignore[arg-type]


def offer(sq: StreamSequencer[str], seq: int, now: float = 0.0, floor: int = 1) -> OfferResult:
    return sq.offer(S(seq), S(floor), f"m{seq}", now)


def released(events: Sequence[SequencerEvent[T]]) -> list[int]:
    return [e.stream_seq for e in events if isinstance(e, Release)]


def answer(*pairs: tuple[int, MissingStatus]) -> list[MissingItem]:
    return [MissingItem(S(seq), status) for seq, status in pairs]


# -- basic ordering ------------------------------------------------------------


def test_in_order_releases_at_once_with_items() -> None:
    sq = make()
    for seq in range(1, 6):
        assert offer(sq, seq) is ACCEPTED
    events = sq.take_events()
    assert events == [Release(S(n), f"m{n}") for n in range(1, 6)]
    assert sq.take_events() == []
    assert sq.next_deadline() is None
    stats = sq.statistics()
    assert (stats.delivered, stats.buffered, stats.reordered) == (5, 0, 0)


def test_waiting_on_3_got_4_5_6_delivers_3_to_6_when_3_arrives() -> None:
    sq = make()
    offer(sq, 1)
    offer(sq, 2)
    for seq in (4, 5, 6):
        assert offer(sq, seq, now=1.0) is ACCEPTED
    assert released(sq.take_events()) == [1, 2]
    assert sq.statistics().buffered == 3
    assert offer(sq, 3, now=1.1) is ACCEPTED
    assert released(sq.take_events()) == [3, 4, 5, 6]
    stats = sq.statistics()
    assert (stats.buffered, stats.max_buffered, stats.reordered) == (0, 3, 3)
    assert sq.next_deadline() is None


def test_duplicates_of_released_and_held_are_refused_and_counted() -> None:
    sq = make()
    offer(sq, 1)
    offer(sq, 3)
    assert offer(sq, 1) is OfferResult.DUPLICATE
    assert offer(sq, 3) is OfferResult.DUPLICATE
    assert offer(sq, 2) is ACCEPTED
    assert released(sq.take_events()) == [1, 2, 3]
    assert sq.statistics().duplicates == 2


def test_bad_seq_or_floor_is_a_remote_error_and_changes_nothing() -> None:
    sq = make()
    with pytest.raises(RemoteProtocolError) as info:
        offer(sq, 2, floor=3)
    assert info.value.reason == "bad-stream-floor"
    with pytest.raises(RemoteProtocolError):
        offer(sq, 0, floor=0)
    with pytest.raises(RemoteProtocolError):
        offer(sq, 1, floor=0)
    assert sq.next_expected == 1
    assert offer(sq, 1) is ACCEPTED


@pytest.mark.parametrize(
    "kwargs",
    [
        {"buffer_limit": 0},
        {"gap_timeout": 0.0},
        {"skip_after": 0.0},
        {"req_backoff": 0.5},
        {"gap_timeout": 5.0, "req_ceiling": 4.0},
        {"req_max_seqs": 0},
    ],
)
def test_config_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(LocalProtocolError, match=r"SequencerConfig\.\w+"):
        SequencerConfig(**kwargs)  # type: ignore[arg-type]


def _three_cores() -> list[LinkSender | LinkReceiver | StreamSequencer[str]]:
    return [
        LinkSender(NodeId("a"), Incarnation(1), NodeId("b"), now=0.0, rng=lambda: 0.5),
        LinkReceiver(NodeId("b"), Incarnation(1)),
        make(),
    ]


@pytest.mark.parametrize("core", _three_cores(), ids=["sender", "receiver", "sequencer"])
def test_the_three_cores_share_one_convention(
    core: LinkSender | LinkReceiver | StreamSequencer[str],
) -> None:
    # transport/_proto_link.py: take_events(), next_deadline() -> float | None,
    # poll(now) refusing a clock that goes backwards, a frozen statistics().
    hints = typing.get_type_hints(type(core).next_deadline)
    assert hints["return"] == float | None
    core.poll(1.0)
    deadline = core.next_deadline()
    assert deadline is None or isinstance(deadline, float)
    assert isinstance(core.take_events(), list)
    assert core.take_events() == []
    with pytest.raises(LocalProtocolError, match="went backwards"):
        core.poll(0.5)
    stats = core.statistics()
    assert dataclasses.is_dataclass(stats)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.__setattr__(dataclasses.fields(stats)[0].name, 0)


@pytest.mark.parametrize(
    "build",
    [
        lambda: SenderConfig(retry_timeout=0.0),
        lambda: ReceiverConfig(window=0),
        lambda: SequencerConfig(buffer_limit=0),
    ],
    ids=["sender", "receiver", "sequencer"],
)
def test_every_core_refuses_bad_config_with_local_protocol_error(build: Any) -> None:
    with pytest.raises(LocalProtocolError, match="must be"):
        build()


# -- REQ timing ----------------------------------------------------------------


def test_ask_at_gap_timeout_then_backoff_doubles_to_ceiling() -> None:
    sq = make(gap_timeout=0.5, req_backoff=2.0, req_ceiling=4.0)
    offer(sq, 1, now=0.0)
    offer(sq, 3, now=1.0)
    sq.take_events()
    sq.poll(1.25)
    assert sq.take_events() == []
    # Waits between REQs: 1, 2, 4, then the 4 s ceiling.
    for due in (1.5, 2.5, 4.5, 8.5, 12.5, 16.5):
        assert sq.next_deadline() == due
        sq.poll(due)
        assert sq.take_events() == [AskMissing((S(2),))]
    assert sq.statistics().reqs_sent == 6


def test_ask_names_missing_numbers_only_capped() -> None:
    sq = make(req_max_seqs=3)
    offer(sq, 4, now=0.0)
    offer(sq, 7, now=0.0)
    offer(sq, 9, now=0.0)
    sq.poll(0.5)
    assert sq.take_events() == [AskMissing((S(1), S(2), S(3)))]
    sq2 = make()
    for seq in (4, 7, 9):
        offer(sq2, seq)
    sq2.poll(0.5)
    assert sq2.take_events() == [AskMissing((S(1), S(2), S(3), S(5), S(6), S(8)))]


def test_moved_head_gap_restarts_schedule_but_reqs_keep_gap_timeout_apart() -> None:
    sq = make(gap_timeout=0.5)
    offer(sq, 1, now=0.0)
    offer(sq, 5, now=1.0)
    offer(sq, 3, now=1.2)
    sq.take_events()
    assert sq.next_deadline() == 1.5
    sq.poll(1.5)
    assert sq.take_events() == [AskMissing((S(2), S(4)))]
    assert sq.next_deadline() == 2.5
    # Gap 2 fills; head gap 4 has been known since 5 arrived at 1.0, so it is
    # due now, but the last REQ went out at 1.5: not before 2.0.
    offer(sq, 2, now=1.7)
    assert released(sq.take_events()) == [2, 3]
    assert sq.next_deadline() == 2.0
    sq.poll(2.0)
    assert sq.take_events() == [AskMissing((S(4),))]
    assert sq.next_deadline() == 3.0
    assert sq.statistics().gaps_seen == 2


def test_in_flight_and_resent_answers_keep_backoff_running() -> None:
    sq = make(gap_timeout=0.5)
    offer(sq, 1, now=0.0)
    offer(sq, 3, now=1.0)
    sq.poll(1.5)
    sq.take_events()
    sq.on_missing_answer(answer((2, MissingStatus.IN_FLIGHT)), now=1.6)
    assert sq.next_deadline() == 2.5
    sq.poll(2.5)
    assert sq.take_events() == [AskMissing((S(2),))]
    sq.on_missing_answer(answer((2, MissingStatus.RESENT)), now=2.6)
    assert sq.next_deadline() == 4.5
    assert offer(sq, 2, now=2.7) is ACCEPTED
    assert released(sq.take_events()) == [2, 3]
    assert sq.next_deadline() is None
    stats = sq.statistics()
    assert (stats.reqs_sent, stats.answers_received, stats.gap_events) == (2, 2, 0)


# -- gap policies --------------------------------------------------------------

LOSSES = [
    (MissingStatus.GIVEN_UP, GapReason.GIVEN_UP),
    (MissingStatus.NEVER_SENT, GapReason.NEVER_SENT),
    (MissingStatus.ANSWERED, GapReason.ANSWERED),
]


@pytest.mark.parametrize("policy", list(GapPolicy))
def test_in_flight_then_resent_delivers_under_every_policy(policy: GapPolicy) -> None:
    sq = make(policy=policy, gap_timeout=0.5, skip_after=10.0)
    offer(sq, 1, now=0.0)
    offer(sq, 3, now=0.0)
    offer(sq, 4, now=0.0)
    sq.poll(0.5)
    sq.on_missing_answer(answer((2, MissingStatus.IN_FLIGHT)), now=0.6)
    sq.poll(1.5)
    sq.on_missing_answer(answer((2, MissingStatus.RESENT)), now=1.6)
    offer(sq, 2, now=1.7)
    events = sq.take_events()
    assert released(events) == [1, 2, 3, 4]
    assert [e for e in events if isinstance(e, AskMissing)] == [AskMissing((S(2),))] * 2
    assert not [e for e in events if isinstance(e, GapEvent | StreamFailed)]


@pytest.mark.parametrize("policy", [GapPolicy.WAIT, GapPolicy.SKIP])
@pytest.mark.parametrize(("status", "reason"), LOSSES)
def test_lost_message_becomes_gap_then_delivery_moves_on(
    policy: GapPolicy, status: MissingStatus, reason: GapReason
) -> None:
    sq = make(policy=policy)
    offer(sq, 1)
    offer(sq, 4)
    offer(sq, 5)
    sq.take_events()
    sq.poll(0.5)
    assert sq.take_events() == [AskMissing((S(2), S(3)))]
    sq.on_missing_answer(answer((2, status), (3, status)), now=0.6)
    assert sq.take_events() == [
        GapEvent(S(2), S(3), reason),
        Release(S(4), "m4"),
        Release(S(5), "m5"),
    ]
    assert sq.next_deadline() is None
    # The sender already holds an outcome for it: a late copy is not delivered.
    assert offer(sq, 2, now=0.7) is OfferResult.LATE_SKIPPED
    stats = sq.statistics()
    assert (stats.gap_events, stats.gap_seqs, stats.skips) == (1, 2, 0)


@pytest.mark.parametrize(("status", "reason"), LOSSES)
def test_fail_policy_fails_and_returns_held_items(status: MissingStatus, reason: GapReason) -> None:
    sq = make(policy=GapPolicy.FAIL)
    offer(sq, 1)
    offer(sq, 5)
    offer(sq, 3)
    sq.poll(0.5)
    sq.take_events()
    sq.on_missing_answer(answer((2, status)), now=0.6)
    assert sq.take_events() == [StreamFailed(S(2), reason, ("m3", "m5"))]
    assert sq.statistics().failed
    assert sq.statistics().buffered == 0
    assert offer(sq, 6, now=0.7) is OfferResult.STREAM_FAILED
    assert offer(sq, 2, now=0.7) is OfferResult.STREAM_FAILED
    assert sq.statistics().refused_failed == 2
    assert sq.next_deadline() is None
    assert sq.end() == []


def test_fail_policy_delivers_up_to_first_lost_message() -> None:
    sq = make(policy=GapPolicy.FAIL)
    offer(sq, 1)
    offer(sq, 3)
    offer(sq, 5)
    sq.poll(0.5)
    sq.take_events()
    # 4 is known lost, 2 may still come: wait for 2, then fail at 4.
    sq.on_missing_answer(answer((2, MissingStatus.IN_FLIGHT), (4, MissingStatus.GIVEN_UP)), now=0.6)
    assert sq.take_events() == []
    assert sq.next_deadline() == 1.5
    offer(sq, 2, now=0.7)
    assert sq.take_events() == [
        Release(S(2), "m2"),
        Release(S(3), "m3"),
        StreamFailed(S(4), GapReason.GIVEN_UP, ("m5",)),
    ]


@pytest.mark.parametrize("policy", list(GapPolicy))
def test_floor_settles_missing_numbers_without_asking(policy: GapPolicy) -> None:
    sq = make(policy=policy)
    offer(sq, 1)
    offer(sq, 3)
    offer(sq, 6)
    sq.take_events()
    # The sender holds an outcome for everything below 5: 2 and 4 can never come.
    result = offer(sq, 7, floor=5)
    events = sq.take_events()
    if policy is GapPolicy.FAIL:
        # The DATA that revealed the loss is refused like every later one.
        assert result is OfferResult.STREAM_FAILED
        assert events == [StreamFailed(S(2), GapReason.PASSED_FLOOR, ("m3", "m6"))]
        return
    assert result is ACCEPTED
    assert events == [
        GapEvent(S(2), S(2), GapReason.PASSED_FLOOR),
        Release(S(3), "m3"),
        GapEvent(S(4), S(4), GapReason.PASSED_FLOOR),
    ]
    assert sq.next_expected == 5
    assert sq.statistics().reqs_sent == 0
    assert offer(sq, 4) is OfferResult.STALE
    assert offer(sq, 5, floor=5) is ACCEPTED
    assert released(sq.take_events()) == [5, 6, 7]


def test_floor_passing_a_message_that_is_then_offered_is_stale() -> None:
    sq = make()
    offer(sq, 1)
    assert offer(sq, 4, floor=3) is ACCEPTED
    assert sq.take_events() == [Release(S(1), "m1"), GapEvent(S(2), S(2), GapReason.PASSED_FLOOR)]
    assert offer(sq, 2) is OfferResult.STALE
    assert offer(sq, 3, floor=3) is ACCEPTED
    assert released(sq.take_events()) == [3, 4]
    assert sq.statistics().stale == 1


def test_wait_never_skips_a_message_that_may_still_arrive() -> None:
    sq = make(policy=GapPolicy.WAIT, gap_timeout=0.5, req_ceiling=4.0)
    offer(sq, 2, now=0.0)
    now = 0.0
    for _ in range(50):
        deadline = sq.next_deadline()
        assert deadline is not None
        now = deadline
        sq.poll(now)
        events = sq.take_events()
        assert events == [AskMissing((S(1),))]
        sq.on_missing_answer(answer((1, MissingStatus.IN_FLIGHT)), now)
    assert now == 0.5 + 1 + 2 + 4 * 47
    assert offer(sq, 1, now=now) is ACCEPTED
    assert released(sq.take_events()) == [1, 2]
    assert sq.statistics().gap_events == 0


def test_skip_after_timeout_then_late_arrival_is_late_skipped() -> None:
    sq = make(policy=GapPolicy.SKIP, gap_timeout=0.5, skip_after=1.0)
    offer(sq, 1, now=0.0)
    offer(sq, 5, now=1.0)
    offer(sq, 3, now=1.25)
    sq.take_events()
    sq.poll(1.5)
    assert sq.take_events() == [AskMissing((S(2), S(4)))]
    assert sq.next_deadline() == 2.0
    sq.poll(1.999)
    assert sq.take_events() == []
    sq.poll(2.0)
    # Both gaps have been known since 5 arrived at 1.0: one poll skips both.
    assert sq.take_events() == [
        GapEvent(S(2), S(2), GapReason.SKIPPED),
        Release(S(3), "m3"),
        GapEvent(S(4), S(4), GapReason.SKIPPED),
        Release(S(5), "m5"),
    ]
    assert offer(sq, 2, now=2.1) is OfferResult.LATE_SKIPPED
    assert offer(sq, 4, now=2.1) is OfferResult.LATE_SKIPPED
    assert offer(sq, 3, now=2.1) is OfferResult.DUPLICATE
    stats = sq.statistics()
    assert (stats.skips, stats.gap_seqs, stats.late_skipped) == (2, 2, 2)
    # Once the floor passes them the sender waits on nothing there: stale.
    offer(sq, 6, now=2.2, floor=6)
    assert offer(sq, 2, now=2.3) is OfferResult.STALE


def test_skip_default_is_twice_gap_timeout() -> None:
    sq = make(policy=GapPolicy.SKIP, gap_timeout=0.25)
    offer(sq, 2, now=1.0)
    sq.poll(1.25)
    assert sq.take_events() == [AskMissing((S(1),))]
    assert sq.next_deadline() == 1.5
    sq.poll(1.5)
    assert sq.take_events() == [GapEvent(S(1), S(1), GapReason.SKIPPED), Release(S(2), "m2")]


def test_number_reported_lost_that_arrives_later_is_stale_not_delivered() -> None:
    sq = make()
    offer(sq, 1)
    offer(sq, 4)
    sq.poll(0.5)
    sq.take_events()
    sq.on_missing_answer(answer((2, MissingStatus.IN_FLIGHT), (3, MissingStatus.GIVEN_UP)), now=0.6)
    # The sender told its user that 3 failed: delivering it now would contradict that.
    assert offer(sq, 3, now=0.7) is OfferResult.STALE
    assert offer(sq, 2, now=0.8) is ACCEPTED
    assert sq.take_events() == [
        Release(S(2), "m2"),
        GapEvent(S(3), S(3), GapReason.GIVEN_UP),
        Release(S(4), "m4"),
    ]


def test_stale_answers_about_numbers_that_arrived_are_ignored() -> None:
    sq = make()
    offer(sq, 3)
    offer(sq, 1)
    offer(sq, 2)
    sq.take_events()
    sq.on_missing_answer(answer((2, MissingStatus.GIVEN_UP)), now=1.0)
    offer(sq, 5)
    sq.on_missing_answer(answer((3, MissingStatus.GIVEN_UP), (9, MissingStatus.GIVEN_UP)), 1.0)
    assert sq.take_events() == []
    assert offer(sq, 4) is ACCEPTED
    assert released(sq.take_events()) == [4, 5]


# -- bounds, end of session, unordered ----------------------------------------


def test_flood_of_far_future_frames_is_refused_within_the_bound() -> None:
    limit = 32
    sq = make(buffer_limit=limit)
    results = [offer(sq, seq) for seq in range(2, 10_002)]
    assert results.count(ACCEPTED) == limit
    assert results.count(OfferResult.REFUSED_BUFFER_FULL) == 10_000 - limit
    stats = sq.statistics()
    assert (stats.buffered, stats.max_buffered) == (limit, limit)
    assert stats.refused_buffer_full == 10_000 - limit
    # The message that unblocks the stream is never refused.
    assert offer(sq, 1) is ACCEPTED
    assert released(sq.take_events()) == list(range(1, limit + 2))
    # The window slid: refused messages are accepted when sent again.
    assert offer(sq, limit + 2) is ACCEPTED
    assert sq.next_expected == limit + 3
    assert offer(sq, 2 * limit + 3) is ACCEPTED
    assert offer(sq, 2 * limit + 4) is OfferResult.REFUSED_BUFFER_FULL


def test_end_returns_held_items_in_order_and_stops_the_sequencer() -> None:
    sq = make()
    offer(sq, 1)
    for seq in (7, 3, 5):
        offer(sq, seq, now=0.1)
    assert sq.next_deadline() == 0.6
    assert sq.end() == ["m3", "m5", "m7"]
    assert released(sq.take_events()) == [1]
    assert sq.next_deadline() is None
    assert sq.end() == []
    sq.poll(10.0)
    assert sq.take_events() == []
    with pytest.raises(LocalProtocolError, match="end"):
        offer(sq, 2)


def test_sender_restart_ends_old_session_and_new_one_starts_at_1() -> None:
    old = make()
    offer(old, 1)
    offer(old, 3)
    offer(old, 4)
    old.poll(0.5)
    assert old.take_events()[-1] == AskMissing((S(2),))
    # The node sees a new incarnation: the old session's held messages are
    # reported undelivered, not dropped.
    assert old.end() == ["m3", "m4"]
    new = make()
    assert offer(new, 1, now=0.6) is ACCEPTED
    assert offer(new, 2, now=0.6) is ACCEPTED
    assert released(new.take_events()) == [1, 2]


@pytest.mark.parametrize("policy", list(GapPolicy))
def test_sequencer_started_mid_stream_resumes_without_gaps(policy: GapPolicy) -> None:
    # A receiver that restarted meets the stream at the sender's floor 50.
    sq = StreamSequencer[str](config=SequencerConfig(policy=policy), first=S(50))
    assert offer(sq, 51, floor=50) is ACCEPTED
    assert offer(sq, 50, floor=50) is ACCEPTED
    assert offer(sq, 12) is OfferResult.STALE
    assert sq.take_events() == [Release(S(50), "m50"), Release(S(51), "m51")]
    with pytest.raises(LocalProtocolError, match="first must be"):
        StreamSequencer[str](first=S(0))


def test_unordered_releases_as_it_arrives_and_still_dedups() -> None:
    sq = make(ordered=False, buffer_limit=4)
    got = [offer(sq, seq) for seq in (3, 1, 3, 2, 1, 9, 6)]
    assert got == [
        ACCEPTED,
        ACCEPTED,
        OfferResult.DUPLICATE,
        ACCEPTED,
        OfferResult.DUPLICATE,
        OfferResult.REFUSED_BUFFER_FULL,
        ACCEPTED,
    ]
    assert released(sq.take_events()) == [3, 1, 2, 6]
    assert sq.next_expected == 4
    sq.poll(100.0)
    assert sq.next_deadline() is None
    assert sq.take_events() == []
    # The floor passes 4 and 5 (given up at the sender): they are stale now,
    # and 6 is still remembered as seen.
    assert offer(sq, 7, floor=5) is ACCEPTED
    assert offer(sq, 4) is OfferResult.STALE
    assert offer(sq, 6, floor=5) is OfferResult.DUPLICATE
    assert sq.next_expected == 5
    assert offer(sq, 5, floor=5) is ACCEPTED
    assert sq.next_expected == 8
    stats = sq.statistics()
    assert (stats.delivered, stats.duplicates, stats.stale, stats.gap_events) == (6, 3, 1, 0)


# -- properties ----------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 60),
    limit=st.integers(1, 64),
)
def test_any_permutation_duplication_and_loss_delivers_1_to_n_once_in_order(
    data: st.DataObject, n: int, limit: int
) -> None:
    order = data.draw(st.permutations(range(1, n + 1)))
    dups = data.draw(st.lists(st.sampled_from(order), max_size=n))
    lost = data.draw(st.sets(st.sampled_from(order)))
    first = [s for s in order if s not in lost]
    arrivals = data.draw(st.permutations(first + dups))
    resends = data.draw(st.permutations(sorted(lost)))
    sq = StreamSequencer[int](config=SequencerConfig(buffer_limit=limit))
    accepted: list[int] = []
    queue = list(arrivals) + list(resends)
    # Refused messages are resent later, as the sender does on RetryLater.
    for _ in range(n * n + 10 * n + 10):
        if not queue:
            break
        seq = queue.pop(0)
        result = sq.offer(S(seq), S(1), seq, 0.0)
        if result is OfferResult.REFUSED_BUFFER_FULL:
            queue.append(seq)
        elif result is ACCEPTED:
            accepted.append(seq)
        else:
            assert result is OfferResult.DUPLICATE
    assert not queue
    events = sq.take_events()
    assert events == [Release(S(s), s) for s in range(1, n + 1)]
    assert sorted(accepted) == list(range(1, n + 1))
    assert sq.statistics().buffered == 0
    assert sq.statistics().max_buffered <= limit


def _run_terrible_network(
    rng: random.Random, n: int, policy: GapPolicy, given_up: frozenset[int], limit: int
) -> tuple[StreamSequencer[int], list[SequencerEvent[int]], dict[int, list[OfferResult]]]:
    """A seeded sender/network/receiver loop: loss, duplication, reordering, REQs.

    The sender retries every message without a final outcome until it has
    one, gives the messages in ``given_up`` up at a random step (none of
    their copies ever arrives) and stamps each DATA with its current floor.
    """
    sq = StreamSequencer[int](
        config=SequencerConfig(policy=policy, buffer_limit=limit, gap_timeout=0.5, skip_after=1.5)
    )
    final: set[int] = set()
    give_up_at = {s: rng.randrange(0, 200) for s in given_up}
    network: list[tuple[int, int]] = []
    results: dict[int, list[OfferResult]] = {s: [] for s in range(1, n + 1)}
    events: list[SequencerEvent[int]] = []
    now = 0.0

    def floor_for(seq: int) -> int:
        low = next((s for s in range(1, n + 1) if s not in final), n + 1)
        return min(low, seq)

    def send(seq: int, lossy: bool) -> None:
        if seq in given_up or (lossy and rng.random() < 0.3):
            return
        network.append((seq, floor_for(seq)))
        if rng.random() < 0.2:
            network.append(network[-1])

    for seq in range(1, n + 1):
        send(seq, lossy=True)
    for step in range(3000):
        lossy = step < 300
        for seq, when in give_up_at.items():
            if when == step:
                final.add(seq)
        if all(s in final for s in range(1, n + 1)):
            break
        now += rng.choice((0.0, 0.125, 0.25))
        if network:
            seq, floor = network.pop(rng.randrange(len(network)))
            result = sq.offer(S(seq), S(floor), seq, now)
            results[seq].append(result)
            if result in (
                OfferResult.LATE_SKIPPED,
                OfferResult.STREAM_FAILED,
                OfferResult.STALE,
            ):
                final.add(seq)
        elif step % 8 == 0:
            for seq in range(1, n + 1):
                if seq not in final:
                    send(seq, lossy)
        sq.poll(now)
        for event in sq.take_events():
            events.append(event)
            if isinstance(event, Release):
                final.add(event.stream_seq)
            elif isinstance(event, StreamFailed):
                final.update(event.undelivered)
            elif isinstance(event, AskMissing) and (not lossy or rng.random() < 0.7):
                items = []
                for seq in event.missing:
                    if seq in given_up and seq in final:
                        items.append(MissingItem(seq, MissingStatus.GIVEN_UP))
                    else:
                        items.append(MissingItem(seq, MissingStatus.RESENT))
                        send(seq, lossy)
                sq.on_missing_answer(items, now)
    else:
        pytest.fail("the simulated stream did not settle")
    events.extend(sq.take_events())
    return sq, events, results


@settings(max_examples=60, deadline=None)
@given(
    rng=st.randoms(use_true_random=False),
    n=st.integers(1, 40),
    policy=st.sampled_from(GapPolicy),
    lost_fraction=st.sampled_from((0.0, 0.1, 0.3)),
    limit=st.sampled_from((4, 64)),
)
def test_terrible_network_each_number_delivered_or_gapped_exactly_once_in_order(
    rng: random.Random, n: int, policy: GapPolicy, lost_fraction: float, limit: int
) -> None:
    given_up = frozenset(s for s in range(1, n + 1) if rng.random() < lost_fraction)
    sq, events, results = _run_terrible_network(rng, n, policy, given_up, limit)

    # Walk the events: Release and GapEvent cover 1..next-1 exactly once, in order.
    covered: list[int] = []
    released_seqs: set[int] = set()
    failed: StreamFailed[int] | None = None
    for event in events:
        assert failed is None, "nothing follows StreamFailed"
        if isinstance(event, Release):
            assert event.item == event.stream_seq
            covered.append(event.stream_seq)
            released_seqs.add(event.stream_seq)
        elif isinstance(event, GapEvent):
            assert event.first <= event.last
            covered.extend(range(event.first, event.last + 1))
            if policy is GapPolicy.WAIT:
                assert set(range(event.first, event.last + 1)) <= given_up
            assert policy is not GapPolicy.FAIL
        elif isinstance(event, StreamFailed):
            assert policy is GapPolicy.FAIL
            assert event.first_missing in given_up
            assert list(event.undelivered) == sorted(event.undelivered)
            assert all(s > event.first_missing for s in event.undelivered)
            failed = event
    assert covered == list(range(1, len(covered) + 1))
    assert len(covered) == sq.next_expected - 1

    for seq in range(1, n + 1):
        accepted = results[seq].count(ACCEPTED)
        assert accepted <= 1
        if seq in released_seqs:
            assert accepted == 1
        if seq in given_up:
            assert seq not in released_seqs
            continue
        if failed is not None:
            # Delivered before the failure, handed back, or refused after it.
            assert (
                seq in released_seqs
                or seq in failed.undelivered
                or OfferResult.STREAM_FAILED in results[seq]
            )
        elif policy is GapPolicy.WAIT:
            assert seq in released_seqs
        else:
            # SKIP: delivered, or skipped and told so when it came late.
            assert seq in released_seqs or OfferResult.LATE_SKIPPED in results[seq]
    assert sq.statistics().max_buffered <= limit


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(1, 50))
def test_unordered_delivers_each_once_in_arrival_order(data: st.DataObject, n: int) -> None:
    order = data.draw(st.permutations(range(1, n + 1)))
    dups = data.draw(st.lists(st.sampled_from(order), max_size=n))
    arrivals = data.draw(st.permutations(list(order) + dups))
    sq = StreamSequencer[int](config=SequencerConfig(ordered=False, buffer_limit=n))
    first_seen: list[int] = []
    for seq in arrivals:
        result = sq.offer(S(seq), S(1), seq, 0.0)
        if seq in first_seen:
            assert result is OfferResult.DUPLICATE
        else:
            assert result is ACCEPTED
            first_seen.append(seq)
    assert released(sq.take_events()) == first_seen
    assert sq.next_expected == n + 1
    assert sq.next_deadline() is None


# -- stream numbers at the top of the u63 range --------------------------------

#: The greatest u63 (docs/protocol.md §3.2): no stream seq or floor is above it.
MAX = 2**63 - 1
#: Numbers at the top of the range, where ``next`` can pass ``MAX``.
TOP = st.sampled_from(
    [1, MAX - 300, MAX - 257, MAX - 256, MAX - 64, MAX - 3, MAX - 2, MAX - 1, MAX]
)


def _req_of(event: AskMissing) -> Req:
    """The REQ the node sends for ``event`` (``LinkReceiver.request``)."""
    return Req(NodeId("b"), Incarnation(MAX), MAX, StreamId("s"), event.missing)


def test_the_last_number_of_the_range_is_released_and_its_copies_refused() -> None:
    sq = StreamSequencer[str](first=S(MAX - 3))
    assert offer(sq, MAX, floor=MAX - 3) is ACCEPTED
    assert offer(sq, MAX - 2, floor=MAX - 3) is ACCEPTED
    sq.poll(0.5)
    (ask,) = [e for e in sq.take_events() if isinstance(e, AskMissing)]
    assert ask.missing == (S(MAX - 3), S(MAX - 1))
    assert decode(encode(_req_of(ask))) == _req_of(ask)
    assert offer(sq, MAX - 3, floor=MAX - 3) is ACCEPTED
    assert offer(sq, MAX - 1, floor=MAX - 3) is ACCEPTED
    assert released(sq.take_events()) == [MAX - 3, MAX - 2, MAX - 1, MAX]
    # ``next`` is now 2**63, past every number a DATA can carry: each copy is
    # a duplicate, never a new message, and no REQ is ever due.
    assert offer(sq, MAX, floor=MAX) is OfferResult.DUPLICATE
    assert sq.next_deadline() is None


@settings(max_examples=200, deadline=None)
@given(
    offers=st.lists(st.tuples(TOP, TOP), max_size=30),
    answers=st.lists(st.tuples(TOP, st.sampled_from(list(MissingStatus))), max_size=6),
    policy=st.sampled_from(list(GapPolicy)),
    ordered=st.booleans(),
    first=TOP,
)
def test_every_event_at_the_top_of_the_range_stays_in_u63_and_every_req_encodes(
    offers: list[tuple[int, int]],
    answers: list[tuple[int, MissingStatus]],
    policy: GapPolicy,
    ordered: bool,
    first: int,
) -> None:
    sq = StreamSequencer[int](
        config=SequencerConfig(ordered=ordered, policy=policy, buffer_limit=256), first=S(first)
    )
    now = 0.0
    for seq, floor in offers:
        if floor > seq:
            # Refused as bad-data by the link layer (§6.2 step 1) before any offer.
            continue
        sq.offer(S(seq), S(floor), seq, now)
        now += 0.25
        sq.poll(now)
        if answers:
            sq.on_missing_answer(answer(*answers), now)
    sq.poll(now + 100.0)
    for event in sq.take_events():
        if isinstance(event, Release):
            assert 1 <= event.stream_seq <= MAX
        elif isinstance(event, GapEvent):
            assert 1 <= event.first <= event.last <= MAX
        elif isinstance(event, StreamFailed):
            assert 1 <= event.first_missing <= MAX
        else:
            assert all(1 <= m <= MAX for m in event.missing)
            assert decode(encode(_req_of(event))) == _req_of(event)
