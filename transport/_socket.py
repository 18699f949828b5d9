"""ZeroMQ sockets driven from Trio, without threads.

A pyzmq socket made from a plain (synchronous) ``zmq.Context`` is wrapped so
that one Trio task, the socket's *owner*, can drive it:

* ``recv_multipart_nowait`` / ``send_multipart_nowait`` never block and raise
  :class:`trio.WouldBlock` when libzmq has nothing queued or no room;
* ``wait_ready`` sleeps until the socket is readable (or writable), or until
  another task calls :meth:`Socket.wake`.

``ZMQ_FD`` is edge-triggered and only means "``ZMQ_EVENTS`` may have changed";
any zmq call, reading ``EVENTS`` included, may consume the edge
(design.md §5). So ``EVENTS`` is always re-read right before sleeping on the
fd, with no checkpoint in between, and again after every wake-up: the same
discipline as pyzmq's ``zmq/_future.py`` (``_handle_recv``,
``_schedule_remaining_events``). Trio allows one waiter per fd, which is why
one task owns each socket; a second task waiting at the same time gets
:class:`trio.BusyResourceError` instead of a silent hang.

On Linux the owner sleeps on a small epoll set of its own holding ``ZMQ_FD``
and an eventfd, and :meth:`Socket.wake` writes the eventfd. Waking the owner
by cancelling its sleep instead (the portable way, kept where there is no
epoll) cost about 35 µs of CPU per wake here: a cancel scope per sleep, the
``Cancelled`` exception and its unwinding. With sparse messages, where every
message wakes its link's owner, that was a large share of the per-message
cost (bench/sparse.py, docs/performance.md "Sparse messages").
"""

from __future__ import annotations

import os
import select
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypeAlias, cast

import trio
import zmq

from ._spin import Spin

if TYPE_CHECKING:
    from typing import Protocol

    from typing_extensions import Buffer

    class _ArrayBuffer(Protocol):
        # numpy's stubs declare __buffer__ only for Python >= 3.12.
        @property
        def __array_interface__(self) -> dict[str, Any]: ...

    #: Anything with the buffer protocol: bytes, memoryview, numpy arrays.
    BytesLike: TypeAlias = Buffer | _ArrayBuffer
else:
    BytesLike: TypeAlias = bytes

__all__ = [
    "DEALER_OPTIONS",
    "ROUTER_OPTIONS",
    "PollerStatistics",
    "Socket",
    "SocketPoller",
    "SocketStatistics",
    "Unroutable",
    "dealer_socket",
    "router_socket",
]

_POLLIN: Final = int(zmq.POLLIN)
_POLLOUT: Final = int(zmq.POLLOUT)
_EVENTS: Final = zmq.EVENTS
_RCVMORE: Final = zmq.RCVMORE

#: Out-of-band parts from this size up reach a ROUTER's owner uncopied.
ROUTER_ZERO_COPY_FROM: Final = 1024 * 1024
_NOBLOCK: Final = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK: Final = int(zmq.SNDMORE | zmq.NOBLOCK)

#: How long a blocked ``send_multipart`` on a ROUTER naps when ``EVENTS``
#: already shows POLLOUT yet the send still fails: with ROUTER_MANDATORY,
#: POLLOUT means "some peer's queue has room", not necessarily the target's,
#: so waiting for POLLOUT alone would spin.
_ROUTER_FULL_NAP: Final = 0.001

#: Whether the owner can sleep on its own epoll set (ZMQ_FD + an eventfd).
_EVENTFD_WAKE: Final = hasattr(select, "epoll") and hasattr(os, "eventfd")

_COMMON_OPTIONS: Final[dict[zmq.SocketOption, int]] = {
    # Closing must never wait for unsent messages: our protocol resends anyway.
    zmq.LINGER: 0,
    # First reconnect after 100 ms, then back off to 2 s (libzmq's default
    # never backs off, so a dead peer would be redialled ten times a second).
    zmq.RECONNECT_IVL: 100,
    zmq.RECONNECT_IVL_MAX: 2_000,
    # ZMTP heartbeats: a frozen (SIGSTOPped) peer is noticed in ~1.5 s, and
    # TTL tells the peer to drop us after 3 s of silence. Off by default.
    zmq.HEARTBEAT_IVL: 500,
    zmq.HEARTBEAT_TIMEOUT: 1_500,
    zmq.HEARTBEAT_TTL: 3_000,
    # A connection must finish its ZMTP (and CURVE/ZAP) handshake within 3 s,
    # not libzmq's 30 s: a handshake that stalls (measured: a secure ROUTER
    # whose ZAP handler is momentarily absent leaves the client hanging with
    # no disconnect) is dropped and redialled soon, and half-open handshakes
    # cannot pile up.
    zmq.HANDSHAKE_IVL: 3_000,
    # A peer cannot make us allocate more than 64 MiB for one message part
    # (libzmq's default is unlimited; it allocates a whole part as soon as
    # the part's size arrives); the codec's own limit is the same.
    zmq.MAXMSGSIZE: 64 * 1024 * 1024,
    # Counted in messages, per peer. The protocol's credit window is the
    # backpressure users see; this only needs to sit above it so zmq rarely
    # pushes back first, while still bounding memory if a peer stops reading.
    zmq.SNDHWM: 10_000,
    zmq.RCVHWM: 10_000,
}

