"""The typed errors of the actor runtime.

Every way an actor interaction can end badly has its own class, so callers can
``except`` exactly what they mean. All of them derive from :class:`ActorError`.
"""

from __future__ import annotations

from collections.abc import Mapping

import trio


class ActorError(Exception):
    """Base of the actor runtime's errors."""


class ActorCrashed(ActorError):
    """The actor raised while it held your message, or failed to start.

    The actor's own exception is chained as ``__cause__``. The message that was
    being handled is not redelivered to the restarted instance.

    Attributes:
        actor: the name of the actor that crashed.
    """

    def __init__(self, actor: str, message: str) -> None:
        super().__init__(message)
        self.actor = actor


class ActorStopped(ActorError):
    """The actor is stopped (or was stopped before it handled your message).

    Raised by ``send``/``send_nowait``/``ask`` on a stopped actor, and delivered
    to every ``ask`` still queued in the mailbox when the actor stops for good.

    Attributes:
        actor: the name of the stopped actor (or supervisor).
    """

    def __init__(self, actor: str, message: str) -> None:
        super().__init__(message)
        self.actor = actor


class AskTimeout(ActorError, trio.TooSlowError):
    """An ``ask`` got no reply within its timeout.

    It is a :class:`trio.TooSlowError`, so code written for ``trio.fail_after``
    catches it too. A reply that arrives later is dropped, never delivered to
    anyone else.
    """


class SupervisorGaveUp(ActorError):
    """A supervisor saw more restarts than its intensity allows and gave up.

    It stopped all its children first. The failure that broke the limit is
    chained as ``__cause__`` (for a nested supervisor that is the child's own
    :class:`SupervisorGaveUp`, so the chain leads down to the original error).

    Attributes:
        supervisor: the name of the supervisor that gave up.
        child: the name of the child whose failure broke the limit.
        intensity: the restart limit that was exceeded.
        period: the window, in seconds, the limit applies to.
    """

    def __init__(self, supervisor: str, child: str, intensity: int, period: float) -> None:
        super().__init__(
            f"supervisor {supervisor!r} gave up: more than {intensity} restarts within "
            f"{period} s (last failure in child {child!r})"
        )
        self.supervisor = supervisor
        self.child = child
        self.intensity = intensity
        self.period = period


class NodeClosed(ActorError):
    """The node was used after its ``open_node`` block ended.

    Every call on a closed node (``send``, ``send_nowait``, ``send_batch``,
    a handle's ``wait``, ``query``, ``wait_all_up``, ...) raises it at once,
    whatever its timeout: nothing will ever answer on a node that is gone.

    Attributes:
        node: the id of the closed node.
    """

    def __init__(self, node: str) -> None:
        super().__init__(f"node {node!r} is closed: its open_node block has ended")
        self.node = node


class PeersNotUp(ActorError, trio.TooSlowError):
    """``wait_all_up``'s timeout passed before every peer was heard from.

    It is a :class:`trio.TooSlowError`, so code written for
    ``trio.fail_after`` catches it too.

    Attributes:
        node: the id of the waiting node.
        missing: peer id -> endpoint, for each peer not UP at the timeout.
        timeout: the timeout, in seconds.
    """

    def __init__(self, node: str, missing: Mapping[str, str], timeout: float) -> None:
        peers = ", ".join(f"{peer} ({endpoint})" for peer, endpoint in missing.items())
        super().__init__(
            f"node {node!r} waited {timeout} s and these peers are still not up: {peers}; "
            "check that they run and that these endpoints reach them"
        )
        self.node = node
        self.missing = dict(missing)
        self.timeout = timeout


class BindError(ActorError):
    """A node could not bind its ROUTER to the endpoint it was given.

    Attributes:
        endpoint: the endpoint that could not be bound.
        reason: what the operating system or ZeroMQ said.
    """

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(
            f"cannot bind {endpoint}: {reason}; pick another port (or '*' for any free one), "
            "or stop the process that holds it"
        )
        self.endpoint = endpoint
        self.reason = reason
