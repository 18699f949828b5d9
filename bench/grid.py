"""Grid benchmark: the Life demo's frames/s against serial numpy, mpi4py and pyzmq by hand.

For each grid size (1024², 2048²) and node count (1, 2, 4; and 16, 64 at 1024²),
in the same run:

* **serial**: ``run_serial`` of the whole grid in this process (pad + ``life_step``
  per frame); frames/s = frames / elapsed, median of the repetitions;
* **mpi**: ``bench/mpi_halo.py`` under ``mpiexec -n N``: the same decomposition,
  the same deep-halo algorithm (``DeepTile``) at the same depth and the same
  ``life_step``, halos swapped with ``Isend``/``Irecv`` of numpy buffers; one
  timed repetition per ``mpiexec`` (after its warm-up), median of the
  repetitions;
* **pyzmq+ACK** (2 nodes and more; one node has nothing to exchange):
  ``bench/pyzmq_halo.py``, one process per tile, the same loop as the demo's
  written by hand on blocking pyzmq, as people write it today without
  cellmesh: a ROUTER per process, a DEALER per neighbour, a ``zmq.Poller``,
  every halo answered at once with an ACK (no retries, no dedup, no ordering
  beyond ZeroMQ's), one exchange in flight, the demo's "ready" barrier before
  the clock starts; one timed repetition per start (after its warm-up):
  frames / median over the processes of its time, median of the repetitions.
  Each process's final tile is checked against the serial run's;
* **trio+pyzmq+ACK** (2 nodes and more): the same program with ``--trio``: the
  same sockets, messages, barrier and per-exchange shape, hand-written on
  Trio (the event loop cellmesh runs on) with no cellmesh code: one task,
  ``NOBLOCK`` calls, one ``wait_readable`` on an epoll set of the sockets'
  ``ZMQ_FD``s. It is the floor of any Trio-based implementation: if it falls
  short of a goal against mpi4py, so must cellmesh. Measured as pyzmq+ACK;
* **cellmesh**: ``run_demo`` (what ``cellmesh demo --json`` runs): one node
  process per tile, every halo a cellmesh send with an ACK, progress sent to a
  coordinator ten times a second; frames/s = the demo's own figure (median
  over nodes of frames over the time their frame loop took, which each node
  starts after a two-round "ready" barrier with its neighbours, as MPI's is
  timed from ``Barrier``), median of the repetitions.

The repetitions alternate (mpi, pyzmq, trio+pyzmq, cellmesh, mpi, ...), so a
burst of load from other work on the machine hits all four; the table gives
the ratios of the medians (cellmesh / mpi4py, / pyzmq and / trio+pyzmq;
pyzmq / mpi4py, trio+pyzmq / mpi4py), each with the range of the
back-to-back repetitions' ratios in brackets. The goals compare cellmesh with
mpi4py; the Trio floor's ratios (against mpi4py and blocking pyzmq) are
printed beside them for information.

The distributed systems run at two halo depths where there are halos (2 and
4 nodes): **1** (a one-cell halo swapped every frame) and the demo's
**auto** depth (``auto_depth``: 16 at 1024² and 2048²), so every ratio, and
the goal check, compares runs of the same algorithm. One node has no halos
and runs at the auto depth only. The depth-1 runs take ``--depth1-reps``
repetitions (default as many as the others; lower it to shorten the run, the
table's title says). MPI ranks and both pyzmq programs get the same malloc
settings as the demo's node processes (``_CHILD_MALLOC_ENV``): without them a
2048² MPI run was 2-4x slower (glibc trimming and regrowing its heap around
every step's temporaries), so the allocator is not what differs either.

**16 and 64 nodes** (``MAX_FEW_NODES``: past 4) are the demo's 4x4 and 8x8
tiles (``Decomposition.for_nodes``, which mpi_halo.py and pyzmq_halo.py use
too), 8 and 32 processes a core here. Their rows run at 1024² only
(``--many-sizes``), at the auto depth only (8 at 16 nodes, 4 at 64; depth 1
would run at a few frames/s), with ``FRAMES_MANY`` frames (400 and 200: 50
exchanges each) and ``REPS_MANY`` (1) repetition (``--reps-many``): measured
here, the 16-node row takes 44 s and the 64-node row 130 s, most of it
starting 64 processes (~25-30 s for each of mpiexec, the two hand-written
loops and the demo; its frames take 11 s). Their goals against
mpi4py are the issue's (``GOAL_VS_MPI_MANY``); the ``--profile`` probe skips
them. Each row's wall time is in the JSON (``row_seconds``).

Every run's final grid is checked against the serial one (SHA-256). The Ray
column is a *reference* measured earlier on this machine (115 frames/s with
Ray actors), not in this run.

``--profile`` adds a probe: tile nodes running the demo's frame loop (minus the
progress reports), once with one halo exchange per frame (depth 1, the loop
before deep halos) and once with the demo's automatic depth, with a clock
around each phase — send the halos, wait for the neighbours' halos, wait for
the previous exchange's ACKs, step — the thread's CPU time, the one-way halo
latency (send -> neighbour's compute actor, stamped with ``perf_counter``,
one clock for all processes of a Linux host) and the ACK round trip.

Run: ``.venv/bin/python bench/grid.py [--profile]``; writes
``bench/results/grid.json`` and ``docs/grid-bench.png``. Without mpi4py and an
``mpiexec`` the MPI column is skipped with a message.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this directory would come first on the path and
# ``import transport`` would find bench/transport.py instead of the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import trio  # noqa: E402
import zmq  # noqa: E402

from actors import (  # noqa: E402
    NodeConfig,
    NodeSpec,
    SendHandle,
    Topology,
    open_node,
)
from actors.grid import (  # noqa: E402
    LIFE,
    Decomposition,
    DeepTile,
    Job,
    auto_depth,
    free_port,
    grid_digest,
    run_demo,
    run_serial,
)

# The --profile probe runs the demo's own frame loop, with the demo's compute
# actor, inbox, counters and allocator settings: internals of the demo, not a
# public API, and measured here exactly as the demo runs them.
from actors.grid._demo import _CHILD_MALLOC_ENV, _HaloActor, _Inbox, _summary  # noqa: E402
from bench._common import machine_info, median, percentile, print_table, write_json  # noqa: E402
from transport import (  # noqa: E402
    SenderConfig,
)

#: Frames per run by grid side: at the auto depth (16) that is 62 and 18 halo
#: exchanges, so one slow exchange on the shared cores moves a run by a few
#: per cent, not by a third (at 300 frames, 19 exchanges, the cellmesh / MPI
#: pairs of one run spread 0.55-1.26).
FRAMES = {1024: 1000, 2048: 300}
NODES = (1, 2, 4, 16, 64)
REPS = 3
#: Node counts past this one are "many" (16 are the demo's 4x4 tiles, 64 its
#: 8x8: 8 and 32 processes a core here). Their rows run at the ``--many-sizes``
#: only, at the auto depth only (depth 1 at 64 nodes is a few frames/s) and
#: with FRAMES_MANY frames and REPS_MANY repetitions, so that a row, which
#: starts N processes four times (mpiexec, both hand-written loops, the demo),
#: takes at most about two minutes here.
MAX_FEW_NODES = 4
#: Frames of a many-node row: 50 halo exchanges at the auto depth (8 at 16
#: nodes, 4 at 64). Measured: the start-up of 64 processes (~25-30 s each for
#: mpiexec, the hand-written loops and the demo) dwarfs the frames.
FRAMES_MANY = {16: 400, 64: 200}
REPS_MANY = 1
SIZES_MANY = (1024,)
#: Repetitions of the depth-1 runs (the slow, pre-deep-halo algorithm), for the run time.
DEPTH1_REPS = 3
#: Frames/s of the Life demo on Ray actors, measured earlier on this machine (not in this run).
RAY_REFERENCE_FPS = 115.0
#: The issue's goals: cellmesh / mpi4py at 2 and 4 nodes, and cellmesh / Ray.
GOAL_VS_MPI = 0.8
#: The issue's goals for the many-node rows (1024², auto depth): cellmesh / mpi4py.
GOAL_VS_MPI_MANY = {16: 0.6, 64: 0.5}
GOAL_VS_RAY = 10.0
#: Bound on one demo or mpiexec run, so the bench always ends.
RUN_TIMEOUT = 300.0
#: Frames of the probe that are not timed: the nodes start one after the other.
PROBE_WARMUP = 20
PLOT = _HERE.parent / "docs" / "grid-bench.png"


# -- the three contenders ------------------------------------------------------------


def measure_serial(size: int, frames: int, reps: int) -> tuple[list[float], str]:
    """Frames/s of ``run_serial`` per repetition, and the final grid's digest."""
    start = LIFE.initial((size, size), 1)
    rates: list[float] = []
    digest = ""
    for _ in range(reps):
        t0 = time.perf_counter()
        final = run_serial(LIFE, start, frames)
        rates.append(frames / (time.perf_counter() - t0))
        digest = grid_digest(final)
    return rates, digest