#: Options applied by :func:`dealer_socket` (zmq option -> value).
DEALER_OPTIONS: Final[Mapping[zmq.SocketOption, int]] = MappingProxyType(
    {
        **_COMMON_OPTIONS,
        # Queue only to completed connections: while the peer is away, sends
        # raise WouldBlock (visible backpressure) instead of piling stale
        # copies into a pipe that is lost if the peer restarts anyway; the
        # protocol's retransmission is what makes delivery reliable.
        zmq.IMMEDIATE: 1,
        # Give up a TCP connect after 1 s and retry on RECONNECT_IVL, instead
        # of waiting out the kernel's SYN backoff (1, 2, 4 ... s) when a
        # peer's host was unreachable (measured in tests/test_multihost.py).
        zmq.CONNECT_TIMEOUT: 1_000,
    }
)

#: Options applied by :func:`router_socket` (zmq option -> value).
ROUTER_OPTIONS: Final[Mapping[zmq.SocketOption, int]] = MappingProxyType(
    {
        **_COMMON_OPTIONS,
        # An unroutable message raises EHOSTUNREACH (our Unroutable) and a full
        # peer queue raises EAGAIN, instead of both being dropped silently.
        zmq.ROUTER_MANDATORY: 1,
        # What libzmq holds for one peer connection that we have not taken
        # yet is at most (RCVHWM + 1) messages (the +1 being read), each up
        # to MAXMSGSIZE per part: ZeroMQ counts messages, not bytes. The
        # Receiver takes every message in bounded time (a size check, at
        # worst one small header's decode), so the queue only grows while
        # the event loop is busy elsewhere; 256 still sits at the credit
        # window (one DATA or batch per link seq), so a well-behaved peer
        # is not pushed back by it.
        zmq.RCVHWM: 256,
        # A restarted peer reconnecting with the same routing id takes over the
        # old connection instead of being ignored until the old one times out.
        zmq.ROUTER_HANDOVER: 1,
    }
)


class Unroutable(Exception):
    """A ROUTER was asked to send to a routing id with no connected peer.

    The peer is gone or has not connected yet; the message was not queued.
    Retry after the peer reconnects, or treat the peer as down.

    Attributes:
        routing_id: The routing id (first message part) that had no route.
    """

    def __init__(self, routing_id: bytes) -> None:
        super().__init__(f"no connected peer with routing id {routing_id!r}")
        self.routing_id = routing_id


@dataclass(frozen=True, slots=True)
class SocketStatistics:
    """Counters of one :class:`Socket`, as returned by ``statistics()``.

    Attributes:
        messages_sent: Multipart messages handed to libzmq.
        messages_received: Multipart messages taken from libzmq.
        fd_waits: Times a task slept on ``ZMQ_FD`` (each is a trip through
            Trio's I/O manager; few per message means batching works).
        wakes: Calls to :meth:`Socket.wake`.
    """

    messages_sent: int
    messages_received: int
    fd_waits: int
    wakes: int


