"""The receiving side of a node: one Receiver actor, one Sequencer per peer.

The Receiver owns the node's ROUTER and the :class:`LinkReceiver` core
(sessions, dedup, credit); it never waits on anyone else. It routes each
peer's new messages to that peer's :class:`PeerSequencer`, which puts every
stream back in order and hands messages to the compute actor; a slow compute
actor or a stalled stream therefore only slows the peer that feeds it.

The compute actor answers through a :class:`_Completion` sink that travels
with each message: returning from ``receive`` becomes ACK, ``Reject`` becomes
ERR with its code, a crash becomes ERR ``COMPUTE_FAILED`` (and the supervisor
restarts the actor), a stop becomes ERR ``SHUTTING_DOWN``. Every delivered
message gets exactly one final answer.

A batch (a DATA_ITEMS) is one message to the core and to the sequencer: it
takes one place in its stream and is released as a unit. Only at the hand-over
to the compute actor does it become one :class:`Delivery` per item, put in
the mailbox as one entry (``ActorRef.send_items``: the actor's task takes them
back to back, no task hop or channel operation per item); each item's outcome
goes to the batch's :class:`_ItemsCompletion` (by index), which answers the
core once the last item has its outcome
(``LinkReceiver.complete_items``). A crash on one item is that item's ERR and
restarts the actor, exactly as for a message sent alone; the runtime carries
the items behind it over to the new instance.

No peer can hurt another peer (issue 14): an exception while handling one
peer's frame (the core's ``receive_frame``), routing its messages, or
encoding and sending its answers is caught at that peer's boundary, counted
as ``internal-error`` in :attr:`InboundStatistics.rejected`, logged on the
``cellmesh.receiver`` logger at most once per peer in ``_LOG_EVERY`` seconds,
and that frame or answer is refused (docs/protocol.md §3.6: no answer; the
sender's retransmission or deadline takes care of it). The Receiver goes on
serving every other peer, and their answers in the same flush still go out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import zmq

from transport import (
    ErrCode,
    Incarnation,
    Limits,
    LinkReceiver,
    LocalProtocolError,
    Network,
    NodeId,
    ReceiverConfig,
    ReceiverStatistics,
    RemoteProtocolError,
    SequencerConfig,
    SequencerStatistics,
    Socket,
    SocketLike,
    StreamId,
    StreamSequencer,
    Unroutable,
    ZmqNetwork,
    decode,
    encode,
)
from transport.events import (
    Admitted,
    AskMissing,
    GapEvent,
    OfferResult,
    QueryAnswered,
    ReceiverEvent,
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

from ._actor import Actor, ActorRef
from ._errors import ActorStopped, BindError
from ._outcomes import Delivery, Gap, Reject, StreamFailedError
from ._security import SecurityState, watch_handshakes

_RECV_BUDGET = 256

log = logging.getLogger("cellmesh.receiver")

#: The reason token (docs/protocol.md §3.6) of a frame refused, or an answer
#: dropped, because handling it raised: a bug in this node that one peer's
#: input reached, kept at that peer's boundary.
INTERNAL_ERROR = "internal-error"
#: At most one log line per peer and reason in this many seconds; the ones in
#: between are counted, and the next line says how many there were.
_LOG_EVERY = 10.0

#: A wake-up stops taking messages once it has spent this long (seconds of
#: time.perf_counter) and sends the answers due: a run of costly messages
#: (a header decode takes up to ~50 ms, Limits.max_header_bytes) then holds
#: the answers of other peers and the compute actors back by about one of
#: them. Usual messages take a few µs each: _RECV_BUDGET ends their drain.
_RECV_SECONDS = 0.02

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

#: Stands for "timers may be due" in a sequencer's mailbox.
_TICK: Any = object()


class _Tracked:
    """What both reply sinks share: whether the message counts in ``outstanding``."""

    __slots__ = ("_inbound", "_item", "_tracked")

    def __init__(self, inbound: InboundState, item: Admitted) -> None:
        self._inbound = inbound
        self._item = item
        self._tracked = False

    def track(self) -> None:
        """Count the message as with the compute actor (call before putting it there)."""
        self._tracked = True
        self._inbound.outstanding += 1

    def untrack(self) -> None:
        """The put failed: the message never reached the compute actor."""
        if self._tracked:
            self._tracked = False
            self._inbound.outstanding -= 1


@dataclass(frozen=True, slots=True)
class InboundStatistics:
    """The receiving side's counters."""

    protocol: ReceiverStatistics
    rejected: dict[str, int]
    unroutable: int
    socket_full: int
    #: What this node's fault injection did to its answers.
    faults: FaultStatistics


