"""The node's I/O task: one dispatcher owns every socket and runs the protocol actors.

One send's walk, the only one (docs/architecture.md draws it):

1. ``actors/_node.py`` ``Node.send`` / ``Node.send_nowait`` post
   ``Submit`` to the peer's link: ``PeerLink.handle(Submit)``.
2. ``actors/_link.py`` ``PeerLink.handle``: ``LinkSender.send`` gives the
   message its seq, a ``SendHandle`` is made and returned; the link asks
   ``Dispatcher.wake`` for a flush.
3. ``actors/_dispatch.py`` ``Dispatcher._serve`` → ``Dispatcher._flush`` →
   ``PeerLink.flush``: ``LinkSender.frames_to_send``, encoded as one message
   (a BATCH when several) → the DEALER.
4. The wire (ZeroMQ, or ``MemoryNetwork``).
5. The peer's ``Dispatcher._drain`` takes it from the ROUTER →
   ``Receiver.handle(Input)``.
6. ``actors/_inbound.py`` ``Receiver.handle(Input)``: decode, identity,
   ``LinkReceiver.receive_frame``; its ``Admitted`` event →
   ``Sequencer.handle(Admitted)``.
7. ``actors/_inbound.py`` ``Sequencer.handle``: ``StreamSequencer.offer``; each
   ``Release`` → ``ActorRef.send_nowait(Delivery, reply=_Completion)`` into the
   compute actor's mailbox.
8. ``actors/_actor.py`` ``_ActorCell._work``: the compute actor's own task
   runs ``receive``; its outcome goes to the reply sink.
9. ``actors/_inbound.py`` ``_Completion.set_result`` →
   ``Receiver.handle(Completed)``: ``LinkReceiver.complete``; the Receiver
   asks ``Dispatcher.wake`` for a flush.
10. ``Dispatcher._flush`` → ``Receiver.flush``: ``LinkReceiver.frames_to_send``
    (an ACK, or one ACK_RANGE for a run), encoded → the ROUTER.
11. The wire.
12. The sender's ``Dispatcher._drain`` takes it from the DEALER →
    ``PeerLink.handle(Input)``.
13. ``actors/_link.py`` ``PeerLink.handle(Input)``: ``LinkSender.receive_frame``;
    its ``Answered`` event settles the ``SendHandle``, and the caller's
    ``await handle.wait()`` returns the ``Ack``.

Who runs what. The protocol actors (PeerLink, Receiver, Sequencer) are state
plus a synchronous ``handle(msg, now)`` over typed messages: a handler never
awaits, and Trio runs one task at a time, so a message is handled the moment
it is posted, on the posting task (a calling-thread dispatcher, as in Akka;
Pony's behaviours are the same idea). No handler touches a socket. The one
task that does is the dispatcher's: it owns the ROUTER and every DEALER,
sleeps on one poller for all of them (one epoll set of their ``ZMQ_FD``\\ s
and an eventfd), and once per wake-up

a. drains every socket that may be readable (at most ``_RECV_BUDGET``
   messages each, ``_RECV_SECONDS`` in all) into its owner's ``handle``,
b. runs the timers of the actors whose ``next_deadline()`` has passed
   (read before each sleep, and every ``_TIMER_SLACK`` while awake),
c. flushes each actor that asked for it (``wake``): one message per peer,
d. re-reads ``EVENTS`` of the sockets it called zmq on (design.md §5: a call
   may eat the fd's edge); if it took messages, yields once to the tasks
   they woke (their answers come back without a wake-up), else sleeps
   until a socket, a wake or the earliest deadline, polling for up to
   ``spin`` seconds first when nothing else can run (transport/_spin.py).

Why one task and not one per socket: a Trio task hop costs ~10-30 µs here
(design.md §5), so per-wake batching (every answer of a burst in one
ACK_RANGE, every send of a burst in one BATCH, every socket in one sleep)
pays for the hop that a lone send now takes from the caller's task to the
dispatcher; and "one owner per socket" needs no edge-trigger patch for
foreign callers, because there are none. Compute actors keep their own
tasks: user code may await.

Per-peer boundary (issue 14): an exception while one actor handles one
message is counted ``internal-error`` and logged rate-limited
(``Receiver.handle(InternalError)``); the dispatcher goes on with the rest.
Anything else that escapes crashes the dispatcher; its supervisor restarts it
with fresh sockets and the same actors and cores, so pending sends resume.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Never, Protocol

import trio
import zmq

from transport import Network, NodeId, Poller, Socket, SocketLike, ZmqNetwork

from ._actor import Actor
from ._errors import BindError
from ._security import SecurityState, watch_handshakes

if TYPE_CHECKING:
    from ._inbound import Receiver, Sequencer
    from ._link import PeerLink

#: Messages taken from one socket per wake-up before the others get a turn,
#: so one busy peer cannot starve the rest of the node.
_RECV_BUDGET = 256

#: How late a timer may fire while the I/O task is busy without a sleep
#: (see _serve): looking at every actor's deadline each round cost more than
#: the work of a lone message on a node with a few peers.
_TIMER_SLACK = 0.005

#: Seconds libzmq may still spend sending what the last flush queued, when the
#: I/O task stops (the context's end waits that long at most).
_CLOSE_LINGER = 0.2

#: A stopping I/O task that sent within this many seconds serves on until
#: that long has passed without a send, at most _CLOSE_GRACE: a peer's
#: DEALER (ZMQ_IMMEDIATE) drops what it has not read yet when the
#: connection closes, so answers sent just before a close were lost
#: (measured: 2-3 runs in 10 of the guide's collectives example, ended by LOST).
_CLOSE_QUIET = 0.1
_CLOSE_GRACE = 0.5

#: A wake-up stops taking messages once it has spent this long (seconds of
#: time.perf_counter) and sends the answers due: a run of costly messages
#: (a header decode takes up to ~50 ms, Limits.max_header_bytes) then holds
#: the answers of other peers and the compute actors back by about one of
#: them. Usual messages take a few µs each: _RECV_BUDGET ends their drain.
_RECV_SECONDS = 0.02


@dataclass(frozen=True, slots=True)
class Input:
    """A message the owner's socket received: its parts, and (secure ROUTER) its ZAP User-Id."""

    parts: list[Any]
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Attached:
    """A (new) socket serves the actor now: what it could not send may go."""


