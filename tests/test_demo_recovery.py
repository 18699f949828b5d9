"""Grid runs outlive killed tile processes: restart, roll back, same result as serial.

Real processes: ``run_demo`` starts four tile processes and the coordinator
SIGKILLs them on cue (``--kill NODE@FRAME``). Each case checks the result
bit for bit against the serial run, what the summary says about each
recovery, and that no tile process is left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from actors.grid import Job, Kill, run_demo
from actors.grid._recovery import (
    CheckpointStore,
    checkpoint_interval,
    latest_common_checkpoint,
    prune_checkpoints,
)

pytestmark = pytest.mark.slow

TILES = ["t0-0", "t0-1", "t1-0", "t1-1"]


def _tiles_running(out: Path) -> list[int]:
    """Pids of live processes started with this run's topology file."""
    needle = str(out / "topology.toml").encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


async def _run(tmp_path: Path, kills: list[Kill], **job: Any) -> Any:
    options: dict[str, Any] = {
        "model": "life",
        "size": 48,
        "frames": 40,
        "seed": 4,
        "checkpoint_every": 5,
        **job,
    }
    with trio.fail_after(150):
        outcome = await run_demo(
            Job(**options), nodes=4, out=tmp_path, pauses=[], show=False, timeout=120, kills=kills
        )
    assert outcome.sha256 == outcome.serial_sha256
    assert outcome.match
    assert outcome.kills_missed == []
    assert [k.split("@")[0] for k in outcome.killed] == [k.node for k in kills]
    assert len(outcome.recoveries) == len(kills)
    for record, kill in zip(outcome.recoveries, kills, strict=True):
        assert record["node"] == kill.node
        assert record["cause"] == "killed"
        assert record["died_at_frame"] >= kill.frame
        # Back to a checkpoint at most one interval and the tiles' spread
        # (an exchange or two) behind the death.
        every, depth = outcome.checkpoint_every, options.get("depth", 1)
        assert record["rolled_back_to"] % every == 0
        assert 0 <= record["frames_replayed"] <= every + 2 * depth
        assert record["restart_seconds"] is not None
        assert record["recovered_seconds"] is not None
    assert _tiles_running(tmp_path) == []
    return outcome


async def test_a_killed_tile_is_restarted_and_the_result_matches(tmp_path: Path) -> None:
    outcome = await _run(tmp_path, [Kill("t0-0", 17)])
    [record] = outcome.recoveries
    assert record["rolled_back_to"] == 15 or record["rolled_back_to"] == 20
    assert record["during_recovery"] is None
    assert outcome.checkpoint_every == 5


async def test_two_kills_of_different_nodes(tmp_path: Path) -> None:
    outcome = await _run(tmp_path, [Kill("t0-1", 12), Kill("t1-0", 28)])
    first, second = outcome.recoveries
    assert (first["epoch"], second["epoch"]) == (1, 2)
    assert second["rolled_back_to"] >= 25


async def test_a_kill_during_recovery(tmp_path: Path) -> None:
    # t0-0 dies at 29 and every tile goes back to 25 (or 20 if a tile had
    # not written 25 yet); t0-1 is killed when it reports 26 again, while
    # t0-0 replays towards 29, for which it needs t0-1's halos.
    outcome = await _run(tmp_path, [Kill("t0-0", 29), Kill("t0-1", 26)], checkpoint_every=5)
    first, second = outcome.recoveries
    assert second["died_at_frame"] < first["died_at_frame"]
    assert second["during_recovery"] == 1


async def test_a_kill_on_a_lossy_wire(tmp_path: Path) -> None:
    outcome = await _run(
        tmp_path, [Kill("t1-1", 14)], drop=0.1, dup=0.1, delay_ms=4.0, model="heat"
    )
    assert sum(n["resent"] for n in outcome.per_node.values()) > 0


async def test_deep_halos_checkpoint_at_exchanges(tmp_path: Path) -> None:
    # Depth 4: a checkpoint every 5 frames is taken every 8, where an
    # exchange begins.
    outcome = await _run(tmp_path, [Kill("t1-0", 19)], depth=4, checkpoint_every=5, frames=41)
    [record] = outcome.recoveries
    assert outcome.checkpoint_every == 8
    assert record["rolled_back_to"] % 8 == 0


# --- the parts, without processes ------------------------------------------------------


def test_checkpoint_interval_rounds_up_to_the_depth() -> None:
    assert checkpoint_interval(10, 1) == 10
    assert checkpoint_interval(10, 4) == 12
    assert checkpoint_interval(16, 16) == 16
    assert checkpoint_interval(1, 16) == 16


def test_the_common_checkpoint_is_the_latest_every_tile_has(tmp_path: Path) -> None:
    cells = np.zeros((4, 4), dtype=np.uint8)
    assert latest_common_checkpoint(tmp_path, TILES) == 0
    for tile, frames in zip(TILES, ([5, 10, 15], [5, 10], [5, 10, 15], [10]), strict=True):
        store = CheckpointStore(tmp_path, tile)
        for frame in frames:
            store.save(frame, cells + frame)
    # A stray temporary file (a tile killed mid-write) is not a checkpoint.
    (tmp_path / "t0-1" / ".15.123.tmp.npy").write_bytes(b"torn")
    assert latest_common_checkpoint(tmp_path, TILES) == 10
    prune_checkpoints(tmp_path, TILES, 10)
    assert not (tmp_path / "t0-0" / "5.npy").exists()
    assert (CheckpointStore(tmp_path, "t0-0").load(15) == 15).all()


def test_kill_option_is_checked(tmp_path: Path) -> None:
    for bad in ("t0-1", "t0-1@0", "@5", "t0-1@x"):
        with pytest.raises(ValueError, match="NODE@FRAME"):
            Kill.parse(bad)
    cmd = [sys.executable, "-m", "actors._cli", "demo", "--kill", "t9-9@5", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "--kill names 't9-9'" in done.stderr
