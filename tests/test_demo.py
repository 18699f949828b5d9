"""The grid demo across real node processes equals the serial numpy run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from actors import NodeSpec
from actors.grid import Job, Pause, run_demo

pytestmark = pytest.mark.slow

FAULTS = {
    "clean": {},
    "drop": {"drop": 0.1},
    "dup": {"dup": 0.2},
    "delay": {"delay_ms": 8.0},
}


@pytest.mark.parametrize("model", ["life", "heat"])
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_tiled_run_equals_serial_run(model: str, fault: str, tmp_path: Path) -> None:
    job = Job(model=model, size=48, frames=12, seed=5, **FAULTS[fault])  # type: ignore[arg-type]
    outcome = await run_demo(job, nodes=4, out=tmp_path, pauses=[], show=False, timeout=90)
    assert outcome.match, (outcome.sha256, outcome.serial_sha256)
    assert outcome.sha256 == outcome.serial_sha256
    if fault in ("drop",):
        assert sum(n["resent"] for n in outcome.per_node.values()) > 0
    if fault == "dup":
        assert sum(n["duplicates_dropped"] for n in outcome.per_node.values()) > 0
    assert (await trio.Path(outcome.pictures["grid"]).stat()).st_size > 0


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_deep_halos_under_faults_equal_the_serial_run(fault: str, tmp_path: Path) -> None:
    # Halos 5 frames deep: 3 exchanges for 13 frames, the last one partly used.
    job = Job(model="life", size=48, frames=13, seed=6, depth=5, **FAULTS[fault])  # type: ignore[arg-type]
    outcome = await run_demo(job, nodes=4, out=tmp_path, pauses=[], show=False, timeout=90)
    assert outcome.sha256 == outcome.serial_sha256
    if fault == "drop":
        assert sum(n["resent"] for n in outcome.per_node.values()) > 0
    if fault == "dup":
        assert sum(n["duplicates_dropped"] for n in outcome.per_node.values()) > 0


async def test_frozen_node_is_waited_for_and_result_still_matches(tmp_path: Path) -> None:
    job = Job(model="life", size=48, frames=400, seed=2)
    start = trio.current_time()
    outcome = await run_demo(
        job, nodes=4, out=tmp_path, pauses=[Pause("t0-1", 5, 1.5)], show=False, timeout=90
    )
    assert outcome.match
    [pause] = outcome.paused
    node, rest = pause.split("@")
    frame = int(rest.split(":")[0])
    # Frozen mid-run (progress reports come ten times a second), not after.
    assert node == "t0-1"
    assert 5 <= frame < 400
    assert trio.current_time() - start >= 1.5


async def test_a_pause_lands_near_its_frame_even_in_a_short_run(tmp_path: Path) -> None:
    # 60 frames of 48² take a few ms, less than one progress interval (0.1 s):
    # the nodes report the pause's frame at once, so the pause still lands.
    job = Job(model="life", size=48, frames=60, seed=3)
    outcome = await run_demo(
        job, nodes=4, out=tmp_path, pauses=[Pause("t1-0", 20, 0.3)], show=False, timeout=90
    )
    assert outcome.match
    assert outcome.pauses_missed == []
    [pause] = outcome.paused
    node, rest = pause.split("@")
    assert node == "t1-0"
    assert 20 <= int(rest.split(":")[0]) <= 60


async def test_a_pause_the_run_never_reaches_is_reported_missed(tmp_path: Path) -> None:
    job = Job(model="life", size=48, frames=20, seed=3)
    outcome = await run_demo(
        job, nodes=4, out=tmp_path, pauses=[Pause("t0-1", 500, 1.0)], show=False, timeout=90
    )
    assert outcome.match
    assert outcome.paused == []
    assert outcome.pauses_missed == ["t0-1@500:1"]


def test_cli_json_summary_and_pattern(tmp_path: Path) -> None:
    pattern = Path(__file__).resolve().parent.parent / "examples" / "patterns" / "glider.rle"
    cmd = [sys.executable, "-m", "actors._cli", "demo", "--nodes", "2", "--size", "32"]
    cmd += ["--frames", "8", "--pattern", str(pattern), "--out", str(tmp_path), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["match"] is True
    assert summary["live_cells"] == 5  # a glider stays five cells
    assert summary["nodes"] == 2
    assert set(summary["per_node"]) == {"t0-0", "t1-0"}


def test_pause_option_is_checked() -> None:
    with pytest.raises(ValueError, match="NODE@FRAME:SECONDS"):
        Pause.parse("t0-1:5")


def _two_tiles(tmp_path: Path) -> tuple[Any, Path]:
    """A 32x32 grid in two tiles on two free local ports; its topology file."""
    from actors import Topology
    from actors.grid import Decomposition, free_port

    decomp = Decomposition.for_nodes((32, 32), 2)
    names = decomp.node_ids()
    ports: set[int] = set()
    while len(ports) < 2:
        ports.add(free_port())
    topology = Topology.build(
        [
            NodeSpec(name, f"tcp://127.0.0.1:{port}")
            for name, port in zip(names, sorted(ports), strict=True)
        ],
        [(names[0], names[1])],
    )
    path = tmp_path / "grid.toml"
    topology.save(path)
    return decomp, path


def test_cellmesh_node_without_a_coordinator_saves_its_tile(tmp_path: Path) -> None:
    # What `srun -n 2 cellmesh node --topology grid.toml ...` does on two hosts,
    # here as two local processes whose ids come from the launcher's rank.
    from actors.grid import assemble, run_serial

    decomp, path = _two_tiles(tmp_path)
    names = decomp.node_ids()
    job = Job(size=32, frames=10, seed=4, linger=1.0)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "actors._cli",
                "node",
                "--topology",
                str(path),
                *job.args(),
                "--out",
                str(tmp_path),
            ],
            env={**os.environ, "SLURM_PROCID": str(rank)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0]
    assert all("wrote" in out for out in outputs)
    parts = {decomp.tile_of(n): np.load(tmp_path / f"{n}.npy") for n in names}
    assert np.array_equal(assemble(decomp, parts), run_serial("life", job.initial_grid(), 10))


@pytest.mark.parametrize("nodes", [2, 4])
async def test_secure_run_gives_the_plaintext_result(nodes: int, tmp_path: Path) -> None:
    job = Job(model="life", size=48, frames=12, seed=3, drop=0.05)
    plain = await run_demo(
        job, nodes=nodes, out=tmp_path / "plain", pauses=[], show=False, timeout=90
    )
    secure = await run_demo(
        job, nodes=nodes, out=tmp_path / "secure", pauses=[], show=False, timeout=90, secure=True
    )
    assert plain.match
    assert secure.match
    assert secure.sha256 == plain.sha256
    assert (plain.secure, secure.secure) == (False, True)
    # Every tile and the coordinator admitted its peers by key; nobody refused.
    assert secure.admitted >= nodes + nodes * (nodes - 1) // 2
    assert secure.refused == 0
    topology = (tmp_path / "secure" / "topology.toml").read_text()
    assert topology.count("public_key") == nodes + 1


def _node_cmd(topology: Path, job: Job, out: Path, keys: Path) -> list[str]:
    cmd = [sys.executable, "-m", "actors._cli", "node", "--topology", str(topology)]
    return [*cmd, *job.args(), "--out", str(out), "--keys", str(keys)]


def test_cellmesh_keys_then_secure_nodes_and_an_open_secret_file_is_refused(
    tmp_path: Path,
) -> None:
    from actors import Topology
    from actors.grid import assemble, run_serial

    decomp, path = _two_tiles(tmp_path)
    names = decomp.node_ids()
    keys = tmp_path / "keys"
    made = subprocess.run(
        [sys.executable, "-m", "actors._cli", "keys", "--dir", str(keys), "--topology", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    assert Topology.load(path).node(names[0]).public_key is not None
    assert (keys.stat().st_mode & 0o777) == 0o700
    job = Job(size=32, frames=10, seed=4, linger=1.0)
    procs = [
        subprocess.Popen(
            _node_cmd(path, job, tmp_path, keys),
            env={**os.environ, "SLURM_PROCID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    # Secure nodes do not warn about running unauthenticated.
    assert all("UNAUTHENTICATED" not in err for _, err in outputs)
    parts = {decomp.tile_of(n): np.load(tmp_path / f"{n}.npy") for n in names}
    assert np.array_equal(assemble(decomp, parts), run_serial("life", job.initial_grid(), 10))

    without_keys = subprocess.run(
        [*_node_cmd(path, job, tmp_path, keys)[:-2], "--id", names[0]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert without_keys.returncode == 2
    assert "give --keys" in without_keys.stderr

    (keys / f"{names[0]}.key_secret").chmod(0o644)
    refused = subprocess.run(
        [*_node_cmd(path, job, tmp_path, keys), "--id", names[0]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2
    assert "accessible by others" in refused.stderr
    assert "chmod 600" in refused.stderr


def test_sixty_four_node_processes_equal_the_serial_run(tmp_path: Path) -> None:
    # `cellmesh demo --nodes 64`: 8x8 tiles, 65 real processes on this machine.
    # Start-up dominates (each tile process imports numpy, trio and zmq:
    # about 1 s of CPU), so a few frames: 8 frames of 64x64 halo-exchange
    # every frame (8-cell tiles, depth 1). It took 147 s with the load average
    # near 100 from other work; at least ~35 s on 2 quiet cores (the imports).
    cmd = [sys.executable, "-m", "actors._cli", "demo", "--nodes", "64", "--size", "64"]
    cmd += ["--frames", "8", "--linger", "1", "--timeout", "280", "--out", str(tmp_path), "--json"]
    # Its own session; the tiles stop when the coordinator does (their stdin
    # closes), so killing the coordinator on a timeout leaves no process behind.
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"cellmesh demo --nodes 64 did not end in 300 s\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["match"] is True
    assert summary["nodes"] == 64
    assert len(summary["per_node"]) == 64
    assert 0 < summary["startup_seconds"] < 300
    # Nothing per tile grows with the node count, only with its links: a
    # tile's file descriptors are a fixed base plus a few per link (its
    # neighbours and the coordinator), the same for the 4 corner tiles (3
    # neighbours), the 24 edge tiles (5) and the 36 inner ones (8).
    by_links: dict[int, set[int]] = {}
    for name, node in summary["per_node"].items():
        row, col = (int(x) for x in name[1:].split("-"))
        neighbours = (3 if 0 < row < 7 else 2) * (3 if 0 < col < 7 else 2) - 1
        by_links.setdefault(neighbours + 1, set()).add(node["fds"])
        assert node["rss_mb"] < 200
    assert sorted(by_links) == [4, 6, 9]
    assert all(len(fds) == 1 for fds in by_links.values()), by_links
    per_link = (max(by_links[9]) - min(by_links[4])) / 5
    assert 0 < per_link <= 6, by_links
    # The coordinator links to all 64 tiles: its descriptors grow by about
    # as much per link, not per link squared.
    assert summary["coordinator_fds"] <= min(by_links[4]) + 64 * per_link + 32
