"""A LinkSender and a LinkReceiver over a seeded terrible network.

The simulator in ``_simnet.py`` asserts the step-by-step invariants as it runs
(no second outcome, no delivery twice per session, answers equal what the
compute layer decided, no DATA after its GaveUp, memory within bounds); these
tests choose the faults and check how each run ended.
"""

from __future__ import annotations

import math
import random

import pytest
from _simnet import STREAMS, A, B, SimNet, decision, expected_items
from hypothesis import given, settings
from hypothesis import strategies as st

from transport import (
    Incarnation,
    LocalProtocolError,
)
from transport._proto_link import Admitted, ReceiverConfig, SenderConfig
from transport._proto_receiver import LinkReceiver
from transport._proto_sender import LinkSender
from transport.frames import (
    ItemAck,
)

seeds = st.integers(0, 2**32 - 1)


def _outcome_kinds(sim: SimNet) -> set[str]:
    return {kind for kind, _ in sim.result.outcomes.values()}


@settings(max_examples=60, deadline=None)
@given(
    seed=seeds,
    drop=st.floats(0.0, 0.5),
    dup=st.floats(0.0, 0.3),
    count=st.integers(1, 150),
    window=st.integers(2, 32),
)
def test_everything_is_answered_as_decided(
    seed: int, drop: float, dup: float, count: int, window: int
) -> None:
    sim = SimNet(
        seed,
        count=count,
        drop=drop,
        dup=dup,
        sender_config=SenderConfig(initial_credit=window, max_in_flight=window),
        receiver_config=ReceiverConfig(window=window, max_entries=2 * window),
    )
    result = sim.run()
    assert len(result.outcomes) == count
    assert "gave_up" not in _outcome_kinds(sim)
    for (_, seq), outcome in result.outcomes.items():
        payload, _ = sim.sends[(0, seq)]
        assert outcome == decision(payload)
    # Each message reached the compute layer exactly once: one receiver
    # process, one sender session, and every outcome came from a delivery.
    assert len(result.deliveries) == count
    assert result.max_sender_in_flight <= window
    assert result.max_receiver_entries <= 2 * window


@settings(max_examples=60, deadline=None)
@given(
    seed=seeds,
    drop=st.floats(0.3, 0.8),
    dup=st.floats(0.0, 0.3),
    count=st.integers(1, 120),
    timeout=st.floats(0.05, 3.0),
)
def test_deadlines_end_each_send_exactly_once(
    seed: int, drop: float, dup: float, count: int, timeout: float
) -> None:
    sim = SimNet(seed, count=count, drop=drop, dup=dup, timeout=timeout)
    result = sim.run()
    assert len(result.outcomes) == count
    stats = sim.sender.statistics()
    assert stats.acked + stats.erred + stats.gave_up == count
    assert stats.in_flight == 0


@settings(max_examples=20, deadline=None)
@given(
    seed=seeds,
    drop=st.floats(0.0, 0.4),
    dup=st.floats(0.0, 0.3),
    restart_receiver_at=st.floats(0.0, 2.0),
)
def test_receiver_restart_mid_run(
    seed: int, drop: float, dup: float, restart_receiver_at: float
) -> None:
    sim = SimNet(seed, count=300, drop=drop, dup=dup, restart_receiver_at=restart_receiver_at)
    result = sim.run()
    assert len(result.outcomes) == 300
    assert "gave_up" not in _outcome_kinds(sim)
    stats = sim.sender.statistics()
    if any(gen == 1 for gen, _, _ in result.deliveries):
        # The new process took a message, so the sender kept at it until the
        # new process answered: it must know the new incarnation. (A restart
        # after the last answer leaves the sender nothing to learn it from.)
        assert stats.peer_incarnation == 1001
        # Zero when the restart came before the sender heard the first process.
        assert stats.peer_restarts <= 1
    # Exactly once per receiver process; across a restart the new process may
    # see again what the old one held without answering.
    per_gen = {(gen, seq) for gen, _, seq in result.deliveries}
    assert len(per_gen) == len(result.deliveries)


@settings(max_examples=20, deadline=None)
@given(
    seed=seeds,
    drop=st.floats(0.0, 0.4),
    dup=st.floats(0.0, 0.3),
    restart_receiver_at=st.floats(0.0, 2.0),
    batch=st.sampled_from([0.0, 0.3]),
)
def test_durable_receiver_restart_finishes_each_message_exactly_once(
    seed: int, drop: float, dup: float, restart_receiver_at: float, batch: float
) -> None:
    # The restarted receiver restores the dead one's sessions (a node with a
    # journal): what the old process finished is answered from them, never
    # finished again, while what it held unfinished is delivered once more.
    sim = SimNet(
        seed,
        count=300,
        drop=drop,
        dup=dup,
        restart_receiver_at=restart_receiver_at,
        batch=batch,
        durable=True,
    )
    result = sim.run()
    assert len(result.outcomes) == 300
    assert "gave_up" not in _outcome_kinds(sim)
    assert sorted(result.finished) == [(100, seq) for seq in range(1, 301)]
    assert set(result.finished.values()) == {1}