class InboundState:
    """What the receiving side keeps across restarts of its actors."""

    def __init__(
        self,
        node: NodeId,
        incarnation: Incarnation,
        bind: str,
        peers: frozenset[NodeId],
        *,
        config: ReceiverConfig,
        faults: FaultPlan,
        limits: Limits,
        security: SecurityState | None = None,
    ) -> None:
        self.node = node
        self.bind = bind
        self.endpoint: str | None = None
        self.limits = limits
        self.core = LinkReceiver(node, incarnation, config=config)
        self.faults: FaultInjector[list[Any]] = FaultInjector(faults, salt=f"{node}<-")
        # Plaintext: routing ids are the peers' node ids (design.md §5);
        # anything else is refused before it reaches the protocol core.
        self.routes: dict[bytes, NodeId] = {peer.encode(): peer for peer in peers}
        self.security = security if security is not None else SecurityState(node, None, peers)
        # Secure: the sender is the node its key proved (ZAP User-Id), and
        # routing ids mean nothing (the ROUTER picks them; a peer cannot claim
        # another's). Answers go to the connection each peer's key last spoke
        # on, so a restarted peer's new connection takes over by speaking.
        self.peer_ids: dict[str, NodeId] = {peer: peer for peer in peers}
        self.reply_routes: dict[NodeId, bytes] = {}
        self.sequencers: dict[NodeId, ActorRef[list[Any], None]] = {}
        # The running PeerSequencer of each peer, for the in-order fast path,
        # and how many batches the Receiver has sent each one that it has not
        # finished yet: a batch already handed to a waiting actor task does not
        # show in the mailbox depth, so the depth alone cannot say "idle".
        self.inline: dict[NodeId, PeerSequencer] = {}
        self.backlog: dict[NodeId, int] = dict.fromkeys(peers, 0)
        self.sequencer_stats: dict[NodeId, Callable[[], dict[StreamId, SequencerStatistics]]] = {}
        self.queries: dict[int, _Query] = {}
        self.rejected: Counter[str] = Counter()
        self.unroutable = 0
        self.socket_full = 0
        self.socket: SocketLike | None = None
        #: The Receiver's timer while it serves (see :meth:`answered`).
        self.timer: trio.CancelScope | None = None
        #: Messages in the compute actor's mailbox or hands, not answered yet.
        self.outstanding = 0
        self._inject = self.faults.active
        # Rate-limited logging of internal errors, per (peer, reason): when the
        # next line may be written, and how many were not logged since the last.
        self._log_after: dict[tuple[NodeId, str], float] = {}
        self._unlogged: Counter[tuple[NodeId, str]] = Counter()

    def internal_error(self, peer: NodeId, what: str, error: Exception, now: float) -> None:
        """Count and log (rate-limited) an exception caught at ``peer``'s boundary.

        Args:
            peer: whose frame or answer was being handled.
            what: what was being done, for the log line ("handling a frame from").
            error: the exception; its traceback goes into the log line.
            now: the current time, for the rate limit.
        """
        self.rejected[INTERNAL_ERROR] += 1
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
            self.node,
            what,
            peer,
            type(error).__name__,
            error,
            INTERNAL_ERROR,
            unlogged,
            _LOG_EVERY,
            exc_info=error,
        )

    def wake(self) -> None:
        """Ask the Receiver's owner task to flush answers and look again."""
        if self.socket is not None:
            self.socket.wake()

    def answered(self, tracked: bool) -> None:
        """A completion gave the core an answer: send it now, or have the Receiver send it.

        When no other message is with the compute actor, no other answer is
        coming to share a message with this one, so the completing task sends
        it itself instead of waking the Receiver for it (the wake-up is a trip
        through Trio's I/O manager and an eventfd write and read per sparse
        message; docs/performance.md, Grid). In a burst the Receiver sends
        the answers, as one ACK_RANGE where they are consecutive. Completions
        raise no core events, so the Receiver has nothing else to do for
        them; its timer is moved forward if the core's next deadline is sooner.

        Args:
            tracked: the message was counted in :attr:`outstanding`.
        """
        if tracked:
            self.outstanding -= 1
        # Cheapest test first: in a burst it hands every answer but the last
        # to the Receiver, which sends them together.
        if self.outstanding:
            self.wake()
            return
        sock = self.socket
        timer = self.timer
        if sock is None or timer is None or self._inject:
            self.wake()
            return
        self.flush(sock, trio.current_time())
        deadline = self.core.next_deadline()
        if deadline is not None and deadline < timer.deadline:
            timer.deadline = deadline

    def flush(self, sock: SocketLike, now: float) -> None:
        """Send every answer the core has ready, each peer's in as few messages as fit."""
        inject = self._inject
        outgoing = self.core.frames_to_send(now)
        if outgoing:
            by_peer: dict[NodeId, list[Frame]] = {}
            for peer, frame in outgoing:
                by_peer.setdefault(peer, []).append(frame)
            secure = self.security.secure
            for peer, frames in by_peer.items():
                found = self.reply_routes.get(peer) if secure else peer.encode()
                if found is None:
                    # Nothing from this peer's key yet: no connection to answer on.
                    self.unroutable += 1
                    continue
                rid = found
                # Each peer's answers behind their own boundary: one that fails
                # here is dropped and counted, and the next peer's still go.
                try:
                    for parts in _encode_answers(frames, self.limits, peer, self, now):
                        message = [rid, *parts]
                        if inject:
                            for copy in self.faults.submit(message, now):
                                _send(self, sock, copy)
                        else:
                            _send(self, sock, message)
                except Exception as exc:
                    self.internal_error(peer, "sending answers to", exc, now)
        if inject:
            for message in self.faults.due(now):
                _send(self, sock, message)

    def statistics(self) -> InboundStatistics:
        """A snapshot of the receiving side."""
        return InboundStatistics(
            protocol=self.core.statistics(),
            rejected=dict(self.rejected),
            unroutable=self.unroutable,
            socket_full=self.socket_full,
            faults=self.faults.statistics(),
        )


