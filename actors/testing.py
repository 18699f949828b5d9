"""Test your cellmesh programs.

Nodes on an in-memory network in virtual time (``open_test_network``,
``Inbox``). The network itself, fault plans and the fault-injecting proxy
between real processes (``MemoryNetwork``, ``FaultPlan``,
``open_fault_proxy``) are transport's tools: import them from
:mod:`transport.testing`, their one public home. See ``docs/testing.md``.
"""

from __future__ import annotations

from ._testing import Inbox, TestNetwork, open_test_network

__all__ = [
    "Inbox",
    "TestNetwork",
    "open_test_network",
]