@settings(max_examples=20, deadline=None)
@given(
    seed=seeds,
    drop=st.floats(0.0, 0.4),
    dup=st.floats(0.0, 0.3),
    restart_sender_at=st.floats(0.01, 1.0),
)
def test_sender_restart_mid_run(
    seed: int, drop: float, dup: float, restart_sender_at: float
) -> None:
    sim = SimNet(seed, count=600, drop=drop, dup=dup, restart_sender_at=restart_sender_at)
    result = sim.run()
    assert len(result.outcomes) + result.died == result.sent
    assert "gave_up" not in _outcome_kinds(sim)
    incarnations = {inc for _, inc, _ in result.deliveries}
    if 101 in incarnations:
        assert sim.receiver.session_incarnation(A) == 101
        if 100 in incarnations:
            # The old session ended explicitly when the new one showed up.
            assert [e.incarnation for e in result.sessions_ended] == [100]


@settings(max_examples=40, deadline=None)
@given(
    seed=seeds,
    drop=st.floats(0.0, 0.5),
    dup=st.floats(0.0, 0.3),
    count=st.integers(1, 300),
    window=st.integers(2, 64),
    timeout=st.one_of(st.just(math.inf), st.floats(0.05, 3.0)),
    restart_receiver_at=st.one_of(st.none(), st.floats(0.0, 3.0)),
    restart_sender_at=st.one_of(st.none(), st.floats(0.0, 3.0)),
)
def test_everything_at_once(
    seed: int,
    drop: float,
    dup: float,
    count: int,
    window: int,
    timeout: float,
    restart_receiver_at: float | None,
    restart_sender_at: float | None,
) -> None:
    sim = SimNet(
        seed,
        count=count,
        drop=drop,
        dup=dup,
        timeout=timeout,
        sender_config=SenderConfig(initial_credit=window, max_in_flight=window),
        receiver_config=ReceiverConfig(window=window, max_entries=2 * window),
        restart_receiver_at=restart_receiver_at,
        restart_sender_at=restart_sender_at,
    )
    result = sim.run()
    # Every send ended exactly once, or died with the process that made it.
    assert len(result.outcomes) + result.died == result.sent == count
    if timeout == math.inf:
        assert "gave_up" not in _outcome_kinds(sim)


def test_receiver_restart_resends_what_was_only_held() -> None:
    sim = SimNet(5, count=400, compute=(0.5, 1.0), restart_receiver_at=0.3)
    result = sim.run()
    assert sim.sender.statistics().peer_restarts == 1
    assert len(result.outcomes) == 400
    # The first process held messages it never answered; the second got them too.
    first = {seq for gen, _, seq in result.deliveries if gen == 0}
    second = {seq for gen, _, seq in result.deliveries if gen == 1}
    assert first & second
    assert first | second == set(range(1, 401))


def test_slow_compute_causes_no_retransmission() -> None:
    sim = SimNet(
        7,
        count=50,
        compute=(0.5, 1.5),
        sender_config=SenderConfig(retry_timeout=0.2, retry_ceiling=2.0),
    )
    result = sim.run()
    assert len(result.outcomes) == 50
    stats = sim.sender.statistics()
    assert (stats.resent, stats.held_probes) == (0, 0)
    assert stats.sent == 50
    assert result.now > 0.5


def test_clean_network_sends_each_message_once() -> None:
    sim = SimNet(3, count=1000)
    result = sim.run()
    stats = sim.sender.statistics()
    assert (stats.sent, stats.resent, stats.held_probes) == (1000, 0, 0)
    assert len(result.deliveries) == 1000
    assert stats.rtt is not None
    assert stats.rtt < 0.05


@pytest.mark.slow
def test_long_run_memory_stays_bounded() -> None:
    window = 64
    sim = SimNet(
        11,
        count=20_000,
        drop=0.05,
        dup=0.05,
        sender_config=SenderConfig(initial_credit=window, max_in_flight=window),
        receiver_config=ReceiverConfig(window=window, max_entries=2 * window),
    )
    result = sim.run()
    assert len(result.outcomes) == 20_000
    assert "gave_up" not in _outcome_kinds(sim)
    assert result.max_sender_in_flight <= window
    assert result.max_receiver_entries <= 2 * window
    (session,) = sim.receiver.statistics().sessions
    assert session.delivered == 20_000
    assert session.cached_answers + session.held <= 2 * window
    assert math.isfinite(result.now)