def find_mpiexec() -> tuple[str | None, str]:
    """The ``mpiexec`` to use and, if there is none, why (for the skip message)."""
    if importlib.util.find_spec("mpi4py") is None:
        return None, "mpi4py is not installed (.venv/bin/pip install mpi4py mpich)"
    beside = Path(sys.executable).with_name("mpiexec")
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        return None, "no mpiexec beside this Python or on PATH (.venv/bin/pip install mpich)"
    return found, ""


def measure_mpi(
    mpiexec: str, size: int, frames: int, nodes: int, reps: int, depth: int
) -> dict[str, Any]:
    """Run ``bench/mpi_halo.py`` on ``nodes`` ranks, ``depth`` frames per exchange; its summary.

    Raises:
        RuntimeError: mpiexec failed, printed no summary, or ran another depth.
    """
    cmd = [mpiexec, "-n", str(nodes), sys.executable, str(_HERE / "mpi_halo.py")]
    cmd += ["--size", str(size), "--frames", str(frames), "--reps", str(reps)]
    cmd += ["--depth", str(depth)]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **_CHILD_MALLOC_ENV},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    if result.get("depth") != depth:
        raise RuntimeError(f"{' '.join(cmd)} ran depth {result.get('depth')}, not {depth}")
    return result


#: ``--spin``: the demo nodes' NodeConfig.spin, None for the default.
_SPIN: list[float | None] = [None]


def measure_cellmesh(
    size: int, frames: int, nodes: int, reps: int, depth: int
) -> list[dict[str, Any]]:
    """``reps`` runs of the demo at ``depth`` frames per exchange; per run its figures."""
    runs: list[dict[str, Any]] = []
    job = Job(model="life", size=size, frames=frames, seed=1, depth=depth, spin=_SPIN[0])
    for _ in range(reps):
        with tempfile.TemporaryDirectory(prefix="cellmesh-grid-") as out:
            outcome = trio.run(
                lambda: run_demo(
                    job, nodes=nodes, out=Path(out), pauses=[], show=False, timeout=RUN_TIMEOUT
                )
            )
        runs.append(
            {
                "frames_per_second": outcome.frames_per_second,
                "seconds": outcome.seconds,
                "match": outcome.match,
                "sha256": outcome.sha256,
                "per_node": outcome.per_node,
            }
        )
    return runs


