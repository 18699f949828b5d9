"""The sending side of one link (this node -> one peer), sans-IO.

A shell (the PeerLink actor) drives it::

    sender.receive_frame(frame, now)      # every frame that came from the peer
    for frame in sender.frames_to_send(now): ...   # DATA, HELLO, REQ_ANSWER to send
    for event in sender.take_events(): ...        # outcomes, liveness, restarts
    sleep until sender.next_deadline()

It follows the convention of the three state machines (``transport/_proto_link.py``).

Rules that live here (design.md §3, §3.1):

* Link sequence numbers count from 1 per sender incarnation, stream sequence
  numbers from 1 per stream. Every message ends in exactly one outcome:
  :class:`Answered` (ACK or ERR) or :class:`GaveUp` at its deadline.
* New DATA only within the credit the receiver granted and within
  ``max_in_flight`` of the watermark; resends are always allowed. When nothing
  sent is outstanding, one new DATA may go past the credit as a window probe
  (TCP's persist timer, RFC 9293 §3.8.6.1): it carries the watermark that lets
  the receiver open the window, so a stale credit can never deadlock the link.
* Unanswered DATA is resent with exponential backoff, jitter and a ceiling.
  A held message (RECEIVED) is re-probed at the ceiling so a lost final answer
  is recovered, and that is not counted as a failure.
* A greater peer incarnation means the receiver restarted: RECEIVED from the
  old one proves nothing, so everything without a final answer goes again at
  once and the credit starts over.
* A peer whose HELLO announces another protocol version cannot take our
  DATA: every unfinished message and every later one is given up at once,
  naming both versions, and heartbeats go on so that a peer upgraded to our
  version is taken up again (protocol.md §5.7).
* A peer heard once and then DOWN for ``lost_grace`` is LOST: every
  unfinished message and every later one is given up at once, saying how long
  it has been down; heartbeats go on, and the first frame heard from it makes
  it UP and sends work again (protocol.md §5.6).

Cost per message is O(1) amortised: dicts keyed by sequence number, a deque for
the not-yet-sent queue, and lazy-deletion heaps for retry timers and deadlines.
"""

from __future__ import annotations

import heapq
import math
from collections import deque

from ._errors import LocalProtocolError
from ._frames import (
    PROTOCOL_VERSION,
    AckFrame,
    AckItems,
    AckRange,
    Batch,
    Data,
    DataItems,
    ErrFrame,
    Frame,
    Hello,
    MissingItem,
    MissingStatus,
    Payload,
    Received,
    Req,
    ReqAnswer,
    RetryLater,
    RetryReason,
    StreamStatus,
)
from ._ids import Incarnation, LinkSeq, NodeId, StreamId, StreamSeq
from ._proto_link import (
    DEADLINE_PASSED,
    Answered,
    GaveUp,
    Held,
    PeerRestarted,
    PeerState,
    PeerStateChanged,
    Rng,
    SenderConfig,
    SenderEvent,
    SenderStatistics,
    incompatible_reason,
    jittered,
    lost_reason,
)

#: RFC 6298 §2.3: SRTT <- (1 - alpha) * SRTT + alpha * R', alpha = 1/8.
_RTT_ALPHA = 0.125
_RTT_BETA = 0.25


class _Msg:
    """One message without a final outcome."""

    __slots__ = (
        "deadline",
        "done",
        "due",
        "frame_no",
        "gen",
        "held",
        "items",
        "payload",
        "retransmitted",
        "rto",
        "sampled",
        "sent_at",
        "seq",
        "stream",
        "stream_seq",
    )

    def __init__(
        self,
        seq: int,
        stream: _Stream,
        stream_seq: int,
        frame_no: int | None,
        payload: Payload,
        deadline: float,
        rto: float,
        items: bool,
    ) -> None:
        self.seq = seq
        self.stream = stream
        self.stream_seq = stream_seq
        self.frame_no = frame_no
        self.payload = payload
        # True: ``payload`` is the tuple of a DATA_ITEMS' items.
        self.items = items
        self.deadline = deadline
        self.rto = rto
        # None until the first transmission; afterwards the time of the next one.
        self.due: float | None = None
        # Bumped whenever ``due`` changes, so stale heap entries are recognised.
        self.gen = 0
        self.held = False
        self.retransmitted = False
        self.sampled = False
        self.sent_at = 0.0
        self.done = False


