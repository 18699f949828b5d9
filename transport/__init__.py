"""cellmesh's wire layer: typed frames, the CBOR codec, the sans-IO protocol
core and the Trio-driven ZeroMQ sockets. It never imports ``actors``.

This face holds what a node and its users need most: ids, errors, the codec,
the three protocol cores with their configs and statistics, and the sockets
and networks. The rest lives in public submodules, each with its own
``__all__``, so that every name has exactly one public home:

- :mod:`transport.frames`: the wire frames and their enums (docs/protocol.md);
- :mod:`transport.events`: what the protocol cores report (``take_events()``);
- :mod:`transport.security`: CURVE keys and the ZAP policy;
- :mod:`transport.testing`: the in-memory network, fault injection and the
  fault proxy, as ``trio.testing`` holds trio's test tools.
"""

from __future__ import annotations

from ._codec import Limits, check_payload, decode, encode
from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ._frames import APP_ERR_MIN, PROTOCOL_VERSION, ErrCode, Payload
from ._ids import Incarnation, LinkSeq, NodeId, StreamId, StreamSeq
from ._memnet import Network, Poller, SocketLike
from ._proto_link import (
    PeerState,
    ReceiverConfig,
    ReceiverStatistics,
    Rng,
    SenderConfig,
    SenderStatistics,
    SessionStatistics,
)
from ._proto_receiver import LinkReceiver
from ._proto_sender import LinkSender
from ._proto_sequencer import GapPolicy, SequencerConfig, SequencerStatistics, StreamSequencer
from ._socket import (
    DEALER_OPTIONS,
    ROUTER_OPTIONS,
    Socket,
    SocketStatistics,
    Unroutable,
    dealer_socket,
    router_socket,
)
from ._zmqnet import ZmqNetwork

__all__ = [
    "APP_ERR_MIN",
    "DEALER_OPTIONS",
    "PROTOCOL_VERSION",
    "ROUTER_OPTIONS",
    "ErrCode",
    "GapPolicy",
    "Incarnation",
    "Limits",
    "LinkReceiver",
    "LinkSender",
    "LinkSeq",
    "LocalProtocolError",
    "Network",
    "NodeId",
    "Payload",
    "PeerState",
    "Poller",
    "ProtocolError",
    "ReceiverConfig",
    "ReceiverStatistics",
    "RemoteProtocolError",
    "Rng",
    "SenderConfig",
    "SenderStatistics",
    "SequencerConfig",
    "SequencerStatistics",
    "SessionStatistics",
    "Socket",
    "SocketLike",
    "SocketStatistics",
    "StreamId",
    "StreamSeq",
    "StreamSequencer",
    "Unroutable",
    "ZmqNetwork",
    "check_payload",
    "dealer_socket",
    "decode",
    "encode",
    "router_socket",
]
