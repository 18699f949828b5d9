"""The receiving side of every link into this node, sans-IO.

One :class:`LinkReceiver` per node holds one session per peer node, keyed by the
peer's incarnation. A shell (the Receiver actor, owner of the ROUTER) drives it::

    receiver.receive_frame(origin, frame, now)   # origin: who the transport vouches for
    for event in receiver.take_events(): ...    # Admitted, session changes, rejections
    receiver.complete(peer, peer_incarnation, seq, result=...)   # compute layer finished
    for peer, frame in receiver.frames_to_send(now): ...   # answers, per peer

It follows the convention of the three state machines (``transport/_proto_link.py``).

Rules that live here (design.md §3, §3.1):

* The first copy of a link sequence number is delivered once; RECEIVED is
  queued at once so a slow compute step causes no retransmission, but if the
  final answer is known by flush time only the final answer goes. A duplicate
  gets the cached final answer again (or RECEIVED while still processing).
  ACKs without a result that are due at the same flush go as one ACK_RANGE
  per run of consecutive numbers.
* A DATA_ITEMS is one message here like any DATA (one entry, one answer);
  only its final answer may be an ACK_ITEMS (:meth:`LinkReceiver.complete_items`).
* Cached answers are dropped as soon as the sender's watermark passes them,
  and copies below the watermark are dropped unanswered: the table stays at
  ``max_entries`` per session at most.
* Credit ``min(floor + window - 1, 2**63 - 1)``: ``floor`` is the lowest
  sequence number not finalised here, so work the compute layer has not
  finished holds the sender back. DATA past the credit gets RETRY_LATER and
  is neither held nor delivered. The cap keeps every answer encodable when a
  peer's numbers reach the top of the u63 range (docs/protocol.md §6.4).
* Per-peer input budget in bytes: a peer's messages held here (delivered,
  not answered yet) count the size of the ZeroMQ message each came in;
  a new DATA that would take the peer past ``max_held_bytes`` gets
  RETRY_LATER(BUFFER_FULL) and is neither held nor delivered, unless the
  peer holds nothing (so any message within the codec's limits gets
  through). The bytes are given back when the compute layer answers the
  message (or gives it back), whatever became of its session meanwhile:
  a message forgotten by the table may still sit in a mailbox.
* A greater incarnation of the peer ends its session (event
  :class:`SessionEnded` with what was left unfinished) and starts a fresh one;
  DATA from an older incarnation is refused with ERR ``STALE_SESSION``. The
  two are never mixed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from ._errors import LocalProtocolError
from ._frames import (
    APP_ERR_MIN,
    PROTOCOL_VERSION,
    AckFrame,
    AckItems,
    AckRange,
    Batch,
    Data,
    DataItems,
    ErrCode,
    ErrFrame,
    Frame,
    Hello,
    ItemAck,
    ItemErr,
    ItemOutcome,
    Payload,
    Received,
    Req,
    ReqAnswer,
    RetryLater,
    RetryReason,
)
from ._ids import Incarnation, LinkSeq, NodeId, StreamId, StreamSeq
from ._proto_link import (
    Admitted,
    CachedAnswer,
    QueryAnswered,
    ReceiverConfig,
    ReceiverEvent,
    ReceiverStatistics,
    Rejected,
    SessionEnded,
    SessionSnapshot,
    SessionStarted,
    SessionStatistics,
)

_PROCESSING = 0
_ACKED = 1
_ERRED = 2
#: Answered per item (ACK_ITEMS); the entry's ``result`` holds the outcomes.
_ITEMS = 3

_VALID_ERR_CODES = frozenset(int(code) for code in ErrCode)

#: The greatest value of a u63 field (docs/protocol.md §3.2). Link sequence
#: numbers are u63 on the wire, so no sender can use a number above it and
#: granting more credit than this means nothing; a credit above it could not
#: be encoded at all.
_U63 = 2**63 - 1


def _credit(floor: int, window: int) -> LinkSeq:
    """The credit of a session whose floor is ``floor`` (docs/protocol.md §6.4).

    ``floor`` reaches ``2**63`` once a peer's ``seq = 2**63 - 1`` is
    finalised, and ``floor + window - 1`` leaves the u63 range well before
    that: capped, every answer still encodes, and the credit still never
    decreases within a session.
    """
    return LinkSeq(min(floor + window - 1, _U63))


class _Entry:
    """One delivered message: still processing, or its final answer."""

    __slots__ = ("code", "detail", "items", "result", "state")

    def __init__(self, items: int) -> None:
        self.state = _PROCESSING
        self.result: Payload = None
        self.code = 0
        self.detail = ""
        #: Items of a DATA_ITEMS; 0 for a DATA. The answer must fit it.
        self.items = items


class _Charge:
    """The bytes of one received ZeroMQ message, held while any DATA of it is."""

    __slots__ = ("refs", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        #: DATA frames of the message delivered and not answered yet.
        self.refs = 0


class _Session:
    """What the receiver knows about one incarnation of one peer."""

    __slots__ = (
        "delivered",
        "dropped",
        "duplicates",
        "entries",
        "floor",
        "incarnation",
        "peer",
        "processing",
        "retry_later",
        "watermark",
    )

    def __init__(self, peer: NodeId, incarnation: Incarnation, watermark: int) -> None:
        self.peer = peer
        self.incarnation = incarnation
        self.watermark = watermark
        self.floor = watermark
        self.entries: dict[int, _Entry] = {}
        self.processing = 0
        self.delivered = 0
        self.duplicates = 0
        self.dropped = 0
        self.retry_later = 0

    def advance_floor(self) -> None:
        entries = self.entries
        floor = self.floor
        while True:
            entry = entries.get(floor)
            if entry is None or entry.state == _PROCESSING:
                break
            floor += 1
        self.floor = floor

    def raise_watermark(self, watermark: int) -> None:
        """Forget every entry the sender no longer needs (all below ``watermark``)."""
        entries = self.entries
        if watermark - self.watermark <= len(entries):
            doomed: Iterable[int] = range(self.watermark, watermark)
        else:
            # A far jump (a long give-up gap): walk the table, not the range.
            doomed = [seq for seq in entries if seq < watermark]
        for seq in doomed:
            entry = entries.pop(seq, None)
            if entry is not None and entry.state == _PROCESSING:
                self.processing -= 1
        self.watermark = watermark
        if self.floor < watermark:
            self.floor = watermark
        self.advance_floor()


class LinkReceiver:
    """The sans-IO receiving side of all links into ``node``.

    Args:
        node: this node's id, stamped on every answer.
        incarnation: this process's incarnation of ``node``.
        config: tuning; see :class:`ReceiverConfig`.
    """

    def __init__(
        self,
        node: NodeId,
        incarnation: Incarnation,
        *,
        config: ReceiverConfig | None = None,
    ) -> None:
        self._node = node
        self._incarnation = incarnation
        self._config = cfg = config if config is not None else ReceiverConfig()
        self._window = cfg.window
        self._max_entries = cfg.max_entries
        self._max_held = cfg.max_held_bytes
        # The message the frames being received came in; its bytes are
        # charged to its peer at its first delivered DATA.
        self._charge: _Charge | None = None
        self._held: dict[NodeId, int] = {}
        self._charges: dict[tuple[NodeId, Incarnation, int], _Charge] = {}
        self._over_budget = 0
        self._now = -float("inf")
        self._sessions: dict[NodeId, _Session] = {}
        # The newest incarnation seen per peer, session or not: a late DATA of
        # a replaced incarnation must never open a session again.
        self._newest: dict[NodeId, Incarnation] = {}
        # Answers tied to a table entry, coalesced: built at flush time so that
        # a final answer known by then replaces the RECEIVED, and credit is fresh.
        self._answers: dict[tuple[NodeId, Incarnation, int], None] = {}
        # RECEIVED for new deliveries waits ``received_delay``: by then most
        # messages have their final answer and need no RECEIVED at all
        # (TCP's delayed ACK). Deliveries come in time order, so a deque is
        # already sorted by due time.
        self._delayed: deque[tuple[float, tuple[NodeId, Incarnation, int]]] = deque()
        self._received_delay = cfg.received_delay
        self._out: list[tuple[NodeId, Frame]] = []
        self._events: deque[ReceiverEvent] = deque()
        self._queries: dict[int, NodeId] = {}
        self._next_query = 1

        self._sessions_ended = 0
        self._stale_refused = 0
        self._ignored_completions = 0
        self._queries_sent = 0
        self._queries_answered = 0
        self._rejected: dict[str, int] = {}

    @property
    def node(self) -> NodeId:
        """This node's id."""
        return self._node

    @property
    def incarnation(self) -> Incarnation:
        """This process's incarnation."""
        return self._incarnation

    def session_incarnation(self, peer: NodeId) -> Incarnation | None:
        """The incarnation of ``peer`` whose session is live here, if any.

        Args:
            peer: a peer node id.

        Returns:
            The incarnation, or None if no DATA from ``peer`` arrived yet.
        """
        session = self._sessions.get(peer)
        return None if session is None else session.incarnation

    def session_watermark(self, peer: NodeId) -> LinkSeq | None:
        """The sender's watermark in ``peer``'s live session, if any.

        Every final answer below it is forgotten: the sender needs none of them.

        Args:
            peer: a peer node id.

        Returns:
            The watermark, or None if no DATA from ``peer`` arrived yet.
        """
        session = self._sessions.get(peer)
        return None if session is None else LinkSeq(session.watermark)

    # --- surviving a restart ---------------------------------------------------------

    def snapshot(self) -> tuple[SessionSnapshot, ...]:
        """Every live session as plain data: incarnation, watermark, final answers.

        What a durable node journals so that its next process answers the
        resends of messages this one finished from the same cached answers,
        instead of processing them again (:meth:`restore`). Messages still
        processing are left out: nobody was told they were processed.

        Returns:
            One :class:`SessionSnapshot` per peer with a live session.
        """
        out = []
        for session in self._sessions.values():
            answers = tuple(
                CachedAnswer(LinkSeq(seq), entry.items, _outcome_of(entry))
                for seq, entry in sorted(session.entries.items())
                if entry.state != _PROCESSING
            )
            out.append(
                SessionSnapshot(
                    session.peer, session.incarnation, LinkSeq(session.watermark), answers
                )
            )
        return tuple(out)

    def restore(self, sessions: Iterable[SessionSnapshot]) -> None:
        """Take back the sessions a previous process of this node journaled.

        Each session continues as if this process had never stopped: a resend
        of a message it answered gets the cached answer again and is not
        delivered; the session's floor and credit follow from its answers;
        DATA of an older incarnation of the peer is refused as stale. Only
        a receiver that has taken no frame yet may restore.

        Args:
            sessions: from :meth:`snapshot` (of this node's previous process).

        Raises:
            LocalProtocolError: this receiver already took frames, a peer
                appears twice, or a snapshot is inconsistent (an answer below
                its watermark or beyond ``max_entries`` above it, an outcome
                that does not fit its item count).
        """
        if self._sessions or self._newest:
            raise LocalProtocolError("restore() sessions before the receiver takes its first frame")
        restored: dict[NodeId, _Session] = {}
        for snap in sessions:
            if snap.peer in restored:
                raise LocalProtocolError(f"the snapshot names peer {snap.peer!r} twice")
            if snap.watermark < 1:
                raise LocalProtocolError(f"watermark {snap.watermark} is below 1")
            session = _Session(snap.peer, snap.incarnation, snap.watermark)
            for answer in snap.answers:
                seq = answer.seq
                if not snap.watermark <= seq < snap.watermark + self._max_entries:
                    raise LocalProtocolError(
                        f"answer for link seq {seq} lies outside [watermark, watermark + "
                        f"max_entries) = [{snap.watermark}, {snap.watermark + self._max_entries})"
                    )
                session.entries[seq] = _entry_of(answer)
            session.advance_floor()
            restored[snap.peer] = session
        self._sessions = restored
        self._newest = {peer: s.incarnation for peer, s in restored.items()}

    # --- receiving -------------------------------------------------------------------

    def receive_frame(self, origin: NodeId, frame: Frame, now: float, *, size: int = 0) -> None:
        """Take one frame from the network.

        Nothing from the network raises: refusals become :class:`Rejected`
        events and counters.

        Args:
            origin: the node the transport vouches for (ZeroMQ routing id now,
                the CURVE key's ZAP User-Id later). A frame naming another node
                is refused as ``"impersonation"``.
            frame: a decoded frame; a :class:`Batch` is unpacked.
            now: the current time.
            size: bytes of the message ``frame`` came in (all its parts),
                held against ``origin``'s ``max_held_bytes`` while a DATA
                of it is delivered and not answered.

        Raises:
            LocalProtocolError: ``now`` went backwards.
        """
        self._tick(now)
        self._charge = _Charge(size) if size > 0 else None
        if isinstance(frame, Batch):
            for inner in frame.frames:
                self._receive_one(origin, inner)
        else:
            self._receive_one(origin, frame)
        self._charge = None

    def _receive_one(self, origin: NodeId, frame: Frame) -> None:
        if isinstance(frame, Batch):
            self._reject(origin, "nested-batch")
            return
        if frame.node != origin:
            self._reject(origin, "impersonation")
            return
        if isinstance(frame, Data | DataItems):
            self._on_data(origin, frame)
        elif isinstance(frame, Hello):
            self._on_hello(origin, frame)
        elif isinstance(frame, ReqAnswer):
            if self._queries.get(frame.query_id) != origin:
                self._reject(origin, "unknown-query")
                return
            del self._queries[frame.query_id]
            self._queries_answered += 1
            self._events.append(QueryAnswered(origin, frame))
        else:
            self._reject(origin, "unexpected-frame")

    def _reject(self, origin: NodeId, reason: str) -> None:
        self._rejected[reason] = self._rejected.get(reason, 0) + 1
        self._events.append(Rejected(origin, reason))

    def _on_hello(self, peer: NodeId, hello: Hello) -> None:
        if hello.reply:
            self._reject(peer, "unexpected-frame")
            return
        if hello.version != PROTOCOL_VERSION:
            # protocol.md §5.7: answer with our own version, so the peer learns
            # at once that we cannot read it; take nothing else from the frame
            # (its incarnation may mean something else in its version).
            self._reject(peer, "bad-version")
            self._out.append((peer, Hello(self._node, self._incarnation, hello.nonce, True)))
            return
        self._note_incarnation(peer, hello.incarnation)
        session = self._sessions.get(peer)
        if session is not None and hello.incarnation > session.incarnation:
            # The peer restarted: its old session can never be finished.
            self._end(session)
            del self._sessions[peer]
        self._out.append((peer, Hello(self._node, self._incarnation, hello.nonce, True)))

    def _end(self, session: _Session) -> None:
        unfinished = tuple(
            LinkSeq(seq)
            for seq, entry in sorted(session.entries.items())
            if entry.state == _PROCESSING
        )
        self._sessions_ended += 1
        self._events.append(SessionEnded(session.peer, session.incarnation, unfinished))

    def _on_data(self, peer: NodeId, data: Data | DataItems) -> None:
        seq = data.seq
        if not (1 <= data.watermark <= seq and 1 <= data.stream_floor <= data.stream_seq):
            # Both floors are at most the number of anything the sender still
            # sends; a greater watermark would wipe answers it still needs.
            self._reject(peer, "bad-data")
            return
        newest = self._note_incarnation(peer, data.incarnation)
        session = self._sessions.get(peer)
        if data.incarnation < newest:
            # A late frame of a life the peer has left (its HELLO or DATA from
            # a newer incarnation came first): refused, never mixed in.
            self._stale_refused += 1
            self._out.append(
                (
                    peer,
                    ErrFrame(
                        self._node,
                        self._incarnation,
                        data.incarnation,
                        data.seq,
                        LinkSeq(0),
                        ErrCode.STALE_SESSION,
                        f"incarnation {data.incarnation} of {peer} was replaced by {newest}",
                    ),
                )
            )
            return
        if session is None or data.incarnation > session.incarnation:
            if session is not None:
                self._end(session)
            session = self._sessions[peer] = _Session(peer, data.incarnation, data.watermark)
            self._events.append(SessionStarted(peer, data.incarnation))
        if data.watermark > session.watermark:
            session.raise_watermark(data.watermark)
        if seq < session.watermark:
            session.dropped += 1
            return
        if seq in session.entries:
            session.duplicates += 1
            self._answers[(peer, session.incarnation, seq)] = None
            return
        if seq >= session.floor + self._window or seq >= session.watermark + self._max_entries:
            self._retry_later(session, seq, RetryReason.WINDOW_FULL)
            return
        charge = self._charge
        if charge is not None:
            if not charge.refs:
                held = self._held.get(peer, 0)
                if held and held + charge.size > self._max_held:
                    self._over_budget += 1
                    self._retry_later(session, seq, RetryReason.BUFFER_FULL)
                    return
                self._held[peer] = held + charge.size
            charge.refs += 1
            self._charges[(peer, session.incarnation, seq)] = charge
        if type(data) is Data:
            payload = data.payload
            items = False
            count = 0
        else:
            payload = data.items  # type: ignore[union-attr]
            items = True
            count = len(payload)
        session.entries[seq] = _Entry(count)
        session.processing += 1
        session.delivered += 1
        key = (peer, session.incarnation, seq)
        if self._received_delay > 0.0:
            self._delayed.append((self._now + self._received_delay, key))
        else:
            self._answers[key] = None
        self._events.append(
            Admitted(
                peer,
                session.incarnation,
                seq,
                data.stream,
                data.stream_seq,
                data.stream_floor,
                data.frame_no,
                payload,
                items,
            )
        )

    def _note_incarnation(self, peer: NodeId, incarnation: Incarnation) -> Incarnation:
        """Remember the newest incarnation seen of ``peer``; returns it."""
        newest = self._newest.get(peer)
        if newest is None or incarnation > newest:
            self._newest[peer] = newest = incarnation
        return newest

    # --- the compute layer's answers -------------------------------------------------

    def complete(
        self, peer: NodeId, peer_incarnation: Incarnation, seq: LinkSeq, result: Payload = None
    ) -> bool:
        """The compute layer processed a delivered message: answer ACK.

        Args:
            peer, peer_incarnation, seq: as in the :class:`Admitted` event.
            result: optional payload carried back in the ACK.

        Returns:
            True if the answer will be sent; False if the session has ended or
            the sender gave the message up meanwhile (nobody waits for it).

        Raises:
            LocalProtocolError: ``seq`` was never delivered in that session, or
                it already has its final answer, or it is a DATA_ITEMS and
                ``result`` is not None (a plain ACK of a batch carries no
                result; give per-item results to :meth:`complete_items`).
        """
        entry = self._entry_to_finish(peer, peer_incarnation, seq, None if result is None else 0)
        if entry is None:
            return False
        entry.state = _ACKED
        entry.result = result
        self._finished(peer, peer_incarnation, seq)
        return True

    def complete_items(
        self,
        peer: NodeId,
        peer_incarnation: Incarnation,
        seq: LinkSeq,
        outcomes: tuple[ItemOutcome, ...],
    ) -> bool:
        """The compute layer finished every item of a delivered DATA_ITEMS.

        When every outcome is an ACK without a result the answer is the plain
        ACK (or part of an ACK_RANGE), exactly as :meth:`complete` would send;
        otherwise it is one ACK_ITEMS carrying ``outcomes``.

        Args:
            peer, peer_incarnation, seq: as in the :class:`Admitted` event.
            outcomes: one :class:`ItemAck` or :class:`ItemErr` per item, in
                item order.

        Returns:
            True if the answer will be sent; False if nobody waits for it.

        Raises:
            LocalProtocolError: ``outcomes`` is empty or holds anything else,
                an ERR code is reserved, ``seq`` was never delivered, it
                already has its final answer, it is a single DATA, or
                ``outcomes`` has not one entry per item.
        """
        if type(outcomes) is not tuple or not outcomes:
            raise LocalProtocolError("outcomes must be a non-empty tuple, one per item")
        plain = True
        for outcome in outcomes:
            t = type(outcome)
            if t is ItemAck:
                if outcome.result is not None:  # type: ignore[union-attr]
                    plain = False
            elif t is ItemErr:
                code = outcome.code  # type: ignore[union-attr]
                if code not in _VALID_ERR_CODES and code < APP_ERR_MIN:
                    raise LocalProtocolError(
                        f"ERR code {code} is reserved; use an ErrCode or a code >= {APP_ERR_MIN}"
                    )
                plain = False
            else:
                raise LocalProtocolError(f"outcomes are ItemAck or ItemErr, got {t.__name__}")
        entry = self._entry_to_finish(peer, peer_incarnation, seq, len(outcomes))
        if entry is None:
            return False
        if plain:
            entry.state = _ACKED
        else:
            entry.state = _ITEMS
            entry.result = outcomes
        self._finished(peer, peer_incarnation, seq)
        return True

    def fail(
        self,
        peer: NodeId,
        peer_incarnation: Incarnation,
        seq: LinkSeq,
        code: int,
        detail: str = "",
    ) -> bool:
        """The compute layer could not process a delivered message: answer ERR.

        Args:
            peer, peer_incarnation, seq: as in the :class:`Admitted` event.
            code: an :class:`ErrCode` or an application code >= ``APP_ERR_MIN``.
            detail: a human-readable reason.

        Returns:
            True if the answer will be sent; False if nobody waits for it.

        Raises:
            LocalProtocolError: ``code`` is neither a protocol nor an application
                code, ``seq`` was never delivered, or it already has its answer.
        """
        if code not in _VALID_ERR_CODES and code < APP_ERR_MIN:
            raise LocalProtocolError(
                f"ERR code {code} is reserved; use an ErrCode or a code >= {APP_ERR_MIN}"
            )
        entry = self._entry_to_finish(peer, peer_incarnation, seq)
        if entry is None:
            return False
        entry.state = _ERRED
        entry.code = code
        entry.detail = detail
        self._finished(peer, peer_incarnation, seq)
        return True

    def _entry_to_finish(
        self, peer: NodeId, peer_incarnation: Incarnation, seq: int, items: int | None = None
    ) -> _Entry | None:
        """The entry an answer finishes, or None if nobody waits for it any more.

        ``items``: the answer's shape, checked against what was delivered:
        None fits anything, 0 only a DATA, n only a DATA_ITEMS of n items.
        """
        session = self._sessions.get(peer)
        if session is None or session.incarnation != peer_incarnation or seq < session.watermark:
            # Nobody waits for the answer, but the message was held till now.
            self._release(peer, peer_incarnation, seq)
            self._ignored_completions += 1
            return None
        entry = session.entries.get(seq)
        if entry is None:
            raise LocalProtocolError(
                f"link seq {seq} from {peer!r} (incarnation {peer_incarnation}) was never "
                "delivered; answer only what a Admitted event handed out"
            )
        if entry.state != _PROCESSING:
            raise LocalProtocolError(
                f"link seq {seq} from {peer!r} already has its final answer; answer each "
                "Admitted exactly once"
            )
        if items is not None and items != entry.items:
            raise LocalProtocolError(_misfit(seq, peer, entry.items, items))
        session.processing -= 1
        if self._charges:
            self._release(peer, peer_incarnation, seq)
        return entry

    def _release(self, peer: NodeId, peer_incarnation: Incarnation, seq: int) -> None:
        """Give back the bytes a delivered message held, once per message."""
        charge = self._charges.pop((peer, peer_incarnation, seq), None)
        if charge is None:
            return
        charge.refs -= 1
        if not charge.refs:
            left = self._held[peer] - charge.size
            if left:
                self._held[peer] = left
            else:
                del self._held[peer]

    def _finished(self, peer: NodeId, peer_incarnation: Incarnation, seq: int) -> None:
        session = self._sessions[peer]
        if seq == session.floor:
            session.advance_floor()
        self._answers[(peer, peer_incarnation, seq)] = None

    def refuse(
        self, peer: NodeId, peer_incarnation: Incarnation, seq: LinkSeq, reason: RetryReason
    ) -> bool:
        """Take back a delivered message the layer above cannot hold after all.

        The node's sequencer refuses a message beyond its stream's reorder
        buffer: the receiver forgets it, answers RETRY_LATER ("not held: send
        again") and treats the resend as new.

        Args:
            peer, peer_incarnation, seq: as in the :class:`Admitted` event.
            reason: why it is refused, for the sender's counters.

        Returns:
            True if a RETRY_LATER goes out; False if nobody waits for it.

        Raises:
            LocalProtocolError: ``seq`` was never delivered or already answered.
        """
        entry = self._entry_to_finish(peer, peer_incarnation, seq)
        if entry is None:
            return False
        session = self._sessions[peer]
        del session.entries[seq]
        session.delivered -= 1
        self._answers.pop((peer, peer_incarnation, seq), None)
        # _entry_to_finish checked that peer_incarnation is the session's.
        self._retry_later(session, seq, reason)
        return True

    def _retry_later(self, session: _Session, seq: int, reason: RetryReason) -> None:
        """Answer RETRY_LATER for ``seq`` ("not held: send it again", §6.5), with fresh credit."""
        session.retry_later += 1
        self._out.append(
            (
                session.peer,
                RetryLater(
                    self._node,
                    self._incarnation,
                    session.incarnation,
                    LinkSeq(seq),
                    _credit(session.floor, self._window),
                    reason,
                ),
            )
        )

    # --- questions to senders --------------------------------------------------------

    def request(
        self,
        peer: NodeId,
        stream: StreamId | None,
        missing: Iterable[StreamSeq],
        now: float,
    ) -> int:
        """Ask ``peer`` (as the sender of its link to us) about messages or its state.

        The answer arrives as a :class:`QueryAnswered` event. A REQ can be lost
        like any frame: the caller asks again if no answer comes in time.

        Args:
            peer: the sending node to ask.
            stream: the stream the missing numbers belong to; None with no
                ``missing`` asks about every stream.
            missing: stream sequence numbers still awaited; empty for a status
                query.
            now: the current time.

        Returns:
            The query id the answer will carry.

        Raises:
            LocalProtocolError: ``missing`` is given without a ``stream``.
        """
        self._tick(now)
        wanted = tuple(missing)
        if wanted and stream is None:
            raise LocalProtocolError("missing stream sequence numbers need the stream they are in")
        query_id = self._next_query
        self._next_query += 1
        self._queries[query_id] = peer
        if len(self._queries) > self._config.max_pending_queries:
            del self._queries[next(iter(self._queries))]
        self._queries_sent += 1
        self._out.append((peer, Req(self._node, self._incarnation, query_id, stream, wanted)))
        return query_id

    # --- output ----------------------------------------------------------------------

    def frames_to_send(self, now: float) -> list[tuple[NodeId, Frame]]:
        """Every answer and question due, each with the peer it goes to.

        Args:
            now: the current time.

        Returns:
            ``(peer, frame)`` pairs; the shell batches frames per peer.

        Raises:
            LocalProtocolError: ``now`` went backwards.
        """
        self._tick(now)
        out = self._out
        self._out = []
        delayed = self._delayed
        while delayed:
            due, key = delayed[0]
            session = self._sessions.get(key[0])
            entry = None
            if session is not None and session.incarnation == key[1]:
                entry = session.entries.get(key[2])
            processing = entry is not None and entry.state == _PROCESSING
            if processing and due > now:
                break
            delayed.popleft()
            if processing:
                # Still processing: RECEIVED is due. A finished one's final
                # answer went out when it finished, and its timer is dropped
                # before it is due: when messages are sparse, a timer left
                # behind would wake the shell for nothing after each one.
                self._answers[key] = None
        if not self._answers:
            return out
        node = self._node
        incarnation = self._incarnation
        window = self._window
        sessions = self._sessions
        # ACKs without a result, by session: sent as runs (ACK_RANGE), the
        # answer of nearly every message on a busy link.
        plain: dict[NodeId, list[int]] = {}
        others: list[tuple[NodeId, Frame]] = []
        for peer, peer_incarnation, seq in self._answers:
            session = sessions.get(peer)
            if session is None or session.incarnation != peer_incarnation:
                continue
            entry = session.entries.get(seq)
            if entry is None:
                continue
            frame: Frame
            if entry.state == _ACKED:
                if entry.result is None:
                    seqs = plain.get(peer)
                    if seqs is None:
                        plain[peer] = [seq]
                    else:
                        seqs.append(seq)
                    continue
                credit = _credit(session.floor, window)
                frame = AckFrame(
                    node, incarnation, peer_incarnation, LinkSeq(seq), credit, entry.result
                )
            elif entry.state == _ITEMS:
                credit = _credit(session.floor, window)
                frame = AckItems(
                    node, incarnation, peer_incarnation, LinkSeq(seq), credit, entry.result
                )
            elif entry.state == _ERRED:
                credit = _credit(session.floor, window)
                frame = ErrFrame(
                    node,
                    incarnation,
                    peer_incarnation,
                    LinkSeq(seq),
                    credit,
                    entry.code,
                    entry.detail,
                )
            else:
                credit = _credit(session.floor, window)
                frame = Received(node, incarnation, peer_incarnation, LinkSeq(seq), credit)
            others.append((peer, frame))
        self._answers.clear()
        for peer, seqs in plain.items():
            session = sessions[peer]
            self._ack_runs(out, peer, session.incarnation, seqs, _credit(session.floor, window))
        out.extend(others)
        return out

    def _ack_runs(
        self,
        out: list[tuple[NodeId, Frame]],
        peer: NodeId,
        peer_incarnation: Incarnation,
        seqs: list[int],
        credit: int,
    ) -> None:
        """Append one ACK_RANGE per run of consecutive numbers (a lone one: ACK)."""
        # Completions come in any order (concurrent compute): sorted, they
        # form the fewest runs. Each number appears once (``_answers`` is a set).
        seqs.sort()
        first = last = seqs[0]
        for seq in seqs[1:]:
            if seq != last + 1:
                out.append((peer, self._ack_run(peer_incarnation, first, last, credit)))
                first = seq
            last = seq
        out.append((peer, self._ack_run(peer_incarnation, first, last, credit)))

    def _ack_run(self, peer_incarnation: Incarnation, first: int, last: int, credit: int) -> Frame:
        if first == last:
            return AckFrame(
                self._node, self._incarnation, peer_incarnation, LinkSeq(first), LinkSeq(credit)
            )
        return AckRange(
            self._node,
            self._incarnation,
            peer_incarnation,
            LinkSeq(first),
            LinkSeq(last),
            LinkSeq(credit),
        )

    def take_events(self) -> list[ReceiverEvent]:
        """Hand over the events produced since the last call, oldest first.

        Returns:
            The events; the receiver forgets them.
        """
        events = list(self._events)
        self._events.clear()
        return events

    def poll(self, now: float) -> None:
        """Advance time. The only timer here is the delayed RECEIVED (``next_deadline``).

        Args:
            now: the current time.

        Raises:
            LocalProtocolError: ``now`` went backwards.
        """
        self._tick(now)

    def next_deadline(self) -> float | None:
        """When the shell must call :meth:`frames_to_send` next.

        Returns:
            The last ``now`` (meaning "at once") when answers are waiting,
            otherwise None: nothing happens here until a frame or a completion.
        """
        if self._out or self._answers:
            return self._now
        if self._delayed:
            return self._delayed[0][0]
        return None

    def _tick(self, now: float) -> None:
        if now < self._now:
            raise LocalProtocolError(
                f"time went backwards ({now!r} < {self._now!r}); pass a monotonic clock"
            )
        self._now = now

    def statistics(self) -> ReceiverStatistics:
        """A snapshot of the counters.

        Returns:
            A frozen :class:`ReceiverStatistics`.
        """
        window = self._window
        sessions = tuple(
            SessionStatistics(
                peer=s.peer,
                incarnation=s.incarnation,
                delivered=s.delivered,
                duplicates=s.duplicates,
                dropped_below_watermark=s.dropped,
                retry_later_sent=s.retry_later,
                held=s.processing,
                cached_answers=len(s.entries) - s.processing,
                watermark=LinkSeq(s.watermark),
                floor=LinkSeq(s.floor),
                credit=_credit(s.floor, window),
            )
            for s in self._sessions.values()
        )
        return ReceiverStatistics(
            sessions=sessions,
            sessions_ended=self._sessions_ended,
            stale_refused=self._stale_refused,
            rejected=dict(self._rejected),
            ignored_completions=self._ignored_completions,
            queries_sent=self._queries_sent,
            queries_answered=self._queries_answered,
            held_bytes=dict(self._held),
            over_budget=self._over_budget,
        )


