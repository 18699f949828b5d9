"""Supervisors: OTP-style restart strategies built on Trio nurseries.

A supervisor owns one nursery per run. Each child instance runs in it inside
its own cancel scope and never lets an ``Exception`` escape into the nursery:
it reports its end as an event, and the supervisor's loop (the nursery's body)
decides, one event at a time, whether to restart, whom, and after what delay,
or to give up. Giving up stops the children in reverse start order and raises
:class:`SupervisorGaveUp` out of the run, which is a failure of this
supervisor in *its* parent, exactly as in OTP.

Prior art: Erlang/OTP ``supervisor`` (strategies, intensity/period, restart
types, reverse-order shutdown) and tractor's supervision as an async context
manager over nested nurseries.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar, overload

import trio

from ._actor import ActorRef, ActorStatistics, _ActorCell
from ._child import _Child, _Started, collapse, unwrap_body_error
from ._errors import ActorCrashed, ActorStopped, SupervisorGaveUp
from ._spec import Backoff, ChildSpec, Restart, Status, Strategy, SupervisorSpec

M = TypeVar("M")
R = TypeVar("R")

#: (child, generation of the run that ended, its failure or None for a normal end).
_Exit: TypeAlias = tuple[_Child, int, Exception | None]

log = logging.getLogger("cellmesh.supervisor")


@dataclass(frozen=True, slots=True)
class SupervisorStatistics:
    """A snapshot of a supervisor and, recursively, of its children.

    Attributes:
        name: the supervisor's name.
        status: its current status.
        strategy: its restart strategy.
        restarts: times its own parent restarted it.
        failures: times it gave up (or failed to start again).
        children: one snapshot per child, in start order.
    """

    name: str
    status: Status
    strategy: Strategy
    restarts: int
    failures: int
    children: tuple[ActorStatistics | SupervisorStatistics, ...]


class Supervisor(_Child):
    """A running supervisor: start, find and stop its children.

    Get one from :func:`open_supervisor` or, nested, from
    ``await parent.start_child(SupervisorSpec(...))``.

    Attributes:
        name: the supervisor's name.
        spec: the :class:`SupervisorSpec` it runs.
        status: a ``trio_util.AsyncValue`` holding its :class:`Status`.
    """

    def __init__(self, spec: SupervisorSpec) -> None:
        super().__init__(spec.name, spec.restart)
        self.spec = spec
        self._children: dict[str, _Child] = {}
        self._nursery: trio.Nursery | None = None
        self._accepting = False
        self._ever_started = False
        self._loop_scope: trio.CancelScope | None = None
        #: Times of restarts within the current run, for the intensity limit.
        self._restart_log: deque[float] = deque()
        self._exits_send, self._exits_recv = trio.open_memory_channel[_Exit](0)
        self._gave_up: SupervisorGaveUp | None = None

    def __repr__(self) -> str:
        return f"<Supervisor {self.name!r} {self.status.value.value}>"

    # ---- public face -------------------------------------------------------

    @overload
    async def start_child(self, spec: ChildSpec[M, R]) -> ActorRef[M, R]: ...

    @overload
    async def start_child(self, spec: SupervisorSpec) -> Supervisor: ...

    async def start_child(
        self, spec: ChildSpec[Any, Any] | SupervisorSpec
    ) -> ActorRef[Any, Any] | Supervisor:
        """Add a child and start it; returns once it is running.

        Args:
            spec: a :class:`ChildSpec` (an actor) or a :class:`SupervisorSpec`.

        Returns:
            The actor's :class:`ActorRef`, or the nested :class:`Supervisor`.

        Raises:
            ValueError: a child with that name exists.
            ActorStopped: this supervisor is not running.
            ActorCrashed: the child failed to start (cause chained); it is
                not added and this does not count as a restart.
        """
        if not self._accepting:
            raise ActorStopped(self.name, f"supervisor {self.name!r} is not running")
        child = await self._start_new(spec)
        if isinstance(child, _ActorCell):
            return child.ref
        assert isinstance(child, Supervisor)
        return child

    def actor(self, name: str) -> ActorRef[Any, Any]:
        """The reference of the child actor called ``name``.

        Raises:
            KeyError: no such child actor (it may have stopped for good).
        """
        child = self._children.get(name)
        if not isinstance(child, _ActorCell):
            raise KeyError(f"supervisor {self.name!r} has no actor {name!r}")
        return child.ref

    def supervisor(self, name: str) -> Supervisor:
        """The nested supervisor called ``name``.

        Raises:
            KeyError: no such child supervisor.
        """
        child = self._children.get(name)
        if not isinstance(child, Supervisor):
            raise KeyError(f"supervisor {self.name!r} has no supervisor {name!r}")
        return child

    def children(self) -> tuple[str, ...]:
        """The names of the current children, in start order."""
        return tuple(self._children)

    async def stop_child(self, name: str) -> None:
        """Stop a child for good (it is not restarted) and wait until it has.

        Raises:
            KeyError: no such child.
        """
        child = self._children[name]
        if not child._final:
            child._stop_requested = True
            child._halt()
        await child._finalized.wait()

    def statistics(self) -> SupervisorStatistics:
        """A snapshot of this supervisor and all its descendants."""
        return SupervisorStatistics(
            name=self.name,
            status=self.status.value,
            strategy=self.spec.strategy,
            restarts=self._restarts,
            failures=self._failures,
            children=tuple(child.statistics() for child in self._children.values()),
        )

    # ---- one run -----------------------------------------------------------

    def _halt(self) -> None:
        # A running supervisor stops gracefully: leaving its loop makes it stop
        # the children in reverse start order. Otherwise cancel outright.
        if self._loop_scope is not None:
            self._loop_scope.cancel()
        else:
            super()._halt()

    async def _run_once(self, task_status: _Started) -> None:
        try:
            await self._live(task_status)
        except BaseExceptionGroup as group:
            failure = collapse(group)
            if failure is group:
                raise
        else:
            return
        raise failure

    async def _live(self, task_status: _Started) -> None:
        self.status.value = Status.STARTING
        self._restart_log.clear()
        # Unbounded on purpose, and still bounded: each child run reports its
        # end at most once, so it never holds more than one item per child.
        self._exits_send, exits = trio.open_memory_channel[_Exit](math.inf)
        gave_up: SupervisorGaveUp | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._ever_started:
                for child in list(self._children.values()):
                    await self._restart_or_drop(child, trigger=None)
            else:
                for spec in self.spec.children:
                    await self._start_new(spec)
                self._ever_started = True
            self._accepting = True
            self.status.value = Status.RUNNING
            task_status.started(self)
            try:
                with trio.CancelScope() as loop_scope:
                    self._loop_scope = loop_scope
                    await self._supervise(exits)
            except SupervisorGaveUp as exc:
                gave_up = exc
            finally:
                self._loop_scope = None
                self._accepting = False
                exits.close()
            for child in reversed(list(self._children.values())):
                await self._stop_instance(child)
        self._nursery = None
        if gave_up is not None:
            raise gave_up

    async def _supervise(self, exits: trio.MemoryReceiveChannel[_Exit]) -> None:
        spec = self.spec
        async for child, generation, failure in exits:
            if child._generation != generation or self._children.get(child.name) is not child:
                continue  # a run we already replaced or dropped
            now = trio.current_time()
            self._count_restart(now, child, failure)
            delay = spec.backoff.delay(child._note_restart(now, spec.period))
            if failure is not None:
                log.warning(
                    "supervisor %s: child %s crashed (%s: %s); restarting it in %.2f s",
                    self.name,
                    child.name,
                    type(failure).__name__,
                    failure,
                    delay,
                )
            if spec.strategy is Strategy.ONE_FOR_ONE:
                generation = child._arm()
                self._nursery_or_raise().start_soon(self._run_child, child, generation, True, delay)
                continue
            group = list(self._children.values())
            if spec.strategy is Strategy.REST_FOR_ONE:
                group = group[group.index(child) :]
            for sibling in reversed(group):
                if sibling is not child:
                    await self._stop_instance(sibling)
            await trio.sleep(delay)
            for member in group:
                await self._restart_or_drop(member, trigger=child)

    def _count_restart(self, now: float, child: _Child, failure: Exception | None) -> None:
        """Record a restart; raise SupervisorGaveUp if it breaks the intensity limit."""
        log = self._restart_log
        while log and log[0] <= now - self.spec.period:
            log.popleft()
        log.append(now)
        if len(log) > self.spec.intensity:
            raise SupervisorGaveUp(
                self.name, child.name, self.spec.intensity, self.spec.period
            ) from failure

    async def _restart_or_drop(self, child: _Child, trigger: _Child | None) -> None:
        """Start a stopped child again, unless it is gone, stopping, or TEMPORARY.

        A TEMPORARY sibling that the supervisor itself stopped is removed, not
        restarted, as OTP does for group restarts.
        """
        if self._children.get(child.name) is not child:
            return
        if child._stop_requested or (child is not trigger and child.restart is Restart.TEMPORARY):
            self._drop(child, Status.STOPPED)
        else:
            generation = child._arm()
            await self._nursery_or_raise().start(self._run_child, child, generation, True, 0.0)

    async def _start_cell(self, cell: _ActorCell[M, R]) -> ActorRef[M, R]:
        """Add and start an actor whose cell the runtime made (a durable node's compute)."""
        if not self._accepting:
            raise ActorStopped(self.name, f"supervisor {self.name!r} is not running")
        await self._start_new(cell.spec, cell)
        return cell.ref

    async def _start_new(
        self, spec: ChildSpec[Any, Any] | SupervisorSpec, made: _Child | None = None
    ) -> _Child:
        if spec.name in self._children:
            raise ValueError(f"supervisor {self.name!r} already has a child {spec.name!r}")
        child: _Child
        if made is not None:
            child = made
        else:
            child = _ActorCell(spec) if isinstance(spec, ChildSpec) else Supervisor(spec)
        self._children[spec.name] = child
        generation = child._arm()
        try:
            await self._nursery_or_raise().start(self._run_child, child, generation, False, 0.0)
        except BaseException as exc:
            if self._children.get(spec.name) is child:
                del self._children[spec.name]
            if not isinstance(exc, Exception):
                child._finalize(Status.STOPPED)
                raise
            child._finalize(Status.FAILED)
            raise ActorCrashed(spec.name, f"{spec.name!r} failed to start: {exc!r}") from exc
        return child

    async def _run_child(
        self,
        child: _Child,
        generation: int,
        restart: bool,
        delay: float,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run one instance of ``child``; report its end unless we stopped it ourselves."""
        started = _Started(task_status)
        failure: Exception | None = None
        ran = False
        try:
            with child._scope:
                if delay > 0:
                    await trio.sleep(delay)
                if restart:
                    child._restarts += 1
                ran = True
                await child._run_once(started)
        except Exception as exc:
            failure = exc
            child._failures += 1
            child._exception = exc
            if not restart and not started.called:
                raise  # a first start: start_child's caller gets the error
        finally:
            child._done.set()
        if ran:
            child._last_failed = failure is not None
        if not started.called:
            # A restart that failed before it was up: the failure is an event
            # like any other, and the supervisor goes on to the next child.
            started.started(None)
        if child._expected_stop or child._final:
            return
        # Decided here, without yielding since the run ended, so that status,
        # membership and the mailbox change together and before any asker
        # woken by the end of the run gets to look.
        if child._stop_requested or not child.restart.wants_restart(failure is not None):
            status = Status.STOPPED if child._stop_requested else child._final_status()
            if self._children.get(child.name) is child:
                self._drop(child, status)
            else:
                child._finalize(status)
            return
        child.status.value = Status.RESTARTING
        # If that supervisor run is over, nobody is left to decide anything.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self._exits_send.send_nowait((child, generation, failure))

    async def _stop_instance(self, child: _Child) -> None:
        """Stop the current run of ``child`` (if any) and wait until it has ended."""
        child._expected_stop = True
        if not child._final:
            child.status.value = Status.RESTARTING
        child._halt()
        await child._done.wait()

    def _drop(self, child: _Child, status: Status) -> None:
        del self._children[child.name]
        child._finalize(status)

    def _nursery_or_raise(self) -> trio.Nursery:
        if self._nursery is None:
            raise ActorStopped(self.name, f"supervisor {self.name!r} is not running")
        return self._nursery

    def _finalize(self, status: Status) -> None:
        if self._final:
            return
        self._final = True
        self._accepting = False
        for child in reversed(list(self._children.values())):
            child._finalize(child._final_status())
        self.status.value = status
        self._finalized.set()


async def _run_root(
    sup: Supervisor,
    body_scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    sup._arm()
    try:
        with sup._scope:
            await sup._run_once(_Started(task_status))
    except SupervisorGaveUp as exc:
        # Kept, not raised: raised from here it would reach the user wrapped in
        # the nursery's ExceptionGroup. open_supervisor raises it bare.
        sup._gave_up = exc
        sup._failures += 1
        sup._last_failed = True
        body_scope.cancel()
    finally:
        sup._done.set()


@asynccontextmanager
async def open_supervisor(
    *children: ChildSpec[Any, Any] | SupervisorSpec,
    name: str = "supervisor",
    strategy: Strategy = Strategy.ONE_FOR_ONE,
    intensity: int = 3,
    period: float = 5.0,
    backoff: Backoff | None = None,
) -> AsyncIterator[Supervisor]:
    """Open a top-level supervisor (an actor system) for the ``async with`` block.

    The children are started in order before the block runs. Leaving the block
    stops every child in reverse start order; no task outlives it, and every
    ask still waiting fails with :class:`ActorStopped`. Cancelling an enclosing
    scope stops everything at once.

    Args:
        children: started in order before the block runs.
        name: the supervisor's name.
        strategy: ONE_FOR_ONE, ONE_FOR_ALL or REST_FOR_ONE.
        intensity: more than this many restarts within ``period`` seconds
            and the supervisor gives up.
        period: the window for ``intensity``, in seconds.
        backoff: restart delays; default ``Backoff()`` (0.1 s doubling to 5 s).

    Yields:
        The running :class:`Supervisor`.

    Raises:
        SupervisorGaveUp: the restart limit was exceeded; the block was
            cancelled and the last failure is chained as ``__cause__``.
        ActorCrashed: one of ``children`` failed to start.
        Exception: an exception raised by the block itself comes out as it
            is, not wrapped in an ExceptionGroup.
    """
    spec = SupervisorSpec(
        name,
        children,
        strategy=strategy,
        intensity=intensity,
        period=period,
        backoff=Backoff() if backoff is None else backoff,
    )
    sup = Supervisor(spec)
    pending: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_run_root, sup, nursery.cancel_scope)
            try:
                yield sup
            finally:
                sup._halt()
    except BaseExceptionGroup as group:
        pending = unwrap_body_error(group)
        if pending is None:
            raise
    finally:
        sup._finalize(Status.FAILED if sup._gave_up is not None else Status.STOPPED)
    # Raised outside the except block so the error does not gain the group as
    # its __context__ (the group already holds it).
    if pending is not None:
        raise pending
    if sup._gave_up is not None:
        raise sup._gave_up
