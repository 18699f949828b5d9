"""Actors, their references and mailboxes, and unsupervised ``spawn``.

The per-message path is kept lean on purpose (a Trio task hop costs tens of
microseconds here): with ``max_concurrency == 1`` one task loops over the
mailbox and awaits ``receive`` inline; with N > 1, N such tasks share the
mailbox. No task is spawned per message.

Several messages may share one mailbox entry (:meth:`ActorRef.send_items`,
used for the items of a batch send): one task takes them back to back, in
order, each handled exactly as if it had been sent alone. If the instance
ends in the middle (a crash on one of them, ``exit()``), the messages not
yet taken are carried over to the next instance, ahead of the mailbox, or
failed with :class:`ActorStopped` if there is none.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import trio

from ._child import _Child, _Started, collapse
from ._errors import ActorCrashed, ActorStopped, AskTimeout
from ._outcomes import Reject
from ._spec import DEFAULT_MAILBOX_SIZE, DEFAULT_SHUTDOWN, ChildSpec, Restart, Status

M = TypeVar("M")
R = TypeVar("R")

#: Default ``ask`` timeout in seconds, the same as OTP's ``gen_server:call``.
DEFAULT_ASK_TIMEOUT = 5.0

_names = itertools.count(1)

#: Messages an actor takes from its mailbox back to back before it yields.
_DRAIN_RUN = 64


class ReplySink(Protocol):
    """Where the reply to a message goes: the runtime settles it exactly once.

    ``ask`` uses one internally; a framework (the node's delivery path) passes
    its own to :meth:`ActorRef.send` to learn each message's outcome without a
    task per message.
    """

    def set_result(self, value: Any) -> None:
        """``receive`` returned ``value``."""

    def fail(self, error: BaseException) -> None:
        """``receive`` raised ``Reject``, or the actor crashed or stopped."""


class ItemsReplySink(Protocol):
    """Where the replies to the messages of one :meth:`ActorRef.send_items` go.

    The runtime settles each message exactly once, by its index.
    """

    def set_item_result(self, index: int, value: Any) -> None:
        """``receive`` returned ``value`` for message ``index``."""

    def fail_item(self, index: int, error: BaseException) -> None:
        """``receive`` raised ``Reject`` for message ``index``, or the actor
        crashed or stopped before or while handling it."""


class _Reply:
    """One-shot result holder that travels with an ``ask``.

    Settled once (result or error); a reply that comes after the asker gave up
    is dropped here, so it cannot leak into anything else.
    """

    __slots__ = ("_error", "_event", "_settled", "_value")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._settled = False

    def set_result(self, value: Any) -> None:
        if not self._settled:
            self._settled = True
            self._value = value
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self._settled:
            self._settled = True
            self._error = error
            self._event.set()

    def abandon(self) -> None:
        """The asker is gone: settle now so that a late reply is not stored."""
        self._settled = True
        self._value = None

    async def wait(self) -> Any:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value


@dataclass(frozen=True, slots=True)
class _Envelope(Generic[M]):
    """A mailbox item: the message and, for an ``ask``, where the reply goes."""

    msg: M
    reply: ReplySink | None


class _Items(Generic[M]):
    """A mailbox item holding several messages, taken in order from ``next`` on.

    While its task handles one of them, ``current`` is that one's index and
    the item stands in the instance's in-hand set for it: if the instance
    ends there, :meth:`fail` answers that message (and only that one).
    """

    __slots__ = ("current", "msgs", "next", "reply")

    def __init__(self, msgs: Sequence[M], reply: ItemsReplySink | None) -> None:
        self.msgs = msgs
        self.reply = reply
        self.next = 0
        self.current: int | None = None

    def set_result(self, value: Any) -> None:
        if self.current is not None and self.reply is not None:
            self.reply.set_item_result(self.current, value)
            self.current = None

    def fail(self, error: BaseException) -> None:
        if self.current is not None and self.reply is not None:
            self.reply.fail_item(self.current, error)
            self.current = None

    def fail_rest(self, error: BaseException) -> None:
        """Answer every message not taken yet with ``error``."""
        reply = self.reply
        start = self.next
        self.next = len(self.msgs)
        if reply is not None:
            for index in range(start, self.next):
                reply.fail_item(index, error)


class Actor(Generic[M, R]):
    """Base class of user actors: override :meth:`receive`, optionally the hooks.

    An instance handles one message at a time, in mailbox order, unless the
    class sets ``max_concurrency`` (or its :class:`ChildSpec` does). The value
    ``receive`` returns is the reply to an ``ask``; for ``send`` it is dropped.

    Raising :class:`Reject` from ``receive`` is an answer, not a crash: the
    asker (or the node's sender, as ERR) gets it and the actor carries on.
    Any other exception escaping ``receive`` (or ``on_start``, or a task
    started in :attr:`nursery`) crashes the instance: its supervisor decides what happens
    next, and an unsupervised actor's crash propagates into the nursery it was
    spawned in.
    """

    #: Messages handled at once; 1 means one at a time, in mailbox order.
    max_concurrency: ClassVar[int] = 1

    _cellmesh_cell: _ActorCell[M, R] | None = None
    _cellmesh_nursery: trio.Nursery | None = None

    async def on_start(self) -> None:
        """Called before the first message; the spawner waits until it returns."""

    async def receive(self, msg: M) -> R:
        """Handle one message; the return value is the reply to an ``ask``.

        Args:
            msg: the message as sent.

        Returns:
            The reply, delivered to the asker (ignored for ``send``).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement receive()")

    async def on_stop(self) -> None:
        """Called when this instance ends, for any reason, if ``on_start`` completed.

        It runs shielded from cancellation, for at most the spec's ``shutdown``
        seconds, after the background tasks in :attr:`nursery` have ended.
        """

    @property
    def ref(self) -> ActorRef[M, R]:
        """This actor's reference (the same object across restarts)."""
        return self._cell().ref

    @property
    def nursery(self) -> trio.Nursery:
        """A nursery for background tasks that live as long as this instance.

        They are cancelled when the instance ends; an exception in one of them
        crashes the instance.
        """
        if self._cellmesh_nursery is None:
            raise RuntimeError("the actor is not running: nursery exists from on_start on")
        return self._cellmesh_nursery

    def exit(self) -> None:
        """End this instance normally once no handler is running.

        The restart policy then decides: a PERMANENT child is restarted, a
        TRANSIENT or TEMPORARY one stops for good (messages still queued are
        dropped and their asks fail with :class:`ActorStopped`).
        """
        self._cell()._request_exit()

    def _cell(self) -> _ActorCell[M, R]:
        if self._cellmesh_cell is None:
            raise RuntimeError("the actor is not running: spawn it or give it to a supervisor")
        return self._cellmesh_cell


@dataclass(frozen=True, slots=True)
class ActorStatistics:
    """A snapshot of one actor.

    Attributes:
        name: the actor's name.
        status: its current status.
        mailbox_depth: messages queued and not yet taken.
        mailbox_size: the mailbox capacity.
        senders_waiting: tasks blocked in ``send``/``ask`` because it is full.
        in_hand: messages being handled right now.
        processed: messages whose ``receive`` returned, over all instances.
        failures: instances that crashed.
        restarts: instances started after the first.
    """

    name: str
    status: Status
    mailbox_depth: int
    mailbox_size: int
    senders_waiting: int
    in_hand: int
    processed: int
    failures: int
    restarts: int


class ActorRef(Generic[M, R]):
    """The handle others use to talk to an actor; survives its restarts.

    Attributes:
        status: a ``trio_util.AsyncValue`` holding the :class:`Status`;
            ``await ref.status.wait_value(Status.RUNNING)``.
    """

    __slots__ = ("_cell", "status")

    def __init__(self, cell: _ActorCell[M, R]) -> None:
        self._cell = cell
        self.status: Any = cell.status

    def __repr__(self) -> str:
        return f"<ActorRef {self._cell.name!r} {self._cell.status.value.value}>"

    @property
    def name(self) -> str:
        """The actor's name."""
        return self._cell.name

    @property
    def exception(self) -> BaseException | None:
        """The exception that ended the most recent crashed instance, if any."""
        return self._cell._exception

    async def send(self, msg: M, *, reply: ReplySink | None = None) -> None:
        """Put ``msg`` in the mailbox, waiting while it is full (backpressure).

        Args:
            msg: the message.
            reply: optional sink for the outcome of handling ``msg``; without
                one, the outcome goes nowhere.

        Raises:
            ActorStopped: the actor is stopped for good.
        """
        await self._post(_Envelope(msg, reply))

    def send_nowait(self, msg: M, *, reply: ReplySink | None = None) -> None:
        """Put ``msg`` in the mailbox now.

        Args:
            msg: the message.
            reply: optional sink for the outcome, as for :meth:`send`.

        Raises:
            trio.WouldBlock: the mailbox is full.
            ActorStopped: the actor is stopped for good.
        """
        self._post_nowait(_Envelope(msg, reply))

    async def send_items(self, msgs: Sequence[M], *, reply: ItemsReplySink | None = None) -> None:
        """Put several messages in the mailbox as one entry, waiting while it is full.

        They are handled back to back, in order, each exactly as if sent
        alone: its own ``receive`` call and its own reply, given to ``reply``
        with its index. A crash on one fails that one (as any crash does) and
        the next instance takes the rest, before anything else in the
        mailbox; if the actor stops for good, the rest fail with
        :class:`ActorStopped`. They take one place in the mailbox, however
        many they are.

        Args:
            msgs: the messages.
            reply: optional sink for each message's outcome, by index.

        Raises:
            ActorStopped: the actor is stopped for good.
        """
        await self._post(_Items(msgs, reply))

    def send_items_nowait(self, msgs: Sequence[M], *, reply: ItemsReplySink | None = None) -> None:
        """Put several messages in the mailbox now, as one entry (see :meth:`send_items`).

        Raises:
            trio.WouldBlock: the mailbox is full; nothing was put in it.
            ActorStopped: the actor is stopped for good.
        """
        self._post_nowait(_Items(msgs, reply))

    async def _post(self, entry: _Envelope[M] | _Items[M]) -> None:
        """Put one mailbox entry, waiting while the mailbox is full."""
        cell = self._cell
        if cell._final:
            raise cell._stopped_error()
        try:
            await cell._send_chan.send(entry)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise cell._stopped_error() from None

    def _post_nowait(self, entry: _Envelope[M] | _Items[M]) -> None:
        """Put one mailbox entry now, or raise ``trio.WouldBlock``."""
        cell = self._cell
        if cell._final:
            raise cell._stopped_error()
        try:
            cell._send_chan.send_nowait(entry)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise cell._stopped_error() from None

    # The timeout is part of ask's contract, as in OTP's call/3: by default
    # nothing waits forever, and expiry surfaces as the typed AskTimeout.
    async def ask(self, msg: M, *, timeout: float = DEFAULT_ASK_TIMEOUT) -> R:
        """Send ``msg`` and wait for ``receive``'s return value.

        The timeout covers both the wait for room in the mailbox and the wait
        for the reply. If it passes, the message may still be handled later;
        its reply is then dropped.

        Args:
            msg: the request.
            timeout: seconds to wait in total (``math.inf`` for no limit).

        Returns:
            What the actor's ``receive`` returned for this message.

        Raises:
            AskTimeout: no reply within ``timeout`` (a ``trio.TooSlowError``).
            ActorCrashed: the actor crashed while handling it (cause chained).
            ActorStopped: the actor stopped before or while handling it.
        """
        cell = self._cell
        if cell._final:
            raise cell._stopped_error()
        reply = _Reply()
        try:
            with trio.fail_after(timeout):
                try:
                    await cell._send_chan.send(_Envelope(msg, reply))
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    raise cell._stopped_error() from None
                result: R = await reply.wait()
                return result
        except trio.TooSlowError:
            reply.abandon()
            raise AskTimeout(f"no reply from {cell.name!r} within {timeout} s") from None
        except BaseException:
            reply.abandon()
            raise

    async def stop(self) -> None:
        """Stop the actor for good (it is not restarted) and wait until it has.

        The handler in progress is cancelled; asks in hand or still queued fail
        with :class:`ActorStopped`. Call it from outside the actor; from inside,
        use :meth:`Actor.exit`.
        """
        cell = self._cell
        if not cell._final:
            cell._stop_requested = True
            cell._halt()
        await cell._finalized.wait()

    def statistics(self) -> ActorStatistics:
        """A snapshot of the actor's mailbox and counters."""
        return self._cell.statistics()


class _ActorCell(_Child, Generic[M, R]):
    """The long-lived part of an actor: spec, mailbox, ref, counters."""

    def __init__(self, spec: ChildSpec[M, R]) -> None:
        super().__init__(spec.name, spec.restart)
        self.spec = spec
        self._send_chan, self._recv_chan = trio.open_memory_channel[_Envelope[M] | _Items[M]](
            spec.mailbox_size
        )
        self.ref: ActorRef[M, R] = ActorRef(self)
        self._processed = 0
        self._busy = 0
        self._exit_requested = False
        self._serve_scope: trio.CancelScope | None = None
        # Shared mailbox entries an instance ended in the middle of: the next
        # instance takes their remaining messages first.
        self._carried: deque[_Items[M]] = deque()

    def _stopped_error(self) -> ActorStopped:
        return ActorStopped(self.name, f"actor {self.name!r} is stopped")

    def _request_exit(self) -> None:
        self._exit_requested = True
        if self._busy == 0 and self._serve_scope is not None:
            self._serve_scope.cancel()

    async def _run_once(self, task_status: _Started) -> None:
        self.status.value = Status.STARTING
        self._busy = 0
        self._exit_requested = False
        actor = self.spec.factory()
        concurrency = self.spec.max_concurrency or actor.max_concurrency
        try:
            await self._live(actor, concurrency, task_status)
        except BaseExceptionGroup as group:
            failure = collapse(group)
            if failure is group:
                raise
        else:
            return
        # Raised outside the except block so that the user's exception keeps
        # its own __context__ instead of gaining our nursery's group.
        raise failure

    async def _live(self, actor: Actor[M, R], concurrency: int, task_status: _Started) -> None:
        in_hand: set[ReplySink] = set()
        started = False
        failure: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                actor._cellmesh_cell = self
                actor._cellmesh_nursery = nursery
                await actor.on_start()
                started = True
                self.status.value = Status.RUNNING
                task_status.started(self.ref)
                with trio.CancelScope() as serve_scope:
                    self._serve_scope = serve_scope
                    if self._exit_requested:
                        serve_scope.cancel()
                    if concurrency == 1:
                        await self._work(actor, in_hand)
                    else:
                        async with trio.open_nursery() as workers:
                            for _ in range(concurrency):
                                workers.start_soon(self._work, actor, in_hand)
                # Only exit() ends serving without an exception: end the
                # instance's background tasks with it.
                nursery.cancel_scope.cancel()
        except BaseException as exc:
            failure = collapse(exc)
            raise
        finally:
            self._serve_scope = None
            self._busy = 0
            actor._cellmesh_nursery = None
            try:
                if started:
                    with trio.move_on_after(self.spec.shutdown, shield=True):
                        await actor.on_stop()
            finally:
                # From here to the status update in the runner nothing yields,
                # so an asker woken by this never sees a stale RUNNING.
                self._fail_in_hand(in_hand, failure)

    async def _work(self, actor: Actor[M, R], in_hand: set[ReplySink]) -> None:
        """Take messages and handle them until the instance ends.

        One rule for every message, whether it came alone (an ``_Envelope``)
        or as an item of a shared entry (``_Items``): the entry only decides
        which message comes next and where its outcome goes.
        """
        receive = self._recv_chan.receive
        receive_nowait = self._recv_chan.receive_nowait
        handle = actor.receive
        carried = self._carried
        # The shared entry this task is taking messages from, if any.
        items: _Items[M] | None = None
        items_sink: _Items[M] | None = None
        items_end = 0
        run = 0
        try:
            while True:
                # Take what is already queued without a checkpoint, up to a run
                # of _DRAIN_RUN messages: a burst is then handled back to back,
                # so whoever waits on the results (the node's answer flusher)
                # wakes once per burst instead of once per message. The
                # checkpoint after a run keeps the actor cancellable and fair to
                # other tasks; a shared entry cancelled there is carried over
                # before its next message is taken.
                if run >= _DRAIN_RUN:
                    await trio.lowlevel.checkpoint()
                    run = 0
                sink: ReplySink | None
                if items is not None:
                    i = items.next
                    if i == items_end:
                        # A shared entry counts as a run of its own: yield
                        # before the next take.
                        items = None
                        run = _DRAIN_RUN
                        continue
                    items.next = i + 1
                    items.current = i
                    msg = items.msgs[i]
                    sink = items_sink
                    run += 1
                else:
                    entry: Any
                    if carried:
                        entry = carried.popleft()
                    else:
                        try:
                            entry = receive_nowait()
                            run += 1
                        except trio.WouldBlock:
                            entry = await receive()
                            run = 0
                    if type(entry) is _Items:
                        items = entry
                        items_end = len(entry.msgs)
                        items_sink = entry if entry.reply is not None else None
                        # Its messages are counted from its start: the first
                        # _DRAIN_RUN go back to back.
                        run = 0
                        continue
                    msg = entry.msg
                    sink = entry.reply
                self._busy += 1
                if sink is None:
                    # A Reject is an answer, not a crash: nobody asked, so it goes nowhere.
                    with contextlib.suppress(Reject):
                        await handle(msg)
                else:
                    in_hand.add(sink)
                    try:
                        result = await handle(msg)
                    except Reject as reject:
                        in_hand.discard(sink)
                        sink.fail(reject)
                    else:
                        in_hand.discard(sink)
                        sink.set_result(result)
                self._busy -= 1
                self._processed += 1
                if self._exit_requested:
                    self._request_exit()
                    return
        finally:
            # Left in the middle of a shared entry (a crash, a cancel, exit()):
            # the rest is carried over; the one in hand, if any, is failed by _live.
            if items is not None and items.next < len(items.msgs):
                carried.append(items)

    def _fail_in_hand(self, in_hand: set[ReplySink], failure: BaseException | None) -> None:
        """Answer every ask whose handler this instance's end interrupted."""
        for reply in in_hand:
            error: BaseException
            if isinstance(failure, Exception):
                error = ActorCrashed(
                    self.name, f"actor {self.name!r} crashed while handling this message"
                )
                error.__cause__ = failure
            else:
                error = ActorStopped(
                    self.name, f"actor {self.name!r} stopped while handling this message"
                )
            reply.fail(error)
        in_hand.clear()

    def _finalize(self, status: Status) -> None:
        if self._final:
            return
        self._final = True
        # In the order they would have been taken: carried-over items come
        # ahead of the mailbox.
        while self._carried:
            self._carried.popleft().fail_rest(self._stopped_error())
        # Draining also takes the items of senders blocked on a full mailbox,
        # so after this loop nobody waits on the mailbox any more.
        while True:
            try:
                envelope = self._recv_chan.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if isinstance(envelope, _Items):
                envelope.fail_rest(self._stopped_error())
            elif envelope.reply is not None:
                envelope.reply.fail(self._stopped_error())
        self._send_chan.close()
        self._recv_chan.close()
        self.status.value = status
        self._finalized.set()

    def statistics(self) -> ActorStatistics:
        chan = self._recv_chan.statistics()
        return ActorStatistics(
            name=self.name,
            status=self.status.value,
            mailbox_depth=chan.current_buffer_used,
            mailbox_size=self.spec.mailbox_size,
            senders_waiting=chan.tasks_waiting_send,
            in_hand=self._busy,
            processed=self._processed,
            failures=self._failures,
            restarts=self._restarts,
        )


async def spawn(
    nursery: trio.Nursery,
    factory: Callable[[], Actor[M, R]],
    *,
    name: str | None = None,
    mailbox_size: int = DEFAULT_MAILBOX_SIZE,
    max_concurrency: int | None = None,
    shutdown: float = DEFAULT_SHUTDOWN,
) -> ActorRef[M, R]:
    """Start an unsupervised actor in ``nursery``; returns once ``on_start`` is done.

    Nothing restarts it. When it crashes, :class:`ActorCrashed` (with the
    actor's exception as ``__cause__``) is raised into ``nursery``, which
    cancels its siblings as any failing Trio task does. It stops when the
    nursery is cancelled, on ``ref.stop()``, or when it calls ``exit()``.

    Args:
        nursery: where the actor's task lives.
        factory: builds the actor instance.
        name: defaults to the factory's name plus a counter.
        mailbox_size: capacity of the bounded mailbox.
        max_concurrency: messages handled at once (None: the class's value).
        shutdown: seconds ``on_stop`` may take.

    Returns:
        The actor's reference.

    Raises:
        ActorCrashed: the factory or ``on_start`` raised (cause chained).
    """
    if name is None:
        name = f"{getattr(factory, '__name__', 'actor')}-{next(_names)}"
    spec = ChildSpec(name, factory, Restart.TEMPORARY, mailbox_size, max_concurrency, shutdown)
    ref: ActorRef[M, R] = await nursery.start(_run_unsupervised, _ActorCell(spec))
    return ref


async def _run_unsupervised(
    cell: _ActorCell[Any, Any], *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    started = _Started(task_status)
    cell._arm()
    try:
        with cell._scope:
            await cell._run_once(started)
    except Exception as exc:
        cell._failures += 1
        cell._exception = exc
        cell._last_failed = True
        cell._finalize(Status.FAILED)
        verb = "crashed" if started.called else "failed to start"
        raise ActorCrashed(cell.name, f"actor {cell.name!r} {verb}: {exc!r}") from exc
    except BaseException:
        cell._finalize(Status.STOPPED)
        raise
    else:
        cell._finalize(Status.STOPPED)
    finally:
        cell._done.set()
