"""The receiving side of a node: the Receiver actor, one Sequencer actor per peer.

Both are synchronous actors (actors/_dispatch.py): a ``handle(msg, now)``
over typed messages that never awaits, run on the posting task. The
Receiver owns the :class:`LinkReceiver` core (sessions, dedup, credit) and
the answers; the node's I/O task hands it what the ROUTER receives
(:class:`Input`) and flushes its answers to the ROUTER. It routes each peer's
new messages to that peer's :class:`Sequencer`, which puts every stream back
in order and hands messages to the compute actor's mailbox; a stalled stream
therefore only holds back its own messages.

The compute actor answers through a :class:`_Completion` sink that travels
with each message and posts :class:`Completed` / :class:`Failed` to the
Receiver: returning from ``receive`` becomes ACK, ``Reject`` becomes ERR with
its code, a crash becomes ERR ``COMPUTE_FAILED`` (and the supervisor restarts
the actor), a stop becomes ERR ``SHUTTING_DOWN``. Every delivered message
gets exactly one final answer, and the answers of a burst leave together
(one ACK_RANGE) at the I/O task's next flush. On a durable node
(``open_node(journal=...)``, actors/_journal.py) the sinks hand the compute
actor's outcomes to the Receiver to *hold*; the compute actor's cell posts
:class:`Commit` between two messages, and the Receiver writes the state and
the held outcomes to the journal before it gives them to the core.

A batch (a DATA_ITEMS) is one message to the core and to the sequencer: it
takes one place in its stream and is released as a unit. Only at the hand-over
to the compute actor does it become one :class:`Delivery` per item, put in
the mailbox as one entry (``ActorRef.send_items``: the actor's task takes them
back to back, no task hop or channel operation per item); each item's outcome
goes to the batch's :class:`_ItemsCompletion` (by index), which answers the
core once the last item has its outcome (:class:`CompletedItems`). A crash on
one item is that item's ERR and restarts the actor, exactly as for a message
sent alone; the runtime carries the items behind it over to the new instance.

The compute mailbox never blocks the I/O task: it is sized so that the
protocol bounds it (each peer has at most ``ReceiverConfig.window`` messages
held, so peers x window entries, plus room for Gap notices), and a put that
finds it full anyway is answered RETRY_LATER and counted
(``compute-mailbox-full``).

No peer can hurt another peer (issue 14): an exception while handling one
peer's frame (the core's ``receive_frame``), routing its messages, or
encoding and sending its answers is caught at that peer's boundary, counted
as ``internal-error`` in :attr:`InboundStatistics.rejected`, logged on the
``cellmesh.receiver`` logger at most once per peer in ``_LOG_EVERY`` seconds,
and that frame or answer is refused (docs/protocol.md §3.6: no answer; the
sender's retransmission or deadline takes care of it). The node goes on
serving every other peer, and their answers in the same flush still go out.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

from transport import (
    ErrCode,
    Incarnation,
    Limits,
    LinkReceiver,
    LocalProtocolError,
    NodeId,
    ReceiverConfig,
    ReceiverStatistics,
    RemoteProtocolError,
    SequencerConfig,
    SequencerStatistics,
    SocketLike,
    StreamId,
    StreamSeq,
    StreamSequencer,
    Unroutable,
    decode,
    encode,
)
from transport.events import (
    Admitted,
    AskMissing,
    GapEvent,
    OfferResult,
    QueryAnswered,
    Rejected,
    Release,
    SessionEnded,
    StreamFailed,
)
from transport.frames import (
    AckFrame,
    AckItems,
    Batch,
    ErrFrame,
    Frame,
    ItemAck,
    ItemErr,
    ItemOutcome,
    ReqAnswer,
    RetryReason,
)
from transport.testing import (
    FaultInjector,
    FaultPlan,
    FaultStatistics,
)

from ._actor import ActorRef
from ._dispatch import Attached, Detached, Input, InternalError
from ._errors import ActorStopped
from ._journal import AnswerRow, JournalStore
from ._outcomes import Delivery, Gap, Reject
from ._security import SecurityState

if TYPE_CHECKING:
    from ._dispatch import Dispatcher

log = logging.getLogger("cellmesh.receiver")

#: The reason token (docs/protocol.md §3.6) of a frame refused, or an answer
#: dropped, because handling it raised: a bug in this node that one peer's
#: input reached, kept at that peer's boundary.
INTERNAL_ERROR = "internal-error"
#: At most one log line per peer and reason in this many seconds; the ones in
#: between are counted, and the next line says how many there were.
_LOG_EVERY = 10.0

#: Each peer may keep the Receiver decoding its messages for at most this
#: share of the time, on average, with bursts of up to _DECODE_BURST seconds.
#: ZeroMQ's ROUTER takes one message from each peer in turn, so a peer that
#: floods costly headers (each up to ~50 ms, Limits.max_header_bytes) would
#: otherwise make every other peer's message wait for one of them: measured,
#: a flood of 64 KiB worst-case headers let a good peer's DATA through at
#: ~15/s. Past its share a peer's messages are dropped before they are
#: decoded (counted ``decode-budget``); its sender resends them. The busiest
#: usual link, bench/links.py's batches of 256 64-byte items at ~200 000
#: items/s, decodes ~14 MB/s of header at ~20 ns a byte: under a third of
#: the time, inside the share (the bench ran as fast with it as without).
_DECODE_SHARE = 0.5
_DECODE_BURST = 0.05
#: Only headers of at least this many bytes are charged: a smaller one decodes
#: in at most ~4 ms even in the costliest shape (~1 µs a byte, protocol.md
#: §3.5), and the ROUTER's fair queueing lets another peer's message through
#: after at most one of them. Charging costs two reads of the thread's CPU
#: clock, which the usual small message does not pay.
_COSTLY_HEADER = 4096


@dataclass(frozen=True, slots=True)
class InboundStatistics:
    """The receiving side's counters."""

    protocol: ReceiverStatistics
    rejected: dict[str, int]
    unroutable: int
    socket_full: int
    #: What this node's fault injection did to its answers.
    faults: FaultStatistics


