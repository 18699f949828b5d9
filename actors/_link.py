"""The sending side of one peer link: the PeerLink actor around ``LinkSender``.

PeerLink is a synchronous actor (actors/_dispatch.py): ``Node.send_nowait``
posts it a :class:`Submit` and gets the :class:`SendHandle` back at once; the
node's I/O task flushes its frames to the DEALER it owns, hands it what the
DEALER receives, and runs its timers. The protocol state (sequence numbers,
in-flight messages, retry timers, credit) is the actor's and outlives the I/O
task: when that crashes and is restarted, a fresh DEALER carries on with the
same pending messages. Callers never notice beyond a short pause.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

import trio
from trio_util import AsyncValue

from transport import (
    Incarnation,
    Limits,
    LinkSender,
    LinkSeq,
    LocalProtocolError,
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

from ._dispatch import Attached, Detached, Input
from ._errors import NodeClosed
from ._outcomes import Ack, DeliveryFailed, PeerError

if TYPE_CHECKING:
    from ._dispatch import Dispatcher

log = logging.getLogger("cellmesh.link")

#: Messages kept while the DEALER cannot send (no connection yet).
_PENDING_MAX = 32

#: ``wait_window`` yields once this many messages wait to be flushed. 64:
#: the compute actor's run (actors/_actor.py _DRAIN_RUN), so a BATCH is
#: about what the far side takes and answers in one go.
_FLUSH_EVERY = 64


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
        link: PeerLink | None = None,
    ) -> None:
        self.peer = peer
        self.seq = seq
        self.stream = stream
        self.stream_seq = stream_seq
        self.sent_at = sent_at
        #: When the send gives up (trio time); the waiter enforces it while
        #: no I/O task runs the link's timers.
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
            if link is None or link.attached or link.closed:
                # The I/O task runs the core's timers (or the close
                # settles every handle): the deadline needs no timer here.
                await self._sleep()
                continue
            # The node's I/O task is being restarted (after a crash, with the
            # supervisor's backoff): nobody runs the core's timers, so the
            # waiter keeps its own deadline. Only here: a cancel scope per
            # wait cost 17-22 us on the normal path (measured, under load).
            with trio.move_on_at(self.deadline):
                await self._sleep()
            if not self._done and trio.current_time() >= self.deadline:
                link.handle(Expire(), trio.current_time())
                if not self._done:
                    # The core holds a later deadline than this handle (it
                    # should not): its timer ends the send, not a busy loop.
                    await self._sleep()
        if self._error is not None:
            raise self._error
        return self._value

    async def _sleep(self) -> None:
        """Sleep until settled, or until :meth:`_nudge` (the I/O task left)."""
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()

    def _nudge(self) -> None:
        """Wake the waiters to look at the link again, without settling anything."""
        if self._event is not None:
            self._event.set()
            self._event = None

    def _give_up(self, reason: str, down_for: float | None = None) -> None:
        """End the send with :class:`DeliveryFailed` for ``reason``."""
        error = DeliveryFailed(
            peer=self.peer, seq=self.seq, reason=reason, held=self.held, down_for=down_for
        )
        self._settle(None, error)

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
        link: PeerLink | None = None,
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


@dataclass(frozen=True, slots=True)
class Submit:
    """Send one message (``Node.send_nowait``); answered with its :class:`SendHandle`."""

    stream: StreamId
    payload: Payload
    frame_no: int | None
    deadline: float | None


@dataclass(frozen=True, slots=True)
class SubmitItems:
    """Send a batch as one message (``Node.send_batch_nowait``); answered with a BatchHandle."""

    stream: StreamId
    items: tuple[Payload, ...]
    frame_no: int | None
    deadline: float | None


@dataclass(frozen=True, slots=True)
class Expire:
    """A waiting handle's deadline passed while no I/O task runs the link's timers."""


@dataclass(frozen=True, slots=True)
class Close:
    """The node is closing: every unanswered send ends, and every wait."""


#: Every message a PeerLink takes.
LinkMessage = Submit | SubmitItems | Expire | Close | Input | Attached | Detached


class PeerLink:
    """The actor of one outgoing link: its LinkSender core, its handles, its DEALER queue.

    Synchronous (actors/_dispatch.py): :meth:`handle` runs on the
    posting task and never awaits; only the node's I/O task calls
    :meth:`flush` and :meth:`poll`, with the DEALER it owns. Everything here
    is private to the actor; others read :meth:`statistics`, :attr:`state`
    and wait with :meth:`wait_window`.
    """

    def __init__(
        self,
        node: NodeId,
        incarnation: Incarnation,
        peer: NodeId,
        endpoint: str,
        dispatcher: Dispatcher,
        *,
        config: SenderConfig,
        faults: FaultPlan,
        limits: Limits,
        seed: int,
    ) -> None:
        self._node = node
        self._peer = peer
        self._endpoint = endpoint
        self._dispatcher = dispatcher
        self._limits = limits
        self._send_timeout = config.send_timeout
        self._closed = False
        self._attached = False
        rng = random.Random(f"{seed}:{node}->{peer}")
        self._core = LinkSender(
            node, incarnation, peer, now=trio.current_time(), rng=rng.random, config=config
        )
        self._faults: FaultInjector[list[Any]] = FaultInjector(faults, salt=f"{node}->{peer}")
        self._inject = faults.active
        self._handles: dict[LinkSeq, SendHandle | BatchHandle] = {}
        self._window = trio.lowlevel.ParkingLot()
        self._state = AsyncValue(PeerState.SUSPECT)
        #: Messages the DEALER refused (no connection yet), oldest first.
        self._pending: deque[list[Any]] = deque(maxlen=_PENDING_MAX)
        self._bad_frames = 0
        self._socket_full = 0
        #: Messages (batch items count each) accepted since the last flush.
        self._unflushed = 0

    # -- read-only views ----------------------------------------------------

    @property
    def peer(self) -> NodeId:
        """The node this link sends to."""
        return self._peer

    @property
    def endpoint(self) -> str:
        """The peer's endpoint."""
        return self._endpoint

    @property
    def state(self) -> AsyncValue[PeerState]:
        """The peer's liveness as this link sees it (read it, wait on it; never set it)."""
        return self._state

    @property
    def attached(self) -> bool:
        """Whether an I/O task serves this link now (runs its timers)."""
        return self._attached

    @property
    def closed(self) -> bool:
        """Whether the node closed this link."""
        return self._closed

    @property
    def wants_write(self) -> bool:
        """Whether the DEALER refused messages that wait for it to be writable."""
        return bool(self._pending)

    def check_batch_size(self, count: int) -> None:
        """Raise LocalProtocolError unless a batch of ``count`` items can be sent."""
        if not 1 <= count <= self._limits.max_items:
            raise LocalProtocolError(
                f"a batch holds 1 to Limits.max_items={self._limits.max_items} items, got {count}"
            )

    def accepts_now(self) -> bool:
        """Whether :meth:`wait_window` would return at once, without a checkpoint."""
        return not self._closed and self._unflushed < _FLUSH_EVERY and self._core.window_open()

    async def wait_window(self) -> None:
        """Wait until the core accepts a new message; NodeClosed once the node closed."""
        if self._unflushed >= _FLUSH_EVERY:
            # A producer with an open window never yields, so without this
            # the I/O task would send nothing until the window shut: the
            # receiver would idle while the window filled, and this side
            # while it drained (stop-and-go). Yielding every _FLUSH_EVERY
            # messages lets them go as one BATCH and keeps both busy.
            await trio.lowlevel.checkpoint()
        while not self._core.window_open():
            if self._closed:
                raise NodeClosed(self._node)
            await self._window.park()
        if self._closed:
            raise NodeClosed(self._node)

    def next_deadline(self) -> float:
        """When :meth:`poll` must run next: the core's timers, and held fault copies."""
        core = self._core.next_deadline()
        deadline = math.inf if core is None else core
        if self._inject:
            held = self._faults.next_deadline()
            if held is not None and held < deadline:
                return held
        return deadline

    def statistics(self) -> LinkStatistics:
        """A snapshot of this link."""
        return LinkStatistics(
            peer=self._peer,
            state=self._state.value,
            protocol=self._core.statistics(),
            waiting_for_window=self._window.statistics().tasks_waiting,
            bad_frames=self._bad_frames,
            socket_full=self._socket_full,
            faults=self._faults.statistics(),
        )

    # -- the actor ------------------------------------------------------------

    @overload
    def handle(self, msg: Submit, now: float) -> SendHandle: ...
    @overload
    def handle(self, msg: SubmitItems, now: float) -> BatchHandle: ...
    @overload
    def handle(self, msg: Expire | Close | Input | Attached | Detached, now: float) -> None: ...
    def handle(self, msg: LinkMessage, now: float) -> SendHandle | BatchHandle | None:
        """Handle one message, synchronously; ``Submit``/``SubmitItems`` answer with the handle.

        Raises:
            trio.WouldBlock: (Submit) the link's window is shut.
            LocalProtocolError: (Submit) a payload no peer could take.
        """
        kind = type(msg)
        if kind is Input:
            assert isinstance(msg, Input)
            self._on_input(msg.parts, now)
            return None
        if kind is Submit:
            assert isinstance(msg, Submit)
            return self._submit(msg, now)
        if kind is SubmitItems:
            assert isinstance(msg, SubmitItems)
            return self._submit_items(msg, now)
        if kind is Expire:
            self.poll(now)
        elif kind is Close:
            self._close()
        elif kind is Attached:
            # A new socket: what the last one could not send is the
            # protocol's to resend, not this socket's to deliver late.
            self._pending.clear()
            self._attached = True
        elif kind is Detached:
            self._attached = False
            # Every waiting handle keeps its own deadline until a new I/O task comes.
            for handle in self._handles.values():
                handle._nudge()
        return None

    def poll(self, now: float) -> None:
        """Run the core's timers (retries, liveness, deadlines) and settle what they ended."""
        self._core.poll(now)
        self._settle_events(now)
        self._dispatcher.wake(self)

    def flush(self, sock: SocketLike, now: float) -> bool:
        """Send what the DEALER refused before, then every frame the core has ready.

        Returns:
            Whether it may have called the socket (its fd's edge may be eaten).
        """
        self._unflushed = 0
        pending = self._pending
        called = bool(pending) or self._inject
        while pending:
            try:
                sock.send_multipart_nowait(pending[0])
            except trio.WouldBlock:
                break
            pending.popleft()
        core = self._core
        faults = self._faults
        while True:
            frames = core.frames_to_send(now)
            if not frames:
                break
            called = True
            self._count_attempts(frames)
            for wire in _encode_fitting(frames, self._limits):
                if self._inject:
                    for message in faults.submit(wire, now):
                        self._send(sock, message)
                else:
                    self._send(sock, wire)
        if self._inject:
            for message in faults.due(now):
                self._send(sock, message)
        return called

    # -- behaviour --------------------------------------------------------------

    def _on_input(self, parts: list[Any], now: float) -> None:
        try:
            frame = decode(parts, self._limits)
        except RemoteProtocolError:
            self._bad_frames += 1
            return
        # The core unpacks a Batch itself (and refuses nested ones).
        self._core.receive_frame(frame, now)
        self._settle_events(now)
        self._dispatcher.wake(self)

    def _submit(self, msg: Submit, now: float) -> SendHandle:
        core = self._core
        if not core.window_open():
            raise trio.WouldBlock
        # A payload no peer could take fails this call, not the link later.
        check_payload(msg.payload, self._limits)
        deadline = msg.deadline
        seq = core.send(msg.stream, msg.payload, now=now, deadline=deadline, frame_no=msg.frame_no)
        handle = SendHandle(
            self._peer,
            seq,
            msg.stream,
            core.stream_seq_of(seq),
            now,
            # Positional: keywords cost about 250 ns more per send (measured).
            now + self._send_timeout if deadline is None else deadline,
            self,
        )
        self._unflushed += 1
        self._accepted(seq, handle, now)
        return handle

    def _submit_items(self, msg: SubmitItems, now: float) -> BatchHandle:
        items = msg.items
        count = len(items)
        self.check_batch_size(count)
        core = self._core
        if not core.window_open():
            raise trio.WouldBlock
        check_payload(items, self._limits, items=True)
        deadline = msg.deadline
        seq = core.send_items(msg.stream, items, now=now, deadline=deadline, frame_no=msg.frame_no)
        handle = BatchHandle(
            self._peer,
            seq,
            msg.stream,
            core.stream_seq_of(seq),
            now,
            count,
            now + self._send_timeout if deadline is None else deadline,
            self,
        )
        self._unflushed += count
        self._accepted(seq, handle, now)
        return handle

    def _accepted(self, seq: LinkSeq, handle: SendHandle | BatchHandle, now: float) -> None:
        self._handles[seq] = handle
        core = self._core
        if core.peer_version is not None or core.peer_state is PeerState.LOST:
            # The peer speaks another protocol version (protocol.md §5.7) or
            # is LOST (§5.6): the core gives the message up on its next step;
            # settle it now, not on a wake.
            core.poll(now)
            self._settle_events(now)
        self._dispatcher.wake(self)

    def _send(self, sock: SocketLike, parts: list[Any]) -> None:
        """Send one message, behind any the DEALER refused before."""
        if self._pending:
            self._pending.append(parts)
            return
        try:
            sock.send_multipart_nowait(parts)
        except trio.WouldBlock:
            # Not connected yet (IMMEDIATE) or the peer stopped reading. Keep
            # the newest few to go the moment the connection is up, so the
            # first sends do not wait for a retry timer; older ones fall off
            # the deque, and the protocol's retransmission covers them.
            self._socket_full += 1
            self._pending.append(parts)

    def _settle_events(self, now: float) -> None:
        """Settle the handles, peer state and window by the core's events."""
        events = self._core.take_events()
        if not events:
            return
        handles = self._handles
        freed = False
        for event in events:
            if type(event) is Answered:
                handle = handles.pop(event.seq, None)
                freed = True
                if handle is not None:
                    _answer(handle, event.answer, now)
            elif type(event) is GaveUp:
                handle = handles.pop(event.seq, None)
                freed = True
                if handle is not None:
                    # The deadline, a LOST peer (§5.6) or another protocol version (§5.7).
                    handle._give_up(event.reason, event.down_for)
            elif type(event) is PeerStateChanged:
                self._state.value = event.new
                _log_state(self._node, self._peer, event.new)
            elif type(event) is Held:
                handle = handles.get(event.seq)
                if handle is not None:
                    handle.held = True
            elif type(event) is PeerRestarted:
                # Whatever the old incarnation held is gone with it; the core
                # is resending those messages to the new one.
                for handle in handles.values():
                    handle.held = False
        if freed and self._core.window_open():
            self._window.unpark_all()

    def _count_attempts(self, frames: list[Frame]) -> None:
        handles = self._handles
        for frame in frames:
            if type(frame) is Data or type(frame) is DataItems:
                handle = handles.get(frame.seq)
                if handle is not None:
                    handle.attempts += 1

    def _close(self) -> None:
        """Nobody will poll the core again: every pending handle ends, every wait wakes."""
        self._closed = True
        for handle in self._handles.values():
            if not handle.done:
                handle._give_up("the sending node shut down")
        self._handles.clear()
        self._window.unpark_all()


def _log_state(node: NodeId, peer: NodeId, state: PeerState) -> None:
    """Say a liveness change on ``cellmesh.link``: a lost peer is a warning."""
    if state is PeerState.LOST:
        log.warning(
            "node %s: peer %s is LOST (DOWN past SenderConfig.lost_grace); "
            "sends to it fail until it is heard again",
            node,
            peer,
        )
    else:
        log.info("node %s: peer %s is %s", node, peer, state.name)


def _answer(
    handle: SendHandle | BatchHandle, answer: AckFrame | AckRange | AckItems | ErrFrame, now: float
) -> None:
    """Settle ``handle`` by the peer's final answer."""
    if type(handle) is BatchHandle:
        handle._answered(answer, now)
        return
    if type(answer) is AckItems:
        # Per-item outcomes for a message sent alone: the peer
        # broke the protocol, and no outcome can be trusted.
        handle._give_up("the peer answered a single message with ACK_ITEMS")
    elif type(answer) is ErrFrame:
        handle._settle(
            None,
            PeerError(peer=handle.peer, seq=handle.seq, code=answer.code, detail=answer.detail),
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