@dataclass(frozen=True, slots=True)
class Detached:
    """The actor's socket is gone (the I/O task stopped); it may come back."""


@dataclass(frozen=True, slots=True)
class InternalError:
    """Handling something of ``peer``'s raised: count and log it at that peer's boundary."""

    peer: NodeId | None
    what: str
    error: Exception


@dataclass(frozen=True, slots=True)
class IoStatistics:
    """How a node's I/O task waited, since the node opened (``node.statistics().io``).

    Attributes:
        sleeps: Times it parked on its sockets (a trip through the kernel and
            Trio's scheduler each; few per message means batching works).
        wakes: Times another task woke it to flush (a send, an answer).
        spins: Times it polled its sockets before parking (``NodeConfig.spin``).
        spin_hits: Spins that found a socket ready, so it did not park.
    """

    sleeps: int = 0
    wakes: int = 0
    spins: int = 0
    spin_hits: int = 0

    def __add__(self, other: IoStatistics) -> IoStatistics:
        return IoStatistics(
            self.sleeps + other.sleeps,
            self.wakes + other.wakes,
            self.spins + other.spins,
            self.spin_hits + other.spin_hits,
        )


#: What the I/O task posts to a socket's owner.
SocketMessage = Input | Attached | Detached


class SocketOwner(Protocol):
    """What the dispatcher needs of an actor that owns a socket."""

    @property
    def peer(self) -> NodeId | None:
        """Whose boundary its errors are counted at (None: the Receiver's, per frame)."""
        ...

    @property
    def wants_write(self) -> bool:
        """Whether it holds messages its socket refused (wake it when writable)."""
        ...

    def handle(self, msg: SocketMessage, now: float) -> None:
        """Handle one message of the I/O task."""
        ...

    def flush(self, sock: SocketLike, now: float) -> bool:
        """Send what it has ready on ``sock``; whether it may have called it."""
        ...


class TimerActor(Protocol):
    """What the dispatcher needs of an actor with timers."""

    @property
    def peer(self) -> NodeId | None:
        """Whose boundary its errors are counted at."""
        ...

    def next_deadline(self) -> float:
        """When :meth:`poll` must run next (``math.inf``: no timer)."""
        ...

    def poll(self, now: float) -> None:
        """Run the timers due at ``now``."""
        ...


