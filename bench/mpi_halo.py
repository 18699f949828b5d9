"""The mpi4py baseline of the grid benchmark: the Life demo's halo exchange over MPI.

Run under an MPI launcher, one rank per tile::

    .venv/bin/mpiexec -n 4 .venv/bin/python bench/mpi_halo.py --size 1024 --frames 300

Every rank takes the tile the demo's node of the same rank takes
(``Decomposition.for_nodes``, row-major ranks) and runs the demo's own
deep-halo algorithm on it (``actors.grid.DeepTile``, ghost-cell expansion):
every ``depth`` frames it posts ``Irecv`` for the (up to 8) halos it needs and
``Isend`` for the edges its neighbours need, ``depth`` cells deep (numpy
buffers, no pickling), waits for all of them (``Waitall``), fills its halo,
and steps ``depth`` frames alone with the same ``life_step`` over the same
shrinking regions. ``--depth 1`` is the textbook one-cell halo swap every
frame; ``--depth 0`` (the default) picks the demo's ``auto_depth``. Same
cells, same regions, same work per frame as a cellmesh tile node minus the
ACKs and the progress reports.

Each repetition is timed from a barrier to the end of the rank's last frame;
the repetition's frames/s is ``frames / median over ranks of that time``. A
warm-up repetition comes first. Rank 0 prints one JSON object on stdout: the
depth, the frames/s of every repetition, their median, the median per-frame
time, and the SHA-256 of the final grid (gathered on rank 0), which must
equal the serial run's after ``frames`` steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import numpy.typing as npt
from mpi4py import MPI

from actors.grid import LIFE, Decomposition, DeepTile, Direction, assemble, auto_depth, grid_digest

#: One tag per direction a halo travels in: MPI keeps messages of one
#: (source, tag) in order, and a rank sends to each neighbour once per exchange.
_TAGS = {d: i for i, d in enumerate(Direction)}


def _run(
    comm: Any, decomp: Decomposition, start: npt.NDArray[np.uint8], frames: int, depth: int
) -> tuple[npt.NDArray[np.uint8], float, list[float]]:
    """Step this rank's tile ``frames`` times; return it, the elapsed s and per-frame ms."""
    tile = decomp.tile_ids()[comm.Get_rank()]
    cells = DeepTile(LIFE, decomp, tile, start[decomp.tile_slices(tile)], depth)
    rows, cols = decomp.tile_shape(tile)
    padded_shape = (rows + 2 * cells.width, cols + 2 * cells.width)
    links: list[tuple[int, Direction, npt.NDArray[np.uint8]]] = []
    for d, other in cells.neighbours.items():
        peer = decomp.tile_ids().index(other)
        # The halo is a strided block of the padded tile: MPI wants contiguous
        # buffers, so it lands here and DeepTile.fill copies it in.
        slot = np.empty(padded_shape, dtype=np.uint8)[decomp.halo_recv_slices(tile, d, cells.width)]
        links.append((peer, d, np.empty(slot.shape, dtype=np.uint8)))
    frame_ms: list[float] = []
    comm.Barrier()
    started = time.perf_counter()
    for _ in range(frames):
        t0 = time.perf_counter()
        if cells.needs_halos:
            requests = [
                comm.Irecv(buf, source=peer, tag=_TAGS[d.opposite]) for peer, d, buf in links
            ]
            outgoing = [np.ascontiguousarray(cells.edge(d)) for _, d, _ in links]
            requests += [
                comm.Isend(data, dest=peer, tag=_TAGS[d])
                for (peer, d, _), data in zip(links, outgoing, strict=True)
            ]
            MPI.Request.Waitall(requests)
            for _, d, buf in links:
                cells.fill(d, buf.tobytes())
        cells.step()
        frame_ms.append((time.perf_counter() - t0) * 1000.0)
    elapsed = time.perf_counter() - started
    return np.array(cells.cells(), copy=True), elapsed, frame_ms


def main(argv: list[str] | None = None) -> int:
    """Run the baseline; rank 0 prints the JSON summary.

    Returns:
        The process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=1024, help="grid side (default 1024)")
    parser.add_argument("--frames", type=int, default=300, help="frames per repetition")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (after 1 warm-up)")
    parser.add_argument("--seed", type=int, default=1, help="the random soup's seed (as the demo)")
    parser.add_argument(
        "--depth", type=int, default=0, help="frames per halo exchange (default 0: auto_depth)"
    )
    args = parser.parse_args(argv)

    comm = MPI.COMM_WORLD
    rank, ranks = comm.Get_rank(), comm.Get_size()
    decomp = Decomposition.for_nodes((args.size, args.size), ranks)
    depth = args.depth or auto_depth(decomp, LIFE)
    start = LIFE.initial((args.size, args.size), args.seed)

    fps: list[float] = []
    frame_ms: list[float] = []
    final: npt.NDArray[np.uint8] | None = None
    for rep in range(args.reps + 1):
        final, elapsed, per_frame = _run(comm, decomp, start, args.frames, depth)
        times = comm.allgather(elapsed)
        if rep > 0:
            fps.append(args.frames / statistics.median(times))
            frame_ms.extend(per_frame)
    assert final is not None
    parts = comm.gather(final, root=0)
    if rank == 0:
        assert parts is not None
        grid = assemble(decomp, dict(zip(decomp.tile_ids(), parts, strict=True)))
        summary = {
            "ranks": ranks,
            "tiles": list(decomp.tiles),
            "size": args.size,
            "frames": args.frames,
            "depth": depth,
            "fps": [round(f, 1) for f in fps],
            "frames_per_second": round(statistics.median(fps), 1),
            "median_frame_ms": round(statistics.median(frame_ms), 3),
            "sha256": grid_digest(grid),
            "mpi": MPI.Get_library_version().splitlines()[0].strip(),
        }
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