class Socket:
    """A pyzmq socket driven by one owning Trio task.

    The owner is the one task that calls it: its loop drains with the
    ``_nowait`` calls until they raise :class:`trio.WouldBlock`, handles its
    other work, then awaits :meth:`wait_ready` (or, for many sockets at once,
    a :class:`SocketPoller`). Other tasks never call zmq on it; they call
    :meth:`wake` to hand the owner work. Simple single-task users may use the
    async :meth:`send_multipart` / :meth:`recv_multipart` instead.

    Use it as an async context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        zmq_socket: zmq.Socket[bytes],
        *,
        eventfd_wake: bool = _EVENTFD_WAKE,
        zero_copy_from: int | None = None,
    ) -> None:
        """Wrap an open pyzmq socket; the wrapper now owns and closes it.

        Args:
            zmq_socket: A socket from a synchronous ``zmq.Context``
                (not ``zmq.asyncio``).
            eventfd_wake: wake the owner through an eventfd (Linux, the
                default there) rather than by cancelling its sleep.
            zero_copy_from: received parts after the first two (on a
                ROUTER: the routing id and the header) of at least this many
                bytes are returned as read-only memoryviews of libzmq's own
                buffer instead of being copied into ``bytes``. None copies
                every part.
        """
        self._zsock = zmq_socket
        self._zero_copy_from = zero_copy_from
        self._fd = cast(int, zmq_socket.getsockopt(zmq.FD))
        self._closed = False
        # Set while a task sleeps on the fd; cancelling it makes that task
        # re-read EVENTS (wake(), or a zmq call that may have eaten the edge).
        # Only used without the eventfd.
        self._wait_scope: trio.CancelScope | None = None
        # With the eventfd: the owner sleeps on ``_wait_fd``, an epoll set
        # (level-triggered) of ZMQ_FD and ``_event_fd``. ``_wakeable`` plays
        # the part of ``_wait_scope``; ``_signalled`` says the eventfd holds
        # a count the owner must read back before it sleeps again.
        self._epoll: select.epoll | None = None
        self._event_fd = -1
        self._wait_fd = self._fd
        self._wakeable = False
        self._signalled = False
        if eventfd_wake:
            self._epoll = select.epoll()
            self._event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            # A socket dropped without close() must not leak the eventfd.
            self._release = weakref.finalize(self, _close_wake_fds, self._epoll, self._event_fd)
            self._epoll.register(self._fd, select.EPOLLIN)
            self._epoll.register(self._event_fd, select.EPOLLIN)
            self._wait_fd = self._epoll.fileno()
        # A wake() that found nobody waiting is remembered, never lost.
        self._wake_pending = False
        # How a drain ends: a failing NOBLOCK recv makes pyzmq build a
        # zmq.Again (about 5 µs here), reading EVENTS first costs 1.5 µs per
        # recv. Sparse messages come one per drain, where the EVENTS read
        # pays; a stream brings many, where it would cost more than the one
        # Again it saves. So the EVENTS read is skipped when the owner's last
        # read of EVENTS showed POLLIN with no recv since (``_readable``:
        # that recv cannot fail), and during and after a burst: a drain that
        # has taken two messages, or a previous drain that did.
        self._readable = False
        self._streak = 0
        self._bursty = False
        self._sent = 0
        self._received = 0
        self._fd_waits = 0
        self._wakes = 0
        self._spin = Spin(0.0)

    # -- lifetime ---------------------------------------------------------

    @property
    def zmq_socket(self) -> zmq.Socket[bytes]:
        """The wrapped pyzmq socket, for options and monitoring only.

        Sending or receiving on it directly bypasses the wake-up bookkeeping.
        """
        return self._zsock

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def close(self, *, linger: float = 0.0) -> None:
        """Close the socket now; what is unsent is dropped, or with ``linger``
        (seconds) libzmq's I/O thread may still send it for that long.

        Idempotent. A task blocked in :meth:`wait_ready`, :meth:`recv_multipart`
        or :meth:`send_multipart` gets :class:`trio.ClosedResourceError`.
        With ``linger``, terminating the context (``ZmqNetwork.close``) waits
        for that sending, at most ``linger`` seconds.
        """
        if self._closed:
            return
        self._closed = True
        # Trio must forget the fd before libzmq closes (and may reuse) it.
        # Outside a Trio run (cleanup after trio.run) nobody can be waiting.
        if trio.lowlevel.in_trio_run():
            trio.lowlevel.notify_closing(self._wait_fd)
            if self._wait_fd != self._fd:
                trio.lowlevel.notify_closing(self._fd)
        self._zsock.close(linger=round(linger * 1000))
        if self._epoll is not None:
            self._release()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- endpoints --------------------------------------------------------

    def bind(self, endpoint: str) -> str:
        """Bind to a ``tcp://`` or ``ipc://`` endpoint.

        Args:
            endpoint: Where to listen; ``tcp://127.0.0.1:*`` picks a free port.

        Returns:
            The endpoint actually bound (``ZMQ_LAST_ENDPOINT``), to give peers.

        Raises:
            trio.ClosedResourceError: The socket is closed.
            zmq.ZMQError: libzmq refused the endpoint (in use, malformed, ...).
        """
        self._check_open()
        self._zsock.bind(endpoint)
        return cast(bytes, self._zsock.getsockopt(zmq.LAST_ENDPOINT)).decode()

    def connect(self, endpoint: str) -> None:
        """Connect to a peer's endpoint; libzmq dials and redials in background.

        Raises:
            trio.ClosedResourceError: The socket is closed.
            zmq.ZMQError: The endpoint is malformed.
        """
        self._check_open()
        self._zsock.connect(endpoint)

    def disconnect(self, endpoint: str) -> None:
        """Stop dialling ``endpoint`` and drop its connection.

        Raises:
            trio.ClosedResourceError: The socket is closed.
            zmq.ZMQError: The socket is not connected to ``endpoint``.
        """
        self._check_open()
        self._zsock.disconnect(endpoint)

    # -- owner-task API ---------------------------------------------------

    def recv_multipart_nowait(self) -> list[bytes]:
        """Take one queued multipart message, without blocking.

        Returns:
            The message's parts (on a ROUTER, the peer's routing id first),
            as ``bytes``; on a socket made with ``zero_copy_from``, large
            parts past the second are read-only memoryviews.

        Raises:
            trio.WouldBlock: Nothing is queued; await :meth:`wait_ready`.
            trio.ClosedResourceError: The socket or its context is closed.
        """
        parts: list[bytes] = self._recv_nowait(True)
        return parts

    def recv_authenticated_nowait(self) -> tuple[str | None, list[bytes]]:
        """Take one queued message and who sent it, without blocking.

        Who sent it is the ZAP ``User-Id`` libzmq attached to the message's
        connection: the node id the ZAP handler gave the key that connection
        proved (CURVE), unlike the routing id, which a peer simply claims.

        Returns:
            The user id (None on a connection that no ZAP handler vouched
            for, e.g. a plaintext socket) and the message's parts, as in
            :meth:`recv_multipart_nowait`.

        Raises:
            trio.WouldBlock: Nothing is queued; await :meth:`wait_ready`.
            trio.ClosedResourceError: The socket or its context is closed.
        """
        frames: list[zmq.Frame] = self._recv_nowait(False)
        user: str | None
        try:
            # Every frame of a message carries its connection's metadata;
            # libzmq has no User-Id property (EINVAL) where no ZAP handler ran.
            user = cast(str, frames[-1].get("User-Id")) or None
        except zmq.ZMQError:
            user = None
        big = self._zero_copy_from
        if big is None:
            return user, [frame.bytes for frame in frames]
        # list[Any]: large parts are memoryviews (see zero_copy_from).
        parts: list[Any] = [
            frame.buffer.toreadonly() if i > 1 and len(frame) >= big else frame.bytes
            for i, frame in enumerate(frames)
        ]
        return user, parts

    def _recv_nowait(self, copy: bool) -> list[Any]:
        # list[Any]: bytes with copy, zmq.Frame without; typed by the callers.
        if self._closed:
            raise trio.ClosedResourceError("socket is closed")
        try:
            if self._readable:
                self._readable = False
            elif (
                self._streak < 2
                and not self._bursty
                and not cast(int, self._zsock.getsockopt(_EVENTS)) & _POLLIN
            ):
                self._streak = 0
                raise trio.WouldBlock
            if copy and self._zero_copy_from is not None:
                parts = self._recv_large_uncopied(self._zero_copy_from)
            else:
                parts = self._zsock.recv_multipart(_NOBLOCK, copy=copy)
        except zmq.Again:
            self._bursty = self._streak >= 2
            self._streak = 0
            raise trio.WouldBlock from None
        except zmq.ContextTerminated:
            raise trio.ClosedResourceError("the zmq context was terminated") from None
        self._received += 1
        self._streak += 1
        return parts

    def _recv_large_uncopied(self, big: int) -> list[Any]:
        """``recv_multipart`` with parts past the second of ``big`` bytes or more not copied.

        Copying a 60 MiB part into ``bytes`` took 130-140 ms here (a fresh
        allocation's page faults and the copy) with the event loop held, and
        doubled the message's memory meanwhile; a memoryview of the
        ``zmq.Frame`` costs neither. The first two parts (routing id and
        CBOR header, small or refused at once) are copied as usual, so a
        message without out-of-band parts costs what ``recv_multipart`` does.
        """
        zsock = self._zsock
        parts: list[Any] = [zsock.recv(_NOBLOCK)]
        while zsock.getsockopt(_RCVMORE):
            if len(parts) < 2:
                parts.append(zsock.recv(_NOBLOCK))
                continue
            frame = zsock.recv(_NOBLOCK, copy=False)
            parts.append(frame.buffer.toreadonly() if len(frame) >= big else frame.bytes)
        return parts

    def send_multipart_nowait(self, parts: Sequence[BytesLike]) -> None:
        """Queue one multipart message, without blocking.

        Parts may be bytes, memoryviews or any buffer (contiguous numpy arrays
        included). Parts of ``zmq.COPY_THRESHOLD`` (64 KiB) or more are sent
        without a copy: libzmq keeps a reference until its I/O thread has
        written them, so do not mutate such a buffer after sending it.

        libzmq takes or refuses a multipart message as a whole at its first
        part, so a WouldBlock never leaves half a message queued.

        Args:
            parts: At least one part. On a ROUTER the first is the routing id.

        Raises:
            trio.WouldBlock: The peer's queue is at its high-water mark, or (on
                a DEALER) no connection is complete yet; await
                :meth:`wait_ready` with ``writable=True``.
            Unroutable: (ROUTER) no connected peer has that routing id.
            trio.ClosedResourceError: The socket or its context is closed.
            ValueError: ``parts`` is empty.
        """
        if self._closed:
            raise trio.ClosedResourceError("socket is closed")
        if not parts:
            raise ValueError("a message needs at least one part")
        # Typed loosely once: numpy arrays are buffers, though not to mypy on 3.11.
        send = cast("Callable[..., object]", self._zsock.send)
        last = len(parts) - 1
        try:
            for i, part in enumerate(parts):
                # copy=False lets pyzmq copy small parts and share large ones.
                send(part, _NOBLOCK if i == last else _SNDMORE_NOBLOCK, copy=False)
        except zmq.Again:
            raise trio.WouldBlock from None
        except zmq.ContextTerminated:
            raise trio.ClosedResourceError("the zmq context was terminated") from None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise Unroutable(bytes(cast("Buffer", parts[0]))) from None
            raise
        self._sent += 1

    async def wait_ready(
        self, *, readable: bool = True, writable: bool = False, spin: float = 0.0
    ) -> None:
        """Wait until the socket is readable/writable, or :meth:`wake` is called.

        Returns at once if the condition already holds or a wake is pending.
        It does not say which happened: afterwards the owner checks all of
        its sources (drain the socket, then its mailbox). A pending wake is
        consumed by every return.

        On a ROUTER with ROUTER_MANDATORY, writable means *some* peer's queue
        has room, not necessarily the one a failed send was aimed at.

        Args:
            readable: Return when a message can be received.
            writable: Return when a message can be sent. With both False,
                only :meth:`wake` (or close/cancel) ends the wait.
            spin: poll ``EVENTS`` for up to this many seconds before parking,
                when no other task is runnable (:mod:`transport._spin` has the
                rules; 0, the default, parks at once).

        Raises:
            trio.ClosedResourceError: The socket is closed, before or during
                the wait.
            trio.BusyResourceError: Another task is already waiting on this
                socket (one task owns each socket).
        """
        want = (_POLLIN if readable else 0) | (_POLLOUT if writable else 0)
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        if self._wake_pending:
            self._wake_pending = False
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        events = cast(int, self._zsock.getsockopt(_EVENTS))
        if events & want:
            self._readable = bool(events & _POLLIN)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if spin != self._spin.limit:
            self._spin.reset(spin)
        if want and self._spin.armed:
            # As in SocketPoller.wait: let this scheduler batch's other tasks
            # run first, then poll while nothing else can.
            await trio.lowlevel.cancel_shielded_checkpoint()
            if self._take_wake():
                return
            zsock = self._zsock
            found = self._spin.poll(lambda: cast(int, zsock.getsockopt(_EVENTS)) & want)
            if found:
                self._readable = bool(found & _POLLIN)
                await trio.lowlevel.checkpoint_if_cancelled()
                return
        since = time.perf_counter()
        await self._sleep_until(want, wakeable=True)
        self._spin.parked(since, by_message=not self._wake_pending)
        self._wake_pending = False

    def wake(self) -> None:
        """Make the owner's pending or next :meth:`wait_ready` return promptly.

        Sync and cheap; callable from any task (e.g. after putting work in the
        owner's mailbox). Wakes are not counted up: many wakes before the owner
        waits make one early return.
        """
        self._wakes += 1
        if self._wake_pending:
            # Already woken: the owner cannot be asleep until it has seen this
            # (wait_ready checks the flag before sleeping, with no checkpoint
            # between), and trio's cancel() is not free even when repeated.
            return
        self._wake_pending = True
        self._interrupt()

    # -- convenience API for single-task users -----------------------------

    async def recv_multipart(self) -> list[bytes]:
        """Receive one multipart message, waiting for it if needed.

        Always a checkpoint. Cancellation loses nothing: a message is either
        returned or left queued.

        Returns:
            The message's parts (on a ROUTER, the peer's routing id first).

        Raises:
            trio.ClosedResourceError: The socket is closed, before or during
                the wait.
            trio.BusyResourceError: Another task is waiting on this socket.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            parts = self.recv_multipart_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return parts
        while True:
            if not cast(int, self._zsock.getsockopt(_EVENTS)) & _POLLIN:
                await self._sleep_until(_POLLIN, wakeable=False)
            try:
                return self.recv_multipart_nowait()
            except trio.WouldBlock:
                continue

    async def send_multipart(self, parts: Sequence[BytesLike]) -> None:
        """Send one multipart message, waiting for room if needed.

        Always a checkpoint; at the high-water mark it sleeps on the socket
        rather than blocking the event loop. Cancellation means not sent.
        See :meth:`send_multipart_nowait` for the parts and zero-copy rules.

        Raises:
            Unroutable: (ROUTER) no connected peer has that routing id.
            trio.ClosedResourceError: The socket is closed, before or during
                the wait.
            trio.BusyResourceError: Another task is waiting on this socket.
            ValueError: ``parts`` is empty.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.send_multipart_nowait(parts)
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        while True:
            if cast(int, self._zsock.getsockopt(_EVENTS)) & _POLLOUT:
                # Writable yet refused: a ROUTER whose target queue is full.
                # Nap instead of spinning; the fd also ends the nap early.
                with trio.move_on_after(_ROUTER_FULL_NAP):
                    await self._sleep_on_fd()
            else:
                await self._sleep_until(_POLLOUT, wakeable=False)
            try:
                self.send_multipart_nowait(parts)
            except trio.WouldBlock:
                continue
            return

    def statistics(self) -> SocketStatistics:
        """Return a snapshot of this socket's counters."""
        return SocketStatistics(
            messages_sent=self._sent,
            messages_received=self._received,
            fd_waits=self._fd_waits,
            wakes=self._wakes,
        )

    # -- internals --------------------------------------------------------

    def _take_wake(self) -> bool:
        """Whether a wake came (while the owner yielded), clearing it."""
        pending, self._wake_pending = self._wake_pending, False
        return pending

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("socket is closed")

    async def _sleep_until(self, want: int, *, wakeable: bool) -> None:
        """Sleep on the fd until ``EVENTS & want`` (or a wake, if wakeable).

        The caller has just read ``EVENTS`` without the wanted bits, with no
        checkpoint since: any change after that read re-arms the fd, so going
        straight to sleep misses no edge.
        """
        while True:
            if wakeable:
                await self._sleep_on_fd_wakeable()
                if self._wake_pending:
                    return
            else:
                await self._sleep_on_fd()
            events = cast(int, self._zsock.getsockopt(_EVENTS))
            if events & want:
                self._readable = bool(events & _POLLIN)
                return

    def _interrupt(self) -> None:
        """End a wakeable sleep in progress early, if there is one."""
        if self._epoll is not None:
            if self._wakeable and not self._signalled:
                self._signalled = True
                os.eventfd_write(self._event_fd, 1)
        elif self._wait_scope is not None:
            self._wait_scope.cancel()

    async def _sleep_on_fd_wakeable(self) -> None:
        """One sleep on ``ZMQ_FD`` that :meth:`wake` can end early."""
        if self._epoll is not None:
            self._wakeable = True
            try:
                await self._sleep_on_fd()
            finally:
                self._wakeable = False
                if self._signalled:
                    self._signalled = False
                    # Read the count back, or the epoll set stays readable
                    # (unless close() has closed the eventfd under us).
                    if not self._closed:
                        os.eventfd_read(self._event_fd)
            return
        # A cancel scope per wait costs a few µs, so only wait_ready pays it.
        with trio.CancelScope() as scope:
            self._wait_scope = scope
            try:
                await self._sleep_on_fd()
            finally:
                self._wait_scope = None

    async def _sleep_on_fd(self) -> None:
        """One sleep on ``ZMQ_FD``, until libzmq signals that EVENTS changed."""
        self._check_open()
        self._fd_waits += 1
        try:
            await trio.lowlevel.wait_readable(self._wait_fd)
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("socket was closed while waiting") from None