class Dispatcher:
    """The scheduler of one node's protocol actors; outlives restarts of its task.

    Args:
        network: where the sockets come from.
        bind: the ROUTER's endpoint.
        routing_id: this node's DEALERs' routing id.
        security: the node's security state (a secure ROUTER's handshakes
            are watched on its monitor socket).
        spin: seconds the I/O task may poll its sockets before it sleeps
            (``NodeConfig.spin``, :mod:`transport._spin`).
    """

    def __init__(
        self,
        network: Network,
        bind: str,
        routing_id: bytes,
        security: SecurityState,
        *,
        spin: float = 0.0,
    ) -> None:
        self._network = network
        self._spin = spin
        self._bind = bind
        self._routing_id = routing_id
        self._security = security
        self._endpoint: str | None = None
        self._receiver: Receiver | None = None
        self._links: list[PeerLink] = []
        self._timers: list[TimerActor] = []
        self._dirty: dict[SocketOwner, None] = {}
        self._poller: Poller | None = None
        #: When a flush last called a socket (trio time).
        self._sent_at = -math.inf
        # True while the I/O task runs (not awaiting): a wake from its own
        # handlers then needs no poller wake, the loop looks at _dirty anyway.
        self._awake = False
        #: The counters of the pollers of I/O tasks that have stopped.
        self._retired = IoStatistics()

    @property
    def endpoint(self) -> str | None:
        """The endpoint the ROUTER is bound to (the real port), once bound."""
        return self._endpoint

    def serve(self, receiver: Receiver, links: list[PeerLink], sequencers: list[Sequencer]) -> None:
        """Set the actors this dispatcher runs (once, before its task starts)."""
        self._receiver = receiver
        self._links = links
        self._timers = [receiver, *links, *sequencers]

    def statistics(self) -> IoStatistics:
        """How the I/O task waited, over all its restarts."""
        poller = self._poller
        return self._retired if poller is None else self._retired + _io_of(poller)

    def wake(self, actor: SocketOwner) -> None:
        """Ask for ``actor`` to be flushed on the next wake-up. Sync, cheap, idempotent."""
        self._dirty[actor] = None
        poller = self._poller
        if poller is not None and not self._awake:
            poller.wake()

    def factory(self) -> Callable[[], IoTask]:
        """The supervisor's factory of the I/O task."""
        return lambda: IoTask(self)

    # -- the I/O task's side ------------------------------------------------

    def _open(self) -> dict[SocketLike, SocketOwner]:
        """Make, bind and connect every socket; BindError names a bad endpoint."""
        assert self._receiver is not None
        network = self._network
        sockets: dict[SocketLike, SocketOwner] = {}
        try:
            router = network.router()
            sockets[router] = self._receiver
            # A restart binds the endpoint the peers already know, not a new
            # wildcard port.
            endpoint = self._endpoint or self._bind
            try:
                self._endpoint = router.bind(endpoint)
            except zmq.ZMQError as exc:
                # The endpoint is the caller's: name it, not this task.
                # zmq.strerror: pyzmq's own text repeats the address.
                reason = exc.strerror if exc.errno is None else zmq.strerror(exc.errno)
                raise BindError(endpoint, reason) from exc
            for link in self._links:
                sock = network.dealer(self._routing_id, peer=link.peer)
                sockets[sock] = link
                sock.connect(link.endpoint)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return sockets

    @trio.lowlevel.enable_ki_protection
    async def _serve(self, poller: Poller, sockets: dict[SocketLike, SocketOwner]) -> None:
        """The I/O loop: drain, timers, flush, sleep (module docstring, a-d).

        Protected from KeyboardInterrupt (Trio delivers a Ctrl-C to the main
        task instead): raised inside a protocol step it would leave an actor
        half-updated, and raised inside cbor2's C encoder it was swallowed
        ("Exception ignored in ...") and the program hung.
        """
        owners = sockets
        by_owner = {owner: sock for sock, owner in sockets.items()}
        # Every socket once: what a crash left queued is taken at once.
        ready: list[SocketLike] = list(sockets)
        touched: dict[SocketLike, None] = {}
        # Messages taken since the I/O task last yielded or slept.
        took = 0
        # When to look at the actors' timers again: the earliest deadline,
        # read before each sleep (nothing moves it earlier while this task
        # sleeps: whoever posts to an actor wakes it, and the flush that
        # follows is where new timers start), or _TIMER_SLACK after the last
        # look while the task stays awake (busy, it does not read deadlines
        # each round, and a timer started meanwhile waits at most that long).
        timers_due = -math.inf
        self._awake = True
        try:
            while True:
                with trio.CancelScope() as timer:
                    while True:
                        self._awake = True
                        now = trio.current_time()
                        if self._dirty:
                            # What other tasks left while this one was away
                            # (the compute actor's answers) goes out before
                            # the next drain, which may take _RECV_SECONDS.
                            self._flush(by_owner, touched, now)
                        if ready:
                            again, n = self._drain(ready, owners, now)
                            took += n
                        else:
                            again = []
                        if now >= timers_due:
                            self._run_timers(now)
                            timers_due = now + _TIMER_SLACK
                        if self._dirty:
                            self._flush(by_owner, touched, now)
                        ready = again
                        for sock in touched:
                            if poller.ready(sock, writable=owners[sock].wants_write):
                                ready.append(sock)
                        touched.clear()
                        if timers_due > now + _TIMER_SLACK:
                            # Awake on: a timer started now is not in timers_due.
                            timers_due = now + _TIMER_SLACK
                        if ready or self._dirty:
                            self._awake = False
                            await trio.lowlevel.checkpoint()
                            continue
                        if took:
                            # What this wake-up took usually handed work to
                            # another task (a delivery to a compute actor, a
                            # settled send), whose answer or next send is
                            # posted before that task parks: yield to it once,
                            # staying awake, rather than sleep and be woken (an
                            # eventfd write and an epoll trip; design.md §5
                            # prices a hop at 10-30 µs).
                            took = 0
                            await trio.lowlevel.cancel_shielded_checkpoint()
                            ready = poller.poll_nowait()
                            continue
                        self._awake = False
                        # One cancel scope serves every sleep until its timer
                        # fires, and its deadline only moves earlier: setting
                        # it costs ~10 µs (Trio re-files the scope), and most
                        # deadlines move later (each heartbeat, each answered
                        # send). A timer that fires early finds nothing due,
                        # and the next scope starts from the true earliest.
                        deadline = timers_due = self._earliest()
                        if deadline < timer.deadline:
                            timer.deadline = deadline
                        ready = await poller.wait(spin=self._spin)
                # The timer fired, in the sleep or in the checkpoint above:
                # ``ready`` keeps the sockets found ready before it (their
                # EVENTS read took the fd's edge; dropped, they would wait
                # for the next message to be drained).
        finally:
            self._awake = False

    def _drain(
        self, ready: list[SocketLike], owners: dict[SocketLike, SocketOwner], now: float
    ) -> tuple[list[SocketLike], int]:
        """Hand what ready sockets hold to their owners: (sockets unfinished, messages taken)."""
        clock = time.perf_counter
        until = clock() + _RECV_SECONDS
        secure = self._security.secure
        again: list[SocketLike] = []
        took = 0
        for sock in ready:
            owner = owners.get(sock)
            if owner is None:
                continue
            if owner.wants_write:
                # The fd fired: the socket may take what it refused before.
                self._dirty[owner] = None
            authenticated = secure and owner is self._receiver
            for _ in range(_RECV_BUDGET):
                try:
                    if authenticated:
                        user, parts = sock.recv_authenticated_nowait()
                    else:
                        user, parts = None, sock.recv_multipart_nowait()
                except trio.WouldBlock:
                    break
                took += 1
                try:
                    owner.handle(Input(parts, user), now)
                except Exception as exc:
                    self._boundary(owner.peer, "handling a message from", exc, now)
                if clock() >= until:
                    again.append(sock)
                    break
            else:
                again.append(sock)
        return again, took

    def _run_timers(self, now: float) -> None:
        """Poll every actor whose timer is due."""
        for actor in self._timers:
            if actor.next_deadline() <= now:
                try:
                    actor.poll(now)
                except Exception as exc:
                    self._boundary(actor.peer, "running the timers of", exc, now)

    def _earliest(self) -> float:
        """The earliest deadline of any actor (after the flush: it moves them)."""
        return min((actor.next_deadline() for actor in self._timers), default=float("inf"))

    def _flush(
        self, by_owner: dict[SocketOwner, SocketLike], touched: dict[SocketLike, None], now: float
    ) -> None:
        """Send what every actor that asked has ready, each on its own socket."""
        dirty = self._dirty
        while dirty:
            actor = next(iter(dirty))
            del dirty[actor]
            sock = by_owner.get(actor)
            if sock is None:
                continue
            try:
                if actor.flush(sock, now):
                    touched[sock] = None
                    self._sent_at = now
            except Exception as exc:
                touched[sock] = None
                self._boundary(actor.peer, "sending to", exc, now)

    def _boundary(self, peer: NodeId | None, what: str, error: Exception, now: float) -> None:
        """An exception at one peer's boundary: counted and logged, the node goes on."""
        assert self._receiver is not None
        self._receiver.handle(InternalError(peer, what, error), now)


