"""The ``cellmesh`` command line: ``run``, ``demo``, ``node`` and ``keys``.

This module is the runtime's half: the parser, ``keys``, ``run`` (the
launcher, :mod:`actors._launch`), the Trio runner and the one-line errors.
``demo`` and ``node`` run the grid application (:mod:`actors.grid`, the extra
``grid``), which is imported only when one of them runs, so ``cellmesh keys``
and ``cellmesh run`` work without numpy.

Exit status: 0 done (for ``demo``: the result equals the serial run), 1 the
demo's result differs, 2 a bad input or a run that cannot go on, 130 Ctrl-C,
143 SIGTERM; ``run`` exits with the status of the rank that failed (128 + N
for a rank killed by signal N). Every error is one line on stderr,
``cellmesh CMD: error: ...``, that says what was wrong and what to do;
``--debug`` shows the traceback.
Inputs are checked before any node starts or any process is spawned.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from importlib import metadata
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import trio

if TYPE_CHECKING:
    from ._launch import RestartPolicy
    from ._topology import Topology

T = TypeVar("T")

#: ``CELLMESH_DEBUG=1`` does what ``--debug`` does.
DEBUG_ENV = "CELLMESH_DEBUG"
#: ``CELLMESH_LOG_LEVEL=info`` does what ``--log-level info`` does; set by
#: ``--log-level`` so that the processes a command starts log alike.
LOG_LEVEL_ENV = "CELLMESH_LOG_LEVEL"
_LOG_LEVELS = ("debug", "info", "warning", "error")


class CliError(Exception):
    """A bad input, or a run that cannot go on; the message says what to do (exit status 2)."""


class _Terminated(Exception):
    """SIGTERM ended the run (exit status 143)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its error as the same one line as every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _whole(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"wants a whole number >= {low}, got {text!r}"
            ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _number(wants: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: a number for which ``ok`` holds (never NaN)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        # NaN fails every comparison in `ok`.
        if not ok(value):
            raise argparse.ArgumentTypeError(f"wants {wants}, got {text!r}")
        return value

    return parse


_PROBABILITY = _number("a probability in [0, 1)", lambda p: 0 <= p < 1)
_NON_NEGATIVE = _number("a number >= 0", lambda x: 0 <= x < math.inf)
_POSITIVE = _number("a number of seconds > 0", lambda x: 0 < x <= math.inf)


def _bind(text: str) -> str:
    """An argparse type: an endpoint to bind, ``tcp://HOST:PORT`` or ``ipc://PATH``.

    Only its shape: the node's bind names what else is wrong with it.
    """
    transport, sep, address = text.partition("://")
    if not sep or not transport or not address:
        raise argparse.ArgumentTypeError(
            f"wants an endpoint such as tcp://ib0:5601 or ipc:///tmp/n1.sock, got {text!r}"
        )
    return text


def _job_options(parser: argparse.ArgumentParser, *, size: int, frames: int) -> None:
    parser.add_argument(
        "--model",
        choices=("life", "heat"),
        default="life",
        help="Conway's Life (uint8) or heat diffusion (float64)",
    )
    parser.add_argument("--size", type=_whole(1), default=size, help="grid is SIZE x SIZE cells")
    parser.add_argument("--frames", type=_whole(0), default=frames, help="frames to step")
    parser.add_argument("--seed", type=_whole(0), default=1, help="seeds the start and the faults")
    parser.add_argument(
        "--pattern", metavar="FILE", help="a Life pattern in RLE format, placed at the centre"
    )
    parser.add_argument(
        "--drop",
        type=_PROBABILITY,
        default=0.0,
        metavar="P",
        help="drop each message on the wire with probability P",
    )
    parser.add_argument(
        "--dup",
        type=_PROBABILITY,
        default=0.0,
        metavar="P",
        help="duplicate each message with probability P",
    )
    parser.add_argument(
        "--delay",
        type=_NON_NEGATIVE,
        default=0.0,
        metavar="MS",
        help="delay each message by up to MS milliseconds (reorders)",
    )
    parser.add_argument(
        "--spin",
        type=_NON_NEGATIVE,
        default=None,
        metavar="SECONDS",
        help="how long a node polls its sockets before it sleeps, when it has nothing else "
        "to do (default NodeConfig.spin, 0.0002; 0 turns it off)",
    )
    parser.add_argument(
        "--linger",
        type=_NON_NEGATIVE,
        default=10.0,
        metavar="SECONDS",
        help="after its last frame a node waits at most this long for its neighbours to "
        "have all their answers (it leaves as soon as they do)",
    )
    parser.add_argument(
        "--depth",
        type=_whole(1),
        default=None,
        metavar="FRAMES",
        help="frames per halo exchange (halos that many frames deep; default: by tile size)",
    )
    parser.add_argument(
        "--report-at",
        type=_whole(0),
        action="append",
        default=[],
        metavar="FRAME",
        help="also report progress the moment FRAME is done (repeatable; the demo "
        "passes its --pause and --kill frames)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=_whole(0),
        default=0,
        metavar="K",
        help="checkpoint each tile every K frames (rounded up to a multiple of --depth) "
        "and survive a tile process's death by rolling back to the last common one; "
        "0: off (default; 10 with --kill)",
    )


def run_trio(fn: Callable[[], Awaitable[T]], *, parent: str | None = None) -> T:
    """``trio.run(fn)``, which SIGTERM (and, given ``parent``, that process's end) cancels.

    Cancelled, not killed: every ``finally`` runs, so the demo's coordinator
    stops its node processes whichever way it ends.

    Args:
        fn: what to run.
        parent: the pid of the process that started this one and holds our
            stdin's pipe open while it lives (a demo's coordinator), or None.

    Raises:
        _Terminated: SIGTERM.
        CliError: ``parent`` is gone.
    """
    stopped: list[Exception] = []
    result: list[T] = []

    async def on_sigterm(scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                stopped.append(_Terminated())
                scope.cancel()
                return

    async def on_orphaned(scope: trio.CancelScope, parent: str) -> None:
        # The coordinator holds our stdin's pipe open while it lives; its end
        # (even by SIGKILL, which no finally sees) closes it, and we stop.
        async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
            while await stdin.receive_some():
                pass
        stopped.append(CliError(f"the demo coordinator (pid {parent}) is gone; stopping"))
        scope.cancel()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(on_sigterm, nursery.cancel_scope)
            if parent:
                nursery.start_soon(on_orphaned, nursery.cancel_scope, parent)
            result.append(await fn())
            nursery.cancel_scope.cancel()

    trio.run(main)
    if stopped:
        raise stopped[0]
    return result[0]


def read_topology(path: str) -> Topology:
    """Read ``--topology``; a missing or unreadable file is a :class:`CliError`."""
    from ._topology import Topology

    try:
        return Topology.load(path)
    except OSError as exc:
        raise CliError(
            f"cannot read the topology {path}: {exc.strerror}; give the path of a topology "
            "TOML file (cellmesh demo writes one as OUT/topology.toml)"
        ) from None


def check_out(out: str) -> None:
    """Make the folder ``out`` now, so a bad one fails before the run, not after it."""
    try:
        os.makedirs(out, exist_ok=True)
    except FileExistsError:
        raise CliError(f"{out} is a file; give --out a folder") from None
    except OSError as exc:
        raise CliError(
            f"cannot make the folder {out}: {exc.strerror}; give --out a folder you can write"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CliError(f"cannot write into {out}; give --out a folder you can write")


#: The packages of the extra ``grid`` each grid command needs: the demo draws
#: its live view with rich and its pictures with matplotlib.
_GRID_NEEDS = {"demo": ("numpy", "rich", "matplotlib"), "node": ("numpy",)}


def _need_grid(command: str) -> None:
    """Say in one line what to install when ``command``'s packages are missing.

    Raises:
        CliError: a package of the extra ``grid`` is not installed.
    """
    missing = [name for name in _GRID_NEEDS[command] if find_spec(name) is None]
    if missing:
        raise CliError(
            f"cellmesh {command} needs {', '.join(missing)}, which this Python lacks; "
            "pip install 'cellmesh[grid]'"
        )


def _demo(args: argparse.Namespace) -> int:
    _need_grid("demo")
    from .grid._cli import demo

    return demo(args)


def _node(args: argparse.Namespace) -> int:
    _need_grid("node")
    from .grid._cli import node

    return node(args)


def _grid(text: str) -> tuple[int, int]:
    """An argparse type: ``RxC``, a tile grid of R rows and C columns."""
    from ._fromenv import parse_grid
    from ._topology import TopologyError

    try:
        return parse_grid(text, "--grid")
    except TopologyError:
        raise argparse.ArgumentTypeError(f"wants ROWSxCOLUMNS such as 2x3, got {text!r}") from None


def _restart(text: str) -> RestartPolicy:
    """An argparse type: ``never``, ``on-failure`` or ``on-failure:MAX``."""
    from ._launch import RestartPolicy

    try:
        return RestartPolicy.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run(args: argparse.Namespace) -> int:
    from ._launch import LaunchPlan, RestartPolicy, launch

    command: list[str] = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not command:
        raise CliError("give the program after --, e.g. cellmesh run -n 3 -- python app.py")
    ranks: int | None = args.n
    if args.grid is not None:
        rows, cols = args.grid
        if ranks is None:
            ranks = rows * cols
        elif ranks != rows * cols:
            raise CliError(
                f"--grid {rows}x{cols} has {rows * cols} tiles but -n is {ranks}; give as many "
                "ranks as tiles (or leave -n out)"
            )
    if ranks is None:
        raise CliError("say how many ranks: -n N (or --grid RxC)")
    if shutil.which(command[0]) is None:
        raise CliError(
            f"cannot find the program {command[0]!r} (not on PATH, or not executable); "
            "give its path"
        )
    restart: RestartPolicy = args.restart or RestartPolicy()
    plan = LaunchPlan(
        command=tuple(command),
        ranks=ranks,
        grid=args.grid,
        restart=restart,
        grace=args.grace,
        secure=args.secure,
    )
    return launch(plan)


def _keys(args: argparse.Namespace) -> int:
    from transport.security import (
        KeyFileError,
        generate_key_pair,
        write_key_pair,
    )

    from ._topology import TopologyError

    topology = read_topology(args.topology) if args.topology else None
    names: list[str] = list(args.nodes) or (list(topology.ids) if topology else [])
    if not names:
        raise CliError("name the nodes, or give --topology")
    if topology is not None:
        for name in names:
            topology.node(name)
    # Owner-only folder: it holds secret keys.
    try:
        os.makedirs(args.dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise CliError(
            f"cannot make the key folder {args.dir}: {exc.strerror}; give --dir a folder "
            "you can write"
        ) from None
    made: dict[str, str] = {}
    try:
        for name in names:
            pair = generate_key_pair()
            _, secret = write_key_pair(args.dir, name, pair, overwrite=args.force)
            made[name] = pair.public
            print(f"{name}: public key {pair.public}  (secret in {secret})")
    except (FileExistsError, KeyFileError, TopologyError) as exc:
        raise CliError(f"{exc} (nothing overwritten; --force replaces keys)") from None
    if topology is not None:
        topology.with_public_keys(made).save(args.topology)
        print(f"wrote the public keys into {args.topology}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cellmesh", description="Reliable neighbour messaging for Trio grid simulations."
    )
    debug_help = f"on an error, show the traceback instead of one line (or set {DEBUG_ENV}=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    parser.add_argument("--version", action="version", version=f"cellmesh {_version()}")
    level_default = os.environ.get(LOG_LEVEL_ENV, "warning").lower()
    if level_default not in _LOG_LEVELS:
        level_default = "warning"
    parser.add_argument("--log-level", **_log_level_option(level_default))
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="start N local ranks of a program, each told its node id and the topology",
        usage="cellmesh run -n N [--grid RxC] [--restart POLICY] [--grace S] [--secure] "
        "-- CMD [ARGS ...]",
        description="Start N ranks of CMD on this machine, as mpiexec -n N would. Each gets "
        "its node id and the job's topology (free ports on 127.0.0.1) in its environment: "
        "CELLMESH_NODE_ID, CELLMESH_TOPOLOGY (a TOML file, removed at the end), and the rank "
        "and rank count as mpiexec and srun set them (PMI_RANK/PMI_SIZE, "
        "OMPI_COMM_WORLD_RANK/SIZE, SLURM_PROCID/SLURM_NTASKS, PMIX_RANK), so "
        "`async with actors.open_node_from_env() as node:` opens its node. Each line a rank "
        "writes is prefixed with [its node id]. The first rank to fail stops the others "
        "(SIGTERM, then SIGKILL after --grace) and its status is the launcher's; Ctrl-C or "
        "SIGTERM stops every rank (130, 143).",
    )
    run.add_argument("-n", type=_whole(1), metavar="N", help="how many ranks")
    run.add_argument(
        "--grid",
        type=_grid,
        metavar="RxC",
        help="lay the ranks out as an R x C tile grid (ids t{row}-{col}, 8 neighbours each); "
        "default: ids 0..N-1, every rank linked to every other",
    )
    run.add_argument(
        "--restart",
        type=_restart,
        default=None,
        metavar="POLICY",
        help="never (default), or on-failure[:MAX]: start a failed rank again, same id and "
        "environment, up to MAX times (default 3) before it fails the job",
    )
    run.add_argument(
        "--grace",
        type=_NON_NEGATIVE,
        default=3.0,
        metavar="S",
        help="seconds a stopped rank has between SIGTERM and SIGKILL (default 3)",
    )
    run.add_argument(
        "--secure",
        action="store_true",
        help="CURVE-encrypt and authenticate every link, with throwaway keys (CELLMESH_KEYS)",
    )
    run.add_argument(
        "program", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the program to run"
    )
    run.set_defaults(run=_run)

    demo = sub.add_parser("demo", help="run a grid simulation over several local node processes")
    demo.add_argument("--nodes", type=_whole(1), default=4, help="tile processes (default 4 = 2x2)")
    _job_options(demo, size=1024, frames=300)
    demo.add_argument(
        "--pause",
        action="append",
        default=[],
        metavar="NODE@FRAME:SECONDS",
        help="freeze NODE's process (SIGSTOP) at FRAME for SECONDS",
    )
    demo.add_argument(
        "--kill",
        action="append",
        default=[],
        metavar="NODE@FRAME",
        help="SIGKILL NODE's process once it reports FRAME; it is restarted from a checkpoint "
        "and the run goes on (repeatable, carried out in order)",
    )
    demo.add_argument("--out", default="out", help="folder for pictures and the topology")
    demo.add_argument("--json", action="store_true", help="print a JSON summary, no live view")
    demo.add_argument("--timeout", type=_POSITIVE, default=600.0, help="give up after SECONDS")
    demo.add_argument(
        "--secure",
        action="store_true",
        help="CURVE-encrypt and authenticate every link, with throwaway keys",
    )
    demo.set_defaults(run=_demo)

    node = sub.add_parser("node", help="run one tile node of a grid simulation")
    node.add_argument("--topology", required=True, metavar="FILE", help="topology TOML")
    node.add_argument("--id", help="this node's id (default: from the launcher's environment)")
    _job_options(node, size=1024, frames=300)
    node.add_argument(
        "--out", default="out", help="without a coordinator: where to save this node's tile"
    )
    node.add_argument(
        "--bind",
        type=_bind,
        help="bind here instead of the topology's endpoint (e.g. tcp://ib0:5601)",
    )
    node.add_argument(
        "--keys",
        metavar="DIR",
        help="run secure: DIR/<id>.key_secret is this node's key, the topology has the others",
    )
    node.add_argument(
        "--metrics",
        metavar="FILE",
        help="append a JSON line to FILE every --metrics-every seconds and at the end: "
        "the frame and, per link, sent, acked, resent, duplicates, RTT and state",
    )
    node.add_argument(
        "--metrics-every",
        type=_number("a number of seconds > 0", lambda x: 0 < x < math.inf),
        default=1.0,
        metavar="SECONDS",
        help="seconds between --metrics lines (default 1)",
    )
    # Set by cellmesh demo's coordinator for a recovering run; not for users.
    node.add_argument("--checkpoint-dir", help=argparse.SUPPRESS)
    node.add_argument("--resume", type=_whole(0), default=0, help=argparse.SUPPRESS)
    node.add_argument("--epoch", type=_whole(0), default=0, help=argparse.SUPPRESS)
    node.set_defaults(run=_node)

    keys = sub.add_parser(
        "keys",
        help="make CURVE key pairs: DIR/<id>.key and DIR/<id>.key_secret (owner-only)",
    )
    keys.add_argument("nodes", nargs="*", metavar="ID", help="node ids (default: the topology's)")
    keys.add_argument("--dir", required=True, help="folder for the key files (made 0700)")
    keys.add_argument(
        "--topology", metavar="FILE", help="also write the public keys into this topology"
    )
    keys.add_argument("--force", action="store_true", help="replace existing key files")
    keys.set_defaults(run=_keys)

    for command in (run, demo, node, keys):
        # Also after the command; SUPPRESS keeps the subcommand from resetting
        # a --debug given before it.
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help
        )
        command.add_argument("--log-level", **_log_level_option(argparse.SUPPRESS))
    return parser


def _log_level_option(default: str) -> dict[str, Any]:
    """``--log-level``'s argparse keywords (on the command line and on each command)."""
    return {
        "choices": _LOG_LEVELS,
        "default": default,
        "type": str.lower,
        "help": "how much the cellmesh.* loggers say on stderr (docs/observability.md; "
        f"default warning, or ${LOG_LEVEL_ENV})",
    }


def _version() -> str:
    """The installed distribution's version."""
    try:
        return metadata.version("cellmesh")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: pip install .)"


def _setup_logging(level: str) -> None:
    """Log ``cellmesh.*`` at ``level`` and above on stderr, one line per record.

    Only cellmesh's loggers take the level: other libraries stay at warning.
    """
    logging.basicConfig(format="%(name)s: %(levelname)s: %(message)s", level=logging.WARNING)
    logging.getLogger("cellmesh").setLevel(level.upper())


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside ``exc``'s (nested) exception groups, or ``exc`` itself."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def one_line(exc: BaseException) -> str:
    """``exc`` as one line of text."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


def _expected() -> tuple[type[BaseException], ...]:
    """The errors that are bad input or the environment, not a bug: one line, status 2."""
    from transport import (
        LocalProtocolError,
    )
    from transport.security import (
        KeyFileError,
    )

    from ._errors import BindError
    from ._topology import TopologyError

    # The grid's own errors can only have been raised if it was imported;
    # importing it here would need numpy for `cellmesh keys`.
    grid = sys.modules.get("actors.grid._cli")
    grid_errors: tuple[type[BaseException], ...] = grid.EXPECTED if grid is not None else ()
    return (
        CliError,
        BindError,
        TopologyError,
        KeyFileError,
        LocalProtocolError,
        OSError,
        *grid_errors,
    )


def _report(prog: str, exc: BaseException) -> int:
    """Say ``exc`` in one line on stderr; returns the exit status."""
    leaves = list(_leaves(exc))
    if any(isinstance(e, KeyboardInterrupt) for e in leaves):
        print(f"{prog}: interrupted (Ctrl-C); stopped", file=sys.stderr)
        return 130
    if any(isinstance(e, _Terminated) for e in leaves):
        print(f"{prog}: terminated (SIGTERM); stopped", file=sys.stderr)
        return 143
    expected = _expected()
    for e in leaves:
        if isinstance(e, expected):
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
            return 2
    first = leaves[0]
    print(
        f"{prog}: error: {type(first).__name__}: {one_line(first)} "
        "(unexpected; rerun with --debug for the traceback, and report it)",
        file=sys.stderr,
    )
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the ``cellmesh`` command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.debug:
        # Inherited by the demo's node processes, so that they show theirs too.
        os.environ[DEBUG_ENV] = "1"
    # Inherited alike: the demo's nodes log at the level the demo was given.
    os.environ[LOG_LEVEL_ENV] = args.log_level
    _setup_logging(args.log_level)
    try:
        code: int = args.run(args)
    except SystemExit:
        raise
    except BaseException as exc:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        return _report(f"cellmesh {args.command}", exc)
    return code


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's: actors.grid's
    # command line imports CliError from actors._cli, and a second copy of the
    # class would make its errors "unexpected" here.
    from actors._cli import main as _main

    sys.exit(_main())