def _topology(size: int, nodes: int) -> tuple[Decomposition, Topology]:
    """The demo's decomposition into ``nodes`` tiles and a topology of them on free ports."""
    decomp = Decomposition.for_nodes((size, size), nodes)
    ports: set[int] = set()
    while len(ports) < nodes:
        ports.add(free_port())
    by_tile = dict(zip(decomp.tile_ids(), sorted(ports), strict=True))
    topology = Topology.build(
        [NodeSpec(decomp.node_id(t), f"tcp://127.0.0.1:{by_tile[t]}") for t in decomp.tile_ids()],
        [
            (decomp.node_id(t), decomp.node_id(o))
            for t in decomp.tile_ids()
            for o in decomp.neighbours(t).values()
            if t < o
        ],
    )
    return decomp, topology


@functools.cache
def _serial_final(size: int, frames: int) -> npt.NDArray[np.uint8]:
    """The serial run's grid after ``frames`` steps (computed once per size and frames)."""
    final: npt.NDArray[np.uint8] = run_serial(LIFE, LIFE.initial((size, size), 1), frames)
    return final


def _check_tiles(
    what: str, decomp: Decomposition, size: int, frames: int, reports: list[dict[str, Any]]
) -> None:
    """Raise RuntimeError unless every report's ``sha256`` is its tile of the serial run."""
    serial = _serial_final(size, frames)
    for report in reports:
        tile = serial[decomp.tile_slices(decomp.tile_of(report["node"]))]
        if report["sha256"] != grid_digest(np.ascontiguousarray(tile)):
            raise RuntimeError(f"{what} node {report['node']} computed a wrong tile")