@dataclass(frozen=True, slots=True)
class PollerStatistics:
    """Counters of one poller, as returned by ``statistics()``.

    Attributes:
        sleeps: Times its owner slept on the poller (each is a trip through
            Trio's I/O manager: few per message means batching works).
        wakes: Calls to ``wake()`` that found the owner asleep or about to sleep.
        spins: Times its owner polled before parking (``wait(spin=...)``).
        spin_hits: Spins that found a socket ready, so the owner did not park.
    """

    sleeps: int
    wakes: int
    spins: int = 0
    spin_hits: int = 0


class SocketPoller:
    r"""One wait on many :class:`Socket`\ s and a wake-up, for the task that owns them all.

    The node's dispatcher owns every socket of the node and sleeps on this:
    one epoll set holding each socket's ``ZMQ_FD`` and an eventfd that
    :meth:`wake` writes (bench/transport.py's "Trio floor" is the same shape).
    ``ZMQ_FD`` only says "``EVENTS`` may have changed" and any zmq call may
    consume its edge (design.md §5), so :meth:`wait` hands back the sockets
    whose fd fired, to be drained, and after its own zmq calls the owner asks
    :meth:`ready` of each socket it touched before it sleeps again.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._release = weakref.finalize(self, _close_wake_fds, self._epoll, self._event_fd)
        self._epoll.register(self._event_fd, select.EPOLLIN)
        self._by_fd: dict[int, Socket] = {}
        self._closed = False
        # As in Socket: a wake that found the owner awake is remembered in
        # ``_pending``; the eventfd is written only while it sleeps.
        self._pending = False
        self._sleeping = False
        self._signalled = False
        self._sleeps = 0
        self._wakes = 0
        self._spin = Spin(0.0)

    def add(self, sock: Any) -> None:
        """Watch ``sock`` (a :class:`Socket`) too."""
        self._epoll.register(sock._fd, select.EPOLLIN)
        self._by_fd[sock._fd] = sock

    def discard(self, sock: Any) -> None:
        """Stop watching ``sock`` (before closing it: libzmq may reuse its fd)."""
        if self._by_fd.pop(sock._fd, None) is not None and not self._closed:
            self._epoll.unregister(sock._fd)

    def wake(self) -> None:
        """Make the owner's pending or next :meth:`wait` return promptly. Sync, cheap."""
        if self._pending:
            return
        self._pending = True
        self._wakes += 1
        if self._sleeping and not self._signalled:
            self._signalled = True
            os.eventfd_write(self._event_fd, 1)

    def poll_nowait(self) -> list[Any]:
        """The sockets whose fd fired since the last look, without sleeping.

        For an owner that yields to other tasks instead of sleeping: what
        arrived meanwhile is drained at once, not after the next sleep.
        """
        by_fd = self._by_fd
        return [by_fd[fd] for fd, _ in self._epoll.poll(0) if fd in by_fd]

    def ready(self, sock: Any, *, writable: bool = False) -> bool:
        """Whether ``sock`` is readable (or writable, if asked) now, by its ``EVENTS``.

        Call it for a socket the owner made a zmq call on since it last
        drained it: that call may have taken the fd's edge.
        """
        events = cast(int, sock._zsock.getsockopt(_EVENTS))
        if events & _POLLIN:
            # The next recv cannot fail: it skips its own EVENTS read.
            sock._readable = True
            return True
        return bool(writable and events & _POLLOUT)

    async def wait(self, *, spin: float = 0.0) -> list[Any]:
        """Sleep until a watched socket's fd fires or :meth:`wake` is called.

        Returns at once (after a checkpoint) if a wake is pending. The
        caller's cancel scope bounds the sleep (its timers).

        Args:
            spin: poll the sockets for up to this many seconds before
                parking, when no other task is runnable (:mod:`transport._spin`
                has the rules; 0, the default, parks at once).

        Returns:
            The sockets whose fd fired: each may be readable or writable.
        """
        if self._pending:
            self._pending = False
            await trio.lowlevel.checkpoint()
            return []
        by_fd = self._by_fd
        epoll = self._epoll
        if spin != self._spin.limit:
            self._spin.reset(spin)
        if self._spin.armed:
            # Tasks woken in this scheduler batch run after this one, and
            # Trio's count of runnable tasks does not see them: yield once so
            # that the spin cannot hold them up (it did, 1 ms at a time).
            await trio.lowlevel.cancel_shielded_checkpoint()
            if self._take_pending():
                return []
        events = self._spin.poll(self._poll_sockets)
        if events:
            # Still a cancellation point, without the trip through Trio's
            # scheduler the spin saved.
            await trio.lowlevel.checkpoint_if_cancelled()
            return [by_fd[fd] for fd, _ in events if fd in by_fd]
        self._sleeping = True
        self._sleeps += 1
        since = time.perf_counter()
        try:
            await trio.lowlevel.wait_readable(epoll.fileno())
        finally:
            self._sleeping = False
            self._pending = False
            if self._signalled:
                self._signalled = False
                if not self._closed:
                    os.eventfd_read(self._event_fd)
        ready = [by_fd[fd] for fd, _ in epoll.poll(0) if fd in by_fd]
        self._spin.parked(since, by_message=bool(ready))
        return ready

    def _take_pending(self) -> bool:
        """Whether a wake came (while the owner yielded), clearing it."""
        pending, self._pending = self._pending, False
        return pending

    def _poll_sockets(self) -> list[tuple[int, int]]:
        """The fds that fired, without sleeping (the spin's probe; the eventfd cannot fire then)."""
        return self._epoll.poll(0)

    def close(self) -> None:
        """Release the epoll set and the eventfd. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._by_fd.clear()
        if trio.lowlevel.in_trio_run():
            trio.lowlevel.notify_closing(self._epoll.fileno())
        self._release()

    def statistics(self) -> PollerStatistics:
        """A snapshot of this poller's counters."""
        spin = self._spin
        return PollerStatistics(self._sleeps, self._wakes, spin.spins, spin.hits)


