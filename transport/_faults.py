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


class FaultDraws:
    """The seeded draws that decide each message's fate: the one place the rule lives.

    :class:`FaultInjector` (a link's outgoing messages) and
    :class:`~transport.MemoryNetwork` (one direction between two nodes) both
    draw here, so the two apply a plan alike. Per message, in this order:
    drop with probability ``drop``; otherwise a second copy with probability
    ``duplicate``; then, if the plan delays, each copy's extra delay, uniform
    in ``[0, delay]``. The plan is passed per message, so one generator keeps
    its sequence when the plan in force changes.

    Args:
        seed: seeds the generator (any string; a run with the same one
            repeats the same fates).
    """

    __slots__ = ("_rng", "delayed", "dropped", "duplicated")

    def __init__(self, seed: str) -> None:
        self._rng = random.Random(seed)
        #: Messages dropped so far.
        self.dropped = 0
        #: Messages that got a second copy so far.
        self.duplicated = 0
        #: Copies given an extra delay so far.
        self.delayed = 0

    def copies(self, plan: FaultPlan) -> list[float]:
        """Draw one message's fate under ``plan``.

        Returns:
            One extra delay in seconds per copy to send: none when the message
            is dropped, two when it is duplicated, each 0.0 if the plan does
            not delay.
        """
        rng = self._rng
        if plan.drop and rng.random() < plan.drop:
            self.dropped += 1
            return []
        copies = 1
        if plan.duplicate and rng.random() < plan.duplicate:
            self.duplicated += 1
            copies = 2
        if not plan.delay:
            return [0.0] * copies
        self.delayed += copies
        return [rng.random() * plan.delay for _ in range(copies)]


class FaultInjector(Generic[T]):
    """Applies a :class:`FaultPlan` to a stream of outgoing messages."""

    def __init__(self, plan: FaultPlan, *, salt: str = "") -> None:
        self._plan = plan
        # A salt (e.g. the link's name) gives each link of one run its own,
        # still repeatable, pattern of faults.
        self._draws = FaultDraws(f"{plan.seed}:{salt}")
        self._held: list[tuple[float, int, T]] = []
        self._order = itertools.count()
        self._passed = 0

    @property
    def active(self) -> bool:
        """Whether the plan changes anything; if not, callers may skip it."""
        return self._plan.active

    def submit(self, message: T, now: float) -> list[T]:
        """Offer one outgoing message; returns the messages to send right now."""
        extras = self._draws.copies(self._plan)
        if not self._plan.delay:
            self._passed += len(extras)
            return [message] * len(extras)
        # With a delaying plan every copy goes through the held heap, a 0.0
        # draw included, so due() hands copies out in due-time order.
        for extra in extras:
            heapq.heappush(self._held, (now + extra, next(self._order), message))
        return []

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
        draws = self._draws
        return FaultStatistics(
            passed=self._passed,
            dropped=draws.dropped,
            duplicated=draws.duplicated,
            delayed=draws.delayed,
            held=len(self._held),
        )
