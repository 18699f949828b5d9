"""Poll before parking: the short wait blocking pyzmq and MPI get for free.

A Trio task that parks on a socket's fd pays for it when the message comes:
the kernel wakes Trio's epoll, Trio reschedules the task, and only then does
it read (design.md §5 prices the hop at 10-30 µs; a node round trip has
several). Blocking pyzmq and MPI wait inside the call instead. When an answer
is imminent, polling for it a little while is cheaper than parking, so an
owner (:class:`~transport.SocketPoller`, :meth:`~transport.Socket.wait_ready`)
asks a :class:`Spin` first. The rules keep it from costing anyone else:

- it polls only when no other Trio task is runnable (polling holds the event
  loop: they would wait), and never past Trio's next deadline;
- at most ``limit`` seconds, with ``os.sched_yield()`` between polls, so a
  process sharing the core (four nodes on two cores) runs meanwhile;
- adaptively: a spin that finds nothing disarms it, and the owner parks at
  once until a park ends by a message within ``limit`` again. An idle node
  therefore spins at most once per message that follows a pause, not per
  timer, and uses no core (docs/performance.md measures both).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import trio

__all__ = ["Spin"]

_T = TypeVar("_T")


class Spin:
    """One owner's poll-before-park state: armed or not, and counters.

    Args:
        limit: seconds one spin may last (0 never spins).
    """

    __slots__ = ("_armed", "hits", "limit", "spins")

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._armed = limit > 0.0
        #: Spins begun, and those that found something.
        self.spins = 0
        self.hits = 0

    def reset(self, limit: float) -> None:
        """Use a new limit from now on (armed, if it is not 0)."""
        self.limit = limit
        self._armed = limit > 0.0

    @property
    def armed(self) -> bool:
        """Whether the next :meth:`poll` may spin (the owner yields once first)."""
        return self._armed

    def poll(self, probe: Callable[[], _T]) -> _T | None:
        """Call ``probe`` until it returns something true, within the rules above.

        Returns:
            What ``probe`` returned, or None if this owner should park.
        """
        if not self._armed:
            return None
        stats = trio.lowlevel.current_statistics()
        if stats.tasks_runnable:
            return None
        self.spins += 1
        clock = time.perf_counter
        end = clock() + min(self.limit, stats.seconds_to_next_deadline)
        while True:
            found = probe()
            if found:
                self.hits += 1
                return found
            if clock() >= end:
                self._armed = False
                return None
            os.sched_yield()

    def parked(self, since: float, *, by_message: bool) -> None:
        """A park that began at ``since`` (``time.perf_counter``) has ended.

        It re-arms the spin if a message ended it within the limit: the next
        one may be as close.
        """
        if by_message and self.limit > 0.0 and time.perf_counter() - since <= self.limit:
            self._armed = True