def _misfit(seq: int, peer: NodeId, delivered: int, answered: int) -> str:
    """Why an answer does not fit what was delivered (see ``_entry_to_finish``)."""
    what = f"link seq {seq} from {peer!r}"
    if not delivered:
        return f"{what} is a single DATA: answer it with complete(), not per-item outcomes"
    if not answered:
        return (
            f"{what} is a DATA_ITEMS: its plain ACK carries no result; give per-item "
            "results to complete_items()"
        )
    return (
        f"{what} has {delivered} items: complete_items() needs {delivered} outcomes, not {answered}"
    )


def _outcome_of(entry: _Entry) -> ItemOutcome | tuple[ItemOutcome, ...]:
    """The final answer an entry holds, as plain data (:class:`CachedAnswer`)."""
    if entry.state == _ACKED:
        return ItemAck(entry.result)
    if entry.state == _ERRED:
        return ItemErr(entry.code, entry.detail)
    result: tuple[ItemOutcome, ...] = entry.result
    return result


def _entry_of(answer: CachedAnswer) -> _Entry:
    """The table entry of a journaled answer; LocalProtocolError if it does not fit."""
    entry = _Entry(answer.items)
    outcome = answer.outcome
    if isinstance(outcome, ItemAck):
        if answer.items and outcome.result is not None:
            raise LocalProtocolError(
                f"the answer for link seq {answer.seq} is a plain ACK of {answer.items} items: "
                "it carries no result (per-item results are a tuple of outcomes)"
            )
        entry.state = _ACKED
        entry.result = outcome.result
    elif isinstance(outcome, ItemErr):
        entry.state = _ERRED
        entry.code = outcome.code
        entry.detail = outcome.detail
    elif isinstance(outcome, tuple) and answer.items == len(outcome) and outcome:
        if not all(isinstance(o, ItemAck | ItemErr) for o in outcome):
            raise LocalProtocolError("per-item outcomes are ItemAck or ItemErr")
        entry.state = _ITEMS
        entry.result = outcome
    else:
        raise LocalProtocolError(
            f"the answer for link seq {answer.seq} does not fit its {answer.items} items"
        )
    return entry