class _DecodeBudget:
    """Per-peer token buckets of decoding time (seconds of ``time.perf_counter``)."""

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

    def spend(self, peer: NodeId, started: float) -> None:
        """Charge ``peer`` the decoding that began at ``started``."""
        now = time.perf_counter()
        bucket = self._buckets.get(peer)
        if bucket is None:
            self._buckets[peer] = [_DECODE_BURST - (now - started), now]
        else:
            bucket[0] -= now - started


@dataclass(slots=True)
class _Query:
    """A status query this node sent; settled by the peer's REQ answer."""

    event: trio.Event = field(default_factory=trio.Event)
    answer: ReqAnswer | None = None


def _err_of(error: BaseException) -> tuple[int, str]:
    """The ERR code and detail a compute actor's failure is answered with."""
    if isinstance(error, Reject):
        return error.code, error.detail
    if isinstance(error, ActorStopped):
        return ErrCode.SHUTTING_DOWN, "the compute actor stopped"
    cause = error.__cause__ or error
    return ErrCode.COMPUTE_FAILED, f"{type(cause).__name__}: {cause}"[:200]


class _Completion(_Tracked):
    """The reply sink of one delivered message: turns the outcome into ACK/ERR."""

    __slots__ = ()

    def set_result(self, value: Any) -> None:
        item = self._item
        self._inbound.core.complete(item.peer, item.peer_incarnation, item.seq, value)
        self._inbound.answered(self._tracked)

    def fail(self, error: BaseException) -> None:
        item = self._item
        code, detail = _err_of(error)
        self._inbound.core.fail(item.peer, item.peer_incarnation, item.seq, code, detail)
        self._inbound.answered(self._tracked)


#: The outcome of an item processed without a result: one shared value.
_ITEM_ACK = ItemAck(None)


class _ItemsCompletion(_Tracked):
    """The reply sink of a batch's items: answers the batch when the last one is settled."""

    __slots__ = ("_left", "_outcomes")

    def __init__(self, inbound: InboundState, item: Admitted) -> None:
        super().__init__(inbound, item)
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
            item = self._item
            done: tuple[ItemOutcome, ...] = tuple(outcomes)  # type: ignore[arg-type]
            self._inbound.core.complete_items(item.peer, item.peer_incarnation, item.seq, done)
            self._inbound.answered(self._tracked)


