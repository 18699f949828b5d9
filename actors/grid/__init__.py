r"""Grid simulations on cellmesh: tiles, halos, two models and the ``cellmesh demo``.

An application of the runtime, not part of it: it builds on the public
faces of :mod:`actors` and :mod:`transport` as any user program would (two
named private helpers excepted, see tests/test_layering.py), and it needs
numpy (rich and matplotlib for the demo's live view and pictures):
``pip install 'cellmesh[grid]'``. ``import actors`` never loads it.

Three parts:

* the decomposition: :class:`Decomposition` cuts a grid into tiles
  (:class:`TilePos`), says which halo goes where (:class:`Direction`), and
  :func:`scatter` / :func:`assemble` / :func:`pad` / :func:`interior` /
  :func:`fill_halos` move the arrays;
* the models: Conway's Life and heat diffusion (:data:`LIFE`, :data:`HEAT`),
  stepped serially (:func:`run_serial`) or as tiles in memory
  (:func:`run_tiled`), bit for bit the same;
* the demo: :func:`run_demo` (``cellmesh demo``) starts one
  :func:`run_tile` process (``cellmesh node``) per tile, each stepping a
  :class:`DeepTile` and exchanging halos over cellmesh, and checks the
  result against the serial run; given kills (:class:`Kill`), it kills tiles on
  the way and recovers from checkpoints (``actors/grid/_recovery.py``).
"""

from __future__ import annotations

from importlib.util import find_spec as _find_spec

if _find_spec("numpy") is None:
    # Say what to install, not just which import failed.
    raise ModuleNotFoundError("actors.grid needs numpy: pip install 'cellmesh[grid]'", name="numpy")

from ._decomp import (
    Decomposition,
    Direction,
    GridError,
    TilePos,
    assemble,
    fill_halos,
    interior,
    pad,
    scatter,
)
from ._demo import (
    COORDINATOR,
    DeepTile,
    DemoError,
    DemoOutcome,
    Job,
    Pause,
    auto_depth,
    free_port,
    grid_topology,
    run_demo,
    run_tile,
)
from ._models import (
    HEAT,
    LIFE,
    MODELS,
    Model,
    RleError,
    get_model,
    grid_digest,
    heat_initial,
    heat_step,
    life_step,
    load_rle,
    parse_rle,
    place_center,
    random_soup,
    run_serial,
    run_tiled,
)
from ._recovery import Kill

__all__ = [
    "COORDINATOR",
    "HEAT",
    "LIFE",
    "MODELS",
    "Decomposition",
    "DeepTile",
    "DemoError",
    "DemoOutcome",
    "Direction",
    "GridError",
    "Job",
    "Kill",
    "Model",
    "Pause",
    "RleError",
    "TilePos",
    "assemble",
    "auto_depth",
    "fill_halos",
    "free_port",
    "get_model",
    "grid_digest",
    "grid_topology",
    "heat_initial",
    "heat_step",
    "interior",
    "life_step",
    "load_rle",
    "pad",
    "parse_rle",
    "place_center",
    "random_soup",
    "run_demo",
    "run_serial",
    "run_tile",
    "run_tiled",
    "scatter",
]