def _close_wake_fds(epoll: select.epoll, event_fd: int) -> None:
    epoll.close()
    os.close(event_fd)


def _apply_options(
    zsock: zmq.Socket[bytes],
    defaults: Mapping[zmq.SocketOption, int],
    overrides: Mapping[str, int | bytes],
) -> None:
    options: dict[zmq.SocketOption, int | bytes] = dict(defaults)
    for name, value in overrides.items():
        try:
            option = zmq.SocketOption[name.upper()]
        except KeyError:
            raise ValueError(f"unknown zmq socket option {name!r}") from None
        options[option] = value
    for option, value in options.items():
        zsock.setsockopt(option, value)


def _new_socket(
    ctx: zmq.Context[zmq.Socket[bytes]],
    kind: zmq.SocketType,
    defaults: Mapping[zmq.SocketOption, int],
    overrides: Mapping[str, int | bytes],
    routing_id: bytes | None = None,
    zero_copy_from: int | None = None,
) -> Socket:
    zsock = ctx.socket(kind)
    try:
        _apply_options(zsock, defaults, overrides)
        if routing_id is not None:
            zsock.setsockopt(zmq.ROUTING_ID, routing_id)
    except BaseException:
        zsock.close(linger=0)
        raise
    return Socket(zsock, zero_copy_from=zero_copy_from)


