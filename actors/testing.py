"""Test your cellmesh programs: nodes on an in-memory network, in virtual time.

``from actors.testing import open_test_network, Inbox`` and see
``docs/testing.md``.
"""

from __future__ import annotations

from transport import FaultPlan
from transport._memnet import MemoryNetwork, MemorySocket, NetworkStatistics

from ._testing import Inbox, TestNetwork, open_test_network

__all__ = [
    "FaultPlan",
    "Inbox",
    "MemoryNetwork",
    "MemorySocket",
    "NetworkStatistics",
    "TestNetwork",
    "open_test_network",
]