def _expand(inbound: InboundState, item: Admitted) -> tuple[list[Delivery], _ItemsCompletion]:
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
    return deliveries, _ItemsCompletion(inbound, item)


class Receiver(Actor[Any, Any]):
    """Owns the ROUTER: decodes, runs the receiving core, routes, answers."""

    def __init__(self, state: InboundState, network: Network) -> None:
        self._state = state
        self._network = network
        self._monitor: SocketLike | None = None

    async def on_start(self) -> None:
        st = self._state
        sock = self._network.router()
        # A restart binds the endpoint the peers already know, not a new
        # wildcard port.
        endpoint = st.endpoint or st.bind
        try:
            st.endpoint = sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            # The endpoint is the caller's: name it, not this actor.
            # zmq.strerror: pyzmq's own text repeats the address.
            reason = exc.strerror if exc.errno is None else zmq.strerror(exc.errno)
            raise BindError(endpoint, reason) from exc
        except BaseException:
            sock.close()
            raise
        st.socket = sock
        # A new ROUTER: the old connections' routing ids are gone with it.
        st.reply_routes.clear()
        if st.security.secure and isinstance(self._network, ZmqNetwork):
            assert isinstance(sock, Socket)
            self._monitor = self._network.monitor(sock)
            self.nursery.start_soon(watch_handshakes, st.security, self._monitor)
        self.nursery.start_soon(self._serve, st, sock)

    async def on_stop(self) -> None:
        st = self._state
        st.timer = None
        if st.socket is not None:
            st.socket.close()
            st.socket = None
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None

    async def receive(self, msg: Any) -> Any:
        """The Receiver takes no messages; it is driven by its socket."""
        raise TypeError(f"Receiver takes no messages, got {msg!r}")

    async def _serve(self, st: InboundState, sock: SocketLike) -> None:
        core = st.core
        limits = st.limits
        routes = st.routes
        peer_ids = st.peer_ids
        faults = st.faults
        inject = faults.active
        secure = st.security.secure
        budget = _DecodeBudget()
        clock = time.perf_counter
        while True:
            # One cancel scope serves every wait until its timer fires: moving
            # its deadline (only when it changed) costs less than a fresh
            # move_on_at per wait.
            with trio.CancelScope() as timer:
                st.timer = timer
                while True:
                    now = trio.current_time()
                    drain_until = clock() + _RECV_SECONDS
                    for _ in range(_RECV_BUDGET):
                        if clock() >= drain_until:
                            break
                        try:
                            if secure:
                                user, parts = sock.recv_authenticated_nowait()
                                peer = peer_ids.get(user) if user is not None else None
                            else:
                                parts = sock.recv_multipart_nowait()
                                peer = routes.get(parts[0])
                        except trio.WouldBlock:
                            break
                        if peer is None:
                            if secure:
                                # ZAP_ENFORCE_DOMAIN admits no connection without a
                                # peer's User-Id; counted in case libzmq ever does.
                                st.security.refuse(
                                    "unauthenticated", "a connection", "no peer's User-Id"
                                )
                            else:
                                st.rejected["unknown-peer"] += 1
                            continue
                        if not budget.allows(peer):
                            st.rejected["decode-budget"] += 1
                            continue
                        size = sum(map(len, parts)) - len(parts[0])
                        started = clock()
                        try:
                            frame = decode(parts[1:], limits)
                        except RemoteProtocolError as exc:
                            st.rejected[exc.reason] += 1
                            continue
                        finally:
                            budget.spend(peer, started)
                        if secure:
                            claimed = _claimed_node(frame, peer)
                            if claimed is not None:
                                st.security.refuse(
                                    "impersonation",
                                    f"node {peer!r} as {claimed!r}",
                                    f"its key belongs to {peer!r} "
                                    f"but its frames claim to be {claimed!r}",
                                )
                                continue
                            st.reply_routes[peer] = parts[0]
                        # The core unpacks a Batch itself (and refuses nested ones).
                        try:
                            core.receive_frame(peer, frame, now, size=size)
                        except Exception as exc:
                            st.internal_error(peer, "handling a frame from", exc, now)
                    core.poll(now)
                    self._route(st)
                    st.flush(sock, now)
                    deadline = core.next_deadline()
                    if inject:
                        held = faults.next_deadline()
                        if held is not None:
                            deadline = held if deadline is None else min(deadline, held)
                    target = math.inf if deadline is None else deadline
                    if timer.deadline != target:
                        timer.deadline = target
                    await sock.wait_ready()

    @staticmethod
    def _route(st: InboundState) -> None:
        events = st.core.take_events()
        if not events:
            return
        by_peer: dict[NodeId, list[Any]] = {}
        inline = st.inline
        for event in events:
            try:
                if type(event) is Admitted:
                    peer = event.peer
                    if peer not in by_peer and not st.backlog[peer]:
                        # Nothing of this peer is queued for or inside its
                        # sequencer, so nothing can overtake: an in-order message
                        # goes straight to the compute mailbox (one task hop less).
                        sequencer = inline.get(peer)
                        if sequencer is not None and sequencer.offer_inline(event):
                            continue
                    by_peer.setdefault(peer, []).append(event)
                elif type(event) is SessionEnded:
                    # The sequencer reports what the old session left buffered now,
                    # not only when the restarted peer's first DATA arrives.
                    by_peer.setdefault(event.peer, []).append(event)
                elif type(event) is QueryAnswered:
                    query = st.queries.pop(event.answer.query_id, None)
                    if query is not None:
                        query.answer = event.answer
                        query.event.set()
                    else:
                        by_peer.setdefault(event.peer, []).append(event)
            except Exception as exc:
                _route_failed(st, event, exc)
        for peer, items in by_peer.items():
            ref = st.sequencers.get(peer)
            try:
                if ref is None:
                    raise trio.WouldBlock
                ref.send_nowait(items)
                st.backlog[peer] += 1
            except (trio.WouldBlock, ActorStopped):
                # The peer's sequencer is flooded (or gone): refuse, do not hold.
                for item in items:
                    if type(item) is Admitted:
                        _refuse(st, item)
            except Exception as exc:
                st.internal_error(peer, "routing messages from", exc, trio.current_time())
                for item in items:
                    if type(item) is Admitted:
                        _refuse(st, item)


