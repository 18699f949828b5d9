"""The ``cellmesh`` command line: ``demo``, ``node`` and ``keys``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import trio


def _job_options(parser: argparse.ArgumentParser, *, size: int, frames: int) -> None:
    parser.add_argument(
        "--model",
        choices=("life", "heat"),
        default="life",
        help="Conway's Life (uint8) or heat diffusion (float64)",
    )
    parser.add_argument("--size", type=int, default=size, help="grid is SIZE x SIZE cells")
    parser.add_argument("--frames", type=int, default=frames, help="frames to step")
    parser.add_argument("--seed", type=int, default=1, help="seeds the start and the faults")
    parser.add_argument(
        "--pattern", metavar="FILE", help="a Life pattern in RLE format, placed at the centre"
    )
    parser.add_argument(
        "--drop",
        type=float,
        default=0.0,
        metavar="P",
        help="drop each message on the wire with probability P",
    )
    parser.add_argument(
        "--dup",
        type=float,
        default=0.0,
        metavar="P",
        help="duplicate each message with probability P",
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=0.0,
        metavar="MS",
        help="delay each message by up to MS milliseconds (reorders)",
    )
    parser.add_argument(
        "--linger",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="after its last frame a node keeps answering its peers this long",
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=None,
        metavar="FRAMES",
        help="frames per halo exchange (halos that many frames deep; default: by tile size)",
    )
    parser.add_argument(
        "--report-at",
        type=int,
        action="append",
        default=[],
        metavar="FRAME",
        help="also report progress the moment FRAME is done (repeatable; the demo "
        "passes its --pause frames)",
    )


def _job(args: argparse.Namespace) -> object:
    from ._demo import Job

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
        depth=args.depth,
        report_at=tuple(args.report_at),
    )


def _demo(args: argparse.Namespace) -> int:
    from ._demo import Job, Pause, outcome_json, run_demo

    job = _job(args)
    assert isinstance(job, Job)
    pauses = [Pause.parse(p) for p in args.pause]
    outcome = trio.run(
        lambda: run_demo(
            job,
            nodes=args.nodes,
            out=Path(args.out),
            pauses=pauses,
            show=not args.json,
            timeout=args.timeout,
            secure=args.secure,
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
        for pause in outcome.paused:
            print(f"paused: {pause} (node@frame it was frozen at:seconds)")
        for pause in outcome.pauses_missed:
            print(
                f"pause {pause} not carried out: the run ended before that node reported the frame"
            )
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


def _node(args: argparse.Namespace) -> int:
    from ._demo import Job, run_tile
    from ._topology import Topology, node_id_from_env

    topology = Topology.load(args.topology)
    node_id = args.id or node_id_from_env(topology=topology)
    if node_id is None:
        print(
            "cellmesh node: give --id, or run under a launcher that sets a rank "
            "(CELLMESH_NODE_ID, SLURM_PROCID, PMI_RANK, PMIX_RANK, OMPI_COMM_WORLD_RANK)",
            file=sys.stderr,
        )
        return 2
    job = _job(args)
    assert isinstance(job, Job)
    security = None
    if args.keys is None and topology.node(node_id).public_key is not None:
        # A keyed topology means a secure cluster: never fall back to plaintext.
        print(
            f"cellmesh node: the topology lists a public key for {node_id!r}; "
            "give --keys DIR (the folder with its .key_secret file)",
            file=sys.stderr,
        )
        return 2
    if args.keys is not None:
        from ._security import load_security

        try:
            security = load_security(topology, node_id, args.keys)
        except ValueError as exc:
            print(f"cellmesh node: {exc}", file=sys.stderr)
            return 2
    trio.run(run_tile, topology, node_id, job, args.out, args.bind, security)
    return 0


def _keys(args: argparse.Namespace) -> int:
    from transport import KeyFileError, generate_key_pair, write_key_pair

    from ._topology import Topology, TopologyError

    try:
        topology = Topology.load(args.topology) if args.topology else None
    except (OSError, TopologyError) as exc:
        print(f"cellmesh keys: {exc}", file=sys.stderr)
        return 2
    names: list[str] = list(args.nodes) or (list(topology.ids) if topology else [])
    if not names:
        print("cellmesh keys: name the nodes, or give --topology", file=sys.stderr)
        return 2
    # Owner-only folder: it holds secret keys.
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    made: dict[str, str] = {}
    try:
        for name in names:
            if topology is not None:
                topology.node(name)
            pair = generate_key_pair()
            _, secret = write_key_pair(args.dir, name, pair, overwrite=args.force)
            made[name] = pair.public
            print(f"{name}: public key {pair.public}  (secret in {secret})")
    except (FileExistsError, KeyFileError, TopologyError) as exc:
        print(f"cellmesh keys: {exc} (nothing overwritten; --force replaces keys)", file=sys.stderr)
        return 2
    if topology is not None:
        topology.with_public_keys(made).save(args.topology)
        print(f"wrote the public keys into {args.topology}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``cellmesh`` command line; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="cellmesh", description="Reliable neighbour messaging for Trio grid simulations."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a grid simulation over several local node processes")
    demo.add_argument("--nodes", type=int, default=4, help="tile processes (default 4 = 2x2)")
    _job_options(demo, size=1024, frames=300)
    demo.add_argument(
        "--pause",
        action="append",
        default=[],
        metavar="NODE@FRAME:SECONDS",
        help="freeze NODE's process (SIGSTOP) at FRAME for SECONDS",
    )
    demo.add_argument("--out", default="out", help="folder for pictures and the topology")
    demo.add_argument("--json", action="store_true", help="print a JSON summary, no live view")
    demo.add_argument("--timeout", type=float, default=600.0, help="give up after SECONDS")
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
        "--bind", help="bind here instead of the topology's endpoint (e.g. tcp://ib0:5601)"
    )
    node.add_argument(
        "--keys",
        metavar="DIR",
        help="run secure: DIR/<id>.key_secret is this node's key, the topology has the others",
    )
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

    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
