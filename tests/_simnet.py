"""A deterministic terrible network between one LinkSender and one LinkReceiver.

After trio's ``test_dtls.py::test_handshake_over_terrible_network``: every frame
(or batch) in either direction is dropped, duplicated and delayed by a seeded
``random.Random``, and the spread of delays reorders them. Virtual time is a
float that jumps to the next thing due, so a run of minutes takes milliseconds.

The compute layer on the receiving node answers each delivery after a random
processing time, by a deterministic rule on the payload, so the test can check
every answer. A run may mix single messages with batches (``send_items`` of
1..8 items, one DATA_ITEMS), which the compute layer answers item by item
(``complete_items``), or refuses as a whole (``fail``). Either process can be
restarted mid-run: a new object with a greater incarnation replaces it, and
what the dead process held is gone.

The simulator records everything the properties need and asserts the
invariants that must hold at every step as it goes.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field

from transport import (
    Incarnation,
    LinkSeq,
    NodeId,
    StreamId,
)
from transport._proto_link import (
    Admitted,
    Answered,
    GaveUp,
    ReceiverConfig,
    SenderConfig,
    SessionEnded,
)
from transport._proto_receiver import LinkReceiver
from transport._proto_sender import LinkSender
from transport.frames import (
    AckFrame,
    AckItems,
    AckRange,
    Batch,
    Data,
    DataItems,
    ErrFrame,
    Frame,
    ItemAck,
    ItemErr,
    ItemOutcome,
)

A = NodeId("a")
B = NodeId("b")
STREAMS = (StreamId("halo"), StreamId("ctl"))
#: The code the compute layer refuses a whole batch with (see :func:`batch_refused`).
BATCH_ERR = 120
#: Largest batch a run sends.
MAX_BATCH = 8

Outcome = tuple[str, int | None]


def decision(payload: int) -> tuple[str, int | None]:
    """What the compute layer answers to ``payload``: ("ack", result) or ("err", code).

    Most ACKs carry no result, so the receiver sends runs of them as ACK_RANGE.
    """
    if payload % 7 == 3:
        return "err", 100 + payload % 5
    if payload % 4 == 1:
        return "ack", payload * 2
    return "ack", None


def batch_refused(items: tuple[int, ...]) -> bool:
    """Whether the compute layer refuses a whole batch (one ERR ``BATCH_ERR`` for all items).

    Keyed on the first item, so it is as deterministic as :func:`decision`.
    """
    return items[0] % 11 == 5


def expected_items(items: tuple[int, ...]) -> list[Outcome]:
    """The outcome each item of a batch must end in, unless the batch gives up."""
    if batch_refused(items):
        return [("err", BATCH_ERR)] * len(items)
    return [decision(item) for item in items]


@dataclass
class SimResult:
    """What a run observed."""

    now: float = 0.0
    sent: int = 0
    #: (sender generation, seq) -> the outcome ("ack", result) / ("err", code) / ("gave_up", 0);
    #: ("items", None) for a batch answered by ACK_ITEMS (see ``item_outcomes``).
    outcomes: dict[tuple[int, int], tuple[str, int | None]] = field(default_factory=dict)
    #: Outcomes that arrived in an ACK_RANGE.
    ack_ranges: int = 0
    #: (sender generation, seq, item index) -> the outcome of each item of every
    #: message (a single message is item 0); a batch gives all its items theirs at once.
    item_outcomes: dict[tuple[int, int, int], Outcome] = field(default_factory=dict)
    #: Batches sent, and how their answer travelled: plain ACK / ACK_RANGE,
    #: ACK_ITEMS, whole-message ERR.
    batches: int = 0
    batch_plain_acks: int = 0
    batch_ack_items: int = 0
    batch_errs: int = 0
    #: (receiver generation, sender incarnation, seq, item index) of every item
    #: the compute layer processed.
    items_processed: set[tuple[int, int, int, int]] = field(default_factory=set)
    #: Messages that were in flight when their sender process died.
    died: int = 0
    #: (receiver generation, sender incarnation, seq) of every Admitted.
    deliveries: set[tuple[int, int, int]] = field(default_factory=set)
    #: (sender incarnation, seq) -> how many times a receiver process finished
    #: it (completed or failed it while the core still waited for its answer).
    finished: dict[tuple[int, int], int] = field(default_factory=dict)
    sessions_ended: list[SessionEnded] = field(default_factory=list)
    max_sender_in_flight: int = 0
    max_receiver_entries: int = 0
    frames_a_to_b: int = 0
    frames_b_to_a: int = 0
    steps: int = 0


class SimNet:
    """One sender node ``a`` sending ``count`` messages to receiver node ``b``.

    Args:
        seed: seeds the network and the jitter.
        count: messages the application on ``a`` sends, as fast as the window allows.
        drop, dup: probability that a frame is lost / arrives twice.
        delay: (min, max) one-way delay in seconds; its spread reorders frames.
        compute: (min, max) processing time of one message on ``b``.
        timeout: per-message deadline relative to its send, or ``math.inf``.
        restart_receiver_at, restart_sender_at: virtual times of process restarts.
        durable: the restarted receiver takes back the dead one's sessions
            (``snapshot`` / ``restore``), as a node with a journal does; the
            sim's completions stand for committed ones.
        batch: probability that a send is a batch (``send_items``) of 1..``MAX_BATCH``
            items rather than a single message; ``count`` counts messages either way.
    """

    def __init__(
        self,
        seed: int,
        *,
        count: int,
        drop: float = 0.0,
        dup: float = 0.0,
        delay: tuple[float, float] = (0.001, 0.02),
        compute: tuple[float, float] = (0.0, 0.03),
        timeout: float = math.inf,
        sender_config: SenderConfig | None = None,
        receiver_config: ReceiverConfig | None = None,
        restart_receiver_at: float | None = None,
        restart_sender_at: float | None = None,
        batch: float = 0.0,
        durable: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self.jitter_rng = random.Random(seed + 1)
        self.count = count
        self.drop = drop
        self.dup = dup
        self.delay = delay
        self.compute = compute
        self.timeout = timeout
        self.sender_config = sender_config or SenderConfig()
        self.receiver_config = receiver_config or ReceiverConfig()
        self.restart_receiver_at = restart_receiver_at
        self.restart_sender_at = restart_sender_at
        self.batch = batch
        self.durable = durable
        # Its own stream, so a run without batches replays the same faults as before.
        self.batch_rng = random.Random(seed + 2)

        self.now = 0.0
        self.sender_gen = 0
        self.receiver_gen = 0
        self.sender = self._new_sender()
        self.receiver = LinkReceiver(B, Incarnation(1000), config=self.receiver_config)
        self._seq = 0
        self._next_item = 0
        self._wire: list[tuple[float, int, str, Frame]] = []
        self._work: list[tuple[float, int, int, Admitted]] = []
        self._order = 0
        self.result = SimResult()
        #: (sender generation, seq) -> (payload, deadline) of every single send.
        self.sends: dict[tuple[int, int], tuple[int, float]] = {}
        #: (sender generation, seq) -> (items, deadline) of every batch send.
        self.batch_sends: dict[tuple[int, int], tuple[tuple[int, ...], float]] = {}
        #: (sender incarnation, seq) -> payload or items, to check what was delivered.
        self._payload_by_inc: dict[tuple[int, int], int | tuple[int, ...]] = {}
        self._given_up: set[int] = set()

    def _new_sender(self) -> LinkSender:
        return LinkSender(
            A,
            Incarnation(100 + self.sender_gen),
            B,
            now=self.now,
            rng=self.jitter_rng.random,
            config=self.sender_config,
        )

    # --- the network -----------------------------------------------------------------

    def _transmit(self, direction: str, frames: list[Frame]) -> None:
        if not frames:
            return
        if direction == "ab":
            self.result.frames_a_to_b += len(frames)
        else:
            self.result.frames_b_to_a += len(frames)
        unit: Frame = frames[0] if len(frames) == 1 else Batch(tuple(frames))
        if self.rng.random() < self.drop:
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            arrival = self.now + self.rng.uniform(*self.delay)
            self._order += 1
            heapq.heappush(self._wire, (arrival, self._order, direction, unit))

    def _arrive(self, direction: str, frame: Frame) -> None:
        if direction == "ab":
            self.receiver.receive_frame(A, frame, self.now)
        else:
            self.sender.receive_frame(frame, self.now)

    # --- the two nodes ---------------------------------------------------------------

    def _app_send(self) -> None:
        sender = self.sender
        while self._seq < self.count and sender.window_open():
            self._seq += 1
            deadline = self.now + self.timeout
            first = self._next_item
            stream = STREAMS[first % 2]
            if self.batch and self.batch_rng.random() < self.batch:
                items = tuple(range(first, first + self.batch_rng.randint(1, MAX_BATCH)))
                self._next_item += len(items)
                seq = sender.send_items(
                    stream, items, now=self.now, deadline=deadline, frame_no=first
                )
                self.batch_sends[(self.sender_gen, seq)] = (items, deadline)
                self._payload_by_inc[(sender.incarnation, seq)] = items
                self.result.batches += 1
            else:
                self._next_item += 1
                seq = sender.send(stream, first, now=self.now, deadline=deadline, frame_no=first)
                self.sends[(self.sender_gen, seq)] = (first, deadline)
                self._payload_by_inc[(sender.incarnation, seq)] = first
            self.result.sent += 1

    def _flush_sender(self) -> None:
        frames = self.sender.frames_to_send(self.now)
        for frame in frames:
            if isinstance(frame, (Data, DataItems)):
                assert frame.seq not in self._given_up, f"seq {frame.seq} sent after GaveUp"
                assert frame.watermark <= frame.seq
        self._transmit("ab", frames)
        for event in self.sender.take_events():
            if isinstance(event, Answered):
                if isinstance(event.answer, AckRange):
                    self.result.ack_ranges += 1
                if (self.sender_gen, event.seq) in self.batch_sends:
                    self._batch_outcome(event.seq, event.answer)
                else:
                    assert not isinstance(event.answer, AckItems), "ACK_ITEMS for a single DATA"
                    self._outcome(event.seq, _answer_outcome(event.answer))
            elif isinstance(event, GaveUp):
                key = (self.sender_gen, event.seq)
                batch = self.batch_sends.get(key)
                deadline = self.sends[key][1] if batch is None else batch[1]
                assert self.now >= deadline, "gave up before the deadline"
                self._given_up.add(event.seq)
                if batch is not None:
                    # A batch fails as a whole: every item gets the same failure.
                    self._record_items(event.seq, [("gave_up", 0)] * len(batch[0]))
                self._outcome(event.seq, ("gave_up", 0))

    def _outcome(self, seq: LinkSeq, outcome: Outcome) -> None:
        key = (self.sender_gen, seq)
        assert key in self.sends or key in self.batch_sends, f"outcome for unknown seq {seq}"
        assert key not in self.result.outcomes, f"second outcome for seq {seq}"
        if key in self.sends:
            payload, _ = self.sends[key]
            if outcome[0] != "gave_up":
                assert outcome == decision(payload), f"seq {seq}: {outcome} != {decision(payload)}"
            self._record_items(seq, [outcome])
        self.result.outcomes[key] = outcome

    def _batch_outcome(
        self, seq: LinkSeq, answer: AckFrame | AckRange | AckItems | ErrFrame
    ) -> None:
        items, _ = self.batch_sends[(self.sender_gen, seq)]
        expected = expected_items(items)
        got: list[Outcome]
        if isinstance(answer, AckItems):
            # ACK_ITEMS only when some item has a result or an error.
            assert any(outcome != ("ack", None) for outcome in expected), f"seq {seq}"
            assert len(answer.outcomes) == len(items), f"seq {seq}: one outcome per item"
            got = [_item_outcome(outcome) for outcome in answer.outcomes]
            self.result.batch_ack_items += 1
            kind: Outcome = ("items", None)
        elif isinstance(answer, ErrFrame):
            got = [("err", answer.code)] * len(items)
            self.result.batch_errs += 1
            kind = ("err", answer.code)
        else:
            # A plain ACK stands for every item, so it must not carry a result.
            assert isinstance(answer, AckRange) or answer.result is None, f"seq {seq}: {answer}"
            got = [("ack", None)] * len(items)
            self.result.batch_plain_acks += 1
            kind = ("ack", None)
        assert got == expected, f"batch seq {seq} {items}: {got} != {expected}"
        self._record_items(seq, got)
        self._outcome(seq, kind)

    def _record_items(self, seq: LinkSeq, outcomes: list[Outcome]) -> None:
        for index, outcome in enumerate(outcomes):
            key = (self.sender_gen, seq, index)
            assert key not in self.result.item_outcomes, f"second outcome for item {key}"
            self.result.item_outcomes[key] = outcome

    def _flush_receiver(self) -> None:
        pairs = self.receiver.frames_to_send(self.now)
        for peer, _ in pairs:
            assert peer == A
        self._transmit("ba", [frame for _, frame in pairs])
        for event in self.receiver.take_events():
            if isinstance(event, Admitted):
                key = (self.receiver_gen, event.peer_incarnation, event.seq)
                assert key not in self.result.deliveries, f"delivered twice: {key}"
                self.result.deliveries.add(key)
                sent = self._payload_by_inc[(event.peer_incarnation, event.seq)]
                assert event.items == isinstance(sent, tuple)
                # Every item, in the order it was sent.
                assert event.payload == sent
                assert event.frame_no == (sent[0] if isinstance(sent, tuple) else sent)
                self._order += 1
                done = self.now + self.rng.uniform(*self.compute)
                heapq.heappush(self._work, (done, self._order, self.receiver_gen, event))
            elif isinstance(event, SessionEnded):
                self.result.sessions_ended.append(event)

    def _finish_work(self, gen: int, event: Admitted) -> None:
        if gen != self.receiver_gen:
            return
        if event.items:
            self._finish_batch(event)
            return
        kind, value = decision(event.payload)
        if kind == "ack":
            taken = self.receiver.complete(
                event.peer, event.peer_incarnation, event.seq, result=value
            )
        else:
            assert value is not None
            taken = self.receiver.fail(event.peer, event.peer_incarnation, event.seq, value, "odd")
        self._finished(event, taken)

    def _finished(self, event: Admitted, taken: bool) -> None:
        if taken:
            key = (event.peer_incarnation, event.seq)
            self.result.finished[key] = self.result.finished.get(key, 0) + 1

    def _finish_batch(self, event: Admitted) -> None:
        items = event.payload
        assert isinstance(items, tuple)
        outcomes: list[ItemOutcome] = []
        # The compute layer takes the items one by one, in order, each once per session.
        for index, item in enumerate(items):
            key = (self.receiver_gen, event.peer_incarnation, event.seq, index)
            assert key not in self.result.items_processed, f"item processed twice: {key}"
            self.result.items_processed.add(key)
            kind, value = decision(item)
            if kind == "ack":
                outcomes.append(ItemAck(value))
            else:
                assert value is not None
                outcomes.append(ItemErr(value, "odd"))
        if batch_refused(items):
            taken = self.receiver.fail(
                event.peer, event.peer_incarnation, event.seq, BATCH_ERR, "all"
            )
        else:
            taken = self.receiver.complete_items(
                event.peer, event.peer_incarnation, event.seq, tuple(outcomes)
            )
        self._finished(event, taken)

    def _restart_receiver(self) -> None:
        sessions = self.receiver.snapshot() if self.durable else ()
        self.receiver_gen += 1
        self.receiver = LinkReceiver(
            B, Incarnation(1000 + self.receiver_gen), config=self.receiver_config
        )
        self.receiver.restore(sessions)

    def _restart_sender(self) -> None:
        in_flight = self.sender.statistics().in_flight
        self.result.died += in_flight
        self.sender_gen += 1
        self._given_up.clear()
        self.sender = self._new_sender()

    def _check_bounds(self) -> None:
        stats = self.sender.statistics()
        assert stats.in_flight <= self.sender_config.max_in_flight
        self.result.max_sender_in_flight = max(self.result.max_sender_in_flight, stats.in_flight)
        for session in self.receiver.statistics().sessions:
            entries = session.held + session.cached_answers
            assert entries <= self.receiver_config.max_entries
            self.result.max_receiver_entries = max(self.result.max_receiver_entries, entries)

    def _all_done(self) -> bool:
        return self._seq == self.count and len(self.result.outcomes) + self.result.died == (
            self.result.sent
        )

    # --- the event loop --------------------------------------------------------------

    def run(self, *, max_time: float = 3600.0, max_steps: int = 2_000_000) -> SimResult:
        """Run until every message has its outcome, or a bound is hit (then fail)."""
        for step in range(max_steps):
            self._app_send()
            self._flush_sender()
            self._flush_receiver()
            self._check_bounds()
            if self._all_done():
                self.result.now = self.now
                self.result.steps = step
                return self.result
            due = [
                d
                for d in (self.sender.next_deadline(), self.receiver.next_deadline())
                if d is not None
            ]
            if self._wire:
                due.append(self._wire[0][0])
            if self._work:
                due.append(self._work[0][0])
            for restart in (self.restart_receiver_at, self.restart_sender_at):
                if restart is not None:
                    due.append(restart)
            self.now = max(self.now, min(due))
            assert self.now <= max_time, f"not finished by t={max_time}"
            if self.restart_receiver_at is not None and self.now >= self.restart_receiver_at:
                self.restart_receiver_at = None
                self._restart_receiver()
            if self.restart_sender_at is not None and self.now >= self.restart_sender_at:
                self.restart_sender_at = None
                self._restart_sender()
            while self._wire and self._wire[0][0] <= self.now:
                _, _, direction, frame = heapq.heappop(self._wire)
                self._arrive(direction, frame)
            while self._work and self._work[0][0] <= self.now:
                _, _, gen, event = heapq.heappop(self._work)
                self._finish_work(gen, event)
        raise AssertionError(f"not finished in {max_steps} steps")


def _answer_outcome(answer: AckFrame | AckRange | ErrFrame) -> tuple[str, int | None]:
    if isinstance(answer, AckFrame):
        return "ack", answer.result
    if isinstance(answer, AckRange):
        assert answer.first <= answer.last
        return "ack", None
    return "err", answer.code


def _item_outcome(outcome: ItemOutcome) -> Outcome:
    if isinstance(outcome, ItemAck):
        return "ack", outcome.result
    return "err", outcome.code
