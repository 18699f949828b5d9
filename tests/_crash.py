"""Crash a node's I/O task on purpose, through the network it gets its poller from.

A node's dispatcher (its one I/O task) sleeps on the poller its network
makes. :class:`CrashingPollers` wraps a network's poller factory so that the
next ``n`` sleeps raise: the dispatcher crashes exactly as it would on a bug
outside every peer's boundary, and its supervisor restarts it.
"""

from __future__ import annotations

from typing import Any

from transport import Poller


class CrashingPollers:
    """Make the next :meth:`arm` ``n`` poller waits of ``network``'s pollers raise.

    Args:
        network: a ``ZmqNetwork`` or ``MemoryNetwork``.
        node: on a MemoryNetwork shared by several nodes, crash only the
            pollers of this node's sockets.
    """

    def __init__(self, network: Any, node: str | None = None) -> None:
        self._make = network.poller
        self._node = node
        self._left = 0
        network.poller = self._poller

    def arm(self, n: int = 1) -> None:
        """Crash the next ``n`` waits (each restart's first wait, when n > 1)."""
        self._left += n

    def _poller(self) -> Poller:
        return _CrashingPoller(self._make(), self)

    def _take(self, nodes: set[str | None]) -> bool:
        if self._left and (self._node is None or self._node in nodes):
            self._left -= 1
            return True
        return False


class _CrashingPoller:
    def __init__(self, inner: Poller, crashes: CrashingPollers) -> None:
        self._inner = inner
        self._crashes = crashes
        self._nodes: set[str | None] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def add(self, sock: Any) -> None:
        self._nodes.add(getattr(sock, "node", None))
        self._inner.add(sock)

    async def wait(self, *, spin: float = 0.0) -> list[Any]:
        if self._crashes._take(self._nodes):
            raise RuntimeError("the I/O task crashed on purpose")
        return await self._inner.wait(spin=spin)
