"""The node's gate: who may connect, and what happens to those who may not.

A secure node (``open_node(..., security=...)``) runs CURVE on every socket
(``transport.ZmqNetwork``). Three places refuse someone, and all of them count
here, in :class:`SecurityState`, so ``node.statistics().security`` shows every
refusal by reason:

* the :class:`Gatekeeper` actor owns the context's ZAP socket and admits a
  connection only if its key belongs to one of the node's peers
  (``unknown-key``; ``mechanism``, ``domain``, ``malformed`` for requests
  libzmq would only send if misconfigured);
* the Receiver reads its ROUTER's handshake failures from a libzmq monitor:
  a peer that does not speak CURVE never reaches ZAP (``plaintext``; other
  failed handshakes, e.g. a client that pinned the wrong server key, are
  ``handshake-failed``);
* the Receiver checks every message: the sender is the node whose key its
  connection proved (ZAP ``User-Id``); a frame naming another node is
  ``impersonation`` and the message is dropped. Routing ids name nothing on
  a secure node (the ROUTER picks them), so claiming one takes nothing over.

Each refusal is logged once per reason and peer (key, address or claimed id),
not once per message or reconnect attempt: a misconfigured peer redials every
few seconds and must not flood the log.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Final

import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from transport import (
    NodeId,
    Socket,
    SocketLike,
    ZmqNetwork,
)
from transport.security import (
    KeyFileError,
    Security,
    ZapDecision,
    ZapPolicy,
    read_key_pair,
    secret_key_path,
)

from ._actor import Actor
from ._topology import Topology

log = logging.getLogger("cellmesh.security")

#: How many distinct (reason, peer) pairs are remembered for log-once; beyond
#: that every refusal is still counted, but no longer logged.
_LOG_ONCE_MAX: Final = 1024

_ZAP_BUDGET: Final = 64


@dataclass(frozen=True, slots=True)
class SecurityStatistics:
    """How a node guards its door.

    Attributes:
        secure: whether the node runs CURVE (False: plaintext, anyone who can
            reach its endpoint may send).
        admitted: connections the ZAP handler admitted.
        refused: refusals by reason: ``plaintext``, ``unknown-key``,
            ``impersonation``, ``handshake-failed``, ``unauthenticated``,
            ``mechanism``, ``domain``, ``malformed``.
    """

    secure: bool
    admitted: int
    refused: dict[str, int]


class SecurityState:
    """Counters, log-once memory and the ZAP policy; outlives actor restarts."""

    def __init__(self, node: NodeId, security: Security | None, peers: frozenset[NodeId]) -> None:
        self.node = node
        self.security = security
        self.policy: ZapPolicy | None = None
        if security is not None:
            self.policy = ZapPolicy({p: security.peers[p] for p in peers})
        self.refused: Counter[str] = Counter()
        self._logged: set[tuple[str, str]] = set()

    @property
    def secure(self) -> bool:
        """Whether the node runs CURVE."""
        return self.security is not None

    def refuse(self, reason: str, who: str, detail: str) -> None:
        """Count one refusal; log it if this (reason, who) is new."""
        self.refused[reason] += 1
        key = (reason, who)
        if key in self._logged or len(self._logged) >= _LOG_ONCE_MAX:
            return
        self._logged.add(key)
        log.warning(
            "node %s refused %s: %s (logged once; node.statistics().security counts each)",
            self.node,
            who,
            detail,
        )

    def on_zap(self, decision: ZapDecision) -> None:
        """Account for one ZAP decision."""
        if decision.reason is None:
            return
        who = f"key {decision.key}" if decision.key else f"a peer at {decision.address}"
        self.refuse(decision.reason, who, f"ZAP said {decision.reason} (from {decision.address})")

    def on_monitor_event(self, parts: list[bytes]) -> None:
        """Account for one monitor event of the secure ROUTER."""
        event = parse_monitor_message(parts)
        kind = event["event"]
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            # The ZAP handler refused it and has counted it already.
            return
        value = event["value"]
        endpoint = event["endpoint"].decode(errors="replace")
        # Client and server send their greetings at once; whichever reads the
        # other's first sees the mechanism mismatch. When the plaintext client
        # notices first it hangs up, and the server only sees the connection
        # end mid-handshake (NO_DETAIL, an errno). Both are "plaintext": a peer
        # that did not even start a CURVE handshake.
        if (
            kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            or value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
        ):
            self.refuse(
                "plaintext",
                f"a peer not speaking CURVE on {endpoint}",
                "it offered another security mechanism (plaintext?) or hung up in the greeting",
            )
        else:
            # A CURVE peer whose handshake failed: most likely it pinned
            # another server key than ours.
            self.refuse(
                "handshake-failed",
                f"a CURVE handshake on {endpoint}",
                f"libzmq protocol error 0x{value:x} (did the client pin another server key?)",
            )

    def statistics(self) -> SecurityStatistics:
        """A snapshot."""
        admitted = 0 if self.policy is None else self.policy.statistics().admitted
        return SecurityStatistics(secure=self.secure, admitted=admitted, refused=dict(self.refused))


class Gatekeeper(Actor[Any, Any]):
    """Owns the context's ZAP socket and answers libzmq's ZAP requests."""

    def __init__(self, state: SecurityState, network: ZmqNetwork) -> None:
        self._state = state
        self._network = network
        self._socket: Socket | None = None

    async def on_start(self) -> None:
        self._socket = self._network.zap_socket()
        self.nursery.start_soon(self._serve, self._socket)

    async def on_stop(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def receive(self, msg: Any) -> Any:
        """The gatekeeper takes no messages; libzmq's ZAP requests drive it."""
        raise TypeError(f"Gatekeeper takes no messages, got {msg!r}")

    async def _serve(self, sock: Socket) -> None:
        state = self._state
        policy = state.policy
        assert policy is not None
        while True:
            for _ in range(_ZAP_BUDGET):
                try:
                    parts = sock.recv_multipart_nowait()
                except trio.WouldBlock:
                    break
                if len(parts) < 2 or parts[1] != b"":
                    state.refuse("malformed", "the ZAP endpoint", "a request without envelope")
                    continue
                decision = policy.decide(parts[2:])
                state.on_zap(decision)
                if decision.reply is not None:
                    # inproc to libzmq's own I/O thread: never near the HWM.
                    sock.send_multipart_nowait([parts[0], b"", *decision.reply])
            await sock.wait_ready()


