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
- only while the machine's threads seldom wait for a CPU (Linux's pressure
  stall information, ``/proc/pressure/cpu``, sampled every 50 ms, under
  30%): with more runnable threads than cores (four grid nodes on two) a
  poller's core is one the others wanted; where PSI is missing, polling is
  allowed;
- at most ``limit`` seconds, with ``os.sched_yield()`` between polls;
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

#: The kernel's CPU pressure: microseconds some task waited for a CPU, in all.
_PSI_CPU = "/proc/pressure/cpu"

#: How often the pressure is sampled (seconds), and the share of that time
#: some task may have waited for a CPU before polling stops: above it, a
#: poller would take a core from a thread that has work. Measured shares on
#: 2 cores: idle 0; a lockstep exchange of two processes 7% parking, 20%
#: polling (the poller's own share: below the bar, or polling would turn
#: itself off where it helps most); the Life demo's 2 tiles 6%, its 4 tiles
#: (4 processes on 2 cores) 43%.
_PSI_EVERY = 0.05
_PSI_MAX_SHARE = 0.3


class _CpuPressure:
    """Whether other threads of this machine wait for a CPU now (process-wide, cached)."""

    def __init__(self, path: str = _PSI_CPU) -> None:
        self._path = path
        self._at = -1.0
        self._total = -1
        self._contended = False
        self._available = os.path.exists(path)

    @property
    def available(self) -> bool:
        """Whether this machine reports CPU pressure (else polling is always allowed)."""
        return self._available

    def contended(self, now: float) -> bool:
        """Whether some task waited for a CPU for over 30% of the last sample's span."""
        if not self._available:
            return False
        if now - self._at < _PSI_EVERY:
            return self._contended
        try:
            with open(self._path, "rb") as f:
                first = f.readline()
            total = int(first.rsplit(b"total=", 1)[1])
        except (OSError, ValueError, IndexError):
            self._available = False
            return False
        if self._total >= 0:
            waited = (total - self._total) / 1e6
            self._contended = waited > _PSI_MAX_SHARE * (now - self._at)
        self._at, self._total = now, total
        return self._contended


_PRESSURE = _CpuPressure()


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
        clock = time.perf_counter
        start = clock()
        if _PRESSURE.contended(start):
            return None
        self.spins += 1
        end = start + min(self.limit, stats.seconds_to_next_deadline)
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
