"""The grid half of the ``cellmesh`` command line: ``demo`` and ``node``.

``actors._cli`` parses the arguments and imports this module only to run one
of these two commands (it needs numpy); errors are its one-line
:class:`CliError`, and :func:`run_trio` runs the Trio part under its signal
handling.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
from pathlib import Path

from actors import Topology, load_security
from actors.launch import node_id_from_env

from .._cli import CliError, check_out, one_line, read_topology, run_trio
from ._decomp import GridError
from ._demo import (
    COORDINATOR,
    PARENT_ENV,
    DemoError,
    DemoOutcome,
    Job,
    Pause,
    outcome_json,
    run_demo,
    run_tile,
    tile_decomposition,
)
from ._models import RleError, get_model
from ._recovery import Kill, Resume, run_recovering_tile

#: The grid's errors that are bad input, not a bug: ``cellmesh`` says them in
#: one line, exit status 2.
EXPECTED: tuple[type[Exception], ...] = (DemoError, GridError, RleError)


def _pause(text: str) -> Pause:
    """``--pause NODE@FRAME:SECONDS``, checked before anything starts."""
    try:
        return Pause.parse(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _kill(text: str) -> Kill:
    """``--kill NODE@FRAME``, checked before anything starts."""
    try:
        return Kill.parse(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _job(args: argparse.Namespace) -> Job:
    return Job(
        model=args.model,
        size=args.size,
        frames=args.frames,
        seed=args.seed,
        pattern=args.pattern,
        drop=args.drop,
        dup=args.dup,
        delay_ms=args.delay,
        linger=args.linger,
        spin=args.spin,
        depth=args.depth,
        report_at=tuple(args.report_at),
        checkpoint_every=args.checkpoint_every,
        checkpoint_dir=getattr(args, "checkpoint_dir", None),
    )


def demo(args: argparse.Namespace) -> int:
    """``cellmesh demo``: run the demo, print its outcome; the exit status."""
    pauses = [_pause(text) for text in args.pause]
    kills = [_kill(text) for text in args.kill]
    outcome = run_trio(
        functools.partial(
            run_demo,
            _job(args),
            nodes=args.nodes,
            out=Path(args.out),
            pauses=pauses,
            show=not args.json,
            timeout=args.timeout,
            secure=args.secure,
            kills=kills,
        )
    )
    if args.json:
        print(outcome_json(outcome))
    else:
        verdict = "MATCH" if outcome.match else "MISMATCH"
        cells = f", {outcome.live_cells} live cells" if outcome.live_cells is not None else ""
        print(
            f"\n{verdict}: {outcome.nodes} nodes computed {outcome.frames} frames of "
            f"{outcome.model} {outcome.size}x{outcome.size} in {outcome.seconds:.2f} s "
            f"({outcome.frames_per_second} frames/s){cells}; the serial numpy run "
            f"{'gives the same' if outcome.match else 'DIFFERS'} (sha256 {outcome.sha256[:16]})."
        )
        resent = sum(n["resent"] for n in outcome.per_node.values())
        dups = sum(n["duplicates_dropped"] for n in outcome.per_node.values())
        print(f"wire: {resent} retransmissions, {dups} duplicates dropped, nothing lost.")
        print(_footprint_line(outcome))
        for pause in outcome.paused:
            print(f"paused: {pause} (node@frame it was frozen at:seconds)")
        for pause in outcome.pauses_missed:
            print(
                f"pause {pause} not carried out: the run ended before that node reported the frame"
            )
        _print_recoveries(outcome)
        if outcome.secure:
            print(
                f"security: CURVE on every link, {outcome.admitted} connections admitted "
                f"by key, {outcome.refused} refused."
            )
        else:
            print("security: plaintext on 127.0.0.1 (add --secure for CURVE with fresh keys).")
        print(f"picture of the final grid: {outcome.pictures['grid']}")
        print(f"per-frame times:           {outcome.pictures['frame_times']}")
    return 0 if outcome.match else 1


def _print_recoveries(outcome: DemoOutcome) -> None:
    """The crash part of the summary: each death, how far back, how long."""
    if outcome.checkpoint_every:
        print(
            f"checkpoints: every {outcome.checkpoint_every} frames; "
            f"{len(outcome.recoveries)} tile deaths recovered."
        )
    for r in outcome.recoveries:
        restart = r["restart_seconds"]
        back = r["recovered_seconds"]
        print(
            f"recovery {r['epoch']}: {r['node']} {r['cause']} at frame {r['died_at_frame']}; "
            f"every tile back to checkpoint {r['rolled_back_to']}, "
            f"{r['frames_replayed']} frames replayed by {r['node']} "
            f"({r['tile_frames_replayed']} by all tiles); "
            f"computing again after {_seconds(restart)}, "
            f"back at frame {r['died_at_frame']} after {_seconds(back)}"
            + (f" (died during recovery {r['during_recovery']})." if r["during_recovery"] else ".")
        )
    for kill in outcome.kills_missed:
        print(f"kill {kill} not carried out: the run ended before that node reported the frame")


def _seconds(value: float | None) -> str:
    return "(not reached)" if value is None else f"{value:.2f} s"


def _footprint_line(outcome: DemoOutcome) -> str:
    """Start-up and what a tile process costs, as medians over the tiles."""
    views = outcome.per_node.values()
    rss = sorted(v["rss_mb"] for v in views if v["rss_mb"] is not None)
    fds = sorted(v["fds"] for v in views if v["fds"] is not None)
    line = f"start-up: {outcome.startup_seconds:.1f} s until every tile passed its start barrier"
    if rss:
        line += f"; per tile process: {rss[len(rss) // 2]:.0f} MB peak RSS"
    if fds:
        line += f", {fds[len(fds) // 2]} file descriptors (at most {fds[-1]})"
    return line + "."


def node(args: argparse.Namespace) -> int:
    """``cellmesh node``: run one tile node until its last frame is confirmed."""
    topology = read_topology(args.topology)
    node_id = args.id or _node_id_from_env(topology)
    if node_id not in topology:
        raise CliError(
            f"--id {node_id!r} is not a node of {args.topology}; "
            f"give one of {', '.join(topology.ids)}"
        )
    if node_id == COORDINATOR:
        tiles = ", ".join(n for n in topology.ids if n != COORDINATOR)
        raise CliError(
            f"--id {COORDINATOR} is the demo's coordinator, which cellmesh demo runs itself; "
            f"give a tile's id: {tiles}"
        )
    job = _job(args)
    job.check()
    try:
        decomp = tile_decomposition(topology, job.size)
        decomp.check_halo(get_model(job.model).halo * (job.depth or 1))
    except GridError as exc:
        raise CliError(f"{exc} (the topology {args.topology}, --size {job.size})") from None
    security = None
    if args.keys is None and topology.node(node_id).public_key is not None:
        # A keyed topology means a secure cluster: never fall back to plaintext.
        raise CliError(
            f"the topology lists a public key for {node_id!r}; "
            "give --keys DIR (the folder with its .key_secret file)"
        )
    if args.keys is not None:
        try:
            security = load_security(topology, node_id, args.keys)
        except (ValueError, OSError) as exc:
            raise CliError(one_line(exc)) from None
    if COORDINATOR not in topology:
        check_out(args.out)
    parent = os.environ.get(PARENT_ENV)
    if parent:
        # A Ctrl-C at the terminal reaches the whole process group; the
        # coordinator answers it and stops this process.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if job.checkpoint_dir is not None:
        if COORDINATOR not in topology:
            raise CliError(
                "--checkpoint-dir is for a tile under cellmesh demo, whose coordinator restarts "
                "tiles; this topology has none"
            )
        resume = Resume(args.resume, args.epoch)
        run_trio(
            functools.partial(
                run_recovering_tile, topology, node_id, job, resume, args.bind, security
            ),
            parent=parent,
        )
        return 0
    run_trio(
        functools.partial(
            run_tile,
            topology,
            node_id,
            job,
            args.out,
            args.bind,
            security,
            args.metrics,
            args.metrics_every,
        ),
        parent=parent,
    )
    return 0


def _node_id_from_env(topology: Topology) -> str:
    """This process's node id from its launcher's environment.

    Raises:
        CliError: no launcher variable is set.
        TopologyError: a variable names no node of ``topology``.
    """
    node_id = node_id_from_env(topology=topology)
    if node_id is None:
        raise CliError(
            "give --id, or run under a launcher that sets a rank "
            "(CELLMESH_NODE_ID, SLURM_PROCID, PMI_RANK, PMIX_RANK, OMPI_COMM_WORLD_RANK)"
        )
    return node_id
