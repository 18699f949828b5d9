"""The programs docs/guide.md walks through run, and the guide's snippets hold.

``examples/heat.py``, the guide's whole program, runs as 3 real ranks under
``cellmesh run`` and its rod equals a serial run computed here.

``examples/my_grid.py`` steps a tiled 2-D wave over real node processes and
exits 0 only if the result equals a serial run bit for bit; here it runs
under a lossy wire, so the match also proves retries and dedup did their job.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import trio

from actors import Topology

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "my_grid.py"
HEAT = ROOT / "examples" / "heat.py"
GUIDE = ROOT / "docs" / "guide.md"


def _load_example(path: Path = EXAMPLE) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _guide_topology() -> str:
    blocks = re.findall(r"```toml\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) == 1, "the guide should hold exactly one TOML topology"
    text: str = blocks[0]
    return text


def test_four_processes_on_a_lossy_wire_equal_the_serial_run(tmp_path: Path) -> None:
    done = _run(
        *("--nodes", "4", "--size", "48", "--frames", "30", "--out", str(tmp_path)),
        *("--drop", "0.05", "--dup", "0.05", "--delay", "2", "--linger", "0.5"),
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    last = done.stdout.splitlines()[-1]
    assert last.startswith("OK: 4 nodes computed 30 frames of a 48x48 wave"), done.stdout
    assert "max difference 0)" in last
    stats = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(s["node"] for s in stats) == ["t0-0", "t0-1", "t1-0", "t1-1"]
    # 2x2 tiles: each node sends 3 halos per frame plus one "done" to each.
    assert all(s["sent"] == 3 * 30 + 3 for s in stats)
    assert sum(s["resent"] for s in stats) > 0
    assert sum(s["duplicates_dropped"] for s in stats) > 0
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == [
        "t0-0.npy",
        "t0-1.npy",
        "t1-0.npy",
        "t1-1.npy",
    ]


def test_the_guides_topology_file_fits_the_grid(tmp_path: Path) -> None:
    path = tmp_path / "grid.toml"
    path.write_text(_guide_topology())
    topology = Topology.load(path)
    assert topology.ids == ("t0-0", "t0-1", "t1-0", "t1-1")
    assert len(topology.link_pairs()) == 6
    done = _run("plan", "--topology", str(path), "--size", "96")
    assert done.returncode == 0, done.stderr
    assert "96x96 grid in 2x2 tiles" in done.stdout
    assert "rank 3  t1-1    rows 48:96  cols 48:96  tcp://10.0.0.14:5601" in done.stdout


def test_a_missing_diagonal_link_is_named_before_anything_starts(tmp_path: Path) -> None:
    text = _guide_topology().replace(
        'neighbours = ["t0-1", "t1-0", "t1-1"]', 'neighbours = ["t0-1"]'
    )
    path = tmp_path / "grid.toml"
    path.write_text(text)
    done = _run("node", "--topology", str(path), "--id", "t0-0", "--out", str(tmp_path))
    assert done.returncode == 2
    assert 't0-0 and t1-0 are neighbouring tiles but not linked: add [[link]] a = "t0-0"' in (
        done.stderr
    )
    assert not list(tmp_path.glob("*.npy"))


async def test_tiles_equal_serial_run_on_a_lossy_wire(tmp_path: Path) -> None:
    # The guide's in-process test, verbatim in substance: four nodes in one
    # nursery on ipc sockets, checked against the serial run.
    my_grid = _load_example()
    topology = Topology.from_grid(2, 2, lambda r, c: f"ipc://{tmp_path}/t{r}-{c}.sock")
    topology.save(tmp_path / "grid.toml")
    args = ["node", "--topology", str(tmp_path / "grid.toml"), "--out", str(tmp_path)]
    args += ["--size", "24", "--frames", "12", "--drop", "0.1", "--dup", "0.1", "--linger", "0.2"]
    opts = my_grid.parse(args)
    results: list[dict[str, int]] = []

    async def one(node_id: str) -> None:
        results.append(await my_grid.run_node(topology, node_id, opts))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for node_id in topology.ids:
                nursery.start_soon(one, node_id)
    assert my_grid.check(topology, opts)
    assert sum(r["resent"] for r in results) > 0


def test_the_guides_heat_listing_is_examples_heat_py() -> None:
    listings = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert HEAT.read_text() in listings, "docs/guide.md must list examples/heat.py verbatim"
    assert len(HEAT.read_text().splitlines()) <= 60


def test_heat_on_three_ranks_under_cellmesh_run_equals_the_serial_run(tmp_path: Path) -> None:
    heat = _load_example(HEAT)
    serial = heat.START
    for _ in range(heat.STEPS):
        serial = heat.step([0.0, *serial, 0.0])
    launcher = [sys.executable, "-m", "actors._cli", "run", "-n", "3", "--"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELLMESH_", "PMI"))}
    # Its own session: on a timeout the launcher gets SIGTERM and stops its
    # ranks (each in a session of its own) before anything is killed.
    with subprocess.Popen(
        [*launcher, sys.executable, str(HEAT)],
        cwd=tmp_path,
        env={**env, "TMPDIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"cellmesh run -n 3 did not finish in 60 s\n{out}\n{err}")
    assert proc.returncode == 0, f"{out}\n{err}"
    [line] = [line for line in out.splitlines() if line.startswith("[0] MATCH")]
    assert line.startswith("[0] MATCH: 3 ranks, 200 steps, 60 cells, rod=")
    rod = ast.literal_eval(line.split("rod=", 1)[1])
    assert rod == serial
    assert max(rod) > 0
    assert rod != heat.START