def _route_failed(st: InboundState, event: ReceiverEvent, error: Exception) -> None:
    """Routing one event raised: count it at its peer's boundary, refuse its message."""
    peer = event.origin if isinstance(event, Rejected) else event.peer
    st.internal_error(peer, "routing a message from", error, trio.current_time())
    if isinstance(event, Admitted):
        _refuse(st, event)


def _refuse(st: InboundState, item: Admitted) -> None:
    """Answer RETRY_LATER for a delivered message that never reached its sequencer.

    The core forgets it, so the sender's resend is taken as new (§6.5). A
    message already answered (the failure came after the hand-over) is left
    to the answer it has.
    """
    try:
        st.core.refuse(item.peer, item.peer_incarnation, item.seq, RetryReason.BUFFER_FULL)
    except LocalProtocolError:
        return


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
    frames: list[Frame], limits: Limits, peer: NodeId, st: InboundState, now: float
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
            st.internal_error(peer, "encoding an answer to", exc, now)
            continue
        if fallback is None:
            st.internal_error(peer, "encoding an answer to", problem, now)
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


def _send(st: InboundState, sock: SocketLike, message: list[Any]) -> None:
    try:
        sock.send_multipart_nowait(message)
    except Unroutable:
        # The peer's DEALER is not connected (now): it resends, and the
        # cached answer goes out then.
        st.unroutable += 1
    except trio.WouldBlock:
        st.socket_full += 1


