"""cellmesh's runtime: actors, supervision, and the node that links peers.

Start with :func:`open_node`; write compute logic as an :class:`Actor` that
receives :class:`Delivery` (and :class:`Gap`) messages. The grid helpers,
models and demo built on it are :mod:`actors.grid` (the extra ``grid``).
"""

from __future__ import annotations

from transport import (
    PROTOCOL_VERSION,
    CurveKeyPair,
    ErrCode,
    FaultPlan,
    GapPolicy,
    KeyFileError,
    NodeId,
    PeerState,
    ReceiverConfig,
    Security,
    SenderConfig,
    StreamId,
    generate_key_pair,
)
from transport import SequencerConfig as StreamConfig

from ._actor import (
    DEFAULT_ASK_TIMEOUT,
    Actor,
    ActorRef,
    ActorStatistics,
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
from ._inbound import InboundStatistics
from ._link import BatchHandle, LinkStatistics, SendHandle
from ._node import DEFAULT_STREAM, Node, NodeConfig, NodeStatistics, open_node
from ._outcomes import (
    Ack,
    Delivery,
    DeliveryFailed,
    Gap,
    PeerError,
    Reject,
    SendError,
    StreamFailedError,
)
from ._security import SecurityStatistics, load_security
from ._spec import Backoff, ChildSpec, Restart, Status, Strategy, SupervisorSpec
from ._supervisor import Supervisor, SupervisorStatistics, open_supervisor
from ._topology import NodeSpec, Topology, TopologyError, node_id_from_env

__all__ = [
    "DEFAULT_ASK_TIMEOUT",
    "DEFAULT_STREAM",
    "PROTOCOL_VERSION",
    "Ack",
    "Actor",
    "ActorCrashed",
    "ActorError",
    "ActorRef",
    "ActorStatistics",
    "ActorStopped",
    "AskTimeout",
    "Backoff",
    "BatchHandle",
    "BindError",
    "ChildSpec",
    "CurveKeyPair",
    "Delivery",
    "DeliveryFailed",
    "ErrCode",
    "FaultPlan",
    "Gap",
    "GapPolicy",
    "InboundStatistics",
    "ItemsReplySink",
    "KeyFileError",
    "LinkStatistics",
    "Node",
    "NodeClosed",
    "NodeConfig",
    "NodeId",
    "NodeSpec",
    "NodeStatistics",
    "PeerError",
    "PeerState",
    "PeersNotUp",
    "ReceiverConfig",
    "Reject",
    "ReplySink",
    "Restart",
    "Security",
    "SecurityStatistics",
    "SendError",
    "SendHandle",
    "SenderConfig",
    "Status",
    "Strategy",
    "StreamConfig",
    "StreamFailedError",
    "StreamId",
    "Supervisor",
    "SupervisorGaveUp",
    "SupervisorSpec",
    "SupervisorStatistics",
    "Topology",
    "TopologyError",
    "generate_key_pair",
    "load_security",
    "node_id_from_env",
    "open_node",
    "open_supervisor",
    "spawn",
]
