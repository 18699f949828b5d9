"""Sans-IO ordered delivery for one (peer session, stream): the stream sequencer.

The link layer (``LinkReceiver``) removes duplicate DATA by link sequence
number and hands each new message to the node once. The node offers it to the
:class:`StreamSequencer` of its (peer session, stream), which hands messages
to the compute layer in the sender's order, each exactly once. Like every
``_proto_*`` module it does no I/O and reads no clock: time comes in as
``now`` (seconds, any monotonic origin), events go out as values pulled with
:meth:`StreamSequencer.take_events`, and :meth:`StreamSequencer.next_deadline`
says when :meth:`StreamSequencer.poll` wants to be called again. It follows
the convention of the three state machines (``transport/_proto_link.py``).

Terms
-----
* ``next`` -- the lowest stream sequence number not yet *settled*. Every
  number below it was either released (handed on in order) or covered by a
  :class:`GapEvent` event; it starts at 1.
* *held* -- messages above ``next`` that arrived early, kept in a dict keyed
  by stream sequence number (the reorder buffer).
* *floor* -- the highest ``stream_floor`` seen on any DATA of the stream. The
  sender holds a final outcome (answered, or given up at its deadline) for
  every number below it, so a number below the floor that was never received
  can never arrive: it is settled as lost without asking.
* *head gap* -- when something is held, ``next`` itself is missing: the
  stream is stalled on it. It is *known since* the earliest arrival time among
  the held messages (all of them lie above it; arrival order is tracked in a
  deque, so this costs O(1) amortised).

Offers (:meth:`StreamSequencer.offer`), checked in this order
--------------------------------------------------------------
1. The sequencer failed earlier: ``STREAM_FAILED`` (answer ``ErrFrame(GAP_FAILED)``).
2. ``stream_floor`` raises the floor; numbers it passes are settled.
3. The number is below the floor, or the sender already said in a REQ answer
   that it gave it up, never sent it, or holds an answer for it: ``STALE``.
   The sender no longer waits on it; it is counted and not delivered, which
   keeps the receiver consistent with the outcome the sender already reported.
4. Below ``next``: ``LATE_SKIPPED`` if a :class:`GapEvent` covered it (answer
   ``ErrFrame(SKIPPED)``: it was not processed), else ``DUPLICATE``.
5. Equal to ``next``: released with every held message that follows it
   contiguously: ``ACCEPTED``.
6. Already held: ``DUPLICATE``.
7. More than ``buffer_limit`` above ``next``: ``REFUSED_BUFFER_FULL`` (answer
   ``RetryLater(BUFFER_FULL)``; the sender resends later). The window is
   ``(next, next + buffer_limit]``, so at most ``buffer_limit`` messages are
   ever held and the message that unblocks the stream (``next``) is never
   refused: a flood of far-future frames cannot fill the buffer and starve it.
   Credit granted by the link keeps well-behaved senders inside the window.
8. Otherwise held: ``ACCEPTED``.

Gaps, REQs and policies (ordered streams)
-----------------------------------------
* When the head gap has been known for ``gap_timeout`` the sequencer emits
  :class:`AskMissing` naming the missing numbers between ``next`` and the
  highest held one (lowest first, at most ``req_max_seqs``), and asks again
  while that head gap stays open after ``2 * gap_timeout``, then
  ``4 * gap_timeout``, ... each wait multiplied by ``req_backoff`` and capped
  at ``req_ceiling`` (with the defaults: 0.5, 1.5, 3.5, 7.5, 11.5 s after the
  gap became known). When the head gap moves (``next`` advances but messages
  are still held) the schedule starts afresh for the new head, but two REQs
  of a stream are never closer than ``gap_timeout``, so filling one gap does
  not trigger a burst of REQs for gaps the last REQ already named.
* Answers (:meth:`StreamSequencer.on_missing_answer`): ``RESENT`` and
  ``IN_FLIGHT`` leave the schedule alone. The message is on its way and the
  sender's own retry timer covers its loss, so asking sooner would only add
  traffic; if it still does not come, the next REQ follows on the backoff
  schedule. ``GIVEN_UP``, ``NEVER_SENT`` and ``ANSWERED`` settle the number as
  lost (``ANSWERED`` means the sender holds a final answer this receiver does
  not know of: an earlier incarnation of this node gave it and the message
  was lost with it). A lost number is reported when ``next`` reaches it, so
  events stay in stream order.
* ``WAIT`` (default): a lost number (REQ answer or floor) becomes a
  :class:`GapEvent` and delivery moves on; a number that may still arrive is
  waited for indefinitely (REQs keep going at the ceiling).
  :meth:`StreamSequencer.end` reports what is still held when the session
  ends.
* ``SKIP``: as ``WAIT``, and in addition a head gap known for ``skip_after``
  is given up by the receiver: a :class:`GapEvent` with reason ``SKIPPED``, then
  the held messages after it. If a skipped message arrives later it gets
  ``LATE_SKIPPED``.
* ``FAIL``: delivery continues in order up to the first lost number, then
  :class:`StreamFailed` carries every held message (so each one gets an
  answer) and every later offer gets ``STREAM_FAILED``. A number that may
  still arrive is waited for as under ``WAIT``.

Every number from 1 up to ``next`` appears in exactly one :class:`Release` or
exactly one :class:`GapEvent`, in increasing order, or the stream ends with
:class:`StreamFailed`, or :meth:`StreamSequencer.end` returns what is held.
Nothing is dropped silently.

Unordered streams (``ordered=False``) release every new message immediately.
Duplicates are still rejected with ``DUPLICATE``, using ``next`` (everything
below was seen or passed by the floor) and a set of the numbers seen above it,
limited to the same ``buffer_limit`` window. They have no gaps, REQs or
timers.

Memory: the reorder buffer holds at most ``buffer_limit`` messages, the
arrival deque at most ``2 * buffer_limit`` entries, the lost map lies inside
the window, and the record of numbers covered by gaps (needed for
``LATE_SKIPPED``) is a list of ranges pruned by the floor and capped at
``buffer_limit`` ranges. Past the cap the two oldest ranges merge, so a
released number between them would read as ``LATE_SKIPPED`` instead of
``DUPLICATE``. The link layer's dedup catches those first, and the error
leans towards "not processed" rather than "processed".

Cost: an in-order arrival with nothing held is O(1) and allocates only its
:class:`Release` event.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Generic, TypeAlias, TypeVar

from ._errors import LocalProtocolError, RemoteProtocolError
from ._frames import MissingItem, MissingStatus
from ._ids import StreamSeq

T = TypeVar("T")

__all__ = [
    "AskMissing",
    "GapEvent",
    "GapPolicy",
    "GapReason",
    "OfferResult",
    "Release",
    "SequencerConfig",
    "SequencerEvent",
    "SequencerStatistics",
    "StreamFailed",
    "StreamSequencer",
]


class GapPolicy(StrEnum):
    """What the compute layer sees when a message of an ordered stream is missing."""

    #: Wait for it (asking the sender, with backoff); a Gap only once it is known lost.
    WAIT = "wait"
    #: As WAIT, and skip it (a Gap, then the later messages) after ``skip_after``.
    SKIP = "skip"
    #: Deliver up to the first lost message, then fail the stream.
    FAIL = "fail"


class GapReason(StrEnum):
    """Why a run of stream sequence numbers will never be delivered."""

    #: The sender answered a REQ: its deadline passed, it will not send it again.
    GIVEN_UP = "given-up"
    #: The sender answered a REQ: it never sent that number (it restarted, or a bug).
    NEVER_SENT = "never-sent"
    #: The sender holds a final answer this receiver never gave: an earlier
    #: incarnation of this node answered it and the message was lost with it.
    ANSWERED = "answered"
    #: The sender's ``stream_floor`` passed it: it holds a final outcome for it.
    PASSED_FLOOR = "passed-floor"
    #: The SKIP policy gave up waiting after ``skip_after``.
    SKIPPED = "skipped"


class OfferResult(Enum):
    """What became of one offered message, and so how the caller answers it."""

    #: Released now or held for release in order.
    ACCEPTED = "accepted"
    #: Already released or held; the link layer normally filters these first.
    DUPLICATE = "duplicate"
    #: Beyond ``next + buffer_limit``: not held, answer ``RetryLater(BUFFER_FULL)``.
    REFUSED_BUFFER_FULL = "refused-buffer-full"
    #: A GapEvent already covered it; not processed, answer ``ErrFrame(SKIPPED)``.
    LATE_SKIPPED = "late-skipped"
    #: The stream failed (FAIL policy); answer ``ErrFrame(GAP_FAILED)``.
    STREAM_FAILED = "stream-failed"
    #: The sender already holds a final outcome for it; not delivered, no answer needed.
    STALE = "stale"


@dataclass(frozen=True, slots=True)
class SequencerConfig:
    """How one stream is sequenced.

    Attributes:
        ordered: deliver in stream order; ``False`` means dedup only.
        policy: the gap policy of an ordered stream.
        buffer_limit: how far beyond the next expected number messages are
            held (and, for unordered streams, the dedup window).
        gap_timeout: how long a gap stays open before the first REQ.
        skip_after: how long a gap stays open before SKIP gives it up;
            ``None`` means ``2 * gap_timeout``.
        req_backoff: factor applied to the wait between successive REQs.
        req_ceiling: the longest wait between successive REQs.
        req_max_seqs: most missing numbers named in one REQ.

    Raises:
        LocalProtocolError: a limit is not positive, or the ceiling is below the timeout.
    """

    ordered: bool = True
    policy: GapPolicy = GapPolicy.WAIT
    buffer_limit: int = 256
    gap_timeout: float = 0.5
    skip_after: float | None = None
    req_backoff: float = 2.0
    req_ceiling: float = 4.0
    req_max_seqs: int = 64

    def __post_init__(self) -> None:
        if self.buffer_limit < 1:
            raise LocalProtocolError(
                f"SequencerConfig.buffer_limit must be an integer >= 1 (messages held "
                f"past a gap), got {self.buffer_limit!r}"
            )
        if not self.gap_timeout > 0:
            raise LocalProtocolError(
                f"SequencerConfig.gap_timeout must be > 0 seconds, got {self.gap_timeout!r}"
            )
        if self.skip_after is not None and not self.skip_after > 0:
            raise LocalProtocolError(
                f"SequencerConfig.skip_after must be > 0 seconds, or None for "
                f"2 * gap_timeout, got {self.skip_after!r}"
            )
        if not self.req_backoff >= 1:
            raise LocalProtocolError(
                f"SequencerConfig.req_backoff must be a factor >= 1, got {self.req_backoff!r}"
            )
        if not self.req_ceiling >= self.gap_timeout:
            raise LocalProtocolError(
                f"SequencerConfig.req_ceiling ({self.req_ceiling!r}) must be >= gap_timeout "
                f"({self.gap_timeout!r}): raise req_ceiling or lower gap_timeout"
            )
        if self.req_max_seqs < 1:
            raise LocalProtocolError(
                f"SequencerConfig.req_max_seqs must be an integer >= 1, got {self.req_max_seqs!r}"
            )

    @property
    def effective_skip_after(self) -> float:
        """``skip_after``, or its default of twice ``gap_timeout``."""
        return 2 * self.gap_timeout if self.skip_after is None else self.skip_after


@dataclass(frozen=True, slots=True)
class Release(Generic[T]):
    """Hand ``item`` to the compute layer: the next message in stream order."""

    stream_seq: StreamSeq
    item: T


@dataclass(frozen=True, slots=True)
class GapEvent:
    """Stream numbers ``first..last`` (inclusive) will never be delivered."""

    first: StreamSeq
    last: StreamSeq
    reason: GapReason


@dataclass(frozen=True, slots=True)
class StreamFailed(Generic[T]):
    """FAIL policy: ``first_missing`` is lost; nothing more will be delivered.

    ``undelivered`` holds every message that was held after it, in stream
    order, so the caller answers each one (``ErrFrame(GAP_FAILED)``).
    """

    first_missing: StreamSeq
    reason: GapReason
    undelivered: tuple[T, ...]


@dataclass(frozen=True, slots=True)
class AskMissing:
    """Send the stream's sender a REQ naming these missing numbers."""

    missing: tuple[StreamSeq, ...]


