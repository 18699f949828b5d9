"""The values that describe actors and supervisors: statuses, policies, specs.

Names and defaults follow Erlang/OTP's supervisor (``child_spec``, restart
``permanent | transient | temporary``, ``intensity``/``period``) and Elixir's
defaults (3 restarts in 5 seconds), with an exponential restart backoff added.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from ._actor import Actor

M = TypeVar("M")
R = TypeVar("R")

#: Default mailbox capacity of an actor (messages queued, not counting the ones in hand).
DEFAULT_MAILBOX_SIZE = 64
#: Default time, in seconds, an actor's ``on_stop`` may take (OTP's ``shutdown``).
DEFAULT_SHUTDOWN = 5.0


class Status(enum.Enum):
    """The life cycle of an actor or supervisor, observable through ``status``."""

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        """True for STOPPED and FAILED: the child will never run again."""
        return self in (Status.STOPPED, Status.FAILED)


class Restart(enum.Enum):
    """When a supervisor restarts a child that ended (OTP's restart types)."""

    #: Always restarted, whether it crashed or exited normally.
    PERMANENT = "permanent"
    #: Restarted only when it crashed; a normal exit ends it for good.
    TRANSIENT = "transient"
    #: Never restarted; a crash ends it with status FAILED and is not escalated.
    TEMPORARY = "temporary"

    def wants_restart(self, crashed: bool) -> bool:
        """Whether a child with this policy is restarted after ending (``crashed`` or not)."""
        if self is Restart.PERMANENT:
            return True
        return self is Restart.TRANSIENT and crashed


class Strategy(enum.Enum):
    """Which children a supervisor restarts when one of them ends."""

    #: Only the child that ended.
    ONE_FOR_ONE = "one_for_one"
    #: Every child: the others are stopped in reverse start order, then all restart in order.
    ONE_FOR_ALL = "one_for_all"
    #: The child that ended and every child started after it.
    REST_FOR_ONE = "rest_for_one"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential restart delay with a ceiling.

    The n-th restart of a child within its supervisor's ``period`` (n counted
    from 0) waits ``min(initial * factor ** n, maximum)`` seconds, so a child
    that has been calm for a whole period starts again from ``initial``.

    Attributes:
        initial: first delay in seconds (0 restarts at once, as OTP does).
        factor: growth per restart, at least 1.
        maximum: the ceiling in seconds.
    """

    initial: float = 0.1
    factor: float = 2.0
    maximum: float = 5.0

    def __post_init__(self) -> None:
        if self.initial < 0 or self.factor < 1 or self.maximum < self.initial:
            raise ValueError(f"need 0 <= initial <= maximum and factor >= 1, got {self}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before restart number ``attempt`` (0-based) within the window."""
        # Cap the exponent: past the ceiling the value no longer matters, and a
        # huge power would overflow a float.
        return min(self.initial * self.factor ** min(attempt, 64), self.maximum)


@dataclass(frozen=True, slots=True)
class ChildSpec(Generic[M, R]):
    """How to build and supervise one actor.

    The mailbox and the :class:`~actors.ActorRef` belong to the child, not to an
    actor instance: a restart builds a fresh instance with ``factory`` and it
    keeps reading the same mailbox, so queued messages and refs survive.

    Attributes:
        name: unique among the supervisor's children.
        factory: builds a fresh actor instance, once per (re)start.
        restart: the restart policy (default PERMANENT).
        mailbox_size: capacity of the bounded mailbox (default 64).
        max_concurrency: messages handled at once; None uses the actor
            class's ``max_concurrency`` (default 1: one at a time, in order).
        shutdown: seconds ``on_stop`` may take before it is cancelled.
    """

    name: str
    factory: Callable[[], Actor[M, R]]
    restart: Restart = Restart.PERMANENT
    mailbox_size: int = DEFAULT_MAILBOX_SIZE
    max_concurrency: int | None = None
    shutdown: float = DEFAULT_SHUTDOWN

    def __post_init__(self) -> None:
        if self.mailbox_size < 0:
            raise ValueError(f"mailbox_size must be >= 0, got {self.mailbox_size}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.shutdown < 0:
            raise ValueError(f"shutdown must be >= 0, got {self.shutdown}")


@dataclass(frozen=True, slots=True)
class SupervisorSpec:
    """A supervisor: its children and its restart strategy.

    Used for nested supervisors (``await sup.start_child(SupervisorSpec(...))``
    or in another spec's ``children``); ``open_supervisor`` takes the same
    parameters as keywords.

    Attributes:
        name: unique among the parent's children.
        children: started in order when the supervisor starts.
        strategy: ONE_FOR_ONE (default), ONE_FOR_ALL or REST_FOR_ONE.
        intensity: more than this many restarts within ``period`` seconds and
            the supervisor gives up (default 3, as in Elixir).
        period: the sliding window for ``intensity``, in seconds (default 5).
        backoff: delay before each restart (default 0.1 s doubling to 5 s).
        restart: this supervisor's own policy as a child of its parent.
    """

    name: str
    children: tuple[ChildSpec[Any, Any] | SupervisorSpec, ...] = ()
    strategy: Strategy = Strategy.ONE_FOR_ONE
    intensity: int = 3
    period: float = 5.0
    backoff: Backoff = field(default_factory=Backoff)
    restart: Restart = Restart.PERMANENT

    def __post_init__(self) -> None:
        if self.intensity < 0 or self.period <= 0:
            raise ValueError(f"need intensity >= 0 and period > 0, got {self}")
        names = [child.name for child in self.children]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique, got {names}")