class _DecodeBudget:
    """Per-peer token buckets of decoding time.

    A bucket fills with wall time (``time.perf_counter``) times the share, and
    is charged the CPU time a decode took (``time.thread_time``): a decode
    the OS preempted on a loaded machine is not charged the time it spent
    waiting, so a busy but honest peer is not refused for the machine's load
    (measured: wall-clock charging refused such peers and caused resends).
    """

    __slots__ = ("_buckets",)

    def __init__(self) -> None:
        self._buckets: dict[NodeId, list[float]] = {}

    def allows(self, peer: NodeId) -> bool:
        """Whether ``peer`` has decoding time left now."""
        bucket = self._buckets.get(peer)
        if bucket is None:
            return True
        now = time.perf_counter()
        credit = min(_DECODE_BURST, bucket[0] + (now - bucket[1]) * _DECODE_SHARE)
        bucket[0] = credit
        bucket[1] = now
        return credit > 0.0

    def spend(self, peer: NodeId, cpu: float) -> None:
        """Charge ``peer`` ``cpu`` seconds of decoding."""
        bucket = self._buckets.get(peer)
        if bucket is None:
            self._buckets[peer] = [_DECODE_BURST - cpu, time.perf_counter()]
        else:
            bucket[0] -= cpu


class QueryWaiter:
    """Where the answer to a status query goes (``Node.query``); settled by the Receiver."""

    __slots__ = ("answer", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.answer: ReqAnswer | None = None


@dataclass(frozen=True, slots=True)
class Completed:
    """The compute actor processed ``item``: answer ACK with ``result``."""

    item: Admitted
    result: Any


@dataclass(frozen=True, slots=True)
class CompletedItems:
    """Every item of the batch ``item`` has its outcome: answer the batch."""

    item: Admitted
    outcomes: tuple[ItemOutcome, ...]


@dataclass(frozen=True, slots=True)
class Failed:
    """``item`` gets the final ERR ``code`` (refused, failed, or no handler)."""

    item: Admitted
    code: int
    detail: str


@dataclass(frozen=True, slots=True)
class Commit:
    """A durable node's compute actor is between messages: commit ``state`` and what it answered.

    Posted from the compute actor's task (actors/_journal.py); the answers
    held since the last commit go to the core only once the journal has them.
    """

    state: bytes


@dataclass(frozen=True, slots=True)
class Refuse:
    """``item`` was not processed and will not be: answer RETRY_LATER (buffer full)."""

    item: Admitted


@dataclass(frozen=True, slots=True)
class Ask:
    """A stream of ``peer``'s misses messages: ask the sender about them (REQ)."""

    peer: NodeId
    stream: StreamId
    missing: tuple[StreamSeq, ...]


@dataclass(frozen=True, slots=True)
class Query:
    """``Node.query``: ask ``peer`` for its view of its link to us; answer into ``waiter``."""

    peer: NodeId
    waiter: QueryWaiter


@dataclass(frozen=True, slots=True)
class ForgetQuery:
    """``Node.query`` stopped waiting: drop ``waiter``'s outstanding queries."""

    waiter: QueryWaiter


#: Every message the Receiver takes.
ReceiverMessage = (
    Input
    | Attached
    | Detached
    | Completed
    | CompletedItems
    | Failed
    | Refuse
    | Commit
    | Ask
    | Query
    | ForgetQuery
    | InternalError
)

#: Every message a Sequencer takes (the Receiver core's events for one peer).
SequencerMessage = Admitted | SessionEnded | QueryAnswered


class _Completion:
    """The reply sink of one delivered message: posts its outcome to the Receiver."""

    __slots__ = ("_item", "_receiver")

    def __init__(self, receiver: Receiver, item: Admitted) -> None:
        self._receiver = receiver
        self._item = item

    def set_result(self, value: Any) -> None:
        self._receiver.handle(Completed(self._item, value), trio.current_time())

    def fail(self, error: BaseException) -> None:
        code, detail = _err_of(error)
        self._receiver.handle(Failed(self._item, code, detail), trio.current_time())


class _HeldCompletion(_Completion):
    """A durable node's reply sink: the outcome waits in the Receiver for the next commit."""

    __slots__ = ()

    def set_result(self, value: Any) -> None:
        self._receiver.hold(Completed(self._item, value))

    def fail(self, error: BaseException) -> None:
        code, detail = _err_of(error)
        self._receiver.hold(Failed(self._item, code, detail))


#: The outcome of an item processed without a result: one shared value.
_ITEM_ACK = ItemAck(None)


class _ItemsCompletion:
    """The reply sink of a batch's items: answers the batch when the last one is settled."""

    __slots__ = ("_item", "_left", "_outcomes", "_receiver")

    def __init__(self, receiver: Receiver, item: Admitted) -> None:
        self._receiver = receiver
        self._item = item
        n = len(item.payload)
        self._outcomes: list[ItemOutcome | None] = [None] * n
        self._left = n

    def set_item_result(self, index: int, value: Any) -> None:
        outcomes = self._outcomes
        if value is None and outcomes[index] is None and self._left > 1:
            # The usual item: no result, not the last one. Inline, as this
            # runs once per item.
            outcomes[index] = _ITEM_ACK
            self._left -= 1
            return
        self._settle(index, _ITEM_ACK if value is None else ItemAck(value))

    def fail_item(self, index: int, error: BaseException) -> None:
        code, detail = _err_of(error)
        self._settle(index, ItemErr(code, detail))

    def _settle(self, index: int, outcome: ItemOutcome) -> None:
        outcomes = self._outcomes
        if outcomes[index] is not None:
            # The runtime settles each item once; a second answer is dropped.
            return
        outcomes[index] = outcome
        self._left -= 1
        if not self._left:
            done: tuple[ItemOutcome, ...] = tuple(outcomes)  # type: ignore[arg-type]
            self._done(CompletedItems(self._item, done))

    def _done(self, msg: CompletedItems) -> None:
        self._receiver.handle(msg, trio.current_time())


class _HeldItemsCompletion(_ItemsCompletion):
    """A durable node's batch reply sink: the batch's answer waits for the next commit."""

    __slots__ = ()

    def _done(self, msg: CompletedItems) -> None:
        self._receiver.hold(msg)


def _expand(
    receiver: Receiver, item: Admitted, sink: type[_ItemsCompletion]
) -> tuple[list[Delivery], _ItemsCompletion]:
    """One Delivery per item of a batch, in item order, and the batch's reply sink."""
    peer = item.peer
    stream = item.stream
    stream_seq = item.stream_seq
    frame_no = item.frame_no
    seq = item.seq
    deliveries = [
        Delivery(peer, stream, stream_seq, frame_no, payload, seq, index)
        for index, payload in enumerate(item.payload)
    ]
    return deliveries, sink(receiver, item)


class Receiver:
    """The actor of the receiving side: decodes, runs the receiving core, routes, answers.

    Synchronous (actors/_dispatch.py): :meth:`handle` never awaits. The node's
    I/O task posts it what the ROUTER receives and calls :meth:`flush` with
    the ROUTER it owns; the reply sinks post the compute actor's outcomes.
    Everything here is private to the actor; others read :meth:`statistics`.
    """

    def __init__(
        self,
        node: NodeId,
        incarnation: Incarnation,
        peers: frozenset[NodeId],
        dispatcher: Dispatcher,
        *,
        config: ReceiverConfig,
        faults: FaultPlan,
        limits: Limits,
        security: SecurityState | None = None,
        journal: JournalStore | None = None,
    ) -> None:
        self._node = node
        self._dispatcher = dispatcher
        self._limits = limits
        self._core = LinkReceiver(node, incarnation, config=config)
        self._peers = peers
        # A durable node (actors/_journal.py): the sessions its previous
        # process committed continue here, and the compute actor's outcomes
        # are held until the commit that covers them.
        self._journal = journal
        self._held: list[Completed | CompletedItems | Failed] = []
        if journal is not None:
            self._core.restore(journal.recovered.sessions)
        self._faults: FaultInjector[list[Any]] = FaultInjector(faults, salt=f"{node}<-")
        self._inject = self._faults.active
        # Plaintext: routing ids are the peers' node ids (design.md §5);
        # anything else is refused before it reaches the protocol core.
        self._routes: dict[bytes, NodeId] = {peer.encode(): peer for peer in peers}
        self._security = security if security is not None else SecurityState(node, None, peers)
        # Secure: the sender is the node its key proved (ZAP User-Id), and
        # routing ids mean nothing (the ROUTER picks them; a peer cannot claim
        # another's). Answers go to the connection each peer's key last spoke
        # on, so a restarted peer's new connection takes over by speaking.
        self._peer_ids: dict[str, NodeId] = {peer: peer for peer in peers}
        self._reply_routes: dict[NodeId, bytes] = {}
        self._sequencers: dict[NodeId, Sequencer] = {}
        self._queries: dict[int, QueryWaiter] = {}
        self._budget = _DecodeBudget()
        self._rejected: Counter[str] = Counter()
        self._unroutable = 0
        self._socket_full = 0
        # Rate-limited logging of internal errors, per (peer, reason): when the
        # next line may be written, and how many were not logged since the last.
        self._log_after: dict[tuple[NodeId | None, str], float] = {}
        self._unlogged: Counter[tuple[NodeId | None, str]] = Counter()

    # -- read-only views ----------------------------------------------------

    @property
    def peer(self) -> NodeId | None:
        """Errors outside one frame's handling are counted at no single peer's boundary."""
        return None

    @property
    def wants_write(self) -> bool:
        """A ROUTER refuses per peer; nothing is kept for it to become writable."""
        return False

    def next_deadline(self) -> float:
        """When :meth:`poll` must run next: the core's timers, and held fault copies."""
        deadline = self._core.next_deadline()
        at = math.inf if deadline is None else deadline
        if self._inject:
            held = self._faults.next_deadline()
            if held is not None and held < at:
                return held
        return at

    def statistics(self) -> InboundStatistics:
        """A snapshot of the receiving side."""
        return InboundStatistics(
            protocol=self._core.statistics(),
            rejected=dict(self._rejected),
            unroutable=self._unroutable,
            socket_full=self._socket_full,
            faults=self._faults.statistics(),
        )

    @property
    def durable(self) -> bool:
        """Whether the compute actor's answers wait for a journal commit."""
        return self._journal is not None

    def hold(self, msg: Completed | CompletedItems | Failed) -> None:
        """Keep a compute outcome for the next :class:`Commit` (durable nodes only)."""
        self._held.append(msg)

    def adopt(self, sequencers: dict[NodeId, Sequencer]) -> None:
        """Set the per-peer sequencers this Receiver routes to (once, at setup)."""
        self._sequencers = sequencers

    # -- the actor ------------------------------------------------------------

    def handle(self, msg: ReceiverMessage, now: float) -> None:
        """Handle one message, synchronously."""
        kind = type(msg)
        core = self._core
        if kind is Input:
            assert isinstance(msg, Input)
            self._on_input(msg, now)
            self._route(now)
        elif kind is Completed:
            assert isinstance(msg, Completed)
            item = msg.item
            core.complete(item.peer, item.peer_incarnation, item.seq, msg.result)
        elif kind is CompletedItems:
            assert isinstance(msg, CompletedItems)
            item = msg.item
            core.complete_items(item.peer, item.peer_incarnation, item.seq, msg.outcomes)
        elif kind is Failed:
            assert isinstance(msg, Failed)
            item = msg.item
            core.fail(item.peer, item.peer_incarnation, item.seq, msg.code, msg.detail)
        elif kind is Refuse:
            assert isinstance(msg, Refuse)
            self._refuse(msg.item)
        elif kind is Commit:
            assert isinstance(msg, Commit)
            self._commit(msg.state)
        elif kind is Ask:
            assert isinstance(msg, Ask)
            core.request(msg.peer, msg.stream, msg.missing, now)
        elif kind is Query:
            assert isinstance(msg, Query)
            self._queries[core.request(msg.peer, None, (), now)] = msg.waiter
        elif kind is ForgetQuery:
            assert isinstance(msg, ForgetQuery)
            waiter = msg.waiter
            for query_id in [q for q, w in self._queries.items() if w is waiter]:
                del self._queries[query_id]
            return
        elif kind is InternalError:
            assert isinstance(msg, InternalError)
            self._internal_error(msg.peer, msg.what, msg.error, now)
            return
        elif kind is Attached:
            # A new ROUTER: the old connections' routing ids are gone with it.
            self._reply_routes.clear()
        elif kind is Detached:
            return
        self._dispatcher.wake(self)

    def poll(self, now: float) -> None:
        """Run the core's timers and route what they raised."""
        self._core.poll(now)
        self._route(now)
        self._dispatcher.wake(self)

    def flush(self, sock: SocketLike, now: float) -> bool:
        """Send every answer the core has ready, each peer's in as few messages as fit.

        Returns:
            Whether it may have called the socket (its fd's edge may be eaten).
        """
        inject = self._inject
        outgoing = self._core.frames_to_send(now)
        if outgoing:
            by_peer: dict[NodeId, list[Frame]] = {}
            for peer, frame in outgoing:
                by_peer.setdefault(peer, []).append(frame)
            secure = self._security.secure
            for peer, frames in by_peer.items():
                found = self._reply_routes.get(peer) if secure else peer.encode()
                if found is None:
                    # Nothing from this peer's key yet: no connection to answer on.
                    self._unroutable += 1
                    continue
                rid = found
                # Each peer's answers behind their own boundary: one that fails
                # here is dropped and counted, and the next peer's still go.
                try:
                    for parts in _encode_answers(frames, self._limits, peer, self._report, now):
                        message = [rid, *parts]
                        if inject:
                            for copy in self._faults.submit(message, now):
                                self._send(sock, copy)
                        else:
                            self._send(sock, message)
                except Exception as exc:
                    self._internal_error(peer, "sending answers to", exc, now)
        if inject:
            for message in self._faults.due(now):
                self._send(sock, message)
            return True
        return bool(outgoing)

    # -- behaviour --------------------------------------------------------------

    def _commit(self, state: bytes) -> None:
        """Write the state and the held outcomes to the journal, then answer them.

        Only outcomes the core will answer are written: one for an ended
        session or below the sender's watermark is nobody's any more. If the
        write fails nothing is answered, the outcomes stay held, and the
        error crashes the compute actor, whose next instance replays from
        the last commit and commits again.
        """
        journal = self._journal
        assert journal is not None
        held = self._held
        self._held = []
        core = self._core
        rows: list[AnswerRow] = []
        positions: dict[tuple[NodeId, StreamId], int] = {}
        try:
            for outcome in held:
                item = outcome.item
                peer = item.peer
                if core.session_incarnation(peer) != item.peer_incarnation:
                    continue
                watermark = core.session_watermark(peer)
                if watermark is None or item.seq < watermark:
                    continue
                rows.append(self._answer_row(outcome))
                key = (peer, item.stream)
                nxt = item.stream_seq + 1
                if nxt > positions.get(key, 0):
                    positions[key] = nxt
            sessions = {}
            for peer in self._peers:
                inc = core.session_incarnation(peer)
                watermark = core.session_watermark(peer)
                if inc is not None and watermark is not None:
                    sessions[peer] = (inc, watermark)
            journal.write(state, sessions, rows, positions)
        except BaseException:
            self._held = held + self._held
            raise
        for outcome in held:
            item = outcome.item
            if type(outcome) is Completed:
                core.complete(item.peer, item.peer_incarnation, item.seq, outcome.result)
            elif type(outcome) is CompletedItems:
                core.complete_items(item.peer, item.peer_incarnation, item.seq, outcome.outcomes)
            else:
                assert isinstance(outcome, Failed)
                core.fail(item.peer, item.peer_incarnation, item.seq, outcome.code, outcome.detail)

    def _answer_row(self, outcome: Completed | CompletedItems | Failed) -> AnswerRow:
        """The journal's copy of an answer: what the wire will carry, results encoded.

        A result the codec refuses is journaled as the ERR it goes out as
        (``_fallback``), so a resend after a restart gets the same answer.
        """
        item = outcome.item
        items = len(item.payload) if item.items else 0
        if type(outcome) is Failed:
            return AnswerRow(item.peer, item.seq, items, ItemErr(outcome.code, outcome.detail))
        frame: Frame
        if type(outcome) is Completed:
            if outcome.result is None:
                return AnswerRow(item.peer, item.seq, items, _ITEM_ACK)
            # Only the result matters here; the other fields are the
            # answer's own, credit aside (it is made fresh at each send).
            frame = AckFrame(
                self._node,
                self._core.incarnation,
                item.peer_incarnation,
                item.seq,
                item.seq,
                outcome.result,
            )
        else:
            assert isinstance(outcome, CompletedItems)
            if all(o == _ITEM_ACK for o in outcome.outcomes):
                return AnswerRow(item.peer, item.seq, items, _ITEM_ACK)
            frame = AckItems(
                self._node,
                self._core.incarnation,
                item.peer_incarnation,
                item.seq,
                item.seq,
                outcome.outcomes,
            )
        try:
            parts = encode(frame, limits=self._limits)
        except Exception as exc:
            fallback = _fallback(frame, exc, self._limits)
            assert fallback is not None
            parts = fallback
            answer = decode(parts, self._limits)
            if isinstance(answer, ErrFrame):
                return AnswerRow(item.peer, item.seq, items, ItemErr(answer.code, answer.detail))
        return AnswerRow(item.peer, item.seq, items, [bytes(p) for p in parts])

    def _on_input(self, msg: Input, now: float) -> None:
        """Identify, budget, decode and take one message the ROUTER received."""
        parts = msg.parts
        secure = self._security.secure
        if secure:
            user = msg.user
            peer = self._peer_ids.get(user) if user is not None else None
        else:
            peer = self._routes.get(parts[0])
        if peer is None:
            if secure:
                # ZAP_ENFORCE_DOMAIN admits no connection without a peer's
                # User-Id; counted in case libzmq ever does.
                self._security.refuse("unauthenticated", "a connection", "no peer's User-Id")
            else:
                self._rejected["unknown-peer"] += 1
            return
        costly = len(parts) > 1 and len(parts[1]) >= _COSTLY_HEADER
        if costly and not self._budget.allows(peer):
            self._rejected["decode-budget"] += 1
            return
        size = sum(map(len, parts)) - len(parts[0])
        started = time.thread_time() if costly else 0.0
        try:
            frame = decode(parts[1:], self._limits)
        except RemoteProtocolError as exc:
            self._rejected[exc.reason] += 1
            return
        finally:
            if costly:
                self._budget.spend(peer, time.thread_time() - started)
        if secure:
            claimed = _claimed_node(frame, peer)
            if claimed is not None:
                self._security.refuse(
                    "impersonation",
                    f"node {peer!r} as {claimed!r}",
                    f"its key belongs to {peer!r} but its frames claim to be {claimed!r}",
                )
                return
            self._reply_routes[peer] = parts[0]
        # The core unpacks a Batch itself (and refuses nested ones).
        try:
            self._core.receive_frame(peer, frame, now, size=size)
        except Exception as exc:
            self._internal_error(peer, "handling a frame from", exc, now)

    def _route(self, now: float) -> None:
        """Post the core's events to the sequencers (and settle query answers)."""
        events = self._core.take_events()
        for event in events:
            try:
                if type(event) is Admitted or type(event) is SessionEnded:
                    sequencer = self._sequencers.get(event.peer)
                    if sequencer is not None:
                        sequencer.handle(event, now)
                    elif type(event) is Admitted:
                        self._refuse(event)
                elif type(event) is QueryAnswered:
                    waiter = self._queries.pop(event.answer.query_id, None)
                    if waiter is not None:
                        waiter.answer = event.answer
                        waiter.event.set()
                    else:
                        sequencer = self._sequencers.get(event.peer)
                        if sequencer is not None:
                            sequencer.handle(event, now)
            except Exception as exc:
                peer = event.origin if isinstance(event, Rejected) else event.peer
                self._internal_error(peer, "routing a message from", exc, now)
                if type(event) is Admitted:
                    self._refuse(event)

    def _refuse(self, item: Admitted) -> None:
        """Answer RETRY_LATER for a delivered message that will not be processed.

        The core forgets it, so the sender's resend is taken as new (§6.5). A
        message already answered (the failure came after the hand-over) is left
        to the answer it has.
        """
        try:
            self._core.refuse(item.peer, item.peer_incarnation, item.seq, RetryReason.BUFFER_FULL)
        except LocalProtocolError:
            return

    def _send(self, sock: SocketLike, message: list[Any]) -> None:
        try:
            sock.send_multipart_nowait(message)
        except Unroutable:
            # The peer's DEALER is not connected (now): it resends, and the
            # cached answer goes out then.
            self._unroutable += 1
        except trio.WouldBlock:
            self._socket_full += 1

    def _report(self, peer: NodeId, what: str, error: Exception, now: float) -> None:
        self._internal_error(peer, what, error, now)

    def _internal_error(self, peer: NodeId | None, what: str, error: Exception, now: float) -> None:
        """Count and log (rate-limited) an exception caught at ``peer``'s boundary."""
        self._rejected[INTERNAL_ERROR] += 1
        key = (peer, INTERNAL_ERROR)
        if now < self._log_after.get(key, -math.inf):
            self._unlogged[key] += 1
            return
        self._log_after[key] = now + _LOG_EVERY
        unlogged = self._unlogged.pop(key, 0)
        log.error(
            "node %s: %s peer %r raised %s: %s; that frame or answer is refused and "
            "counted as %r, the node goes on (%d more for this peer not logged in the "
            "last %g s; node.statistics().inbound.rejected counts each)",
            self._node,
            what,
            peer,
            type(error).__name__,
            error,
            INTERNAL_ERROR,
            unlogged,
            _LOG_EVERY,
            exc_info=error,
        )

    def count(self, reason: str) -> None:
        """Count one message refused for ``reason`` (a Sequencer's, e.g. a full compute mailbox)."""
        self._rejected[reason] += 1


class OwnStream(Protocol):
    """An actor of the node that takes one reserved stream instead of the compute actor.

    The collectives (actors/_collectives.py) are one: their messages travel,
    are retried and put in order as any other, then go to them, not to the
    user's compute. Synchronous, like the Sequencer that calls it.
    """

    def handle(self, msg: Admitted | Gap, now: float) -> None:
        """Take a released message (answer it through the Receiver) or a Gap."""


class Sequencer:
    """The actor that puts one peer's streams in order and hands them to the compute actor.

    Synchronous (actors/_dispatch.py). It takes the Receiver core's events
    for its peer (:data:`SequencerMessage`) and posts what they need
    answered to the Receiver (:class:`Failed`, :class:`Refuse`,
    :class:`Ask`). A stream whose gap policy fails it is handled here: the
    messages held behind the loss are answered ERR ``GAP_FAILED``, the
    compute actor gets a Gap (``stream-failed``), and the stream starts over
    at the sender's floor with its next message. The node's own streams
    (``own``, e.g. the collectives') go to their :class:`OwnStream` actor
    instead of the compute actor.
    """

    def __init__(
        self,
        receiver: Receiver,
        peer: NodeId,
        compute: ActorRef[Any, Any] | None,
        streams: dict[StreamId, SequencerConfig],
        default: SequencerConfig,
        own: Mapping[StreamId, OwnStream] | None = None,
        resume: tuple[Incarnation, Mapping[StreamId, StreamSeq]] | None = None,
    ) -> None:
        self._receiver = receiver
        self._peer = peer
        self._compute = compute
        # A durable node's compute outcomes wait for the journal's commit.
        durable = receiver.durable
        self._completion = _HeldCompletion if durable else _Completion
        self._items_completion = _HeldItemsCompletion if durable else _ItemsCompletion
        # Where each stream of the peer's session stood at the journal's last
        # commit: a durable node's streams go on from there, not from the
        # sender's floor (which lags when answers were lost with the process).
        self._resume = resume
        self._own: Mapping[StreamId, OwnStream] = own or {}
        self._configs = streams
        self._default = default
        self._incarnation: Incarnation | None = None
        self._streams: dict[StreamId, StreamSequencer[Admitted]] = {}

    @property
    def peer(self) -> NodeId:
        """The peer whose streams this puts in order."""
        return self._peer

    def next_deadline(self) -> float:
        """The earliest timer (gap timeout, REQ retry) of any stream."""
        at = math.inf
        for stream in self._streams.values():
            deadline = stream.next_deadline()
            if deadline is not None and deadline < at:
                at = deadline
        return at

    def statistics(self) -> dict[StreamId, SequencerStatistics]:
        """Per-stream sequencer counters for this peer."""
        return {name: s.statistics() for name, s in self._streams.items()}

    def handle(self, msg: SequencerMessage, now: float) -> None:
        """Handle one event of this peer's, synchronously."""
        if type(msg) is Admitted:
            stream = self._offer(msg, now)
            if stream is not None:
                self._release(msg.stream, stream, now)
        elif type(msg) is SessionEnded:
            # What the old session left buffered is reported now, not only
            # when the restarted peer's first DATA arrives.
            if msg.incarnation == self._incarnation:
                self._end_session(now)
        elif type(msg) is QueryAnswered:
            answer = msg.answer
            name = answer.stream
            stream = self._streams.get(name) if name is not None else None
            if name is not None and stream is not None:
                stream.on_missing_answer(answer.missing, now)
                self._release(name, stream, now)

    def poll(self, now: float) -> None:
        """Run every stream's timers and hand on what they released."""
        for name, stream in list(self._streams.items()):
            stream.poll(now)
            self._release(name, stream, now)

    def _offer(self, item: Admitted, now: float) -> StreamSequencer[Admitted] | None:
        """Offer ``item`` to its stream; the stream if it took it, None if answered."""
        if item.peer_incarnation != self._incarnation:
            self._end_session(now)
            self._incarnation = item.peer_incarnation
        stream = self._streams.get(item.stream)
        if stream is None:
            config = self._configs.get(item.stream, self._default)
            first = item.stream_floor
            resume = self._resume
            if resume is not None and resume[0] == item.peer_incarnation:
                first = max(first, resume[1].get(item.stream, first))
            stream = StreamSequencer(config=config, first=first)
            self._streams[item.stream] = stream
        result = stream.offer(item.stream_seq, item.stream_floor, item, now)
        if result is OfferResult.ACCEPTED:
            return stream
        receiver = self._receiver
        if result is OfferResult.REFUSED_BUFFER_FULL:
            receiver.handle(Refuse(item), now)
        elif result is OfferResult.STREAM_FAILED:
            receiver.handle(Failed(item, ErrCode.GAP_FAILED, "stream failed"), now)
        else:
            # Late after a skip, stale, or a repeated stream number: the
            # sender already has (or gets now) a definite "not processed".
            receiver.handle(Failed(item, ErrCode.SKIPPED, result.name), now)
        # An offer may still raise events (a gap learnt from the floor).
        self._release(item.stream, stream, now)
        return None

    def _end_session(self, now: float) -> None:
        """The peer's session ended: what its streams held is reported as a Gap."""
        self._incarnation = None
        for name, stream in self._streams.items():
            lost = stream.end()
            for item in lost:
                # The core has ended that session already: nothing is sent,
                # but the bytes these messages held are given back.
                self._receiver.handle(Refuse(item), now)
            if lost:
                self._notify(
                    Gap(self._peer, name, lost[0].stream_seq, lost[-1].stream_seq, "session-ended")
                )
        self._streams = {}

    def _release(self, name: StreamId, stream: StreamSequencer[Admitted], now: float) -> None:
        """Hand on every event ``stream`` has: releases to the compute actor, gaps, asks."""
        receiver = self._receiver
        for event in stream.take_events():
            if type(event) is Release:
                self._hand_over(event.item, now)
            elif type(event) is GapEvent:
                self._notify(Gap(self._peer, name, event.first, event.last, event.reason.value))
            elif type(event) is AskMissing:
                receiver.handle(Ask(self._peer, name, tuple(event.missing)), now)
            elif type(event) is StreamFailed:
                self._stream_failed(name, event, now)

    def _stream_failed(self, name: StreamId, event: StreamFailed[Admitted], now: float) -> None:
        """A policy fail: answer what is held, report the Gap, start the stream over."""
        receiver = self._receiver
        detail = f"stream failed at {event.first_missing}"
        for item in event.undelivered:
            receiver.handle(Failed(item, ErrCode.GAP_FAILED, detail), now)
        self._notify(
            Gap(self._peer, name, event.first_missing, event.first_missing, "stream-failed")
        )
        stream = self._streams.pop(name, None)
        if stream is not None:
            for item in stream.end():
                receiver.handle(Refuse(item), now)
        log.warning(
            "stream %r of peer %r failed at %d (%s); held messages answered "
            "GAP_FAILED, the stream starts over at the sender's floor",
            name,
            self._peer,
            event.first_missing,
            event.reason.value,
        )

    def _hand_over(self, item: Admitted, now: float) -> None:
        """Put a released message (or a batch's items, as one entry) in the compute mailbox."""
        own = self._own.get(item.stream)
        if own is not None:
            own.handle(item, now)
            return
        receiver = self._receiver
        compute = self._compute
        if compute is None:
            receiver.handle(
                Failed(item, ErrCode.NO_HANDLER, "this node runs no compute actor"), now
            )
            return
        try:
            if item.items:
                deliveries, batch = _expand(receiver, item, self._items_completion)
                compute.send_items_nowait(deliveries, reply=batch)
            else:
                compute.send_nowait(_delivery(item), reply=self._completion(receiver, item))
        except trio.WouldBlock:
            # Sized so that the protocol bounds it (module docstring): only a
            # misconfigured node gets here. The sender resends.
            receiver.count("compute-mailbox-full")
            receiver.handle(Refuse(item), now)
        except ActorStopped as stopped:
            code, detail = _err_of(stopped)
            receiver.handle(Failed(item, code, detail), now)

    def _notify(self, gap: Gap) -> None:
        """Tell the compute actor about a gap; a full mailbox drops the notice, counted."""
        own = self._own.get(gap.stream)
        if own is not None:
            own.handle(gap, trio.current_time())
            return
        compute = self._compute
        if compute is None:
            return
        try:
            compute.send_nowait(gap)
        except (trio.WouldBlock, ActorStopped):
            self._receiver.count("gap-notice-dropped")


def _err_of(error: BaseException) -> tuple[int, str]:
    """The ERR code and detail a compute actor's failure is answered with."""
    if isinstance(error, Reject):
        return error.code, error.detail
    if isinstance(error, ActorStopped):
        return ErrCode.SHUTTING_DOWN, "the compute actor stopped"
    cause = error.__cause__ or error
    return ErrCode.COMPUTE_FAILED, f"{type(cause).__name__}: {cause}"[:200]


def _delivery(item: Admitted) -> Delivery:
    """What the compute actor gets for a message the core delivered."""
    return Delivery(
        peer=item.peer,
        stream=item.stream,
        stream_seq=item.stream_seq,
        frame_no=item.frame_no,
        payload=item.payload,
        seq=item.seq,
    )


def _claimed_node(frame: Frame, peer: NodeId) -> str | None:
    """The other node a frame (or any frame of a batch) claims to come from, if any."""
    if isinstance(frame, Batch):
        for inner in frame.frames:
            # A nested batch is the core's to refuse.
            if not isinstance(inner, Batch) and inner.node != peer:
                return inner.node
        return None
    return frame.node if frame.node != peer else None


def _encode_answers(
    frames: list[Frame],
    limits: Limits,
    peer: NodeId,
    report: Callable[[NodeId, str, Exception, float], None],
    now: float,
) -> list[list[Any]]:
    """Encode answers for one peer, one batch where possible.

    A compute actor may return a result the codec refuses (an arbitrary
    object): that message is answered ERR instead, and the rest still go.
    An answer that cannot be encoded even then (a bug here: every field of
    an answer is in range, §6.4) is dropped and counted as ``internal-error``;
    the sender's resend gets it again, and nothing is raised.
    """
    try:
        one: Frame = frames[0] if len(frames) == 1 else Batch(tuple(frames))
        return [encode(one, limits=limits)]
    except Exception:
        # One by one below: only the answer that does not encode is lost.
        pass
    out: list[list[Any]] = []
    for frame in frames:
        try:
            out.append(encode(frame, limits=limits))
            continue
        except Exception as exc:
            problem = exc
        try:
            fallback = _fallback(frame, problem, limits)
        except Exception as exc:
            report(peer, "encoding an answer to", exc, now)
            continue
        if fallback is None:
            report(peer, "encoding an answer to", problem, now)
        else:
            out.append(fallback)
    return out


def _fallback(frame: Frame, problem: Exception, limits: Limits) -> list[Any] | None:
    """The encoded stand-in of an answer whose results the codec refused.

    An ACK becomes ERR ``COMPUTE_FAILED``; an ACK_ITEMS keeps its items and
    turns each refused result into that item's ERR. Any other answer carries
    no result and has no stand-in: None.
    """
    if type(frame) is AckItems:
        try:
            return encode(_encodable_items(frame, limits), limits=limits)
        except LocalProtocolError as too_large:
            # Results that encode one by one but not together (over
            # the size limits): the batch is answered ERR as a whole.
            problem = too_large
    elif type(frame) is not AckFrame:
        return None
    err = ErrFrame(
        frame.node,
        frame.incarnation,
        frame.peer_incarnation,
        frame.seq,
        frame.credit,
        ErrCode.COMPUTE_FAILED,
        f"result not encodable: {problem}"[:200],
    )
    return encode(err, limits=limits)


def _encodable_items(frame: AckItems, limits: Limits) -> AckItems:
    """``frame`` with each item result the codec refuses turned into that item's ERR."""
    outcomes: list[ItemOutcome] = []
    for outcome in frame.outcomes:
        if isinstance(outcome, ItemAck) and outcome.result is not None:
            probe = AckFrame(
                frame.node,
                frame.incarnation,
                frame.peer_incarnation,
                frame.seq,
                frame.credit,
                outcome.result,
            )
            try:
                encode(probe, limits=limits)
            except LocalProtocolError as exc:
                outcomes.append(
                    ItemErr(ErrCode.COMPUTE_FAILED, f"result not encodable: {exc}"[:200])
                )
                continue
        outcomes.append(outcome)
    return AckItems(
        frame.node,
        frame.incarnation,
        frame.peer_incarnation,
        frame.seq,
        frame.credit,
        tuple(outcomes),
    )