#: Everything :meth:`StreamSequencer.take_events` can return.
SequencerEvent: TypeAlias = Release[T] | GapEvent | StreamFailed[T] | AskMissing


@dataclass(frozen=True, slots=True)
class SequencerStatistics:
    """Counters of one stream sequencer (cumulative unless noted).

    Attributes:
        delivered: messages released.
        buffered: messages held right now.
        max_buffered: most messages held at once.
        reordered: messages that arrived early and were held.
        gaps_seen: head gaps the stream stalled on.
        gap_events: GapEvent events emitted.
        gap_seqs: stream numbers covered by GapEvent events.
        skips: GapEvent events with reason SKIPPED.
        reqs_sent: AskMissing events emitted.
        answers_received: REQ answers passed to ``on_missing_answer``.
        refused_buffer_full: offers refused because beyond the window.
        late_skipped: offers of numbers a GapEvent had covered.
        duplicates: offers of numbers already released or held.
        stale: offers the sender no longer waits on.
        refused_failed: offers refused after the stream failed.
        failed: the stream failed under the FAIL policy.
    """

    delivered: int
    buffered: int
    max_buffered: int
    reordered: int
    gaps_seen: int
    gap_events: int
    gap_seqs: int
    skips: int
    reqs_sent: int
    answers_received: int
    refused_buffer_full: int
    late_skipped: int
    duplicates: int
    stale: int
    refused_failed: int
    failed: bool