def dealer_socket(
    ctx: zmq.Context[zmq.Socket[bytes]],
    *,
    routing_id: bytes | None = None,
    **overrides: int | bytes,
) -> Socket:
    """Make a DEALER socket with :data:`DEALER_OPTIONS` applied.

    Args:
        ctx: A synchronous ``zmq.Context``.
        routing_id: How ROUTER peers address this socket (e.g. the node id);
            libzmq picks a random one if None.
        **overrides: zmq options by name, e.g. ``sndhwm=100`` or ``LINGER=10``;
            they replace the defaults.

    Returns:
        The new, unconnected socket.

    Raises:
        ValueError: An override names no zmq socket option.
        zmq.ZMQError: libzmq rejected an option value.
    """
    return _new_socket(ctx, zmq.DEALER, DEALER_OPTIONS, overrides, routing_id)


def router_socket(ctx: zmq.Context[zmq.Socket[bytes]], **overrides: int | bytes) -> Socket:
    """Make a ROUTER socket with :data:`ROUTER_OPTIONS` applied.

    Args:
        ctx: A synchronous ``zmq.Context``.
        **overrides: zmq options by name, e.g. ``rcvhwm=100``; they replace
            the defaults.

    Out-of-band parts of :data:`ROUTER_ZERO_COPY_FROM` (1 MiB) or more are
    received without a copy, as read-only memoryviews.

    Returns:
        The new, unbound socket.

    Raises:
        ValueError: An override names no zmq socket option.
        zmq.ZMQError: libzmq rejected an option value.
    """
    return _new_socket(
        ctx, zmq.ROUTER, ROUTER_OPTIONS, overrides, zero_copy_from=ROUTER_ZERO_COPY_FROM
    )