class IoTask(Actor[Never, None]):
    """The supervised I/O task of a node: opens the sockets, runs :class:`Dispatcher`.

    It takes no messages. A crash (of anything outside a peer's boundary)
    restarts it with fresh sockets; the actors and their cores carry on.
    """

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._d = dispatcher
        self._sockets: dict[SocketLike, SocketOwner] = {}
        self._poller: Poller | None = None
        self._monitor: SocketLike | None = None
        #: The dispatcher loop raised: on_stop closes at once, without a grace.
        self._crashed = False

    async def on_start(self) -> None:
        d = self._d
        sockets = d._open()
        poller = d._network.poller()
        for sock in sockets:
            poller.add(sock)
        self._sockets = sockets
        self._poller = poller
        d._poller = poller
        now = trio.current_time()
        for owner in sockets.values():
            owner.handle(Attached(), now)
            d._dirty[owner] = None
        network = d._network
        if d._security.secure and isinstance(network, ZmqNetwork):
            router = next(iter(sockets))
            assert isinstance(router, Socket)
            self._monitor = network.monitor(router)
            self.nursery.start_soon(watch_handshakes, d._security, self._monitor)
        self.nursery.start_soon(self._serve, poller, sockets)

    async def _serve(self, poller: Poller, sockets: dict[SocketLike, SocketOwner]) -> None:
        try:
            await self._d._serve(poller, sockets)
        except Exception:
            self._crashed = True
            raise

    async def on_stop(self) -> None:
        d = self._d
        d._poller = None
        poller = self._poller
        # Answers posted since the last wake-up (a collective's last ACKs,
        # taken just before its caller left the node's block) still go out:
        # flushed now, and given _CLOSE_LINGER to leave the machine.
        by_owner = {owner: sock for sock, owner in self._sockets.items()}
        d._flush(by_owner, {}, trio.current_time())
        quiet = d._sent_at + _CLOSE_QUIET
        # ZeroMQ only: a MemorySocket's sends are in the peer's queue already.
        zmq_net = isinstance(d._network, ZmqNetwork)
        if zmq_net and poller is not None and not self._crashed and trio.current_time() < quiet:
            # Best effort: a fault in it ends the grace, not the stop.
            with trio.move_on_after(_CLOSE_GRACE), contextlib.suppress(Exception):
                async with trio.open_nursery() as nursery:
                    d._poller = poller
                    nursery.start_soon(d._serve, poller, self._sockets)
                    while True:
                        # Each send the I/O task makes moves the end of the quiet on.
                        quiet = d._sent_at + _CLOSE_QUIET
                        if quiet <= trio.current_time():
                            break
                        await trio.sleep_until(quiet)
                    nursery.cancel_scope.cancel()
            d._poller = None
        for sock, owner in self._sockets.items():
            if poller is not None:
                poller.discard(sock)
            sock.close(linger=_CLOSE_LINGER)
            owner.handle(Detached(), trio.current_time())
        self._sockets = {}
        if poller is not None:
            d._retired += _io_of(poller)
            poller.close()
            self._poller = None
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None


def _io_of(poller: Poller) -> IoStatistics:
    st = poller.statistics()
    return IoStatistics(st.sleeps, st.wakes, st.spins, st.spin_hits)