class PeerSequencer(Actor[list[Any], None]):
    """Puts one peer's streams in order and hands them to the compute actor."""

    def __init__(
        self,
        inbound: InboundState,
        peer: NodeId,
        compute: ActorRef[Any, Any] | None,
        streams: dict[StreamId, SequencerConfig],
        default: SequencerConfig,
    ) -> None:
        self._inbound = inbound
        self._peer = peer
        self._compute = compute
        self._configs = streams
        self._default = default
        self._incarnation: Incarnation | None = None
        self._streams: dict[StreamId, StreamSequencer[Admitted]] = {}
        self._timer_scope: trio.CancelScope | None = None
        self._timer_at = math.inf
        self._pending_gaps: list[Gap] = []
        self._busy = False

    async def on_start(self) -> None:
        self._inbound.sequencer_stats[self._peer] = self.statistics
        self._inbound.inline[self._peer] = self
        self.nursery.start_soon(self._timer)

    async def on_stop(self) -> None:
        if self._inbound.inline.get(self._peer) is self:
            del self._inbound.inline[self._peer]
        # Messages buffered here will never be handed over by this instance:
        # answer them so no sender waits in vain (the sender resends; a new
        # instance starts clean).
        for stream_seq in list(self._streams.values()):
            for item in stream_seq.end():
                self._inbound.core.refuse(
                    item.peer, item.peer_incarnation, item.seq, RetryReason.BUFFER_FULL
                )
        self._streams.clear()
        self._inbound.wake()

    async def receive(self, msg: list[Any]) -> None:
        self._busy = True
        try:
            await self._receive(msg)
        finally:
            self._busy = False
            if msg[0] is not _TICK:
                self._inbound.backlog[self._peer] -= 1

    def offer_inline(self, item: Admitted) -> bool:
        """Hand ``item`` to the compute actor now, from the Receiver's task.

        Only when nothing can overtake it or be overtaken: this instance is
        not inside :meth:`receive`, the Receiver checked that no batch for
        it is queued, and ``item`` is the next message of its stream in the
        live session with nothing held. The stream's state then moves
        exactly as in :meth:`_offer` followed by :meth:`_drain`.

        Returns:
            True if it was handed over; False if it must go the usual way
            (through this actor's mailbox), and nothing changed.
        """
        compute = self._compute
        if (
            compute is None
            or self._busy
            or self._pending_gaps
            or item.peer_incarnation != self._incarnation
        ):
            return False
        stream = self._streams.get(item.stream)
        if stream is None or not stream.releases_at_once(item.stream_seq, item.stream_floor):
            return False
        sink: _Tracked
        try:
            if item.items:
                # One mailbox entry: a batch is released as one unit.
                deliveries, batch = _expand(self._inbound, item)
                compute.send_items_nowait(deliveries, reply=batch)
                sink = batch
            else:
                completion = _Completion(self._inbound, item)
                compute.send_nowait(_delivery(item), reply=completion)
                sink = completion
        except (trio.WouldBlock, ActorStopped):
            return False
        # Counted after the put: the compute actor cannot answer before this
        # task yields.
        sink.track()
        stream.release_at_once(item.stream_seq, item.stream_floor)
        return True

    async def _receive(self, msg: list[Any]) -> None:
        now = trio.current_time()
        for item in msg:
            if type(item) is Admitted:
                self._offer(item, now)
            elif type(item) is SessionEnded:
                if item.incarnation == self._incarnation:
                    self._end_session()
            elif type(item) is QueryAnswered:
                answer = item.answer
                stream = self._streams.get(answer.stream) if answer.stream is not None else None
                if stream is not None:
                    stream.on_missing_answer(answer.missing, now)
        for stream in self._streams.values():
            stream.poll(now)
        await self._drain()
        self._inbound.wake()
        self._rearm()

    def _offer(self, item: Admitted, now: float) -> None:
        if item.peer_incarnation != self._incarnation:
            self._new_session(item.peer_incarnation)
        stream = self._streams.get(item.stream)
        if stream is None:
            config = self._configs.get(item.stream, self._default)
            stream = StreamSequencer(config=config, first=item.stream_floor)
            self._streams[item.stream] = stream
        result = stream.offer(item.stream_seq, item.stream_floor, item, now)
        if result is OfferResult.ACCEPTED:
            return
        core = self._inbound.core
        if result is OfferResult.REFUSED_BUFFER_FULL:
            core.refuse(item.peer, item.peer_incarnation, item.seq, RetryReason.BUFFER_FULL)
        elif result is OfferResult.STREAM_FAILED:
            core.fail(
                item.peer, item.peer_incarnation, item.seq, ErrCode.GAP_FAILED, "stream failed"
            )
        else:
            # Late after a skip, stale, or a repeated stream number: the
            # sender already has (or gets now) a definite "not processed".
            core.fail(item.peer, item.peer_incarnation, item.seq, ErrCode.SKIPPED, result.name)

    def _new_session(self, incarnation: Incarnation) -> None:
        self._end_session()
        self._incarnation = incarnation

    def _end_session(self) -> None:
        """The peer's session ended: what its streams held is reported as a Gap."""
        self._incarnation = None
        core = self._inbound.core
        for name, stream in self._streams.items():
            lost = stream.end()
            for item in lost:
                # The core has ended that session already: nothing is sent,
                # but the bytes these messages held are given back.
                core.refuse(item.peer, item.peer_incarnation, item.seq, RetryReason.BUFFER_FULL)
            if lost:
                self._pending_gaps.append(
                    Gap(self._peer, name, lost[0].stream_seq, lost[-1].stream_seq, "session-ended")
                )
        self._streams = {}

    async def _drain(self) -> None:
        compute = self._compute
        inbound = self._inbound
        failed: StreamFailedError | None = None
        for gap in self._take_pending_gaps():
            if compute is not None:
                await compute.send(gap)
        for name, stream in list(self._streams.items()):
            for event in stream.take_events():
                if type(event) is Release:
                    item = event.item
                    if compute is None:
                        inbound.core.fail(
                            item.peer,
                            item.peer_incarnation,
                            item.seq,
                            ErrCode.NO_HANDLER,
                            "this node runs no compute actor",
                        )
                        continue
                    if item.items:
                        await self._hand_over_items(compute, item)
                        continue
                    delivery = _delivery(item)
                    completion = _Completion(inbound, item)
                    # Counted before the put: the actor may answer before
                    # a waiting put returns.
                    completion.track()
                    try:
                        try:
                            # No checkpoint per message: a whole batch reaches
                            # the compute mailbox before the compute actor runs.
                            compute.send_nowait(delivery, reply=completion)
                        except trio.WouldBlock:
                            await compute.send(delivery, reply=completion)
                    except BaseException:
                        completion.untrack()
                        raise
                elif type(event) is GapEvent:
                    if compute is not None:
                        await compute.send(
                            Gap(self._peer, name, event.first, event.last, event.reason.value)
                        )
                elif type(event) is AskMissing:
                    inbound.core.request(self._peer, name, event.missing, trio.current_time())
                elif type(event) is StreamFailed:
                    for item in event.undelivered:
                        inbound.core.fail(
                            item.peer,
                            item.peer_incarnation,
                            item.seq,
                            ErrCode.GAP_FAILED,
                            f"stream failed at {event.first_missing}",
                        )
                    if compute is not None:
                        await compute.send(
                            Gap(
                                self._peer,
                                name,
                                event.first_missing,
                                event.first_missing,
                                "stream-failed",
                            )
                        )
                    failed = failed or StreamFailedError(
                        self._peer, name, event.first_missing, event.reason.value
                    )
        if failed is not None:
            # Policy fail is an error for the supervisor too (OTP: let it
            # crash). Raised only now, when every event has been handed on;
            # on_stop answers what is still buffered, and the restarted
            # sequencer takes the stream up again from the sender's floor.
            raise failed

    async def _hand_over_items(self, compute: ActorRef[Any, Any], item: Admitted) -> None:
        """Put a batch's items in the compute mailbox as one entry, waiting for room."""
        deliveries, completion = _expand(self._inbound, item)
        completion.track()
        try:
            try:
                compute.send_items_nowait(deliveries, reply=completion)
            except trio.WouldBlock:
                await compute.send_items(deliveries, reply=completion)
        except BaseException as exc:
            completion.untrack()
            # None of the items reached the actor and none will: each gets its
            # ERR now, so the batch still gets its one final answer.
            stopped = exc if isinstance(exc, ActorStopped) else ActorStopped("compute", "stopped")
            for index in range(len(deliveries)):
                completion.fail_item(index, stopped)
            raise

    def _take_pending_gaps(self) -> list[Gap]:
        gaps, self._pending_gaps = self._pending_gaps, []
        return gaps

    def _rearm(self) -> None:
        deadlines = [d for s in self._streams.values() if (d := s.next_deadline()) is not None]
        at = min(deadlines, default=math.inf)
        if at != self._timer_at:
            self._timer_at = at
            if self._timer_scope is not None:
                self._timer_scope.cancel()

    async def _timer(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._timer_at) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            if scope.cancelled_caught and trio.current_time() >= self._timer_at:
                self._timer_at = math.inf
                # A busy mailbox is fine: its next message polls the timers too.
                with contextlib.suppress(trio.WouldBlock):
                    self.ref.send_nowait([_TICK])

    def statistics(self) -> dict[StreamId, SequencerStatistics]:
        """Per-stream sequencer counters for this peer."""
        return {name: s.statistics() for name, s in self._streams.items()}
