"""Tile nodes on separate hosts survive a cut network link and still compute the exact grid.

Each "host" is a Linux network namespace that the test creates; a veth pair
joins the two, with addresses from a private /24 that exists only inside
them. Each namespace runs two ``cellmesh node`` processes of a 2x2 grid (the
top row in one, the bottom row in the other), bound to the namespace's own
address, so the vertical and diagonal halos cross the veth link and the
horizontal ones stay inside a host. The test cuts the link with
``ip link set DEV down`` and restores it; the run must end with the serial
result. The host's own interfaces and routes are never touched.

Creating namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN); where that is
missing the tests skip and say why.
"""

from __future__ import annotations

import ast
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import trio

from actors import Topology
from actors.grid import Decomposition, Job, assemble, run_serial

pytestmark = pytest.mark.slow

#: The two hosts' addresses: a private /24 assigned only to the veth ends
#: inside the test's own namespaces.
_ADDRESSES = ("10.77.0.1", "10.77.0.2")

#: How long the link stays down: about seven resends of each lost halo at
#: run_tile's retry timeouts (0.1 s doubling up to 0.5 s), and twice ZMTP's
#: 1.5 s heartbeat timeout, so libzmq drops the connections across the cut.
_CUT_SECONDS = 3.0

#: Every node must have reported this frame before the link is cut, so that
#: the connections are up and start-up retries are behind us.
_CUT_AFTER_FRAME = 5

#: 64x64 Life for 200 frames with up to 2 ms of wire delay lasts 3-5 s on two
#: busy cores: enough to cut the link mid-run.
_JOB = Job(size=64, frames=200, seed=7, delay_ms=2.0, linger=1.0)

#: Bounds every wait: the whole run, start-up included.
_RUN_TIMEOUT = 60.0

_PROGRESS = re.compile(r"^(?P<node>\S+): frame (?P<frame>\d+)/\d+ (?P<report>\{.*\})$")


@dataclass(frozen=True, slots=True)
class Hosts:
    """Two network namespaces joined by one veth pair.

    Attributes:
        namespaces: the namespaces' names.
        devices: the veth end inside each namespace, same order.
        addresses: each end's address, same order.
    """

    namespaces: tuple[str, str]
    devices: tuple[str, str]
    addresses: tuple[str, str]


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``, capturing its output; never raises on a non-zero exit."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)


def _ip_check(*args: str) -> None:
    """Run ``ip ARGS``; a failure is a broken setup, not a missing capability."""
    result = _ip(*args)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr.strip()}"