class _Stream:
    """Per-stream counters of one link."""

    __slots__ = ("floor", "given_up", "given_up_total", "last_sent", "name", "next_seq", "open")

    def __init__(self, name: StreamId) -> None:
        self.name = name
        self.next_seq = 1
        self.floor = 1
        self.last_sent = 0
        # stream_seq -> link seq of every message of this stream without an outcome.
        self.open: dict[int, int] = {}
        # Recent give-ups, oldest first, bounded by ``given_up_memory``.
        self.given_up: dict[int, None] = {}
        self.given_up_total = 0


class LinkSender:
    """The sans-IO sending side of one link: this node to ``peer``.

    Args:
        node: this node's id, stamped on every frame.
        incarnation: this process's incarnation of ``node``.
        peer: the node every frame goes to; frames from anyone else are refused.
        now: the current time; liveness is measured from here.
        rng: uniform floats in ``[0, 1)`` for jitter.
        config: tuning; see :class:`SenderConfig`.
    """

    def __init__(
        self,
        node: NodeId,
        incarnation: Incarnation,
        peer: NodeId,
        *,
        now: float,
        rng: Rng,
        config: SenderConfig | None = None,
    ) -> None:
        self._node = node
        self._incarnation = incarnation
        self._peer = peer
        self._rng = rng
        self._config = cfg = config if config is not None else SenderConfig()
        self._now = now

        self._next_seq = 1
        self._watermark = 1
        self._credit = cfg.initial_credit
        self._msgs: dict[int, _Msg] = {}
        self._queue: deque[_Msg] = deque()
        self._timers: list[tuple[float, int, int]] = []
        self._deadlines: list[tuple[float, int]] = []
        self._streams: dict[StreamId, _Stream] = {}
        # Transmitted at least once and still without an outcome.
        self._outstanding = 0
        self._held = 0
        self._control: list[Frame] = []
        self._events: deque[SenderEvent] = deque()

        self._peer_incarnation: Incarnation | None = None
        # The other protocol version the peer announced; None while compatible.
        self._peer_version: int | None = None
        self._last_sent = -math.inf
        self._last_heard = now
        self._heard_any = False
        self._state = PeerState.SUSPECT
        self._ping_nonce = 0
        self._ping_sent_at: float | None = None
        self._srtt: float | None = None
        self._rttvar = 0.0
        # RFC 6298 §2: the first try waits max(retry_timeout, SRTT + 4 RTTVAR),
        # so a receiver slowed by load is not flooded with spurious resends.
        self._rto = cfg.retry_timeout

        self._sent = 0
        self._resent = 0
        self._held_probes = 0
        self._acked = 0
        self._erred = 0
        self._gave_up = 0
        self._retry_later = 0
        self._duplicate_answers = 0
        self._stale_answers = 0
        self._heartbeats = 0
        self._peer_restarts = 0
        self._rejected: dict[str, int] = {}

    # --- properties ------------------------------------------------------------------

    @property
    def node(self) -> NodeId:
        """This node's id."""
        return self._node

    @property
    def incarnation(self) -> Incarnation:
        """This process's incarnation."""
        return self._incarnation

    @property
    def peer(self) -> NodeId:
        """The receiving node."""
        return self._peer

    @property
    def peer_incarnation(self) -> Incarnation | None:
        """The receiver's current incarnation, once any frame from it was accepted."""
        return self._peer_incarnation

    @property
    def peer_state(self) -> PeerState:
        """The peer's liveness as of the last call that passed ``now``."""
        return self._state

    @property
    def watermark(self) -> LinkSeq:
        """Lowest link sequence number without a final outcome."""
        return LinkSeq(self._watermark)

    @property
    def credit(self) -> LinkSeq:
        """Highest link sequence number usable for new DATA."""
        return LinkSeq(self._credit)

    @property
    def peer_version(self) -> int | None:
        """The peer's protocol version if its last HELLO announced another one than ours.

        While it is not None every send ends at once in :class:`GaveUp`
        (protocol.md §5.7).
        """
        return self._peer_version

    @property
    def rtt(self) -> float | None:
        """Smoothed round-trip time in seconds, or None before the first sample."""
        return self._srtt

    # --- sending ---------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Messages sent and not finished yet (no final answer, not given up)."""
        return len(self._msgs)

    def window_open(self) -> bool:
        """Whether :meth:`send` would accept a message now.

        Returns:
            True if a new message fits the credit and ``max_in_flight``. While
            it is False, wait for the next frame from the peer or deadline.
        """
        seq = self._next_seq
        if seq >= self._watermark + self._config.max_in_flight:
            return False
        # With nothing left unfinished, one message may go as a window probe.
        return seq <= self._credit or not self._msgs

    def send(
        self,
        stream: StreamId,
        payload: Payload,
        *,
        now: float,
        deadline: float | None = None,
        frame_no: int | None = None,
    ) -> LinkSeq:
        """Accept a message for the peer; it goes out with the next ``frames_to_send``.

        Args:
            stream: the ordered stream it belongs to.
            payload: the message body (bytes or plain CBOR data).
            now: the current time.
            deadline: absolute time after which the send gives up; defaults to
                ``now + config.send_timeout``. ``math.inf`` never gives up.
            frame_no: the application's own frame number, delivered with it.

        Returns:
            The message's link sequence number; its outcome arrives as an
            :class:`Answered` or :class:`GaveUp` event naming it.

        Raises:
            LocalProtocolError: the window is closed (check :meth:`window_open`
                first), the deadline is not after ``now``, the stream name is
                empty, or ``now`` went backwards.
        """
        return self._accept(stream, payload, False, now, deadline, frame_no)

    def send_items(
        self,
        stream: StreamId,
        items: tuple[Payload, ...],
        *,
        now: float,
        deadline: float | None = None,
        frame_no: int | None = None,
    ) -> LinkSeq:
        """Accept several items as one message (DATA_ITEMS), like :meth:`send`.

        To the protocol the items are one message: one link and one stream
        sequence number, one window slot, one retry timer, one final answer
        (an ACK or ERR for all of them, or an ACK_ITEMS with one outcome each).

        Args:
            stream: the ordered stream the message belongs to.
            items: the items' payloads, at least one (the codec's
                ``Limits.max_items`` bounds how many).
            now / deadline / frame_no: as for :meth:`send`.

        Returns:
            The message's link sequence number.

        Raises:
            LocalProtocolError: ``items`` is not a non-empty tuple, or as for
                :meth:`send`.
        """
        if type(items) is not tuple or not items:
            raise LocalProtocolError("items must be a non-empty tuple of payloads")
        return self._accept(stream, items, True, now, deadline, frame_no)

    def _accept(
        self,
        stream: StreamId,
        payload: Payload,
        items: bool,
        now: float,
        deadline: float | None,
        frame_no: int | None,
    ) -> LinkSeq:
        self._advance(now)
        if not self.window_open():
            raise LocalProtocolError(
                f"send window to {self._peer!r} is closed (seq {self._next_seq}, credit "
                f"{self._credit}, watermark {self._watermark}); wait until window_open()"
            )
        if deadline is None:
            deadline = now + self._config.send_timeout
        elif not deadline > now:
            raise LocalProtocolError(
                f"deadline {deadline!r} is not after now ({now!r}); pass an absolute time "
                "in the future, or math.inf for no deadline"
            )
        if not stream:
            raise LocalProtocolError("stream must be a non-empty name")
        st = self._streams.get(stream)
        if st is None:
            st = self._streams[stream] = _Stream(stream)
        seq = self._next_seq
        self._next_seq = seq + 1
        stream_seq = st.next_seq
        st.next_seq = stream_seq + 1
        st.open[stream_seq] = seq
        msg = _Msg(seq, st, stream_seq, frame_no, payload, deadline, self._rto, items)
        self._msgs[seq] = msg
        self._queue.append(msg)
        if not self.window_open():
            self._expedite_blocker(now)
        if deadline != math.inf:
            heapq.heappush(self._deadlines, (deadline, seq))
            if len(self._deadlines) > 2 * len(self._msgs) + 64:
                self._compact_deadlines()
        return LinkSeq(seq)

    def stream_seq_of(self, seq: LinkSeq) -> StreamSeq:
        """The stream sequence number :meth:`send` gave the message ``seq``.

        Raises:
            LocalProtocolError: ``seq`` has already reached its outcome.
        """
        msg = self._msgs.get(seq)
        if msg is None:
            raise LocalProtocolError(f"link seq {seq} is not in flight on the link to {self._peer}")
        return StreamSeq(msg.stream_seq)

    def frames_to_send(self, now: float) -> list[Frame]:
        """Everything to send to the peer now, oldest first.

        Processes due timers first (give-ups, liveness). Returns due resends,
        then new DATA within the credit, at most ``max_batch`` DATA in all
        (call again when :meth:`next_deadline` says so), then HELLO replies and
        REQ answers, and a heartbeat HELLO if nothing was sent for
        ``heartbeat_interval``. The shell may put several frames in one
        :class:`Batch`.

        Args:
            now: the current time.

        Returns:
            The frames, possibly empty.

        Raises:
            LocalProtocolError: ``now`` went backwards.
        """
        self._advance(now)
        out: list[Frame] = []
        budget = self._config.max_batch
        msgs = self._msgs
        timers = self._timers
        while budget and timers and timers[0][0] <= now:
            _, seq, gen = heapq.heappop(timers)
            msg = msgs.get(seq)
            if msg is None or msg.gen != gen:
                continue
            out.append(self._transmit(msg, now))
            budget -= 1
        queue = self._queue
        while budget and queue:
            msg = queue[0]
            if msg.done:
                queue.popleft()
                continue
            if msg.seq > self._credit and self._outstanding:
                break
            queue.popleft()
            out.append(self._transmit(msg, now))
            budget -= 1
        if self._control:
            out.extend(self._control)
            self._control.clear()
        if not out and now >= self._last_sent + self._config.heartbeat_interval:
            self._ping_nonce += 1
            self._ping_sent_at = now
            self._heartbeats += 1
            out.append(Hello(self._node, self._incarnation, self._ping_nonce, False))
        if out:
            self._last_sent = now
        return out

    def _transmit(self, msg: _Msg, now: float) -> Data | DataItems:
        cfg = self._config
        st = msg.stream
        if msg.due is None:
            self._sent += 1
            self._outstanding += 1
            msg.sent_at = now
            if msg.stream_seq > st.last_sent:
                st.last_sent = msg.stream_seq
        else:
            msg.retransmitted = True
            if msg.held:
                self._held_probes += 1
            else:
                self._resent += 1
        if msg.held and not self._is_blocker(msg):
            wait = cfg.retry_ceiling
        else:
            wait = msg.rto
            msg.rto = min(wait * cfg.backoff, cfg.retry_ceiling)
        self._schedule(msg, now + jittered(wait, cfg.jitter, self._rng))
        return (DataItems if msg.items else Data)(
            self._node,
            self._incarnation,
            LinkSeq(msg.seq),
            st.name,
            StreamSeq(msg.stream_seq),
            StreamSeq(st.floor),
            msg.frame_no,
            msg.payload,
            LinkSeq(self._watermark),
        )

    def _schedule(self, msg: _Msg, due: float) -> None:
        msg.due = due
        msg.gen += 1
        heapq.heappush(self._timers, (due, msg.seq, msg.gen))
        if len(self._timers) > 2 * len(self._msgs) + 64:
            # In place: frames_to_send holds a reference while it pops.
            self._timers[:] = [
                (m.due, m.seq, m.gen) for m in self._msgs.values() if m.due is not None
            ]
            heapq.heapify(self._timers)

    def _compact_deadlines(self) -> None:
        self._deadlines[:] = [(d, s) for d, s in self._deadlines if s in self._msgs]
        heapq.heapify(self._deadlines)

    # --- receiving -------------------------------------------------------------------

    def receive_frame(self, frame: Frame, now: float) -> None:
        """Take one frame that came from the peer over this link's connection.

        Frames that do not belong (another node's id, a stale incarnation, an
        answer for a finished message) are counted and dropped, never raised.

        Args:
            frame: a decoded frame; a :class:`Batch` is unpacked.
            now: the current time.

        Raises:
            LocalProtocolError: ``now`` went backwards.
        """
        self._advance(now)
        if isinstance(frame, Batch):
            for inner in frame.frames:
                if isinstance(inner, Batch):
                    self._reject("nested-batch")
                else:
                    self._receive_one(inner, now)
        else:
            self._receive_one(frame, now)

    def _receive_one(self, frame: Frame, now: float) -> None:
        if isinstance(frame, Batch):
            self._reject("nested-batch")
            return
        if frame.node != self._peer:
            self._reject("wrong-peer")
            return
        if isinstance(frame, AckRange):
            self._on_ack_range(frame, now)
        elif isinstance(frame, Received | AckFrame | AckItems | ErrFrame | RetryLater):
            self._on_answer(frame, now)
        elif isinstance(frame, Hello):
            self._on_hello(frame, now)
        elif isinstance(frame, Req):
            self._on_req(frame, now)
        else:
            self._reject("unexpected-frame")

    def _reject(self, reason: str) -> None:
        self._rejected[reason] = self._rejected.get(reason, 0) + 1

    def _current_answer(
        self, answer: Received | AckFrame | AckRange | AckItems | ErrFrame | RetryLater, now: float
    ) -> bool:
        """Whether an answer is for this session of both sides; takes its credit if so."""
        if answer.peer_incarnation != self._incarnation or not self._accept_incarnation(
            answer.incarnation, now
        ):
            self._stale_answers += 1
            return False
        if answer.credit > self._credit:
            self._credit = answer.credit
        return True

    def _accept_incarnation(self, incarnation: Incarnation, now: float) -> bool:
        """Track the peer's incarnation; False if the frame comes from an older one."""
        current = self._peer_incarnation
        if current is None:
            self._peer_incarnation = incarnation
        elif incarnation != current:
            if incarnation < current:
                return False
            self._peer_restarted(current, incarnation, now)
        self._last_heard = now
        self._heard_any = True
        self._update_state(now)
        return True

    def _peer_restarted(self, old: Incarnation, new: Incarnation, now: float) -> None:
        # design.md §3.1: RECEIVED from the old incarnation proves nothing, so
        # every message without a final answer goes to the new one at once,
        # with a fresh backoff. Final answers already taken stand.
        self._peer_incarnation = new
        self._peer_restarts += 1
        self._credit = self._watermark + self._config.initial_credit - 1
        self._held = 0
        for msg in self._msgs.values():
            if msg.due is not None:
                msg.held = False
                msg.rto = self._rto
                self._schedule(msg, now)
        self._events.append(PeerRestarted(old, new))

    def _on_answer(
        self, answer: Received | AckFrame | AckItems | ErrFrame | RetryLater, now: float
    ) -> None:
        if not self._current_answer(answer, now):
            return
        msg = self._msgs.get(answer.seq)
        if msg is None or msg.due is None:
            self._duplicate_answers += 1
            return
        if not msg.sampled:
            msg.sampled = True
            # Karn's rule: a resent message's answer may belong to any copy.
            if not msg.retransmitted:
                self._rtt_sample(now - msg.sent_at)
        if isinstance(answer, AckFrame | AckItems | ErrFrame):
            if not isinstance(answer, ErrFrame):
                self._acked += 1
            else:
                self._erred += 1
            self._finish(msg, now)
            self._events.append(Answered(LinkSeq(msg.seq), answer))
        elif isinstance(answer, Received):
            if not msg.held:
                msg.held = True
                self._held += 1
                self._events.append(Held(LinkSeq(msg.seq)))
            cfg = self._config
            wait = msg.rto if self._is_blocker(msg) else cfg.retry_ceiling
            self._schedule(msg, now + jittered(wait, cfg.jitter, self._rng))
        elif msg.held and answer.reason is not RetryReason.BUFFER_FULL:
            # This incarnation holds it: a WINDOW_FULL can only answer an older copy.
            self._duplicate_answers += 1
        elif msg.held:
            # The receiver took it, then its stream's reorder buffer refused it
            # (LinkReceiver.refuse): it is no longer held; resend on the backoff.
            msg.held = False
            self._held -= 1
            self._retry_later += 1
            cfg = self._config
            self._schedule(msg, now + jittered(msg.rto, cfg.jitter, self._rng))
        else:
            # Not held: the retry timer armed at transmission already backs off.
            self._retry_later += 1

    def _on_ack_range(self, answer: AckRange, now: float) -> None:
        if not self._current_answer(answer, now):
            return
        msgs = self._msgs
        events = self._events
        # Only numbers that can still be waiting (watermark .. last sent): a
        # range from the network costs at most max_in_flight steps, however wide.
        first = max(answer.first, self._watermark)
        last = min(answer.last, self._next_seq - 1)
        finished = 0
        sampled = False
        for seq in range(first, last + 1):
            msg = msgs.get(seq)
            if msg is None or msg.due is None:
                continue
            if not sampled and not msg.sampled and not msg.retransmitted:
                # One RTT sample per frame: its messages share one round trip.
                sampled = True
                self._rtt_sample(now - msg.sent_at)
            self._finish(msg, now)
            events.append(Answered(LinkSeq(seq), answer))
            finished += 1
        self._acked += finished
        self._duplicate_answers += answer.last - answer.first + 1 - finished

    def _is_blocker(self, msg: _Msg) -> bool:
        """Whether ``msg`` is the oldest unfinished message and the window is shut."""
        return msg.seq == self._watermark and not self.window_open()

    def _expedite_blocker(self, now: float) -> None:
        # A held message is re-probed only every retry_ceiling, which is right
        # while the compute step runs but, if its final answer was lost, would
        # stall a shut window for that long. The one message that keeps the
        # window shut is probed on the normal backoff instead.
        msg = self._msgs.get(self._watermark)
        if msg is None or not msg.held or msg.due is None or self.window_open():
            return
        cfg = self._config
        due = now + jittered(cfg.retry_timeout, cfg.jitter, self._rng)
        if due < msg.due:
            self._schedule(msg, due)

    def _finish(self, msg: _Msg, now: float) -> None:
        """Remove a message that reached its outcome and advance the floors."""
        msg.done = True
        del self._msgs[msg.seq]
        if msg.due is not None:
            self._outstanding -= 1
        if msg.held:
            self._held -= 1
        st = msg.stream
        del st.open[msg.stream_seq]
        while st.floor < st.next_seq and st.floor not in st.open:
            st.floor += 1
        w = self._watermark
        if w == msg.seq:
            w += 1
            while w < self._next_seq and w not in self._msgs:
                w += 1
            self._watermark = w
            self._expedite_blocker(now)

    def _rtt_sample(self, sample: float) -> None:
        if self._srtt is None:
            self._srtt = sample
            self._rttvar = sample / 2
        else:
            self._rttvar += _RTT_BETA * (abs(self._srtt - sample) - self._rttvar)
            self._srtt += _RTT_ALPHA * (sample - self._srtt)
        cfg = self._config
        self._rto = min(max(cfg.retry_timeout, self._srtt + 4 * self._rttvar), cfg.retry_ceiling)

    def _on_hello(self, hello: Hello, now: float) -> None:
        if hello.version != PROTOCOL_VERSION:
            self._on_other_version(hello)
            return
        # A peer that spoke another version and now speaks ours was upgraded.
        self._peer_version = None
        if not self._accept_incarnation(hello.incarnation, now):
            self._stale_answers += 1
            return
        if not hello.reply:
            self._control.append(Hello(self._node, self._incarnation, hello.nonce, True))
        elif hello.nonce == self._ping_nonce and self._ping_sent_at is not None:
            self._rtt_sample(now - self._ping_sent_at)
            self._ping_sent_at = None

    def _on_other_version(self, hello: Hello) -> None:
        # protocol.md §5.7. Only the HELLO layout up to ``version`` is shared
        # between versions: nothing else of the frame is taken (no incarnation,
        # no liveness, no RTT). A request still gets our HELLO reply, so that
        # the peer learns our version from us as we learn its from it.
        self._reject("bad-version")
        if not hello.reply:
            self._control.append(Hello(self._node, self._incarnation, hello.nonce, True))
        self._peer_version = hello.version
        self._give_up_incompatible(hello.version)

    def _give_up_incompatible(self, peer_version: int) -> None:
        # §5.7: the peer could not read our DATA; fail it now, not at its deadline.
        reason = incompatible_reason(peer_version)
        for msg in list(self._msgs.values()):
            self._give_up(msg, reason)

    def _on_req(self, req: Req, now: float) -> None:
        if not self._accept_incarnation(req.incarnation, now):
            self._stale_answers += 1
            return
        if req.missing:
            if req.stream is None:
                self._reject("req-missing-without-stream")
                return
            st = self._streams.get(req.stream)
            items = tuple(MissingItem(k, self._missing_status(st, k, now)) for k in req.missing)
            statuses: tuple[StreamStatus, ...] = ()
        else:
            items = ()
            if req.stream is None:
                chosen = list(self._streams.values())
            else:
                one = self._streams.get(req.stream)
                chosen = [one] if one is not None else []
            statuses = tuple(
                StreamStatus(
                    st.name,
                    StreamSeq(st.last_sent),
                    len(st.open),
                    st.given_up_total,
                )
                for st in chosen
            )
        self._control.append(
            ReqAnswer(self._node, self._incarnation, req.query_id, req.stream, items, statuses)
        )

    def _missing_status(self, st: _Stream | None, stream_seq: int, now: float) -> MissingStatus:
        if st is None or not 1 <= stream_seq < st.next_seq:
            return MissingStatus.NEVER_SENT
        seq = st.open.get(stream_seq)
        if seq is not None:
            msg = self._msgs[seq]
            if msg.due is None or msg.due <= now:
                # Queued, or its retry timer is already due: it goes out anyway.
                return MissingStatus.IN_FLIGHT
            self._schedule(msg, now)
            return MissingStatus.RESENT
        if stream_seq in st.given_up:
            return MissingStatus.GIVEN_UP
        return MissingStatus.ANSWERED

    # --- time ------------------------------------------------------------------------

    def poll(self, now: float) -> None:
        """Run the timers that produce events: give-ups and liveness changes.

        :meth:`frames_to_send`, :meth:`send` and :meth:`receive_frame` do this
        too; call it alone when nothing is to be sent.

        Args:
            now: the current time.

        Raises:
            LocalProtocolError: ``now`` went backwards.
        """
        self._advance(now)

    def _advance(self, now: float) -> None:
        if now < self._now:
            raise LocalProtocolError(
                f"time went backwards ({now!r} < {self._now!r}); pass a monotonic clock"
            )
        self._now = now
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, seq = heapq.heappop(deadlines)
            msg = self._msgs.get(seq)
            if msg is not None:
                self._give_up(msg)
        if self._peer_version is not None and self._msgs:
            # A message accepted since: it never goes out (frames_to_send comes here first).
            self._give_up_incompatible(self._peer_version)
        self._update_state(now)
        if self._state is PeerState.LOST and self._msgs:
            self._give_up_lost(now)

    def _give_up_lost(self, now: float) -> None:
        # A dead rank must surface within the grace, not at each send's deadline.
        silent = now - self._last_heard
        down = silent - self._config.down_after
        reason = lost_reason(self._peer, down, silent)
        for msg in list(self._msgs.values()):
            self._give_up(msg, reason, down)

    def _give_up(
        self, msg: _Msg, reason: str = DEADLINE_PASSED, down_for: float | None = None
    ) -> None:
        st = msg.stream
        st.given_up[msg.stream_seq] = None
        if len(st.given_up) > self._config.given_up_memory:
            del st.given_up[next(iter(st.given_up))]
        st.given_up_total += 1
        self._gave_up += 1
        self._finish(msg, self._now)
        self._events.append(
            GaveUp(LinkSeq(msg.seq), st.name, StreamSeq(msg.stream_seq), reason, down_for)
        )

    def _update_state(self, now: float) -> None:
        # Compare against the same sums next_deadline() returns, so that being
        # woken at that time always changes the state (no float rounding gap).
        heard = self._last_heard
        cfg = self._config
        if self._heard_any and now < heard + cfg.suspect_after:
            state = PeerState.UP
        elif now < heard + cfg.down_after:
            state = PeerState.SUSPECT
        elif not self._heard_any or now < heard + cfg.down_after + cfg.lost_grace:
            # Never heard: not started yet, rather than lost (wait_all_up's case).
            state = PeerState.DOWN
        else:
            state = PeerState.LOST
        if state is not self._state:
            self._events.append(PeerStateChanged(self._state, state))
            self._state = state

    def next_deadline(self) -> float | None:
        """When the shell must call :meth:`frames_to_send` (or :meth:`poll`) next.

        Returns:
            An absolute time; one at or before the last ``now`` means "at once".
            ``None`` (no timer) is part of the shared convention
            (``transport/_proto_link.py``) but never happens here: an idle
            link sends heartbeats, so a time is always due.
        """
        cfg = self._config
        if self._control:
            return self._now
        queue = self._queue
        while queue and queue[0].done:
            queue.popleft()
        if queue and (queue[0].seq <= self._credit or not self._outstanding):
            return self._now
        best = self._last_sent + cfg.heartbeat_interval
        timers = self._timers
        while timers:
            due, seq, gen = timers[0]
            msg = self._msgs.get(seq)
            if msg is not None and msg.gen == gen:
                best = min(best, due)
                break
            heapq.heappop(timers)
        deadlines = self._deadlines
        while deadlines:
            if deadlines[0][1] in self._msgs:
                best = min(best, deadlines[0][0])
                break
            heapq.heappop(deadlines)
        if self._state is PeerState.UP:
            best = min(best, self._last_heard + cfg.suspect_after)
        elif self._state is PeerState.SUSPECT:
            best = min(best, self._last_heard + cfg.down_after)
        elif self._state is PeerState.DOWN and self._heard_any:
            best = min(best, self._last_heard + cfg.down_after + cfg.lost_grace)
        return best

    # --- output ----------------------------------------------------------------------

    def take_events(self) -> list[SenderEvent]:
        """Hand over the events produced since the last call, oldest first.

        Returns:
            The events; the sender forgets them.
        """
        events = list(self._events)
        self._events.clear()
        return events

    def statistics(self) -> SenderStatistics:
        """A snapshot of the counters.

        Returns:
            A frozen :class:`SenderStatistics`.
        """
        return SenderStatistics(
            sent=self._sent,
            resent=self._resent,
            held_probes=self._held_probes,
            in_flight=len(self._msgs),
            queued=len(self._msgs) - self._outstanding,
            held=self._held,
            credit=LinkSeq(self._credit),
            watermark=LinkSeq(self._watermark),
            acked=self._acked,
            erred=self._erred,
            gave_up=self._gave_up,
            retry_later=self._retry_later,
            duplicate_answers=self._duplicate_answers,
            stale_answers=self._stale_answers,
            rejected=dict(self._rejected),
            heartbeats=self._heartbeats,
            peer_restarts=self._peer_restarts,
            rtt=self._srtt,
            peer_state=self._state,
            peer_incarnation=self._peer_incarnation,
            peer_version=self._peer_version,
        )
