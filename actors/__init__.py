"""cellmesh's runtime: actors, supervision, and the node that links peers.

Start with :func:`open_node`; write compute logic as an :class:`Actor` that
receives :class:`Delivery` (and :class:`Gap`) messages. The grid helpers,
models and demo built on it are :mod:`actors.grid` (the extra ``grid``).

This face is the runtime's: the node, actors, outcomes, errors, supervision
and topology. Each name has one public home: ids, configs and the protocol's
types are imported from :mod:`transport` (``NodeId``, ``SenderConfig``,
``SequencerConfig`` ...), keys from :mod:`transport.security`, the statistics
value types from :mod:`actors.statistics` (read through ``statistics()``,
rarely named), the launcher's environment (rank, topology) from
:mod:`actors.launch`, test tools from :mod:`actors.testing` and
:mod:`transport.testing`.
"""

from __future__ import annotations

from ._actor import (
    Actor,
    ActorRef,
    ItemsReplySink,
    ReplySink,
    spawn,
)
from ._errors import (
    ActorCrashed,
    ActorError,
    ActorStopped,
    AskTimeout,
    BindError,
    NodeClosed,
    PeersNotUp,
    SupervisorGaveUp,
)
from ._fromenv import open_node_from_env
from ._link import BatchHandle, SendHandle
from ._node import DEFAULT_STREAM, Node, NodeConfig, open_node
from ._outcomes import (
    Ack,
    Delivery,
    DeliveryFailed,
    Gap,
    PeerError,
    Reject,
    SendError,
)
from ._security import load_security
from ._spec import Backoff, ChildSpec, Restart, Status, Strategy, SupervisorSpec
from ._supervisor import Supervisor, open_supervisor
from ._topology import NodeSpec, Topology, TopologyError

__all__ = [
    "DEFAULT_STREAM",
    "Ack",
    "Actor",
    "ActorCrashed",
    "ActorError",
    "ActorRef",
    "ActorStopped",
    "AskTimeout",
    "Backoff",
    "BatchHandle",
    "BindError",
    "ChildSpec",
    "Delivery",
    "DeliveryFailed",
    "Gap",
    "ItemsReplySink",
    "Node",
    "NodeClosed",
    "NodeConfig",
    "NodeSpec",
    "PeerError",
    "PeersNotUp",
    "Reject",
    "ReplySink",
    "Restart",
    "SendError",
    "SendHandle",
    "Status",
    "Strategy",
    "Supervisor",
    "SupervisorGaveUp",
    "SupervisorSpec",
    "Topology",
    "TopologyError",
    "load_security",
    "open_node",
    "open_node_from_env",
    "open_supervisor",
    "spawn",
]
