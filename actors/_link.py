"""The sending side of one peer link: a supervised actor around ``LinkSender``.

The protocol state (sequence numbers, in-flight messages, retry timers,
credit) lives in a :class:`LinkSender` owned by the node, not by the actor:
when the actor crashes and its supervisor restarts it, the new instance opens
a fresh DEALER and carries on with the same pending messages. Callers never
notice beyond a short pause.

One task owns the DEALER and does all per-message bookkeeping inline
(design.md §5: a Trio task hop costs tens of µs); other tasks only touch the
pure ``LinkSender`` and call :meth:`Socket.wake`.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

import trio
from trio_util import AsyncValue

from transport import (
    Incarnation,
    Limits,
    LinkSender,
    LinkSeq,
    LocalProtocolError,
    Network,
    NodeId,
    Payload,
    PeerState,
    RemoteProtocolError,
    SenderConfig,
    SenderStatistics,
    SocketLike,
    StreamId,
    StreamSeq,
    check_payload,
    decode,
    encode,
)
from transport.events import (
    Answered,
    GaveUp,
    Held,
    PeerRestarted,
    PeerStateChanged,
)
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
)
from transport.testing import (
    FaultInjector,
    FaultPlan,
    FaultStatistics,
)

from ._actor import Actor
from ._errors import NodeClosed
from ._outcomes import Ack, DeliveryFailed, PeerError

#: Incoming ZeroMQ messages handled per wake before the owner task yields,
#: so one busy link cannot starve the rest of the node.
_RECV_BUDGET = 256

#: Messages kept while the DEALER cannot send (no connection yet).
_PENDING_MAX = 32


class _Handle:
    """What a send and a batch send have in common: where it goes, and one final outcome."""

    __slots__ = (
        "_done",
        "_error",
        "_event",
        "_link",
        "_value",
        "attempts",
        "deadline",
        "held",
        "peer",
        "sent_at",
        "seq",
        "stream",
        "stream_seq",
    )

    def __init__(
        self,
        peer: NodeId,
        seq: LinkSeq,
        stream: StreamId,
        stream_seq: StreamSeq,
        sent_at: float,
        deadline: float = math.inf,
        link: LinkState | None = None,
    ) -> None:
        self.peer = peer
        self.seq = seq
        self.stream = stream
        self.stream_seq = stream_seq
        self.sent_at = sent_at
        #: When the send gives up (trio time); ``link`` enforces it while no
        #: owner task runs the link's timers.
        self.deadline = deadline
        self._link = link
        self.attempts = 0
        self.held = False
        self._done = False
        # Made by the first wait() that has to sleep: most handles of a busy
        # link are settled before anyone awaits them, and a trio.Event per
        # message (made, then set) was a measurable share of the sender's CPU.
        self._event: trio.Event | None = None
        self._value: Any = None
        self._error: PeerError | DeliveryFailed | None = None

    @property
    def done(self) -> bool:
        """Whether the outcome is known."""
        return self._done

    async def _wait_value(self) -> Any:
        """Wait until settled; the value, or raise the error."""
        if self._done:
            await trio.lowlevel.checkpoint()
        while not self._done:
            link = self._link
            if link is None or link.socket is not None or link.closed:
                # The owner task runs the core's timers (or the close
                # settles every handle): the deadline needs no timer here.
                await self._sleep()
                continue
            # The link's actor is being restarted (after a crash, with the
            # supervisor's backoff): nobody runs the core's timers, so the
            # waiter keeps its own deadline. Only here: a cancel scope per
            # wait cost 17-22 us on the normal path (measured, under load).
            with trio.move_on_at(self.deadline):
                await self._sleep()
            if not self._done and trio.current_time() >= self.deadline:
                link.expire(trio.current_time())
                if not self._done:
                    # The core holds a later deadline than this handle (it
                    # should not): its timer ends the send, not a busy loop.
                    await self._sleep()
        if self._error is not None:
            raise self._error
        return self._value

    async def _sleep(self) -> None:
        """Sleep until settled, or until :meth:`_nudge` (the link's owner left)."""
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()

    def _nudge(self) -> None:
        """Wake the waiters to look at the link again, without settling anything."""
        if self._event is not None:
            self._event.set()
            self._event = None

    def _give_up(self, reason: str) -> None:
        """End the send with :class:`DeliveryFailed` for ``reason``."""
        self._settle(
            None, DeliveryFailed(peer=self.peer, seq=self.seq, reason=reason, held=self.held)
        )

    def _settle(self, value: Any, error: PeerError | DeliveryFailed | None) -> None:
        self._value = value
        self._error = error
        self._done = True
        if self._event is not None:
            self._event.set()


class SendHandle(_Handle):
    """The pending outcome of one send; ``await handle.wait()`` for it.

    Attributes:
        peer: where it goes; seq: its link sequence number (its message id);
        stream / stream_seq: its place in its stream.
    """

    __slots__ = ()

    async def wait(self) -> Ack:
        """Wait for the final outcome.

        Returns:
            The peer's :class:`Ack`.

        Raises:
            PeerError: the peer answered ERR.
            DeliveryFailed: no final answer before the deadline.
        """
        result: Ack = await self._wait_value()
        return result


class BatchHandle(_Handle):
    """The pending outcomes of one batch send; ``await handle.wait()`` for them.

    The batch travels as one protocol message, so it has one ``seq`` and one
    ``stream_seq``, and it fails (:class:`DeliveryFailed`) as a whole; but each
    item has its own final outcome, :class:`Ack` or :class:`PeerError`.

    Attributes:
        peer: where it goes; seq: its link sequence number (shared by its
        items); stream / stream_seq: its place in its stream; count: how many
        items it holds.
    """

    __slots__ = ("count",)

    def __init__(
        self,
        peer: NodeId,
        seq: LinkSeq,
        stream: StreamId,
        stream_seq: StreamSeq,
        sent_at: float,
        count: int,
        deadline: float = math.inf,
        link: LinkState | None = None,
    ) -> None:
        super().__init__(peer, seq, stream, stream_seq, sent_at, deadline, link)
        self.count = count

    async def wait(self) -> list[Ack | PeerError]:
        """Wait for the final outcome of every item.

        Returns:
            One outcome per item, in item order: the peer's :class:`Ack` (with
            that item's result) or a :class:`PeerError` (that item's ERR).

        Raises:
            DeliveryFailed: no final answer for the batch before its deadline.
        """
        outcomes: list[Ack | PeerError] = await self._wait_value()
        return list(outcomes)

    def _answered(self, answer: AckFrame | AckRange | AckItems | ErrFrame, now: float) -> None:
        """Settle every item from the peer's final answer to the batch."""
        peer = self.peer
        seq = self.seq
        outcomes: list[Ack | PeerError]
        if type(answer) is ErrFrame:
            # The whole batch was refused: the same ERR stands for each item.
            error = PeerError(peer=peer, seq=seq, code=answer.code, detail=answer.detail)
            outcomes = [error] * self.count
        else:
            rtt = now - self.sent_at
            stream = self.stream
            stream_seq = self.stream_seq
            attempts = self.attempts
            if type(answer) is AckItems:
                outcomes = []
                plain: Ack | None = None
                for item in answer.outcomes:
                    if isinstance(item, ItemAck):
                        if item.result is None:
                            if plain is None:
                                plain = Ack(peer, seq, stream, stream_seq, None, rtt, attempts)
                            outcomes.append(plain)
                        else:
                            outcomes.append(
                                Ack(peer, seq, stream, stream_seq, item.result, rtt, attempts)
                            )
                    else:
                        outcomes.append(
                            PeerError(peer=peer, seq=seq, code=item.code, detail=item.detail)
                        )
                if len(outcomes) != self.count:
                    # A peer that answers a different number of items broke
                    # the protocol; its answer cannot be matched to our items.
                    self._give_up(
                        f"the peer answered {len(outcomes)} outcomes for {self.count} items"
                    )
                    return
            else:
                if type(answer) is AckFrame and answer.result is not None:
                    # A batch's plain ACK means "no result for any item"
                    # (protocol.md §1); one result cannot be matched to items.
                    self._give_up("the peer answered a batch with a result on a plain ACK")
                    return
                # An ACK without a result for every item: one shared value, as
                # the items' Acks are equal field for field.
                ack = Ack(peer, seq, stream, stream_seq, None, rtt, attempts)
                outcomes = [ack] * self.count
        self._settle(outcomes, None)


@dataclass(frozen=True, slots=True)
class LinkStatistics:
    """One link's counters: the protocol's, plus what the shell saw."""

    peer: NodeId
    state: PeerState
    protocol: SenderStatistics
    waiting_for_window: int
    bad_frames: int
    socket_full: int
    #: What this node's fault injection did to the link (all zero unless
    #: NodeConfig.faults is set).
    faults: FaultStatistics


class LinkState:
    """Everything about a link that outlives a crash of its actor."""

    def __init__(
        self,
        node: NodeId,
        incarnation: Incarnation,
        peer: NodeId,
        endpoint: str,
        *,
        config: SenderConfig,
        faults: FaultPlan,
        limits: Limits,
        seed: int,
    ) -> None:
        self.node = node
        self.peer = peer
        self.endpoint = endpoint
        self.limits = limits
        self.send_timeout = config.send_timeout
        #: Set once by :meth:`close`, when the node's block ends; never cleared.
        self.closed = False
        rng = random.Random(f"{seed}:{node}->{peer}")
        self.core = LinkSender(
            node, incarnation, peer, now=trio.current_time(), rng=rng.random, config=config
        )
        self.faults: FaultInjector[list[Any]] = FaultInjector(faults, salt=f"{node}->{peer}")
        self._inject = faults.active
        self.handles: dict[LinkSeq, SendHandle | BatchHandle] = {}
        self.window = trio.lowlevel.ParkingLot()
        self.state = AsyncValue(PeerState.SUSPECT)
        self.socket: SocketLike | None = None
        #: Messages the DEALER refused (no connection yet), oldest first.
        self.pending: deque[list[Any]] = deque(maxlen=_PENDING_MAX)
        #: The owner's timer while it serves: a send from another task moves
        #: its deadline forward when the core's next deadline comes sooner.
        self.timer: trio.CancelScope | None = None
        self.bad_frames = 0
        self.socket_full = 0

    def wake(self) -> None:
        """Ask the owner task to look at the core again (new sends, changes)."""
        if self.socket is not None:
            self.socket.wake()

    def push(self, now: float) -> None:
        """Put what the core has to send on the wire now, from the caller's task.

        Only for a lone message (nothing else in flight on the link): the
        caller's task sends it rather than waking the owner task to send it,
        which saves the owner's trip through Trio's I/O manager and an
        eventfd write and read per sparse message (docs/performance.md,
        Grid). While messages stream, the owner sends them, several to a
        Batch message. The owner stays the only task that waits on the
        socket, and is woken when this leaves it work: a message the DEALER
        refused, or injected faults (held messages run on its timer). Its
        retry timer is moved forward when the core's next deadline is sooner.
        """
        # Cheapest test first: while messages stream, the owner sends them,
        # several to a Batch message, and this costs one comparison.
        if self.core.in_flight > 1:
            self.wake()
            return
        sock = self.socket
        timer = self.timer
        if sock is None or timer is None or self.pending or self._inject:
            self.wake()
            return
        self.transmit(sock, now)
        if self.pending:
            self.wake()
            return
        self.dispatch()
        deadline = self.core.next_deadline()
        if deadline is not None and deadline < timer.deadline:
            timer.deadline = deadline

    def transmit(self, sock: SocketLike, now: float) -> None:
        """Send every frame the core has ready, several in one Batch message."""
        core = self.core
        faults = self.faults
        while True:
            frames = core.frames_to_send(now)
            if not frames:
                return
            self._count_attempts(frames)
            for wire in _encode_fitting(frames, self.limits):
                if self._inject:
                    for message in faults.submit(wire, now):
                        self.send(sock, message)
                else:
                    self.send(sock, wire)

    def send(self, sock: SocketLike, parts: list[Any]) -> None:
        """Send one message, behind any the DEALER refused before."""
        if self.pending:
            self.pending.append(parts)
            return
        try:
            sock.send_multipart_nowait(parts)
        except trio.WouldBlock:
            # Not connected yet (IMMEDIATE) or the peer stopped reading. Keep
            # the newest few to go the moment the connection is up, so the
            # first sends do not wait for a retry timer; older ones fall off
            # the deque, and the protocol's retransmission covers them.
            self.socket_full += 1
            self.pending.append(parts)

    def dispatch(self) -> None:
        """Settle the handles, peer state and window by the core's events."""
        events = self.core.take_events()
        if not events:
            return
        handles = self.handles
        now = trio.current_time()
        freed = False
        for event in events:
            if type(event) is Answered:
                handle = handles.pop(event.seq, None)
                freed = True
                if handle is None:
                    continue
                answer = event.answer
                if type(handle) is BatchHandle:
                    handle._answered(answer, now)
                    continue
                assert type(handle) is SendHandle
                if type(answer) is AckItems:
                    # Per-item outcomes for a message sent alone: the peer
                    # broke the protocol, and no outcome can be trusted.
                    handle._give_up("the peer answered a single message with ACK_ITEMS")
                elif type(answer) is ErrFrame:
                    handle._settle(
                        None,
                        PeerError(
                            peer=handle.peer, seq=handle.seq, code=answer.code, detail=answer.detail
                        ),
                    )
                else:
                    handle._settle(
                        Ack(
                            peer=handle.peer,
                            seq=handle.seq,
                            stream=handle.stream,
                            stream_seq=handle.stream_seq,
                            # An AckRange is an ACK without a result.
                            result=answer.result if type(answer) is AckFrame else None,
                            rtt=now - handle.sent_at,
                            attempts=handle.attempts,
                        ),
                        None,
                    )
            elif type(event) is GaveUp:
                handle = handles.pop(event.seq, None)
                freed = True
                if handle is not None:
                    # The deadline, or a peer of another protocol version (§5.7).
                    handle._give_up(event.reason)
            elif type(event) is PeerStateChanged:
                self.state.value = event.new
            elif type(event) is Held:
                handle = handles.get(event.seq)
                if handle is not None:
                    handle.held = True
            elif type(event) is PeerRestarted:
                # Whatever the old incarnation held is gone with it; the core
                # is resending those messages to the new one.
                for handle in handles.values():
                    handle.held = False
        if freed and self.core.window_open():
            self.window.unpark_all()

    def _count_attempts(self, frames: list[Frame]) -> None:
        handles = self.handles
        for frame in frames:
            if type(frame) is Data or type(frame) is DataItems:
                handle = handles.get(frame.seq)
                if handle is not None:
                    handle.attempts += 1

    def submit(
        self, stream: StreamId, payload: Payload, frame_no: int | None, deadline: float | None
    ) -> SendHandle:
        """Hand one message to the core; raises ``trio.WouldBlock`` if the window is closed."""
        core = self.core
        if not core.window_open():
            raise trio.WouldBlock
        # A payload no peer could take fails this call, not the link later.
        check_payload(payload, self.limits)
        now = trio.current_time()
        seq = core.send(stream, payload, now=now, deadline=deadline, frame_no=frame_no)
        handle = SendHandle(
            self.peer,
            seq,
            stream,
            core.stream_seq_of(seq),
            now,
            # Positional: keywords cost about 250 ns more per send (measured).
            now + self.send_timeout if deadline is None else deadline,
            self,
        )
        self.handles[seq] = handle
        if core.peer_version is not None:
            # The peer speaks another protocol version (protocol.md §5.7): the
            # core gives it up on its next step; settle it now, not on a wake.
            core.poll(now)
            self.dispatch()
        self.push(now)
        return handle

    def check_batch_size(self, count: int) -> None:
        """Raise LocalProtocolError unless a batch of ``count`` items can be sent."""
        if not 1 <= count <= self.limits.max_items:
            raise LocalProtocolError(
                f"a batch holds 1 to Limits.max_items={self.limits.max_items} items, got {count}"
            )

    def submit_items(
        self,
        stream: StreamId,
        items: tuple[Payload, ...],
        frame_no: int | None,
        deadline: float | None,
    ) -> BatchHandle:
        """Hand a batch to the core as one message; raises ``trio.WouldBlock`` like submit."""
        count = len(items)
        self.check_batch_size(count)
        core = self.core
        if not core.window_open():
            raise trio.WouldBlock
        check_payload(items, self.limits, items=True)
        now = trio.current_time()
        seq = core.send_items(stream, items, now=now, deadline=deadline, frame_no=frame_no)
        handle = BatchHandle(
            self.peer,
            seq,
            stream,
            core.stream_seq_of(seq),
            now,
            count,
            now + self.send_timeout if deadline is None else deadline,
            self,
        )
        self.handles[seq] = handle
        if core.peer_version is not None:
            # The peer speaks another protocol version (protocol.md §5.7): the
            # core gives it up on its next step; settle it now, not on a wake.
            core.poll(now)
            self.dispatch()
        self.push(now)
        return handle

    async def wait_window(self) -> None:
        """Wait until the core accepts a new message; NodeClosed once the node closed."""
        while not self.core.window_open():
            if self.closed:
                raise NodeClosed(self.node)
            await self.window.park()
        if self.closed:
            raise NodeClosed(self.node)

    def expire(self, now: float) -> None:
        """Run the core's timers from a waiting task: the owner is away (restarting)."""
        self.core.poll(now)
        self.dispatch()

    def owner_left(self) -> None:
        """The owner task ended: wake every waiting handle to keep its own deadline."""
        for handle in self.handles.values():
            handle._nudge()

    def close(self) -> None:
        """The node is closing: every unanswered send ends now, and so does every wait.

        Nobody will poll the core again, so a handle left pending would wait
        forever, whatever its deadline: it ends with DeliveryFailed, and a
        task parked for the window wakes to NodeClosed.
        """
        self.closed = True
        for handle in self.handles.values():
            if not handle.done:
                handle._give_up("the sending node shut down")
        self.handles.clear()
        self.window.unpark_all()

    def statistics(self) -> LinkStatistics:
        """A snapshot of this link."""
        return LinkStatistics(
            peer=self.peer,
            state=self.state.value,
            protocol=self.core.statistics(),
            waiting_for_window=self.window.statistics().tasks_waiting,
            bad_frames=self.bad_frames,
            socket_full=self.socket_full,
            faults=self.faults.statistics(),
        )


class PeerLink(Actor[Any, Any]):
    """The actor that drives one :class:`LinkState` over a DEALER socket."""

    def __init__(self, state: LinkState, network: Network, routing_id: bytes) -> None:
        self._state = state
        self._network = network
        self._routing_id = routing_id
        # A new instance has a new socket: what the last one could not send
        # is the protocol's to resend, not this socket's to deliver late.
        state.pending.clear()

    async def on_start(self) -> None:
        self.nursery.start_soon(self._own_socket)

    async def receive(self, msg: Any) -> Any:
        """Links take no messages: sends go straight into the protocol core."""
        raise TypeError(f"PeerLink takes no messages, got {msg!r}")

    async def _own_socket(self) -> None:
        st = self._state
        sock = self._network.dealer(self._routing_id, peer=st.peer)
        try:
            sock.connect(st.endpoint)
            st.socket = sock
            await self._serve(st, sock)
        finally:
            st.socket = None
            st.timer = None
            sock.close()
            st.owner_left()

    async def _serve(self, st: LinkState, sock: SocketLike) -> None:
        core = st.core
        limits = st.limits
        faults = st.faults
        inject = faults.active
        pending = st.pending
        while True:
            # One cancel scope serves every wait until its timer fires: moving
            # its deadline (only when it changed) costs less than entering and
            # leaving a fresh move_on_at per wait, and with messages in flight
            # there is always a retry timer, so every sparse message paid one.
            with trio.CancelScope() as timer:
                st.timer = timer
                while True:
                    now = trio.current_time()
                    while pending:
                        try:
                            sock.send_multipart_nowait(pending[0])
                        except trio.WouldBlock:
                            break
                        pending.popleft()
                    for _ in range(_RECV_BUDGET):
                        try:
                            parts = sock.recv_multipart_nowait()
                        except trio.WouldBlock:
                            break
                        try:
                            frame = decode(parts, limits)
                        except RemoteProtocolError:
                            st.bad_frames += 1
                            continue
                        # The core unpacks a Batch itself (and refuses nested ones).
                        core.receive_frame(frame, now)
                    core.poll(now)
                    st.dispatch()
                    st.transmit(sock, now)
                    if inject:
                        for message in faults.due(now):
                            st.send(sock, message)
                    deadline = core.next_deadline()
                    if inject:
                        held = faults.next_deadline()
                        if held is not None:
                            deadline = held if deadline is None else min(deadline, held)
                    # A poll can settle sends (give-ups) and free window: dispatch again.
                    st.dispatch()
                    target = math.inf if deadline is None else deadline
                    if timer.deadline != target:
                        timer.deadline = target
                    await sock.wait_ready(writable=bool(pending))


def _encode_fitting(frames: list[Frame], limits: Limits) -> list[list[Any]]:
    """``frames`` as one message, or, when together they are over ``limits``, halves of them.

    Each frame fits alone (every payload was checked at submit), but a wake-up's
    batch of them may not fit the peer's header limit (64 KiB by default):
    a batch of 128 DATA of 4 KiB inline payloads is 512 KiB. The order of
    the frames is kept.
    """
    out: Frame = frames[0] if len(frames) == 1 else Batch(tuple(frames))
    try:
        return [encode(out, limits=limits)]
    except LocalProtocolError:
        if len(frames) == 1:
            raise
    half = len(frames) // 2
    return _encode_fitting(frames[:half], limits) + _encode_fitting(frames[half:], limits)