_LOST_REASON = {
    MissingStatus.GIVEN_UP: GapReason.GIVEN_UP,
    MissingStatus.NEVER_SENT: GapReason.NEVER_SENT,
    MissingStatus.ANSWERED: GapReason.ANSWERED,
}

_INF = math.inf
_FIRST = StreamSeq(1)


class StreamSequencer(Generic[T]):
    """Ordered (or deduplicated) delivery of one stream from one peer session.

    ``T`` is whatever the node keeps with each message (typically the DATA
    and its link sequence number); the sequencer hands it back in
    :class:`Release`, :class:`StreamFailed` and :meth:`end`. See the module
    docstring for the full rules.

    Args:
        config: how the stream is sequenced.
        first: the first stream number to expect; everything below is treated
            as already settled (offers of it are ``STALE``). 1 for a new
            session; a node that restarted and meets a stream mid-flight may
            start at the first DATA's ``stream_floor`` instead of reporting
            (or, under FAIL, failing on) numbers its previous life answered.

    Raises:
        LocalProtocolError: ``first`` is below 1.
    """

    __slots__ = (
        "_answers",
        "_arrivals",
        "_ask_at",
        "_ask_interval",
        "_buffer",
        "_config",
        "_delivered",
        "_duplicates",
        "_ended",
        "_events",
        "_failed",
        "_floor",
        "_gap_events",
        "_gap_seqs",
        "_gaps_seen",
        "_gone_first",
        "_gone_last",
        "_last_ask",
        "_late_skipped",
        "_lost",
        "_max_buffered",
        "_next",
        "_now",
        "_ordered",
        "_refused_failed",
        "_refused_full",
        "_reordered",
        "_reqs",
        "_seen",
        "_skip_at",
        "_skips",
        "_stale",
    )

    def __init__(self, *, config: SequencerConfig | None = None, first: StreamSeq = _FIRST) -> None:
        if first < 1:
            raise LocalProtocolError(
                f"first must be a stream sequence number >= 1 (1 for a new session), got {first!r}"
            )
        self._config = config if config is not None else SequencerConfig()
        self._ordered = self._config.ordered
        # Plain ints inside: arithmetic on them is the hot path.
        self._next: int = first
        self._floor: int = first
        # The latest poll's time: a clock that goes backwards is caller misuse.
        self._now = -_INF
        self._buffer: dict[int, T] = {}
        # (arrival time, stream seq) of held messages, in arrival order; entries
        # below ``next`` are stale and dropped lazily from the left.
        self._arrivals: deque[tuple[float, int]] = deque()
        # Missing numbers above ``next`` the sender reported lost, with why.
        self._lost: dict[int, GapReason] = {}
        # Unordered streams: numbers seen above ``next``.
        self._seen: set[int] = set()
        # Disjoint ascending ranges of numbers covered by GapEvent events.
        self._gone_first: list[int] = []
        self._gone_last: list[int] = []
        self._events: list[SequencerEvent[T]] = []
        self._failed = False
        self._ended = False
        self._ask_at = _INF
        self._skip_at = _INF
        self._ask_interval = self._config.gap_timeout
        self._last_ask = -_INF
        self._delivered = 0
        self._max_buffered = 0
        self._reordered = 0
        self._gaps_seen = 0
        self._gap_events = 0
        self._gap_seqs = 0
        self._skips = 0
        self._reqs = 0
        self._answers = 0
        self._refused_full = 0
        self._late_skipped = 0
        self._duplicates = 0
        self._stale = 0
        self._refused_failed = 0

    @property
    def config(self) -> SequencerConfig:
        """The configuration this sequencer was created with."""
        return self._config

    @property
    def next_expected(self) -> StreamSeq:
        """The lowest stream number not yet released or covered by a GapEvent."""
        return StreamSeq(self._next)

    # -- input ---------------------------------------------------------------

    def offer(
        self, stream_seq: StreamSeq, stream_floor: StreamSeq, item: T, now: float
    ) -> OfferResult:
        """Offer one new message of the stream.

        Args:
            stream_seq: its ``Data.stream_seq``.
            stream_floor: its ``Data.stream_floor``.
            item: what to hand back when it is released (or returned undelivered).
            now: the current time.

        Returns:
            What became of it; the module docstring says how to answer each result.

        Raises:
            RemoteProtocolError: ``stream_seq`` or ``stream_floor`` is below 1, or
                the floor is above ``stream_seq`` (the sender waits on the message
                it is sending); nothing changed.
            LocalProtocolError: the sequencer was ended with :meth:`end`.
        """
        # The common case first: the next message of an ordered stream that
        # holds nothing, knows nothing lost and has not failed or ended.
        # O(1), and the Release is the only allocation.
        if (
            stream_seq == self._next
            and self._ordered
            and not self._buffer
            and not self._lost
            and not self._failed
            and not self._ended
            and 1 <= stream_floor <= stream_seq
        ):
            if stream_floor > self._floor:
                self._learn_floor(stream_floor)
            self._next = stream_seq + 1
            self._delivered += 1
            self._events.append(Release(stream_seq, item))
            return OfferResult.ACCEPTED
        if self._ended:
            raise LocalProtocolError("offer() after end(): create a new StreamSequencer")
        if stream_seq < 1:
            raise RemoteProtocolError(
                f"stream_seq {stream_seq} is below 1", reason="bad-stream-seq"
            )
        if not 1 <= stream_floor <= stream_seq:
            raise RemoteProtocolError(
                f"stream_floor {stream_floor} is outside 1..stream_seq ({stream_seq})",
                reason="bad-stream-floor",
            )
        if self._failed:
            self._refused_failed += 1
            return OfferResult.STREAM_FAILED
        if self._ordered:
            return self._offer_ordered(stream_seq, stream_floor, item, now)
        return self._offer_unordered(stream_seq, stream_floor, item)

    def on_missing_answer(self, items: Sequence[MissingItem], now: float) -> None:
        """Take the sender's answer to an :class:`AskMissing` REQ.

        Answers about numbers that are no longer missing (they arrived, or a
        GapEvent covered them) are ignored, so late or repeated answers are safe.

        Args:
            items: ``ReqAnswer.missing`` of the answer.
            now: the current time.
        """
        if self._ended:
            return
        self._answers += 1
        if not self._ordered or self._failed or not self._buffer:
            return
        old_next = self._next
        top = max(self._buffer)
        lost = self._lost
        for answer in items:
            reason = _LOST_REASON.get(answer.status)
            if reason is None:
                continue
            seq = answer.stream_seq
            # Only numbers inside the current gaps can be lost: anything else
            # is an answer about a number that has since arrived or settled.
            if self._next <= seq < top and seq not in self._buffer:
                lost[seq] = reason
        if self._next in lost:
            self._advance()
            if self._next != old_next:
                self._rearm()

    def poll(self, now: float) -> None:
        """Fire the timers that are due at ``now``: skips, then REQs.

        Args:
            now: the current time.

        Raises:
            LocalProtocolError: ``now`` is before an earlier poll's.
        """
        if now < self._now:
            raise LocalProtocolError(
                f"time went backwards ({now!r} < {self._now!r}); pass a monotonic clock"
            )
        self._now = now
        if not self._buffer or self._failed or self._ended:
            return
        if self._config.policy is GapPolicy.SKIP:
            # A skip can uncover a head gap that has itself been known for
            # skip_after already, hence the loop.
            while self._buffer and now >= self._skip_at:
                self._skip_head()
        if self._buffer and not self._failed and now >= self._ask_at:
            self._ask(now)

    def end(self) -> list[T]:
        """End the stream: the sender started a new session or the node shuts down.

        Events already queued stay available from :meth:`take_events`; every
        later :meth:`offer` raises.

        Returns:
            The held, never released messages in stream order, so the caller
            reports them as undelivered and answers them. Calling it again
            returns an empty list.
        """
        held = [self._buffer[seq] for seq in sorted(self._buffer)]
        self._clear_held()
        self._ended = True
        return held

    # -- output --------------------------------------------------------------

    def take_events(self) -> list[SequencerEvent[T]]:
        """Hand over the events produced since the last call, oldest first.

        Returns:
            The events; the sequencer forgets them.
        """
        events = self._events
        self._events = []
        return events

    def next_deadline(self) -> float | None:
        """When :meth:`poll` has work to do next.

        Returns:
            An absolute time on the ``now`` clock, or ``None`` if no timer is armed.
        """
        if not self._buffer or self._failed or self._ended:
            return None
        return min(self._ask_at, self._skip_at)

    def statistics(self) -> SequencerStatistics:
        """A snapshot of the counters.

        Returns:
            A frozen :class:`SequencerStatistics`.
        """
        return SequencerStatistics(
            delivered=self._delivered,
            buffered=len(self._buffer),
            max_buffered=self._max_buffered,
            reordered=self._reordered,
            gaps_seen=self._gaps_seen,
            gap_events=self._gap_events,
            gap_seqs=self._gap_seqs,
            skips=self._skips,
            reqs_sent=self._reqs,
            answers_received=self._answers,
            refused_buffer_full=self._refused_full,
            late_skipped=self._late_skipped,
            duplicates=self._duplicates,
            stale=self._stale,
            refused_failed=self._refused_failed,
            failed=self._failed,
        )

    # -- ordered streams -----------------------------------------------------

    def _offer_ordered(self, seq: int, floor: int, item: T, now: float) -> OfferResult:
        """Steps 2-8 of the module docstring for an ordered stream."""
        old_next = self._next
        was_empty = not self._buffer
        result = self._classify_and_place(seq, floor, item, now)
        if self._next != old_next or (was_empty and self._buffer):
            self._rearm()
        return result

    def _classify_and_place(self, seq: int, floor: int, item: T, now: float) -> OfferResult:
        """Learn the floor, then accept, hold or reject one offered message."""
        if floor > self._floor:
            self._learn_floor(floor)
            if floor > self._next:
                self._advance()
                if self._failed:
                    self._refused_failed += 1
                    return OfferResult.STREAM_FAILED
        if seq < self._floor or seq in self._lost:
            self._stale += 1
            return OfferResult.STALE
        if seq < self._next:
            if self._was_gapped(seq):
                self._late_skipped += 1
                return OfferResult.LATE_SKIPPED
            self._duplicates += 1
            return OfferResult.DUPLICATE
        if seq == self._next:
            self._next = seq + 1
            self._delivered += 1
            self._events.append(Release(StreamSeq(seq), item))
            self._advance()
            return OfferResult.ACCEPTED
        if seq in self._buffer:
            self._duplicates += 1
            return OfferResult.DUPLICATE
        if seq - self._next > self._config.buffer_limit:
            self._refused_full += 1
            return OfferResult.REFUSED_BUFFER_FULL
        self._buffer[seq] = item
        self._arrivals.append((now, seq))
        self._reordered += 1
        if len(self._buffer) > self._max_buffered:
            self._max_buffered = len(self._buffer)
        return OfferResult.ACCEPTED

    def _advance(self) -> None:
        """Move ``next`` past everything at the head that is held or settled as lost."""
        buffer = self._buffer
        lost = self._lost
        nxt = self._next
        while True:
            if nxt in buffer:
                self._events.append(Release(StreamSeq(nxt), buffer.pop(nxt)))
                self._delivered += 1
                nxt += 1
                continue
            reason = lost.pop(nxt, None)
            if reason is not None:
                last = nxt
                # Merge a run with one reason into one event; lost numbers are
                # never held, so the run cannot swallow a message.
                while lost.get(last + 1) is reason:
                    del lost[last + 1]
                    last += 1
            elif nxt < self._floor:
                reason = GapReason.PASSED_FLOOR
                # The run stops before the next held or lost number. A scan,
                # but only when the floor jumps past a gap: rare and bounded.
                bound = self._floor
                if buffer:
                    bound = min(bound, min(buffer))
                if lost:
                    bound = min(bound, min(lost))
                last = bound - 1
            else:
                break
            if self._config.policy is GapPolicy.FAIL:
                self._next = nxt
                self._fail(nxt, reason)
                return
            self._gap(nxt, last, reason)
            nxt = last + 1
        self._next = nxt

    def _skip_head(self) -> None:
        """SKIP policy: give up the head gap, then release what follows it."""
        bound = min(self._buffer)
        if self._lost:
            bound = min(bound, min(self._lost))
        self._gap(self._next, bound - 1, GapReason.SKIPPED)
        self._next = bound
        self._advance()
        self._rearm()

    def _ask(self, now: float) -> None:
        """Emit an AskMissing for the current gaps and schedule the next one."""
        buffer = self._buffer
        lost = self._lost
        top = max(buffer)
        cap = self._config.req_max_seqs
        missing: list[StreamSeq] = []
        seq = self._next
        while seq < top and len(missing) < cap:
            if seq not in buffer and seq not in lost:
                missing.append(StreamSeq(seq))
            seq += 1
        self._events.append(AskMissing(tuple(missing)))
        self._reqs += 1
        self._last_ask = now
        self._ask_interval = min(
            self._ask_interval * self._config.req_backoff, self._config.req_ceiling
        )
        self._ask_at = now + self._ask_interval

    def _rearm(self) -> None:
        """The head gap changed (or closed): restart its REQ and skip timers."""
        if not self._buffer:
            self._ask_at = _INF
            self._skip_at = _INF
            self._arrivals.clear()
            return
        arrivals = self._arrivals
        while arrivals[0][1] < self._next:
            arrivals.popleft()
        since = arrivals[0][0]
        timeout = self._config.gap_timeout
        self._gaps_seen += 1
        self._ask_interval = timeout
        self._ask_at = max(since + timeout, self._last_ask + timeout)
        if self._config.policy is GapPolicy.SKIP:
            self._skip_at = since + self._config.effective_skip_after
        else:
            self._skip_at = _INF

    def _gap(self, first: int, last: int, reason: GapReason) -> None:
        """Emit a GapEvent and remember its range for LATE_SKIPPED."""
        self._events.append(GapEvent(StreamSeq(first), StreamSeq(last), reason))
        self._gap_events += 1
        self._gap_seqs += last - first + 1
        if reason is GapReason.SKIPPED:
            self._skips += 1
        firsts = self._gone_first
        lasts = self._gone_last
        if lasts and lasts[-1] + 1 == first:
            lasts[-1] = last
            return
        firsts.append(first)
        lasts.append(last)
        if len(firsts) > self._config.buffer_limit:
            # Over the cap: merge the two oldest ranges (see the module docstring).
            lasts[0] = lasts[1]
            del firsts[1]
            del lasts[1]

    def _was_gapped(self, seq: int) -> bool:
        """Whether a GapEvent covered ``seq`` (as far as the pruned record reaches)."""
        i = bisect_right(self._gone_first, seq) - 1
        return i >= 0 and seq <= self._gone_last[i]

    def _fail(self, first_missing: int, reason: GapReason) -> None:
        """FAIL policy: report the loss and hand back everything held."""
        undelivered = tuple(self._buffer[seq] for seq in sorted(self._buffer))
        self._clear_held()
        self._failed = True
        self._events.append(StreamFailed(StreamSeq(first_missing), reason, undelivered))

    def _clear_held(self) -> None:
        """Forget held messages and timers (after fail or end)."""
        self._buffer.clear()
        self._arrivals.clear()
        self._lost.clear()
        self._seen.clear()
        self._ask_at = _INF
        self._skip_at = _INF

    def _learn_floor(self, floor: int) -> None:
        """Record a higher floor and prune the gap record below it."""
        self._floor = floor
        lasts = self._gone_last
        if lasts and lasts[0] < floor:
            # Below the floor the sender waits on nothing, so what a GapEvent
            # covered there no longer matters (those offers are STALE).
            keep = bisect_right(lasts, floor - 1)
            del self._gone_first[:keep]
            del lasts[:keep]

    # -- unordered streams ---------------------------------------------------

    def _offer_unordered(self, seq: int, floor: int, item: T) -> OfferResult:
        """Dedup within the window, then release at once."""
        seen = self._seen
        if floor > self._floor:
            self._floor = floor
            if floor > self._next:
                self._next = floor
                self._seen = seen = {s for s in seen if s >= floor}
                self._slide_unordered()
        if seq < self._floor:
            self._stale += 1
            return OfferResult.STALE
        if seq < self._next or seq in seen:
            self._duplicates += 1
            return OfferResult.DUPLICATE
        if seq - self._next > self._config.buffer_limit:
            self._refused_full += 1
            return OfferResult.REFUSED_BUFFER_FULL
        if seq == self._next:
            self._next = seq + 1
            self._slide_unordered()
        else:
            seen.add(seq)
        self._delivered += 1
        self._events.append(Release(StreamSeq(seq), item))
        return OfferResult.ACCEPTED

    def _slide_unordered(self) -> None:
        """Move ``next`` over numbers already seen, dropping them from the set."""
        seen = self._seen
        nxt = self._next
        while nxt in seen:
            seen.discard(nxt)
            nxt += 1
        self._next = nxt
