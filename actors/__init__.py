"""cellmesh's runtime: actors, supervision, and the node that links peers."""

from __future__ import annotations

from ._actor import DEFAULT_ASK_TIMEOUT, Actor, ActorRef, ActorStatistics, spawn
from ._errors import ActorCrashed, ActorError, ActorStopped, AskTimeout, SupervisorGaveUp
from ._spec import Backoff, ChildSpec, Restart, Status, Strategy, SupervisorSpec
from ._supervisor import Supervisor, SupervisorStatistics, open_supervisor

__all__ = [
    "DEFAULT_ASK_TIMEOUT",
    "Actor",
    "ActorCrashed",
    "ActorError",
    "ActorRef",
    "ActorStatistics",
    "ActorStopped",
    "AskTimeout",
    "Backoff",
    "ChildSpec",
    "Restart",
    "Status",
    "Strategy",
    "Supervisor",
    "SupervisorGaveUp",
    "SupervisorSpec",
    "SupervisorStatistics",
    "open_supervisor",
    "spawn",
]