def test_runs_of_plain_acks_travel_as_ack_ranges() -> None:
    # Compute takes no time: what arrives together is answered together.
    sim = SimNet(11, count=150, drop=0.1, dup=0.1, compute=(0.0, 0.0))
    result = sim.run()
    assert len(result.outcomes) == 150
    for (_, seq), outcome in result.outcomes.items():
        payload, _ = sim.sends[(0, seq)]
        assert outcome == decision(payload)
    # Most plain ACKs arrived inside a range, each counted once per message.
    plain = sum(1 for outcome in result.outcomes.values() if outcome == ("ack", None))
    assert plain // 2 < result.ack_ranges <= plain


# --- batches (DATA_ITEMS) mixed with single messages ------------------------------------


def _check_items(sim: SimNet) -> None:
    """Every item of every answered message ended in what the compute layer decided."""
    result = sim.result
    for (gen, seq), (items, _) in sim.batch_sends.items():
        outcome = result.outcomes.get((gen, seq))
        if outcome is None:
            continue
        got = [result.item_outcomes[(gen, seq, i)] for i in range(len(items))]
        if outcome[0] == "gave_up":
            assert got == [("gave_up", 0)] * len(items)
        else:
            assert got == expected_items(items)
    # No outcome for an item that was never sent.
    for gen, seq, index in result.item_outcomes:
        if (gen, seq) in sim.batch_sends:
            assert index < len(sim.batch_sends[(gen, seq)][0])
        else:
            assert index == 0


@settings(max_examples=40, deadline=None)
@given(
    seed=seeds,
    drop=st.floats(0.0, 0.5),
    dup=st.floats(0.0, 0.3),
    count=st.integers(1, 120),
    window=st.integers(2, 32),
    batch=st.floats(0.2, 1.0),
)
def test_batches_are_answered_item_by_item(
    seed: int, drop: float, dup: float, count: int, window: int, batch: float
) -> None:
    sim = SimNet(
        seed,
        count=count,
        drop=drop,
        dup=dup,
        batch=batch,
        sender_config=SenderConfig(initial_credit=window, max_in_flight=window),
        receiver_config=ReceiverConfig(window=window, max_entries=2 * window),
    )
    result = sim.run()
    assert len(result.outcomes) == count
    assert "gave_up" not in _outcome_kinds(sim)
    items = sum(len(its) for its, _ in sim.batch_sends.values()) + len(sim.sends)
    assert len(result.item_outcomes) == items
    _check_items(sim)
    # One receiver process and one sender session: every message reached the
    # compute layer exactly once, and so did every item of every batch.
    assert len(result.deliveries) == count
    assert len(result.items_processed) == items - len(sim.sends)
    assert result.max_sender_in_flight <= window
    assert result.max_receiver_entries <= 2 * window


@settings(max_examples=40, deadline=None)
@given(
    seed=seeds,
    drop=st.floats(0.3, 0.8),
    dup=st.floats(0.0, 0.3),
    count=st.integers(1, 100),
    timeout=st.floats(0.05, 3.0),
)
def test_deadlines_end_each_batch_exactly_once(
    seed: int, drop: float, dup: float, count: int, timeout: float
) -> None:
    sim = SimNet(seed, count=count, drop=drop, dup=dup, timeout=timeout, batch=0.7)
    result = sim.run()
    assert len(result.outcomes) == count
    _check_items(sim)
    stats = sim.sender.statistics()
    assert stats.acked + stats.erred + stats.gave_up == count
    assert stats.in_flight == 0
    # Each batch that gave up ended once, with the same failure for all its items.
    gave_up = [key for key, outcome in result.outcomes.items() if outcome[0] == "gave_up"]
    assert stats.gave_up == len(gave_up)


@settings(max_examples=20, deadline=None)
@given(
    seed=seeds,
    drop=st.floats(0.0, 0.4),
    dup=st.floats(0.0, 0.3),
    restart_receiver_at=st.floats(0.0, 2.0),
)
def test_batches_survive_a_receiver_restart(
    seed: int, drop: float, dup: float, restart_receiver_at: float
) -> None:
    sim = SimNet(
        seed,
        count=200,
        drop=drop,
        dup=dup,
        batch=0.6,
        restart_receiver_at=restart_receiver_at,
    )
    result = sim.run()
    assert len(result.outcomes) == 200
    assert "gave_up" not in _outcome_kinds(sim)
    _check_items(sim)
    if any(gen == 1 for gen, _, _ in result.deliveries):
        assert sim.sender.statistics().peer_incarnation == 1001
    # Each item is processed at most once per receiver process, and every
    # answered batch had all its items processed by some process.
    processed = {(inc, seq, i) for _, inc, seq, i in result.items_processed}
    for (gen, seq), (items, _) in sim.batch_sends.items():
        assert {(100 + gen, seq, i) for i in range(len(items))} <= processed


