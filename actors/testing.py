"""Test your cellmesh programs.

Two tools: nodes on an in-memory network in virtual time
(``open_test_network``, ``Inbox``), and a fault-injecting proxy between real
processes on real sockets (``open_fault_proxy``). See ``docs/testing.md``.
"""

from __future__ import annotations

from transport import (
    FaultPlan,
    FaultProxy,
    MemoryNetwork,
    MemorySocket,
    NetworkStatistics,
    ProxyStatistics,
    open_fault_proxy,
)

from ._testing import Inbox, TestNetwork, open_test_network

__all__ = [
    "FaultPlan",
    "FaultProxy",
    "Inbox",
    "MemoryNetwork",
    "MemorySocket",
    "NetworkStatistics",
    "ProxyStatistics",
    "TestNetwork",
    "open_fault_proxy",
    "open_test_network",
]