def measure_pyzmq(
    size: int, frames: int, nodes: int, reps: int, depth: int, loop: str = "blocking"
) -> dict[str, Any]:
    """Run ``bench/pyzmq_halo.py``, one process per tile, ``reps`` timed repetitions.

    A repetition's frames/s is ``frames`` / the median over the processes of
    the seconds that repetition took them (as ``bench/mpi_halo.py`` does with
    its ranks); ``frames_per_second`` is the median over the repetitions.

    Args:
        size: the grid's side.
        frames: frames per repetition.
        nodes: processes (tiles); at least 2, one node has nothing to exchange.
        reps: timed repetitions (each process runs one warm-up first).
        depth: frames per halo exchange (0: ``auto_depth``).
        loop: ``"blocking"`` (a ``zmq.Poller``) or ``"trio"`` (``--trio``: the
            same loop hand-written on Trio).

    Returns:
        ``loop``, ``fps`` (per repetition), ``frames_per_second``, ``depth``,
        ``seconds`` (per node, per repetition) and the ZeroMQ version.

    Raises:
        RuntimeError: a process died or printed no report, the run took longer
            than ``RUN_TIMEOUT``, or a final tile differs from the serial run's.
        ValueError: ``loop`` is neither ``"blocking"`` nor ``"trio"``.
    """
    if loop not in ("blocking", "trio"):
        raise ValueError(f"unknown loop {loop!r}")
    decomp, topology = _topology(size, nodes)
    reports: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cellmesh-pyzmq-") as tmp:
        path = Path(tmp) / "topology.toml"
        topology.save(path)
        errors = [(Path(tmp) / f"{name}.err").open("w+") for name in topology.ids]
        procs = [
            subprocess.Popen(
                [
                    *(sys.executable, str(_HERE / "pyzmq_halo.py")),
                    *("--topology", str(path), "--id", name, "--size", str(size)),
                    *("--frames", str(frames), "--reps", str(reps), "--depth", str(depth)),
                    *("--timeout", str(RUN_TIMEOUT)),
                    *(["--trio"] if loop == "trio" else []),
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                env={**os.environ, **_CHILD_MALLOC_ENV},
            )
            for name, err in zip(topology.ids, errors, strict=True)
        ]
        deadline = time.monotonic() + RUN_TIMEOUT
        try:
            for name, proc, err in zip(topology.ids, procs, errors, strict=True):
                # Each prints one line, then serves its neighbours' last ACKs
                # for about a second and exits: the pipe never fills.
                try:
                    out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise RuntimeError(
                        f"pyzmq node {name} still ran after {RUN_TIMEOUT:.0f} s"
                    ) from None
                lines = [line for line in out.splitlines() if line.startswith("{")]
                if proc.returncode != 0 or not lines:
                    err.seek(0)
                    raise RuntimeError(
                        f"pyzmq node {name} failed ({proc.returncode}): {err.read()[-2000:]}"
                    )
                reports.append(json.loads(lines[-1]))
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
            for err in errors:
                err.close()
    _check_tiles(f"pyzmq ({loop})", decomp, size, frames, reports)
    fps = [frames / median([r["seconds"][i] for r in reports]) for i in range(reps)]
    return {
        "loop": loop,
        "depth": reports[0]["depth"],
        "fps": fps,
        "frames_per_second": median(fps),
        "seconds": {r["node"]: r["seconds"] for r in reports},
        "zmq": reports[0]["zmq"],
    }


# -- the probe: where a frame's time goes ---------------------------------------------


class _ProbeInbox(_Inbox):
    """The demo's inbox, also noting each halo's one-way latency.

    The probe's senders prefix each halo with their ``perf_counter`` (one
    clock for all processes of a host).
    """

    def __init__(self) -> None:
        super().__init__()
        self.latency_ms: list[float] = []

    def put(self, frame: int, peer: str, data: bytes) -> None:
        (sent,) = struct.unpack_from("<d", data)
        self.latency_ms.append((time.perf_counter() - sent) * 1000.0)
        super().put(frame, peer, data[8:])


async def _probe_tile(
    topology_path: str, node_id: str, size: int, frames: int, depth: int
) -> dict[str, Any]:
    """The demo's frame loop (``run_tile``) without progress reports, timed per phase.

    ``depth`` frames per halo exchange (``DeepTile``; 0 = the demo's
    ``auto_depth``). Exchange phases are summed per exchange; ``step`` is per
    frame. ``cpu`` is this thread's CPU time (``time.thread_time``) over the
    same span as the wall clock: the rest is time the process was not running
    (waiting for its neighbours, or for a core).
    """
    topology = Topology.load(topology_path)
    decomp = Decomposition.for_nodes((size, size), len(topology.ids), names=topology.ids)
    tile = decomp.tile_of(node_id)
    depth = depth or auto_depth(decomp, LIFE)
    cells = DeepTile(
        LIFE, decomp, tile, LIFE.initial((size, size), 1)[decomp.tile_slices(tile)], depth
    )
    towards = {decomp.node_id(other): d for d, other in cells.neighbours.items()}
    inbox = _ProbeInbox()
    config = NodeConfig(
        sender=SenderConfig(retry_timeout=0.1, retry_ceiling=0.5, send_timeout=120.0), seed=1
    )
    phases: dict[str, list[float]] = {
        "send": [],
        "wait_halos": [],
        "fill": [],
        "wait_acks": [],
        "exchange_cpu": [],
    }
    step_ms: list[float] = []
    rtt_ms: list[float] = []
    with trio.fail_after(RUN_TIMEOUT):
        async with open_node(
            node_id,
            bind=topology.endpoint_of(node_id),
            peers=dict(topology.peers_of(node_id)),
            compute=lambda: _HaloActor(inbox),
            config=config,
        ) as node:
            previous: list[SendHandle] = []
            timed_from = cpu_from = 0.0
            for frame in range(frames):
                if frame == PROBE_WARMUP:
                    timed_from, cpu_from = time.perf_counter(), time.thread_time()
                    inbox.latency_ms.clear()
                    rtt_ms.clear()
                    step_ms.clear()
                    for samples in phases.values():
                        samples.clear()
                exchange = cells.needs_halos
                if exchange:
                    c0 = time.thread_time()
                    t0 = time.perf_counter()
                    stamp = struct.pack("<d", time.perf_counter())
                    sent = [
                        node.send_nowait(
                            peer, stamp + cells.edge(d).tobytes(), stream="halo", frame_no=frame
                        )
                        for peer, d in towards.items()
                    ]
                    t1 = time.perf_counter()
                    halos = await inbox.take(frame, len(towards))
                    t2 = time.perf_counter()
                    for peer, data in halos.items():
                        cells.fill(towards[peer], data)
                    t3 = time.perf_counter()
                    for handle in previous:
                        rtt_ms.append((await handle.wait()).rtt * 1000.0)
                    previous = sent
                    t4 = time.perf_counter()
                    for name, a, b in (
                        ("send", t0, t1),
                        ("wait_halos", t1, t2),
                        ("fill", t2, t3),
                        ("wait_acks", t3, t4),
                    ):
                        phases[name].append((b - a) * 1000.0)
                    phases["exchange_cpu"].append((time.thread_time() - c0) * 1000.0)
                t5 = time.perf_counter()
                cells.step()
                step_ms.append((time.perf_counter() - t5) * 1000.0)
            elapsed = time.perf_counter() - timed_from
            cpu = time.thread_time() - cpu_from
            for handle in previous:
                await handle.wait()
            # What the demo's per-frame progress report costs before it is sent.
            t0 = time.perf_counter()
            for _ in range(200):
                _summary(node.statistics())
            stats_ms = (time.perf_counter() - t0) / 200 * 1000.0
            timed = frames - PROBE_WARMUP
            report = {
                "node": node_id,
                "depth": depth,
                "fps": timed / elapsed,
                "wall_ms_per_frame": elapsed / timed * 1000.0,
                "cpu_ms_per_frame": cpu / timed * 1000.0,
                "exchange_ms_mean": {k: sum(v) / len(v) for k, v in phases.items() if v},
                "step_ms_mean": sum(step_ms) / len(step_ms),
                "halo_one_way_ms": {
                    "p50": percentile(inbox.latency_ms, 50),
                    "p90": percentile(inbox.latency_ms, 90),
                },
                "ack_rtt_ms": {"p50": percentile(rtt_ms, 50), "p90": percentile(rtt_ms, 90)},
                "resent": sum(s.protocol.resent for s in node.statistics().links.values()),
                "statistics_call_ms": stats_ms,
                "sha256": grid_digest(np.ascontiguousarray(cells.cells())),
            }
            print(json.dumps(report), flush=True)
            # Our neighbours may still wait for our ACK of their last halo: serve a
            # while; the parent ends us once every node has reported.
            await trio.sleep(30.0)
    return report


def measure_probe(size: int, frames: int, nodes: int, depth: int) -> list[dict[str, Any]]:
    """Start ``nodes`` probe processes on one topology; their per-node reports.

    Raises:
        RuntimeError: a probe node died, or its final tile differs from the serial run's.
    """
    decomp, topology = _topology(size, nodes)
    reports: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cellmesh-probe-") as tmp:
        path = Path(tmp) / "topology.toml"
        topology.save(path)
        procs = [
            subprocess.Popen(
                [
                    *(sys.executable, __file__, "--probe-tile", name, "--topology", str(path)),
                    *("--size", str(size), "--frames", str(frames), "--depth", str(depth)),
                ],
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
            )
            for name in topology.ids
        ]
        try:
            for proc in procs:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"a probe node exited with code {proc.wait()}")
                reports.append(json.loads(line))
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
    _check_tiles("probe", decomp, size, frames, reports)
    return reports


