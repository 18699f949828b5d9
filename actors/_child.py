"""What a supervisor needs from any child, actor or nested supervisor.

A child is long-lived (its name, status, counters and, for actors, its
mailbox); an *instance run* is one life of it between a start and an end. The
supervisor arms a run (cancel scope + done event, synchronously, so a stop can
never miss a run that is about to begin) and then runs it in its nursery.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import trio
from trio_util import AsyncValue

from ._spec import Restart, Status


class _Started:
    """Wraps a ``task_status`` to remember whether ``started()`` was called."""

    __slots__ = ("_inner", "called")

    def __init__(self, inner: trio.TaskStatus[Any]) -> None:
        self._inner = inner
        self.called = False

    def started(self, value: Any = None) -> None:
        self.called = True
        self._inner.started(value)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """The non-group exceptions inside ``exc``, depth first."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def collapse(exc: BaseException) -> BaseException:
    """Undo Trio's strict exception-group wrapping where it carries no information.

    A group holding exactly one real failure becomes that failure; a group with
    several stays a group. A group holding anything that is not an
    ``Exception`` (``Cancelled``, ``KeyboardInterrupt``) is returned unchanged,
    because those must keep propagating as they are.
    """
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = list(_leaves(exc))
    if not all(isinstance(leaf, Exception) for leaf in leaves):
        return exc
    return leaves[0] if len(leaves) == 1 else exc


def unwrap_body_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The single non-cancellation error in ``group``, or None if there is not exactly one.

    Used where our own nursery wraps the user's ``async with`` body: a
    ``KeyError`` raised in the body should come out as a ``KeyError``.
    """
    real = [leaf for leaf in _leaves(group) if not isinstance(leaf, trio.Cancelled)]
    return real[0] if len(real) == 1 else None


class _Child:
    """State shared by every supervised child, kept across restarts."""

    def __init__(self, name: str, restart: Restart) -> None:
        self.name = name
        self.restart = restart
        self.status: Any = AsyncValue(Status.STARTING)
        self._restarts = 0
        self._failures = 0
        self._exception: BaseException | None = None
        self._last_failed = False
        #: Times of this child's recent restarts, for the backoff attempt number.
        self._restart_times: deque[float] = deque()
        self._generation = 0
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._done.set()
        #: Set by a deliberate stop (``ref.stop()``/``stop_child``): never restart.
        self._stop_requested = False
        #: Set when the supervisor itself stops this run: its end is not an event.
        self._expected_stop = False
        self._final = False
        self._finalized = trio.Event()

    def _arm(self) -> int:
        """Prepare the next instance run; returns its generation number."""
        self._generation += 1
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._expected_stop = False
        return self._generation

    def _halt(self) -> None:
        """Make the current instance run (or pending restart) end soon."""
        self._scope.cancel()

    def _note_restart(self, now: float, period: float) -> int:
        """Record a restart at ``now``; returns how many came before it within ``period``."""
        times = self._restart_times
        while times and times[0] <= now - period:
            times.popleft()
        attempt = len(times)
        times.append(now)
        return attempt

    async def _run_once(self, task_status: _Started) -> None:
        """One instance run: start, call ``task_status.started()``, serve, end.

        Returns on a normal end, raises the failure (collapsed, see
        :func:`collapse`) on a crash.
        """
        raise NotImplementedError

    def _finalize(self, status: Status) -> None:
        """End this child for good (idempotent): nothing will run it again."""
        raise NotImplementedError

    def statistics(self) -> Any:
        """A frozen snapshot of this child (ActorStatistics or SupervisorStatistics)."""
        raise NotImplementedError

    def _final_status(self) -> Status:
        return Status.FAILED if self._last_failed else Status.STOPPED
