"""What both sides of a reliable link share: configuration, events, statistics.

The protocol core is sans-IO (h11's habit): :class:`~transport._proto_sender.LinkSender`
and :class:`~transport._proto_receiver.LinkReceiver` take frames and ``now`` in, hand
frames and events out, and say with ``next_deadline()`` when they want to be
called again. Nothing here sleeps, reads a clock or draws a random number: time
arrives as ``now: float`` (any monotonic clock, seconds) and randomness as an
injected :data:`Rng`.

All events are frozen values collected in one place so the whole vocabulary a
shell has to handle is visible at a glance.

The convention of the three state machines (``LinkSender``, ``LinkReceiver``,
``StreamSequencer``), so that one shell loop drives any of them:

* constructed with keyword-only ``config=`` (``None``: the defaults); a bad
  configuration raises :class:`LocalProtocolError` saying which field and why;
* ``take_events() -> list[...]``: the events since the last call, oldest first;
* ``poll(now)``: run the timers due at ``now``; a ``now`` before an earlier
  one raises :class:`LocalProtocolError` (pass a monotonic clock);
* ``next_deadline() -> float | None``: when to call again, an absolute time on
  the ``now`` clock (at or before the last ``now``: at once), ``None``: no timer;
* ``statistics()``: a frozen dataclass snapshot of the counters;
* caller misuse raises :class:`LocalProtocolError`, bad input from the network
  :class:`~transport._errors.RemoteProtocolError` (or is counted, never a crash).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeAlias

from ._errors import LocalProtocolError
from ._frames import (
    PROTOCOL_VERSION,
    AckFrame,
    AckItems,
    AckRange,
    ErrFrame,
    ItemOutcome,
    Payload,
    ReqAnswer,
)
from ._ids import Incarnation, LinkSeq, NodeId, StreamId, StreamSeq

#: A source of uniform floats in ``[0, 1)``, e.g. ``random.Random(seed).random``.
Rng: TypeAlias = Callable[[], float]


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise LocalProtocolError(f"{name} must be a positive finite number, got {value!r}")


def _positive_int(name: str, value: int) -> None:
    if value < 1:
        raise LocalProtocolError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True, slots=True)
class SenderConfig:
    """Tuning of a :class:`LinkSender`. Every field has a default that suits a LAN.

    Attributes:
        retry_timeout: wait before the first resend of an unanswered DATA, in
            seconds. 0.2 s is Linux TCP's minimum RTO: far above a LAN round
            trip, and the receiver answers RECEIVED at once, before computing,
            so a slow compute step never trips it.
        backoff: factor applied to the wait after every unanswered try
            (RFC 6298 §5.5, trio's ``_dtls.py``: ``timeout = min(2 * timeout, ceiling)``).
        retry_ceiling: the wait never grows beyond this (before jitter), and a
            message the receiver holds (RECEIVED) is re-probed at this interval
            so a lost final answer is recovered. 2 s: a peer that comes back is
            noticed within about two seconds.
        jitter: each wait is multiplied by a uniform factor in
            ``[1 - jitter, 1 + jitter)`` so that many links that lost the same
            peer do not resend in lockstep when it returns.
        initial_credit: how many new messages may be sent past the watermark
            before the receiver has granted any credit (and again after it
            restarts). Matches the receiver's default ``window``.
        max_in_flight: at most this many messages without a final outcome at
            once. It bounds the sender's memory and, because every DATA carries
            the watermark, the receiver's cache of answers too. Keep it at or
            below the receiver's ``window``.
        max_batch: at most this many DATA frames per ``frames_to_send`` call,
            so one wake-up never monopolises the socket-owning task.
        heartbeat_interval: send a HELLO after this long without sending
            anything, so an idle link still proves liveness and measures RTT.
        suspect_after: nothing heard from the peer for this long: SUSPECT
            (three missed heartbeats).
        down_after: nothing heard for this long: DOWN (ten missed heartbeats).
        lost_grace: a peer that was heard once and then stays DOWN this long
            is LOST: every unfinished send to it and every later one fails at
            once (:class:`GaveUp` with ``down_for``), until it is heard again.
            5 s: a dead rank surfaces ten seconds after its last word instead
            of at each send's deadline. ``math.inf``: never (sends then wait
            for their deadlines, however long the peer is away).
        send_timeout: deadline given to a ``send`` that names none, in seconds
            from the call.
        given_up_memory: per stream, how many given-up stream sequence numbers
            are remembered to answer a REQ with GIVEN_UP instead of ANSWERED.
    """

    retry_timeout: float = 0.2
    backoff: float = 2.0
    retry_ceiling: float = 2.0
    jitter: float = 0.1
    initial_credit: int = 256
    max_in_flight: int = 256
    max_batch: int = 128
    heartbeat_interval: float = 0.5
    suspect_after: float = 1.5
    down_after: float = 5.0
    lost_grace: float = 5.0
    send_timeout: float = 30.0
    given_up_memory: int = 1024

    def __post_init__(self) -> None:
        for name in ("retry_timeout", "retry_ceiling", "heartbeat_interval"):
            _positive(name, getattr(self, name))
        for name in ("suspect_after", "down_after", "send_timeout"):
            _positive(name, getattr(self, name))
        for name in ("initial_credit", "max_in_flight", "max_batch", "given_up_memory"):
            _positive_int(name, getattr(self, name))
        if not (self.backoff >= 1.0 and math.isfinite(self.backoff)):
            raise LocalProtocolError(f"backoff must be a finite factor >= 1, got {self.backoff!r}")
        if not 0.0 <= self.jitter < 1.0:
            raise LocalProtocolError(f"jitter must be in [0, 1), got {self.jitter!r}")
        if self.retry_ceiling < self.retry_timeout:
            raise LocalProtocolError("retry_ceiling must be >= retry_timeout")
        if not self.lost_grace > 0:
            raise LocalProtocolError(
                f"lost_grace must be > 0 seconds (math.inf: never), got {self.lost_grace!r}"
            )
        if self.down_after <= self.suspect_after:
            raise LocalProtocolError("down_after must be greater than suspect_after")


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    """Tuning of a :class:`LinkReceiver`.

    Attributes:
        window: credit granted per session: the sender may use link sequence
            numbers up to ``floor + window - 1`` (at most ``2**63 - 1``), where
            ``floor`` is the lowest one the receiver has not finalised. Messages
            the compute layer has not answered yet hold the floor back: that is
            the backpressure.
        max_entries: hard cap on the per-session table (messages being
            processed plus final answers the sender has not yet confirmed with
            its watermark). DATA that would exceed it gets RETRY_LATER. A sender
            whose ``max_in_flight`` is at most ``window`` never reaches it.
        max_pending_queries: outstanding REQs remembered to route answers;
            the oldest is forgotten beyond it.
        received_delay: how long a new delivery waits for its final answer
            before RECEIVED is sent for it (TCP's delayed ACK): a fast compute
            step is then confirmed by one ACK instead of RECEIVED + ACK. Must
            stay well below the sender's ``retry_timeout``; 0 sends RECEIVED
            at once.
        max_held_bytes: per-peer input budget: how many bytes of one peer's
            messages this node holds at once (delivered and not answered yet,
            or buffered for ordering), counted as the size of the ZeroMQ
            message each came in (all parts). A new DATA beyond it gets
            RETRY_LATER(BUFFER_FULL), "not held: send it again" (§6.5), so
            a flood of large valid messages cannot grow memory. A message
            is always taken when nothing of its peer is held, so anything
            within ``Limits.max_message_bytes`` gets through. Default 64 MiB:
            one largest message, or hundreds of a busy link's usual ones.
    """

    window: int = 256
    max_entries: int = 512
    max_pending_queries: int = 1024
    received_delay: float = 0.01
    max_held_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("window", "max_entries", "max_pending_queries", "max_held_bytes"):
            _positive_int(name, getattr(self, name))
        if not 0.0 <= self.received_delay < 1.0:
            raise LocalProtocolError(
                f"received_delay must be in [0, 1) seconds, got {self.received_delay!r}"
            )
        if self.max_entries < self.window:
            raise LocalProtocolError("max_entries must be >= window")


def jittered(base: float, jitter: float, rng: Rng) -> float:
    """Spread ``base`` uniformly over ``[base * (1 - jitter), base * (1 + jitter))``.

    Args:
        base: the un-jittered wait, in seconds.
        jitter: the relative spread, in ``[0, 1)``.
        rng: a source of uniform floats in ``[0, 1)``.

    Returns:
        The jittered wait.
    """
    return base * (1.0 + jitter * (2.0 * rng() - 1.0))


class PeerState(Enum):
    """What a link knows about its peer's liveness."""

    #: Heard from within ``suspect_after``.
    UP = "up"
    #: Silent for ``suspect_after`` (or never heard from yet).
    SUSPECT = "suspect"
    #: Silent for ``down_after``.
    DOWN = "down"
    #: Heard once, then DOWN for ``lost_grace`` more: every send to it fails
    #: at once until it is heard again (then UP).
    LOST = "lost"


# --- sender events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answered:
    """The receiver's final answer to ``seq``: ACK or ERR. The send is over.

    ``answer`` is the frame that carried it: an :class:`AckRange` (shared by
    every number it covers) is an ACK with ``result`` None. A message sent with
    ``send_items`` may also end in an :class:`AckItems` (one outcome per item);
    a plain ACK or ERR then stands for each of its items.
    """

    seq: LinkSeq
    answer: AckFrame | AckRange | AckItems | ErrFrame


@dataclass(frozen=True, slots=True)
class Held:
    """The receiver's current incarnation holds ``seq`` (RECEIVED); a final answer follows."""

    seq: LinkSeq


#: Why a message is given up when its deadline passes (the usual case).
DEADLINE_PASSED = "deadline passed without a final answer"


def lost_reason(peer: NodeId, down_for: float, silent_for: float) -> str:
    """Why a message to a LOST peer is given up: who, and for how long it has been away."""
    return (
        f"peer {peer} is lost: DOWN for {down_for:.1f} s (nothing heard for {silent_for:.1f} s); "
        "sends to it fail until it is heard again"
    )


def incompatible_reason(peer_version: int) -> str:
    """Why a message to a peer of another protocol version is given up (protocol.md §5.7)."""
    return f"peer speaks protocol version {peer_version}, this node speaks {PROTOCOL_VERSION}"


@dataclass(frozen=True, slots=True)
class GaveUp:
    """``seq`` ended without a final answer; it is never sent again.

    Attributes:
        reason: why: its deadline passed (:data:`DEADLINE_PASSED`), the
            peer speaks another protocol version (:func:`incompatible_reason`),
            or the peer is LOST (:func:`lost_reason`).
        down_for: for a LOST peer, how long it has been DOWN, in seconds;
            None for the other reasons.
    """

    seq: LinkSeq
    stream: StreamId
    stream_seq: StreamSeq
    reason: str = DEADLINE_PASSED
    down_for: float | None = None


@dataclass(frozen=True, slots=True)
class PeerRestarted:
    """The peer shows a new incarnation: everything unanswered is being resent to it."""

    old: Incarnation
    new: Incarnation


@dataclass(frozen=True, slots=True)
class PeerStateChanged:
    """The peer's liveness changed."""

    old: PeerState
    new: PeerState


SenderEvent: TypeAlias = Answered | Held | GaveUp | PeerRestarted | PeerStateChanged


# --- receiver events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admitted:
    """The core admitted a new message (the first copy of a DATA): hand it to the
    compute layer, which must answer it.

    Finish it with ``LinkReceiver.complete`` or ``LinkReceiver.fail`` using
    ``peer``, ``peer_incarnation`` and ``seq``.
    """

    peer: NodeId
    peer_incarnation: Incarnation
    seq: LinkSeq
    stream: StreamId
    stream_seq: StreamSeq
    stream_floor: StreamSeq
    frame_no: int | None
    payload: Payload
    #: True for a DATA_ITEMS: ``payload`` is then the tuple of its items, and
    #: ``LinkReceiver.complete_items`` can answer each one.
    items: bool = False


@dataclass(frozen=True, slots=True)
class SessionStarted:
    """The first DATA of ``(peer, incarnation)`` arrived."""

    peer: NodeId
    incarnation: Incarnation


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """``(peer, incarnation)`` was replaced by a newer incarnation of that peer.

    ``unfinished`` lists the link sequence numbers that were delivered but never
    completed or failed: their answers can no longer reach anyone, and later
    ``complete``/``fail`` calls for them are ignored.
    """

    peer: NodeId
    incarnation: Incarnation
    unfinished: tuple[LinkSeq, ...]


@dataclass(frozen=True, slots=True)
class Rejected:
    """A frame from ``origin`` was refused; ``reason`` is a stable counter key."""

    origin: NodeId
    reason: str


@dataclass(frozen=True, slots=True)
class QueryAnswered:
    """``peer`` answered the REQ this receiver sent with ``request``."""

    peer: NodeId
    answer: ReqAnswer


ReceiverEvent: TypeAlias = Admitted | SessionStarted | SessionEnded | Rejected | QueryAnswered


# --- statistics ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SenderStatistics:
    """A snapshot of one :class:`LinkSender`.

    Attributes:
        sent: DATA frames sent for the first time.
        resent: retransmissions of messages the receiver did not hold.
        held_probes: periodic resends of held messages (not failures).
        in_flight: messages without a final outcome (queued ones included).
        queued: accepted by ``send`` but not transmitted yet.
        held: messages the current receiver incarnation holds.
        credit: highest link sequence number usable for new DATA.
        watermark: lowest link sequence number without a final outcome.
        acked, erred, gave_up: final outcomes so far.
        retry_later: RETRY_LATER answers taken.
        duplicate_answers: answers for unknown or finished sequence numbers.
        stale_answers: answers meant for another incarnation of this node or
            coming from an older incarnation of the peer.
        rejected: frames refused, by reason.
        heartbeats: HELLO requests sent.
        peer_restarts: new peer incarnations seen after the first.
        rtt: smoothed round-trip time in seconds (RFC 6298 SRTT), or None.
        peer_state: liveness of the peer.
        peer_incarnation: the peer's current incarnation, once known.
        peer_version: the protocol version the peer's last HELLO announced
            when it is not this node's: every send to it fails at once
            (protocol.md §5.7). None while the versions match, or before any
            HELLO was heard.
    """

    sent: int
    resent: int
    held_probes: int
    in_flight: int
    queued: int
    held: int
    credit: LinkSeq
    watermark: LinkSeq
    acked: int
    erred: int
    gave_up: int
    retry_later: int
    duplicate_answers: int
    stale_answers: int
    rejected: Mapping[str, int]
    heartbeats: int
    peer_restarts: int
    rtt: float | None
    peer_state: PeerState
    peer_incarnation: Incarnation | None
    peer_version: int | None = None


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    """A snapshot of one receiver session ``(peer, incarnation)``.

    Attributes:
        delivered: first copies handed to the compute layer.
        duplicates: copies answered again from the table.
        dropped_below_watermark: copies the sender no longer needs, dropped.
        retry_later_sent: DATA refused as beyond the credit or the table cap.
        held: delivered, not completed yet.
        cached_answers: final answers kept until the sender's watermark passes.
        watermark: the sender's latest watermark.
        floor: lowest link sequence number not finalised.
        credit: the credit this session grants now.
    """

    peer: NodeId
    incarnation: Incarnation
    delivered: int
    duplicates: int
    dropped_below_watermark: int
    retry_later_sent: int
    held: int
    cached_answers: int
    watermark: LinkSeq
    floor: LinkSeq
    credit: LinkSeq


@dataclass(frozen=True, slots=True)
class ReceiverStatistics:
    """A snapshot of one :class:`LinkReceiver`.

    Attributes:
        sessions: the live session of each peer.
        sessions_ended: sessions replaced by a newer incarnation.
        stale_refused: DATA from an older incarnation than the live one.
        rejected: frames refused, by reason (``"impersonation"``, ...).
        ignored_completions: ``complete``/``fail`` for ended or pruned messages.
        queries_sent: REQs sent with ``request``.
        queries_answered: REQ_ANSWERs routed back as events.
        held_bytes: bytes of each peer's messages held now (peers holding
            none are left out); see ``ReceiverConfig.max_held_bytes``.
        over_budget: DATA refused with RETRY_LATER(BUFFER_FULL) because its
            peer's ``held_bytes`` was at the budget.
    """

    sessions: tuple[SessionStatistics, ...]
    sessions_ended: int
    stale_refused: int
    rejected: Mapping[str, int]
    ignored_completions: int
    queries_sent: int
    queries_answered: int
    held_bytes: Mapping[NodeId, int] = field(default_factory=dict)
    over_budget: int = 0


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """The final answer a receiver holds for one message (docs/protocol.md §6.1).

    Attributes:
        seq: the message's link sequence number.
        items: 0 for a DATA; the item count of a DATA_ITEMS.
        outcome: an ACK (``ItemAck``, with its result) or an ERR (``ItemErr``)
            for the whole message; for a DATA_ITEMS answered per item, one
            outcome per item.
    """

    seq: LinkSeq
    items: int
    outcome: ItemOutcome | tuple[ItemOutcome, ...]


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """What a receiver must keep of one peer's session to survive its own restart.

    Plain data, made by ``LinkReceiver.snapshot`` and taken back by
    ``LinkReceiver.restore`` (a durable node keeps it in its journal): the
    peer's incarnation, the sender's watermark and every final answer at or
    above it. Messages still processing are not part of it: a receiver that
    restarts has not answered them, so their senders send them again.
    """

    peer: NodeId
    incarnation: Incarnation
    watermark: LinkSeq
    answers: tuple[CachedAnswer, ...]