# -- report ---------------------------------------------------------------------------


def _ratio(ours: float, theirs: float | None) -> float | None:
    return ours / theirs if theirs else None


def _pairs(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[float]:
    """frames/s ratios of back-to-back repetitions (none if either side did not run)."""
    if not ours or not theirs:
        return []
    return [
        a["frames_per_second"] / b["frames_per_second"] for a, b in zip(ours, theirs, strict=True)
    ]


def _pyzmq_summary(runs: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, float | None]:
    """The JSON entry of a row's ``measure_pyzmq`` runs and their median frames/s (none: none)."""
    if not runs:
        return None, None
    fps = median([z["frames_per_second"] for z in runs])
    return {"runs": runs, "frames_per_second": fps, "zmq": runs[0]["zmq"]}, fps


def _frames(override: int | None, size: int, nodes: int) -> int:
    """Frames per run: ``--frames``, else FRAMES_MANY past MAX_FEW_NODES, else by size."""
    if override:
        return override
    if nodes > MAX_FEW_NODES:
        return FRAMES_MANY.get(nodes, min(FRAMES_MANY.values()))
    return FRAMES.get(size, 150)


def _by_nodes(results: list[dict[str, Any]], size: int, key: str) -> str:
    """The auto-depth rows' ``key`` at ``size``: ``"16"``, or by nodes ``"16 (2, 4) / 8 (16)"``."""
    nodes: dict[Any, list[str]] = {}
    for r in results:
        if r["size"] == size and r["auto_depth"]:
            nodes.setdefault(r[key], []).append(str(r["nodes"]))
    if len(nodes) == 1:
        return str(next(iter(nodes)))
    return " / ".join(f"{value} ({', '.join(ns)})" for value, ns in nodes.items())


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "n/a"


def _depth_label(row: dict[str, Any]) -> str:
    return f"{row['depth']} (auto)" if row["auto_depth"] else str(row["depth"])


def _depth_gains(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size and node count run at both depths: frames/s at the auto depth / at depth 1."""
    gains: list[dict[str, Any]] = []
    for auto in (r for r in results if r["auto_depth"]):
        one = [
            r
            for r in results
            if r["size"] == auto["size"] and r["nodes"] == auto["nodes"] and not r["auto_depth"]
        ]
        if one:
            gains.append(
                {
                    "size": auto["size"],
                    "nodes": auto["nodes"],
                    "depth": auto["depth"],
                    "mpi": None
                    if auto["mpi_fps"] is None
                    else _ratio(auto["mpi_fps"], one[0]["mpi_fps"]),
                    "pyzmq": None
                    if auto.get("pyzmq_fps") is None
                    else _ratio(auto["pyzmq_fps"], one[0].get("pyzmq_fps")),
                    "trio_pyzmq": None
                    if auto.get("trio_pyzmq_fps") is None
                    else _ratio(auto["trio_pyzmq_fps"], one[0].get("trio_pyzmq_fps")),
                    "cellmesh": auto["cellmesh_fps"] / one[0]["cellmesh_fps"],
                }
            )
    return gains


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Bars of frames/s by node count and halo depth, one panel per grid size (log scale)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size"] for r in results})
    fig, axes = plt.subplots(1, len(sizes), figsize=(9 * len(sizes), 4.8), dpi=120, sharey=True)
    axes = np.atleast_1d(axes)
    width = 0.095
    series = [
        ("serial numpy (1 process)", "serial_fps", None, "#999999", ""),
        ("mpi4py, depth 1", "mpi_fps", False, "#9ecae1", "//"),
        ("mpi4py, auto depth", "mpi_fps", True, "#1f77b4", ""),
        ("pyzmq+ACK by hand, depth 1", "pyzmq_fps", False, "#a1d99b", "//"),
        ("pyzmq+ACK by hand, auto depth", "pyzmq_fps", True, "#2ca02c", ""),
        ("Trio+pyzmq+ACK by hand, depth 1", "trio_pyzmq_fps", False, "#cbc9e2", "//"),
        ("Trio+pyzmq+ACK by hand, auto depth", "trio_pyzmq_fps", True, "#6a51a3", ""),
        ("cellmesh, depth 1", "cellmesh_fps", False, "#f4a6a6", "//"),
        ("cellmesh, auto depth", "cellmesh_fps", True, "#d62728", ""),
    ]
    for ax, size in zip(axes, sizes, strict=True):
        counts = sorted({r["nodes"] for r in results if r["size"] == size})
        x = np.arange(len(counts))
        for i, (label, key, auto, colour, hatch) in enumerate(series):
            xs: list[float] = []
            values: list[float] = []
            for j, nodes in enumerate(counts):
                rows = [
                    r
                    for r in results
                    if r["size"] == size
                    and r["nodes"] == nodes
                    and (auto is None or r["auto_depth"] == auto)
                    and r.get(key)
                ]
                if rows:
                    xs.append(float(x[j]) + (i - (len(series) - 1) / 2) * width)
                    values.append(float(rows[0][key]))
            bars = ax.bar(xs, values, width, label=label, color=colour, hatch=hatch)
            ax.bar_label(bars, fmt="%.0f", fontsize=5)
        ax.axhline(RAY_REFERENCE_FPS, color="black", linestyle=":", linewidth=1)
        ax.text(x[0] - 0.45, RAY_REFERENCE_FPS * 1.08, "Ray (reference)", ha="left", fontsize=7)
        ax.set_xticks(x, [f"{n} node{'s' if n > 1 else ''}" for n in counts])
        ax.set_yscale("log")
        ax.set_title(
            f"Life {size}x{size}, frames {_by_nodes(results, size, 'frames')}, "
            f"auto depth {_by_nodes(results, size, 'depth')} (by nodes)"
        )
        ax.set_ylabel("frames/s (log)")
    # Below the panels: nine series would cover bars inside one.
    # The first panel may lack a series another has: take each label once.
    legend: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(
        list(legend.values()),
        list(legend),
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=5,
    )
    fig.suptitle(
        "cellmesh grid demo vs serial numpy, mpi4py and hand-written pyzmq (blocking, Trio) at "
        f"the same halo depth ({os.cpu_count()} shared cores: more nodes oversubscribe them; "
        "1 node has no halos)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def print_report(
    results: list[dict[str, Any]], reps: int, depth1_reps: int, reps_many: int
) -> tuple[list[dict[str, Any]], dict[str, bool | None]]:
    """Print the tables and the goals of ``results``; return the depth gains and the goals."""

    def cell(value: float | None) -> object:
        return "n/a" if value is None else value

    fewer = [f"{depth1_reps} at depth 1"] if depth1_reps != reps else []
    if reps_many != reps and any(r["nodes"] > MAX_FEW_NODES for r in results):
        fewer.append(f"{reps_many} past {MAX_FEW_NODES} nodes")
    runs_text = f"{reps} runs" + (f" ({', '.join(fewer)}, to save time)" if fewer else "")

    def vs(r: dict[str, Any], key: str) -> str:
        # A ratio of medians and, in brackets, the range of its back-to-back pairs.
        ratio = r.get(key)
        return "n/a" if ratio is None else f"{ratio:.2f} ({_span(r[f'{key}_pairs'])})"

    print_table(
        f"Life frames/s, median of {runs_text} "
        f"({os.cpu_count()} cores: more nodes oversubscribe them)",
        [
            "size",
            "nodes",
            "depth",
            "serial",
            "mpi4py",
            "pyzmq+ACK",
            "trio+ACK",
            "cellmesh",
            "cm/mpi (pairs)",
            "cm/pyzmq (pairs)",
            "cm/trio (pairs)",
            "pyzmq/mpi (pairs)",
            "trio/mpi (pairs)",
            f"cm/Ray ref {RAY_REFERENCE_FPS:.0f}*",
            "= serial",
        ],
        [
            [
                f"{r['size']}²",
                r["nodes"],
                _depth_label(r),
                r["serial_fps"],
                cell(r["mpi_fps"]),
                cell(r["pyzmq_fps"]),
                cell(r.get("trio_pyzmq_fps")),
                r["cellmesh_fps"],
                vs(r, "cellmesh_vs_mpi"),
                vs(r, "cellmesh_vs_pyzmq"),
                vs(r, "cellmesh_vs_trio_pyzmq"),
                vs(r, "pyzmq_vs_mpi"),
                vs(r, "trio_pyzmq_vs_mpi"),
                r["cellmesh_vs_ray_reference"],
                "yes" if r["all_match_serial"] else "NO",
            ]
            for r in results
        ],
    )
    print(
        "  depth: frames per halo exchange, the same for every system in a row; 'auto' is the "
        "demo's default (auto_depth); 1 node exchanges no halos.\n"
        "  pyzmq+ACK: bench/pyzmq_halo.py, the same loop hand-written on blocking pyzmq, every "
        "halo ACKed (no retries, no dedup); trio+ACK: the same loop, sockets and messages "
        "hand-written on Trio (--trio), no cellmesh code; neither runs at 1 node.\n"
        "  ratios: of the medians; in brackets the range of the ratios of the back-to-back "
        "runs (mpi4py, pyzmq, trio, cellmesh alternate); cm = cellmesh.\n"
        f"  * Ray: {RAY_REFERENCE_FPS:.0f} frames/s is a reference measured earlier on this "
        "machine, not in this run."
    )
    gains = _depth_gains(results)
    if gains:
        print_table(
            "What the deep halos gain each system (auto depth / depth 1, frames/s)",
            ["size", "nodes", "auto depth", "mpi4py", "pyzmq+ACK", "trio+ACK", "cellmesh"],
            [
                [
                    f"{g['size']}²",
                    g["nodes"],
                    g["depth"],
                    cell(g["mpi"]),
                    cell(g["pyzmq"]),
                    cell(g.get("trio_pyzmq")),
                    g["cellmesh"],
                ]
                for g in gains
            ],
        )
    goals = {
        f"{r['size']}/{r['nodes']} depth {_depth_label(r)}: vs mpi4py at the same depth "
        f">= {GOAL_VS_MPI}": (
            None if r["cellmesh_vs_mpi"] is None else r["cellmesh_vs_mpi"] >= GOAL_VS_MPI
        )
        for r in results
        if r["nodes"] in (2, 4)
    }
    goals.update(
        {
            f"{r['size']}/{r['nodes']} depth {_depth_label(r)}: vs mpi4py at the same depth "
            f">= {GOAL_VS_MPI_MANY[r['nodes']]}": (
                None
                if r["cellmesh_vs_mpi"] is None
                else r["cellmesh_vs_mpi"] >= GOAL_VS_MPI_MANY[r["nodes"]]
            )
            for r in results
            if r["nodes"] in GOAL_VS_MPI_MANY and r["size"] == 1024 and r["auto_depth"]
        }
    )
    # The Ray goal is the for the rows it had (1, 2 and 4 nodes).
    goals.update(
        {
            f"{r['size']}/{r['nodes']} depth {_depth_label(r)}: vs Ray >= {GOAL_VS_RAY:.0f}x": r[
                "cellmesh_vs_ray_reference"
            ]
            >= GOAL_VS_RAY
            for r in results
            if r["nodes"] <= MAX_FEW_NODES
        }
    )
    print("\nGoals:")
    for name, met in goals.items():
        print(f"  {name}: {'n/a (no MPI)' if met is None else 'met' if met else 'NOT met'}")
    # For information: the same loop by hand on Trio is the floor of any
    # Trio-based implementation; against mpi4py it says what the goal allows.
    for r in results:
        if r["nodes"] > 1 and r.get("trio_pyzmq_fps") is not None:
            print(
                f"  {r['size']}/{r['nodes']} depth {_depth_label(r)}: (information) "
                f"Trio+pyzmq+ACK by hand vs mpi4py {vs(r, 'trio_pyzmq_vs_mpi')}, "
                f"vs blocking pyzmq+ACK {vs(r, 'trio_pyzmq_vs_pyzmq')}; "
                f"cellmesh vs it {vs(r, 'cellmesh_vs_trio_pyzmq')}"
            )
    return gains, goals


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--probe-tile``, one probe node); returns the exit code."""
    parser = argparse.ArgumentParser(
        description="Grid benchmark: cellmesh vs numpy, mpi4py and hand-written pyzmq."
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=list(FRAMES), help="grid sides")
    parser.add_argument("--nodes", type=int, nargs="+", default=list(NODES), help="node counts")
    parser.add_argument("--reps", type=int, default=REPS, help="repetitions (median taken)")
    parser.add_argument(
        "--depth1-reps",
        type=int,
        default=DEPTH1_REPS,
        help=f"repetitions of the depth-1 runs (default {DEPTH1_REPS}, at most --reps)",
    )
    parser.add_argument(
        "--reps-many",
        type=int,
        default=REPS_MANY,
        help=f"repetitions past {MAX_FEW_NODES} nodes (default {REPS_MANY}, at most --reps)",
    )
    parser.add_argument(
        "--many-sizes",
        type=int,
        nargs="+",
        default=list(SIZES_MANY),
        help=f"grid sides that also run past {MAX_FEW_NODES} nodes (default {SIZES_MANY[0]})",
    )
    parser.add_argument(
        "--frames",
        type=int,
        default=None,
        help="override frames per run (every row; default by size, past "
        f"{MAX_FEW_NODES} nodes by node count: {FRAMES_MANY})",
    )
    parser.add_argument(
        "--spin",
        type=float,
        default=None,
        metavar="SECONDS",
        help="the cellmesh nodes' NodeConfig.spin (default: NodeConfig's; 0: never poll)",
    )
    parser.add_argument("--no-mpi", action="store_true", help="skip the mpi4py column")
    parser.add_argument("--profile", action="store_true", help="also run the per-phase probe")
    parser.add_argument("--probe-tile", help=argparse.SUPPRESS)
    parser.add_argument("--topology", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _SPIN[0] = args.spin
    if args.probe_tile is not None:
        trio.run(_probe_tile, args.topology, args.probe_tile, args.size, args.frames, args.depth)
        return 0

    mpiexec, why = (None, "--no-mpi given") if args.no_mpi else find_mpiexec()
    if mpiexec is None:
        print(f"MPI column skipped: {why}", flush=True)
    many = sorted(n for n in args.nodes if n > MAX_FEW_NODES)
    if many:
        print(
            f"past {MAX_FEW_NODES} nodes ({', '.join(map(str, many))}): auto depth only, "
            f"{min(args.reps, args.reps_many)} rep(s), sizes {args.many_sizes} only, "
            "no --profile probe (to bound the run's time)",
            flush=True,
        )
    results: list[dict[str, Any]] = []
    for size in args.sizes:
        serial: dict[int, tuple[list[float], str]] = {}
        for nodes in args.nodes:
            if nodes > MAX_FEW_NODES and size not in args.many_sizes:
                print(f"size {size}, {nodes} nodes: skipped (--many-sizes)", flush=True)
                continue
            frames = _frames(args.frames, size, nodes)
            if frames not in serial:
                serial[frames] = measure_serial(size, frames, args.reps)
            serial_runs, serial_digest = serial[frames]
            serial_fps = median(serial_runs)
            auto = auto_depth(Decomposition.for_nodes((size, size), nodes), LIFE)
            # One node exchanges no halos: its depth changes nothing. Past
            # MAX_FEW_NODES depth 1 is too slow to run (a few frames/s at 64).
            few = nodes <= MAX_FEW_NODES
            depths = [auto] if nodes == 1 or auto == 1 or not few else [1, auto]
            for depth in depths:
                if not few:
                    reps = min(args.reps, args.reps_many)
                elif depth == auto:
                    reps = args.reps
                else:
                    reps = min(args.reps, args.depth1_reps)
                started = time.monotonic()
                print(
                    f"size {size}, {nodes} node(s), depth {depth}, {frames} frames, "
                    f"{reps} rep(s) ...",
                    flush=True,
                )
                # Alternate the four, one repetition each, so that all see the
                # same load from whatever else shares the cores at that moment.
                mpi_runs: list[dict[str, Any]] = []
                zmq_runs: list[dict[str, Any]] = []
                trio_runs: list[dict[str, Any]] = []
                runs: list[dict[str, Any]] = []
                for _ in range(reps):
                    if mpiexec is not None:
                        mpi_runs.append(measure_mpi(mpiexec, size, frames, nodes, 1, depth))
                    if nodes > 1:
                        zmq_runs.append(measure_pyzmq(size, frames, nodes, 1, depth))
                        trio_runs.append(measure_pyzmq(size, frames, nodes, 1, depth, "trio"))
                    runs += measure_cellmesh(size, frames, nodes, 1, depth)
                fps = median([r["frames_per_second"] for r in runs])
                pyzmq, pyzmq_fps = _pyzmq_summary(zmq_runs)
                trio_pyzmq, trio_fps = _pyzmq_summary(trio_runs)
                mpi: dict[str, Any] | None = None
                mpi_fps: float | None = None
                pairs: list[float] = []
                if mpi_runs:
                    mpi_fps = median([m["frames_per_second"] for m in mpi_runs])
                    pairs = _pairs(runs, mpi_runs)
                    mpi = {
                        "runs": mpi_runs,
                        "frames_per_second": mpi_fps,
                        "mpi": mpi_runs[0]["mpi"],
                        "sha256": mpi_runs[0]["sha256"],
                    }
                results.append(
                    {
                        "size": size,
                        "nodes": nodes,
                        "frames": frames,
                        "depth": depth,
                        "auto_depth": depth == auto,
                        "reps": reps,
                        "serial_fps": serial_fps,
                        "serial_runs_fps": serial_runs,
                        "mpi_fps": mpi_fps,
                        "mpi": mpi,
                        "cellmesh_fps": fps,
                        "cellmesh_runs": runs,
                        "cellmesh_vs_mpi": _ratio(fps, mpi_fps),
                        "cellmesh_vs_mpi_pairs": pairs,
                        "pyzmq_fps": pyzmq_fps,
                        "pyzmq": pyzmq,
                        "cellmesh_vs_pyzmq": _ratio(fps, pyzmq_fps),
                        "cellmesh_vs_pyzmq_pairs": _pairs(runs, zmq_runs),
                        "pyzmq_vs_mpi": None if pyzmq_fps is None else _ratio(pyzmq_fps, mpi_fps),
                        "pyzmq_vs_mpi_pairs": _pairs(zmq_runs, mpi_runs),
                        "trio_pyzmq_fps": trio_fps,
                        "trio_pyzmq": trio_pyzmq,
                        "cellmesh_vs_trio_pyzmq": _ratio(fps, trio_fps),
                        "cellmesh_vs_trio_pyzmq_pairs": _pairs(runs, trio_runs),
                        "trio_pyzmq_vs_mpi": None
                        if trio_fps is None
                        else _ratio(trio_fps, mpi_fps),
                        "trio_pyzmq_vs_mpi_pairs": _pairs(trio_runs, mpi_runs),
                        "trio_pyzmq_vs_pyzmq": None
                        if trio_fps is None
                        else _ratio(trio_fps, pyzmq_fps),
                        "trio_pyzmq_vs_pyzmq_pairs": _pairs(trio_runs, zmq_runs),
                        "cellmesh_vs_serial": _ratio(fps, serial_fps),
                        "cellmesh_vs_ray_reference": fps / RAY_REFERENCE_FPS,
                        "row_seconds": time.monotonic() - started,
                        # measure_pyzmq raises on a tile that differs from the serial run's.
                        "all_match_serial": all(r["sha256"] == serial_digest for r in runs)
                        and all(m["sha256"] == serial_digest for m in mpi_runs),
                    }
                )

    depth1_reps = min(args.reps, args.depth1_reps)
    reps_many = min(args.reps, args.reps_many)
    gains, goals = print_report(results, args.reps, depth1_reps, reps_many)

    probe: dict[str, Any] = {}
    if args.profile:
        for size in args.sizes:
            for nodes in (n for n in args.nodes if 1 < n <= MAX_FEW_NODES):
                frames = _frames(args.frames, size, nodes)
                # Depth 1 is the loop before deep halos: one exchange per frame.
                for depth in (1, 0):
                    name = f"{size}/{nodes} depth {'auto' if depth == 0 else depth}"
                    probe[name] = measure_probe(size, frames, nodes, depth)
        rows = []
        for key, reports in probe.items():
            for rep in reports:
                p = rep["exchange_ms_mean"]
                rows.append(
                    [
                        key,
                        rep["node"],
                        rep["fps"],
                        rep["wall_ms_per_frame"],
                        rep["cpu_ms_per_frame"],
                        rep["step_ms_mean"],
                        p["send"],
                        p["wait_halos"],
                        p["wait_acks"],
                        p["exchange_cpu"],
                        rep["halo_one_way_ms"]["p50"],
                        rep["ack_rtt_ms"]["p50"],
                        rep["resent"],
                    ]
                )
        print_table(
            "Probe: the demo loop without progress reports; ms per frame, ms per exchange",
            [
                "size/nodes depth",
                "node",
                "fps",
                "wall/frame",
                "cpu/frame",
                "step",
                "exch: send",
                "wait halos",
                "wait ACKs",
                "exch cpu",
                "halo 1-way p50",
                "ACK rtt p50",
                "resent",
            ],
            rows,
        )

    path = write_json(
        "grid",
        {
            "machine": machine_info(),
            "mpi": None if mpiexec is None else results[0]["mpi"]["mpi"] if results else None,
            "mpi_skipped": why or None,
            "zmq": zmq.zmq_version(),
            "reps": args.reps,
            "depth1_reps": depth1_reps,
            "reps_many": reps_many,
            "spin": NodeConfig().spin if _SPIN[0] is None else _SPIN[0],
            "max_few_nodes": MAX_FEW_NODES,
            "depth_gains": gains,
            "ray_reference_fps": RAY_REFERENCE_FPS,
            "results": results,
            "goals": goals,
            "probe": probe,
        },
    )
    plot(results, PLOT)
    print(f"\nwrote {path} and {PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