def _why_no_namespaces() -> str | None:
    """Why this machine cannot create network namespaces, or None if it may."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux only (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"creating network namespaces needs root (running as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    return None


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Two namespaces joined by a veth pair, removed afterwards even if the test fails."""
    reason = _why_no_namespaces()
    if reason is not None:
        pytest.skip(reason)
    # Unique names: other test runs may be creating namespaces at the same time.
    tag = f"cm{os.getpid()}x{secrets.token_hex(2)}"
    namespaces = (f"{tag}a", f"{tag}b")
    # Both veth ends are created directly inside our namespaces, so their
    # names cannot clash with the host's interfaces.
    devices = ("cmveth0", "cmveth1")
    created: list[str] = []
    try:
        for ns in namespaces:
            result = _ip("netns", "add", ns)
            if result.returncode != 0:
                pytest.skip(f"`ip netns add` failed: {result.stderr.strip()}")
            created.append(ns)
        result = _ip(
            "-n",
            namespaces[0],
            "link",
            "add",
            devices[0],
            "type",
            "veth",
            "peer",
            "name",
            devices[1],
            "netns",
            namespaces[1],
        )
        if result.returncode != 0:
            pytest.skip(f"cannot create a veth pair: {result.stderr.strip()}")
        for ns, dev, address in zip(namespaces, devices, _ADDRESSES, strict=True):
            _ip_check("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            _ip_check("-n", ns, "link", "set", "lo", "up")
            _ip_check("-n", ns, "link", "set", dev, "up")
        yield Hosts(namespaces, devices, _ADDRESSES)
    finally:
        # Deleting a namespace destroys the veth end inside it, and with it
        # the peer end in the other namespace.
        for ns in created:
            _ip("netns", "del", ns)


def _tcp_table(pid: int) -> list[list[str]]:
    """The rows of ``/proc/PID/net/tcp``: the TCP sockets of PID's network namespace.

    Each row is ``sl local_address rem_address st ...``; addresses are
    ``IPHEX:PORTHEX`` and ``st`` is ``0A`` for LISTEN, ``01`` for ESTABLISHED.
    """
    table = Path(f"/proc/{pid}/net/tcp").read_text(encoding="ascii")
    return [line.split() for line in table.splitlines()[1:]]


def _cross_host(connections: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """The connections whose two ends have different addresses (they cross the veth)."""
    return {(a, b) for a, b in connections if a.split(":")[0] != b.split(":")[0]}


@dataclass(frozen=True, slots=True)
class Line:
    """One line a node printed, with the (trio) time the test read it."""

    at: float
    node: str
    text: str

    def report(self) -> dict[str, float] | None:
        """The progress report on this line, or None if it is not a progress line."""
        match = _PROGRESS.match(self.text)
        if match is None:
            return None
        report: dict[str, float] = ast.literal_eval(match["report"])
        return report


class Grid:
    """A 2x2 grid of ``cellmesh node`` processes, the top row in one namespace."""

    def __init__(self, hosts: Hosts, out: Path) -> None:
        self.hosts = hosts
        self.out = out
        # Tile (r, c) listens on host r's address; the two tiles of a host
        # differ by port (below 32768, as the guide advises).
        self.topology = Topology.from_grid(
            2, 2, lambda r, c: f"tcp://{hosts.addresses[r]}:{25000 + c}"
        )
        self.decomp = Decomposition.for_nodes((_JOB.size, _JOB.size), 4, names=self.topology.ids)
        self.lines: list[Line] = []
        self.returncodes: dict[str, int | None] = {}
        self.pids: dict[str, int] = {}
        self._changed = trio.Event()

    def namespace_of(self, node: str) -> str:
        """The namespace (host) that runs ``node``: its tile row picks it."""
        return self.hosts.namespaces[self.decomp.tile_of(node).row]

    def latest(self, node: str) -> dict[str, float]:
        """``node``'s last progress report (an empty dict before its first)."""
        for line in reversed(self.lines):
            if line.node == node and (report := line.report()) is not None:
                return report
        return {}

    def reports(self, node: str) -> list[tuple[float, dict[str, float]]]:
        """Every progress report of ``node`` with the time it was read."""
        return [
            (line.at, report)
            for line in self.lines
            if line.node == node and (report := line.report()) is not None
        ]

    def output(self) -> str:
        """Everything the nodes printed, for assertion messages."""
        return "\n".join(line.text for line in self.lines)

    async def wait_until(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()`` holds, re-checked whenever a node prints or exits."""
        while not done():
            if any(code is not None for code in self.returncodes.values()):
                raise AssertionError(f"a node exited early:\n{self.output()}")
            self._changed = trio.Event()
            await self._changed.wait()

    def connections(self, node: str) -> set[tuple[str, str]]:
        """The established TCP connections in ``node``'s namespace, as (local, remote)."""
        return {(row[1], row[2]) for row in _tcp_table(self.pids[node]) if row[3] == "01"}

    def listening(self, node: str) -> bool:
        """Whether ``node`` has bound its endpoint (a TCP socket in LISTEN state)."""
        port = int(self.topology.endpoint_of(node).rsplit(":", 1)[1])
        try:
            rows = _tcp_table(self.pids[node])
        except OSError:
            return False  # exited: wait_listening reports it
        return any(int(row[1].rsplit(":", 1)[1], 16) == port and row[3] == "0A" for row in rows)

    async def wait_listening(self) -> None:
        """Wait until every node has bound its endpoint: it is up and sending."""
        # Polled, because a node prints nothing before its first frame.
        while not all(self.listening(node) for node in self.topology.ids):
            await trio.sleep(0.05)
            if any(code is not None for code in self.returncodes.values()):
                raise AssertionError(f"a node exited early:\n{self.output()}")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every node, collect their output, and return when all have exited."""
        path = self.out / "grid.toml"
        self.topology.save(path)
        async with trio.open_nursery() as nursery:
            for node in self.topology.ids:
                await nursery.start(self._node, node, path)
            task_status.started()

    async def _node(self, node: str, topology: Path, *, task_status: trio.TaskStatus[None]) -> None:
        command = [
            "ip", "netns", "exec", self.namespace_of(node),
            sys.executable, "-m", "actors._cli", "node",
            "--topology", str(topology), "--id", node, *_JOB.args(), "--out", str(self.out),
        ]  # fmt: skip
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.returncodes[node] = None
        self.pids[node] = process.pid
        task_status.started()
        try:
            assert process.stdout is not None
            pending = b""
            async for chunk in process.stdout:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    self.lines.append(Line(trio.current_time(), node, raw.decode()))
                self._changed.set()
            self.returncodes[node] = await process.wait()
            self._changed.set()
        finally:
            # Reached early only when the test failed or timed out: leave no
            # process behind in a namespace that is about to be deleted.
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()

    def check_result(self) -> None:
        """Every node exited 0 and the assembled tiles equal the serial run."""
        assert self.returncodes == dict.fromkeys(self.topology.ids, 0), self.output()
        parts = {
            self.decomp.tile_of(node): np.load(self.out / f"{node}.npy")
            for node in self.topology.ids
        }
        expected = run_serial(_JOB.model, _JOB.initial_grid(), _JOB.frames)
        assert np.array_equal(assemble(self.decomp, parts), expected)

    def resent(self) -> int:
        """Retransmissions so far, summed over the nodes' last reports."""
        return sum(int(self.latest(node).get("resent", 0)) for node in self.topology.ids)


async def _link(hosts: Hosts, state: str) -> None:
    """Set host 0's veth end ``up`` or ``down``, as a pulled cable would."""
    await trio.run_process(
        ["ip", "netns", "exec", hosts.namespaces[0], "ip", "link", "set", hosts.devices[0], state]
    )


async def test_a_link_cut_mid_run_stalls_the_grid_and_it_finishes_exactly(
    hosts: Hosts, tmp_path: Path
) -> None:
    grid = Grid(hosts, tmp_path)
    ids = grid.topology.ids
    with trio.fail_after(_RUN_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(grid.run)
            await grid.wait_until(
                lambda: all(grid.latest(n).get("frame", 0) >= _CUT_AFTER_FRAME for n in ids)
            )
            resent_before = grid.resent()
            connected_before = grid.connections(ids[0])
            await _link(hosts, "down")
            cut_at = trio.current_time()
            await trio.sleep(_CUT_SECONDS)
            restored_at = trio.current_time()
            await _link(hosts, "up")
            await grid.wait_until(
                lambda: all(any(at > restored_at for at, _ in grid.reports(n)) for n in ids)
            )
            connected_after = grid.connections(ids[0])
    grid.check_result()
    for node in ids:
        reports = grid.reports(node)
        # Lockstep: with its cross-host halos cut off, no node can finish a
        # frame. Half a second is slack for the frame or two already under way.
        stalled = [r["frame"] for at, r in reports if cut_at + 0.5 < at < restored_at]
        assert stalled == [], f"{node} advanced while the link was down:\n{grid.output()}"
        # Each node waited out the cut inside one frame and then resumed.
        longest = max(r["ms"] for _, r in reports)
        assert longest >= 0.8 * _CUT_SECONDS * 1000.0, grid.output()
        assert reports[-1][1]["frame"] == _JOB.frames
    # The lost halos were sent again, again and again, while the link was down.
    assert grid.resent() >= resent_before + 3, grid.output()
    # The cut outlasted ZMTP's heartbeat timeout (1.5 s in transport/_socket.py),
    # so libzmq dropped every connection across it and the nodes reconnected by
    # themselves; the connections inside a host were left alone.
    crossing_before, crossing_after = _cross_host(connected_before), _cross_host(connected_after)
    assert crossing_before
    assert crossing_after
    assert not crossing_before & crossing_after
    assert connected_before - crossing_before == connected_after - crossing_after


async def test_a_host_unreachable_at_start_is_waited_for(hosts: Hosts, tmp_path: Path) -> None:
    # The nodes start while the other host cannot be reached: host 0's
    # connects fail at once (its end is down, so no route), host 1's SYNs are
    # lost, and every first halo waits until the link is up.
    grid = Grid(hosts, tmp_path)
    await _link(hosts, "down")
    with trio.fail_after(_RUN_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(grid.run)
            await grid.wait_listening()
            await trio.sleep(_CUT_SECONDS)
            restored_at = trio.current_time()
            await _link(hosts, "up")
    grid.check_result()
    for node in grid.topology.ids:
        first_at, first = grid.reports(node)[0]
        assert first_at > restored_at, f"{node} stepped before the link was up:\n{grid.output()}"
        # The outage was waited out in the start-up barrier, before the frame
        # clock started: frame 1 took a frame's time, not the outage's.
        assert first["frame"] == 1, grid.output()
        assert first["ms"] < 0.5 * _CUT_SECONDS * 1000.0, grid.output()
    # The barrier waits for every link to hear from its peer before it sends
    # a "ready", so nothing was sent into the outage to be sent again.
    assert grid.resent() == 0, grid.output()