async def watch_handshakes(state: SecurityState, monitor: SocketLike) -> None:
    """Own a ROUTER's monitor socket and count its failed handshakes."""
    while True:
        for _ in range(_ZAP_BUDGET):
            try:
                parts = monitor.recv_multipart_nowait()
            except trio.WouldBlock:
                break
            state.on_monitor_event(parts)
        await monitor.wait_ready()


def load_security(topology: Topology, node_id: str, keys_dir: str | os.PathLike[str]) -> Security:
    """The ``security=`` of ``open_node`` for one node of a keyed topology.

    Reads ``KEYS_DIR/<node_id>.key_secret`` (written by ``cellmesh keys``) and
    takes each neighbour's public key from the topology.

    Args:
        topology: lists every node's ``public_key``.
        node_id: the node to load for.
        keys_dir: the folder holding this node's secret key file.

    Raises:
        KeyFileError: the secret key file is missing, malformed or readable by
            others; a neighbour has no public key in the topology; or the
            topology lists another public key for this node than its file.
        TopologyError: ``node_id`` is not in the topology.
    """
    keys = read_key_pair(secret_key_path(keys_dir, node_id))
    listed = topology.node(node_id).public_key
    if listed is not None and listed != keys.public:
        raise KeyFileError(
            f"the topology's public_key of {node_id!r} does not match the key in {keys_dir}; "
            "regenerate the keys and the topology together (cellmesh keys --topology)"
        )
    peers: dict[str, str] = {}
    for peer in topology.neighbours_of(node_id):
        key = topology.node(peer).public_key
        if key is None:
            raise KeyFileError(
                f"the topology has no public_key for {peer!r}, a neighbour of {node_id!r}"
            )
        peers[peer] = key
    return Security(keys, peers)
