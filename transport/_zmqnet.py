"""The production network: ZeroMQ sockets, plaintext or CURVE with a ZAP handler.

:class:`ZmqNetwork` is the default :class:`~transport.Network` of a node. It
lives apart from :mod:`transport._memnet` (the in-memory test network) so that
the test tools and the real sockets do not share a file: the node imports this
one in production, and ``transport.testing`` holds the other.
"""

from __future__ import annotations

from typing import Final

import zmq

from ._errors import LocalProtocolError
from ._security import ZAP_DOMAIN, Security
from ._socket import Socket, SocketPoller, dealer_socket, router_socket

__all__ = ["ZmqNetwork"]


class ZmqNetwork:
    """The real network: ZeroMQ sockets from one ``zmq.Context``.

    With ``security`` every socket runs CURVE: the ROUTER is a CURVE server
    that asks the ZAP handler (``ZAP_ENFORCE_DOMAIN``: no handler, no
    connection) and each DEALER pins its peer's public key. The handler is
    whoever serves :meth:`zap_socket`; a node runs one as an actor.

    Args:
        ctx: a synchronous context to make sockets from; by default a new one
            that :meth:`close` destroys. A secure network needs a context of
            its own: a context has one ZAP endpoint, so one handler.
        security: this node's keys and its peers' public keys, or None for
            plaintext (one machine, tests).
    """

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        *,
        security: Security | None = None,
    ) -> None:
        self._owned = ctx is None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context() if ctx is None else ctx
        self._security = security

    @property
    def security(self) -> Security | None:
        """The keys this network runs CURVE with, or None (plaintext)."""
        return self._security

    def dealer(self, routing_id: bytes, *, peer: str | None = None) -> Socket:
        """A DEALER with :data:`DEALER_OPTIONS` and the given routing id.

        A secure DEALER pins ``peer``'s public key and sets no routing id.

        Raises:
            LocalProtocolError: the network is secure and ``peer`` has no
                public key in it (an unpinned server could be anyone).
        """
        sec = self._security
        if sec is None:
            return dealer_socket(self._ctx, routing_id=routing_id)
        server = sec.peers.get(peer) if peer is not None else None
        if server is None:
            raise LocalProtocolError(f"no public key for peer {peer!r}: cannot pin its server key")
        # No routing id: the ROUTER names the connection itself (a random-based
        # id nobody can predict), and knows the sender by its key. A chosen id
        # could be claimed by another admitted peer to take the route over.
        return dealer_socket(
            self._ctx,
            curve_serverkey=server.encode(),
            curve_publickey=sec.keys.public.encode(),
            curve_secretkey=sec.keys.secret.encode(),
        )

    def router(self) -> Socket:
        """A ROUTER with :data:`ROUTER_OPTIONS` (a CURVE server if secure)."""
        sec = self._security
        if sec is None:
            return router_socket(self._ctx)
        return router_socket(
            self._ctx,
            curve_server=1,
            curve_publickey=sec.keys.public.encode(),
            curve_secretkey=sec.keys.secret.encode(),
            zap_domain=ZAP_DOMAIN,
            zap_enforce_domain=1,
        )

    def poller(self) -> SocketPoller:
        """A poller for this network's sockets (one epoll set)."""
        return SocketPoller()

    def zap_socket(self) -> Socket:
        """The ZAP handler's socket: a ROUTER bound at libzmq's ZAP endpoint.

        Raises:
            zmq.ZMQError: another handler is bound in this context already.
        """
        zsock = self._ctx.socket(zmq.ROUTER)
        try:
            zsock.setsockopt(zmq.LINGER, 0)
            zsock.bind(ZAP_ENDPOINT)
        except BaseException:
            zsock.close(linger=0)
            raise
        return Socket(zsock)

    def monitor(self, sock: Socket) -> Socket:
        """A socket that receives ``sock``'s handshake outcomes (libzmq monitor events).

        A refused plaintext or mismatched peer never reaches the ZAP handler;
        these events are the only place it shows.
        """
        zmon = sock.zmq_socket.get_monitor_socket(MONITOR_EVENTS)
        zmon.setsockopt(zmq.LINGER, 0)
        return Socket(zmon)

    def close(self) -> None:
        """Destroy the context if this object made it (closing its sockets).

        Sockets still open are dropped at once; one closed with a linger may
        hold this call that long, while libzmq sends what it queued.
        """
        if self._owned:
            self._ctx.destroy(linger=0)


#: libzmq's fixed ZAP endpoint (RFC 27), one per context.
ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"

#: The monitor events a secure ROUTER reports: every failed handshake.
MONITOR_EVENTS: Final = int(
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