@settings(max_examples=30, deadline=None)
@given(
    seed=seeds,
    drop=st.floats(0.0, 0.5),
    dup=st.floats(0.0, 0.3),
    count=st.integers(1, 200),
    window=st.integers(2, 64),
    timeout=st.one_of(st.just(math.inf), st.floats(0.05, 3.0)),
    restart_receiver_at=st.one_of(st.none(), st.floats(0.0, 3.0)),
    restart_sender_at=st.one_of(st.none(), st.floats(0.0, 3.0)),
    batch=st.floats(0.0, 1.0),
)
def test_batches_with_everything_at_once(
    seed: int,
    drop: float,
    dup: float,
    count: int,
    window: int,
    timeout: float,
    restart_receiver_at: float | None,
    restart_sender_at: float | None,
    batch: float,
) -> None:
    sim = SimNet(
        seed,
        count=count,
        drop=drop,
        dup=dup,
        timeout=timeout,
        batch=batch,
        sender_config=SenderConfig(initial_credit=window, max_in_flight=window),
        receiver_config=ReceiverConfig(window=window, max_entries=2 * window),
        restart_receiver_at=restart_receiver_at,
        restart_sender_at=restart_sender_at,
    )
    result = sim.run()
    assert len(result.outcomes) + result.died == result.sent == count
    _check_items(sim)
    if timeout == math.inf:
        assert "gave_up" not in _outcome_kinds(sim)


def test_batch_answers_take_every_form() -> None:
    # One seeded run that sees all three answers to a DATA_ITEMS, under faults.
    sim = SimNet(4, count=300, drop=0.2, dup=0.2, batch=0.8, compute=(0.0, 0.0))
    result = sim.run()
    assert len(result.outcomes) == 300
    _check_items(sim)
    assert result.batches == len(sim.batch_sends) > 150
    assert result.batch_plain_acks + result.batch_ack_items + result.batch_errs == result.batches
    assert min(result.batch_plain_acks, result.batch_ack_items, result.batch_errs) > 0
    # All-plain batches may share an ACK_RANGE with single messages.
    assert result.ack_ranges > 0
    stats = sim.sender.statistics()
    assert stats.acked + stats.erred == 300


# --- what the receiver core lets the compute layer get wrong ----------------------------


def _delivered(*sends: tuple[int, ...] | int) -> tuple[LinkReceiver, list[Admitted]]:
    """A receiver that delivered ``sends`` (an int is a single DATA, a tuple a DATA_ITEMS)."""
    sender = LinkSender(A, Incarnation(100), B, now=0.0, rng=random.Random(0).random)
    receiver = LinkReceiver(B, Incarnation(1000))
    for sent in sends:
        if isinstance(sent, tuple):
            sender.send_items(STREAMS[0], sent, now=0.0)
        else:
            sender.send(STREAMS[0], sent, now=0.0)
    for frame in sender.frames_to_send(0.0):
        receiver.receive_frame(A, frame, 0.0)
    delivered = [e for e in receiver.take_events() if isinstance(e, Admitted)]
    assert [e.items for e in delivered] == [isinstance(sent, tuple) for sent in sends]
    return receiver, delivered


@pytest.mark.parametrize("outcomes", [1, 3], ids=["fewer", "more"])
def test_complete_items_refuses_a_wrong_number_of_outcomes(outcomes: int) -> None:
    receiver, (batch,) = _delivered((1, 2))
    with pytest.raises(LocalProtocolError, match="needs 2 outcomes"):
        receiver.complete_items(
            A, batch.peer_incarnation, batch.seq, (ItemAck(None),) * (outcomes - 1) + (ItemAck(7),)
        )
    # The refusal took nothing: the batch still waits for its one right answer.
    assert receiver.complete_items(A, batch.peer_incarnation, batch.seq, (ItemAck(7),) * 2)


def test_a_batch_plain_ack_carries_no_result() -> None:
    receiver, (batch,) = _delivered((1, 2))
    with pytest.raises(LocalProtocolError, match="carries no result"):
        receiver.complete(A, batch.peer_incarnation, batch.seq, result=7)
    assert receiver.complete(A, batch.peer_incarnation, batch.seq)


def test_complete_items_refuses_a_single_message() -> None:
    receiver, (single,) = _delivered(5)
    with pytest.raises(LocalProtocolError, match="single DATA"):
        receiver.complete_items(A, single.peer_incarnation, single.seq, (ItemAck(7),))
    assert receiver.complete(A, single.peer_incarnation, single.seq, result=7)
