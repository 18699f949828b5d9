"""A LinkSender and a LinkReceiver over a seeded terrible network.

The simulator in ``_simnet.py`` asserts the step-by-step invariants as it runs
(no second outcome, no delivery twice per session, answers equal what the
compute layer decided, no DATA after its GaveUp, memory within bounds); these
tests choose the faults and check how each run ended.
"""

from __future__ import annotations

import math

import pytest
from _simnet import A, SimNet, decision
from hypothesis import given, settings
from hypothesis import strategies as st

from transport._proto_link import ReceiverConfig, SenderConfig

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
