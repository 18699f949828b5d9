"""Seeded fault injection on outgoing messages: drop, duplicate, delay.

The same plan serves the demo's ``--drop/--dup/--delay`` options, the chaos
tests and users' own tests. It is sans-IO like the protocol core: messages
go in with the current time, and come out when they are due, so a shell can
sleep until :meth:`FaultInjector.next_deadline`. Delaying messages by a random
amount also reorders them, which is the point.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass
from typing import Generic, TypeVar

from ._errors import LocalProtocolError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """What goes wrong on the wire, and how often.

    Attributes:
        drop: probability that a message is silently lost.
        duplicate: probability that a message is sent twice.
        delay: the largest extra delay in seconds; each message is held back
            by a uniform random time in ``[0, delay]``, which reorders them.
        seed: makes a run repeatable.
    """

    drop: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise LocalProtocolError(f"FaultPlan.{name} must be in [0, 1), got {value!r}")
        if self.delay < 0.0:
            raise LocalProtocolError(f"FaultPlan.delay must be >= 0 seconds, got {self.delay!r}")

    @property
    def active(self) -> bool:
        """Whether this plan changes anything at all."""
        return self.drop > 0.0 or self.duplicate > 0.0 or self.delay > 0.0


@dataclass(frozen=True, slots=True)
class FaultStatistics:
    """How many messages each fault hit."""

    passed: int
    dropped: int
    duplicated: int
    delayed: int
    held: int


class FaultInjector(Generic[T]):
    """Applies a :class:`FaultPlan` to a stream of outgoing messages."""

    def __init__(self, plan: FaultPlan, *, salt: str = "") -> None:
        self._plan = plan
        # A salt (e.g. the link's name) gives each link of one run its own,
        # still repeatable, pattern of faults.
        self._rng = random.Random(f"{plan.seed}:{salt}")
        self._held: list[tuple[float, int, T]] = []
        self._order = itertools.count()
        self._passed = self._dropped = self._duplicated = self._delayed = 0

    @property
    def active(self) -> bool:
        """Whether the plan changes anything; if not, callers may skip it."""
        return self._plan.active

    def submit(self, message: T, now: float) -> list[T]:
        """Offer one outgoing message; returns the messages to send right now."""
        plan = self._plan
        rng = self._rng
        if plan.drop and rng.random() < plan.drop:
            self._dropped += 1
            return []
        copies = 1
        if plan.duplicate and rng.random() < plan.duplicate:
            self._duplicated += 1
            copies = 2
        out: list[T] = []
        for _ in range(copies):
            if plan.delay:
                self._delayed += 1
                due = now + rng.random() * plan.delay
                heapq.heappush(self._held, (due, next(self._order), message))
            else:
                self._passed += 1
                out.append(message)
        return out

    def due(self, now: float) -> list[T]:
        """Messages whose delay has passed, in the order they fall due."""
        out: list[T] = []
        held = self._held
        while held and held[0][0] <= now:
            out.append(heapq.heappop(held)[2])
        self._passed += len(out)
        return out

    def next_deadline(self) -> float | None:
        """When the next held message falls due, or None."""
        return self._held[0][0] if self._held else None

    def statistics(self) -> FaultStatistics:
        """Counts of what the plan did so far."""
        return FaultStatistics(
            passed=self._passed,
            dropped=self._dropped,
            duplicated=self._duplicated,
            delayed=self._delayed,
            held=len(self._held),
        )
