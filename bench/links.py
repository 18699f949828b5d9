"""Links benchmark: confirmed (ACKed) cellmesh sends against raw and hand-written pyzmq.

Two processes on tcp loopback. This process opens node "a" and sends 64-byte
payloads to node "b" in a child process, whose compute actor answers each at
once (so every message ends in an ACK):

* confirmed throughput: N sends kept in flight with ``await wait_window`` +
  ``send_nowait``, then every handle awaited; msgs/s = N / elapsed. Run with
  the default window (256) and a wide one (1024);
* batched confirmed throughput ("batch 64", "batch 256"): the same N
  payloads sent with ``send_batch_nowait`` in batches of 64 (256) items, the
  default window, every handle awaited; msgs/s = items confirmed / elapsed
  (every item ends in its own ACK);
* confirmed latency: one message in flight, ``await node.send`` in a loop;
  p50 and p99 of send -> ACK.

In the same run, the references:

* raw pyzmq one-way throughput and lockstep round trip, measured by
  ``bench/transport.py``'s blocking ``pyzmq`` driver (same code, same sockets);
* a hand-written "acked" sender, the code users write today: blocking pyzmq,
  a DEALER sends [8-byte id, 64-byte payload], a ROUTER answers with the id,
  64 in flight, a dict of pending ids, no retries.

With ``--secure`` the default window is measured once more with CURVE on
the link (throwaway keys, ZAP authentication, per-message User-Id), so the
cost of encryption shows against plaintext in the same run.

The ``durable`` rows measure the default window once more against a node "b"
opened with ``journal=`` (issue 18): its compute actor's state (a count) and
its receive state are committed to sqlite before each ACK leaves, with
``journal_sync="normal"`` (the default) and ``"full"`` (an fsync per
commit). Throughput and send -> ACK latency are reported beside the
in-memory mode's of the same run; the goal is >= 0.5x its throughput.

Each figure is the median over the repetitions, after one warm-up repetition.

Run: ``.venv/bin/python bench/links.py [--secure]``; writes ``bench/results/links.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# Run as a script, this directory would come first on the path and
# ``import transport`` would find bench/transport.py instead of the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import trio  # noqa: E402
import zmq  # noqa: E402

from actors import (  # noqa: E402
    Actor,
    Delivery,
    NodeConfig,
    open_node,
)
from bench import transport as transport_bench  # noqa: E402
from bench._common import machine_info, median, percentile, print_table, write_json  # noqa: E402
from transport import (  # noqa: E402
    NodeId,
    ReceiverConfig,
    SenderConfig,
)
from transport.security import (  # noqa: E402
    Security,
    generate_key_pair,
    read_key_pair,
    read_public_key,
    secret_key_path,
    write_key_pair,
)

PAYLOAD = bytes(range(64))
THROUGHPUT_N = 50_000
LATENCY_N = 2_000
RAW_THROUGHPUT_N = 100_000
REPS = 5
#: Messages in flight in the hand-written baseline.
HANDWRITTEN_IN_FLIGHT = 64
#: Bound on each repetition (and, times ten, on a child's life), so the run always ends.
RUN_DEADLINE = 60.0
BLOCKING_TIMEOUT_MS = 20_000

#: The node configurations measured: the defaults, and a window four times wider.
CONFIGS: dict[str, NodeConfig] = {
    "window 256": NodeConfig(),
    "window 1024": NodeConfig(
        sender=SenderConfig(max_in_flight=1024, initial_credit=1024),
        receiver=ReceiverConfig(window=1024, max_entries=2048),
    ),
}

#: ``--spin``: NodeConfig.spin of both nodes, None for the default.
_SPIN: list[float | None] = [None]

#: Batched rows: label -> items per batch, sent with the default window.
BATCHES: dict[str, int] = {"batch 64": 64, "batch 256": 256}
BATCH_CONFIG = "window 256"

Ctx = zmq.Context[zmq.Socket[bytes]]


# -- child processes: node "b", or the hand-written acker -----------------------


class _Sink(Actor[Delivery, None]):
    """Node b's compute actor: takes every message, answers ACK at once."""

    async def receive(self, msg: Delivery) -> None:
        return None


class _DurableSink(Actor[Delivery, None]):
    """Node b's compute actor on a durable node: counts messages; the count is its state."""

    def __init__(self) -> None:
        self.count = 0

    async def receive(self, msg: Delivery) -> None:
        self.count += 1

    def snapshot(self) -> int:
        return self.count

    def restore(self, state: int) -> None:
        self.count = state


#: The durable rows: label -> the journal's sync mode (default window).
DURABLE: dict[str, str] = {"durable": "normal", "durable, sync=full": "full"}
DURABLE_CONFIG = "window 256"


#: The configuration measured once more over CURVE with ``--secure``.
SECURE_CONFIG = "window 256"


def _security(keys_dir: str | None, me: str, peer: str) -> Security | None:
    """Node ``me``'s keys from a folder :func:`_make_keys` filled, or None (plaintext)."""
    if keys_dir is None:
        return None
    pair = read_key_pair(secret_key_path(keys_dir, me))
    return Security(pair, {peer: read_public_key(secret_key_path(keys_dir, peer))})


def _make_keys(keys_dir: str) -> None:
    for name in ("a", "b"):
        write_key_pair(keys_dir, name, generate_key_pair())


async def _serve_node(
    config_name: str, keys_dir: str | None = None, journal: str | None = None, sync: str = ""
) -> None:
    config = CONFIGS[config_name]
    if journal:
        config = replace(config, journal_sync=sync)
    with trio.fail_after(RUN_DEADLINE * 10):
        async with open_node(
            "b",
            bind="tcp://127.0.0.1:*",
            peers={"a": None},
            compute=_DurableSink if journal else _Sink,
            config=config,
            security=_security(keys_dir or None, "b", "a"),
            journal=journal or None,
        ) as node:
            print(node.endpoint, flush=True)
            await _wait_stdin_closed()


async def _wait_stdin_closed() -> None:
    """The parent closes our stdin when it is done with us."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stream:
        while await stream.receive_some():
            pass


def _serve_acker() -> None:
    """Blocking ROUTER: answer every [id, payload] with [id], until stdin closes."""
    ctx: Ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(f"tcp://127.0.0.1:{port}", flush=True)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    deadline = time.monotonic() + RUN_DEADLINE * 10
    try:
        while time.monotonic() < deadline:
            ready = dict(poller.poll(1000))
            if sys.stdin.fileno() in ready:
                return
            while True:
                try:
                    routing_id, message_id, _ = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                sock.send_multipart([routing_id, message_id])
    finally:
        sock.close()
        ctx.term()


class _Child:
    """A child process that prints its endpoint and lives until we close its stdin."""

    def __init__(self, *role: str) -> None:
        spin = [] if _SPIN[0] is None else ["--spin", str(_SPIN[0])]
        argv = [sys.executable, __file__, *spin, "--child", *role]
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._proc.stdout is not None
        self.endpoint = self._proc.stdout.readline().strip()
        if not self.endpoint:
            self.close()
            raise RuntimeError(f"child {role} exited before it was ready")

    def close(self) -> None:
        proc = self._proc
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# -- this process: node "a" and the hand-written sender --------------------------


async def _cellmesh(
    endpoint: str,
    config: NodeConfig,
    n: int,
    latency_n: int,
    reps: int,
    keys_dir: str | None = None,
    batch: int = 0,
) -> tuple[list[float], list[list[float]], dict[str, int]]:
    """Confirmed throughput (``reps`` runs), then latency (``reps`` runs if latency_n).

    With ``batch``, the ``n`` payloads go as batches of that many items
    (``send_batch_nowait``), and the rate counts items.

    Returns:
        msgs/s per run, send -> ACK times (µs) per run, and the link's
        counters, which show whether anything was resent or refused.
    """
    rates: list[float] = []
    rtts: list[list[float]] = []
    async with open_node(
        "a",
        bind="tcp://127.0.0.1:*",
        peers={"b": endpoint},
        config=config,
        security=_security(keys_dir, "a", "b"),
    ) as node:
        with trio.fail_after(RUN_DEADLINE):
            await node.send("b", PAYLOAD)  # connected, session established
        items = [PAYLOAD] * batch
        for _ in range(reps):
            with trio.fail_after(RUN_DEADLINE):
                if batch:
                    batches = []
                    start = time.perf_counter()
                    for _ in range(n // batch):
                        await node.wait_window("b")
                        batches.append(node.send_batch_nowait("b", items))
                    confirmed = 0
                    for batch_handle in batches:
                        confirmed += len(await batch_handle.wait())
                    rates.append(confirmed / (time.perf_counter() - start))
                    continue
                handles = []
                start = time.perf_counter()
                for _ in range(n):
                    await node.wait_window("b")
                    handles.append(node.send_nowait("b", PAYLOAD))
                for handle in handles:
                    await handle.wait()
                rates.append(n / (time.perf_counter() - start))
        for _ in range(reps if latency_n else 0):
            with trio.fail_after(RUN_DEADLINE):
                run = []
                for _ in range(latency_n):
                    t0 = time.perf_counter_ns()
                    await node.send("b", PAYLOAD)
                    run.append((time.perf_counter_ns() - t0) / 1000.0)
                rtts.append(run)
        stats = node.statistics().links[NodeId("b")].protocol
        counters = {
            "acked": stats.acked,
            "resent": stats.resent,
            "retry_later": stats.retry_later,
            "erred": stats.erred,
        }
    return rates, rtts, counters


def _handwritten(endpoint: str, n: int, reps: int) -> list[float]:
    """Acked msgs/s of the hand-written sender: 64 in flight, a dict of pending ids."""
    ctx: Ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = BLOCKING_TIMEOUT_MS
    sock.connect(endpoint)
    rates = []
    try:
        for _ in range(reps):
            pending: dict[bytes, bytes] = {}
            sent = acked = 0
            start = time.perf_counter()
            while acked < n:
                while sent < n and len(pending) < HANDWRITTEN_IN_FLIGHT:
                    message_id = sent.to_bytes(8, "big")
                    sock.send_multipart([message_id, PAYLOAD])
                    pending[message_id] = PAYLOAD
                    sent += 1
                [message_id] = sock.recv_multipart()
                del pending[message_id]
                acked += 1
            rates.append(n / (time.perf_counter() - start))
    finally:
        sock.close()
        ctx.term()
    return rates


def _ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else float("nan")


def _measure_cellmesh(
    args: argparse.Namespace, keys_dir: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each node configuration against a fresh node "b", latency with the first one;
    with ``keys_dir``, :data:`SECURE_CONFIG` once more over CURVE, latency too.

    Returns:
        throughput by label, and latency by label.
    """
    runs: list[tuple[str, str, str | None, bool, int, str]] = [
        (name, name, None, index == 0, 0, "") for index, name in enumerate(CONFIGS)
    ]
    # Right after the in-memory row they are compared with: on a shared
    # machine the load drifts over a run.
    after = list(CONFIGS).index(DURABLE_CONFIG) + 1
    runs[after:after] = [
        (label, DURABLE_CONFIG, None, True, 0, sync) for label, sync in DURABLE.items()
    ]
    runs.extend((label, BATCH_CONFIG, None, False, size, "") for label, size in BATCHES.items())
    if keys_dir is not None:
        runs.append((f"{SECURE_CONFIG}, CURVE", SECURE_CONFIG, keys_dir, True, 0, ""))
    throughput: dict[str, Any] = {}
    latency: dict[str, Any] = {}
    journals = tempfile.TemporaryDirectory(prefix="cellmesh-bench-journal-")
    try:
        _run_rows(args, runs, journals.name, throughput, latency)
    finally:
        journals.cleanup()
    return throughput, latency


def _run_rows(
    args: argparse.Namespace,
    runs: list[tuple[str, str, str | None, bool, int, str]],
    journals: str,
    throughput: dict[str, Any],
    latency: dict[str, Any],
) -> None:
    """Measure each row against a fresh node "b" (durable rows: a fresh journal)."""
    for label, name, keys, with_latency, batch, sync in runs:
        if sync:
            journal = str(Path(journals) / f"{label}.db")
            child = _Child("node", name, "", journal, sync)
        else:
            child = _Child("node", name, *([keys] if keys else []))
        try:
            rates, rtts, counters = trio.run(
                _cellmesh,
                child.endpoint,
                CONFIGS[name],
                args.throughput_n,
                args.latency_n if with_latency else 0,
                args.reps + 1,
                keys,
                batch,
            )
        finally:
            child.close()
        throughput[label] = {
            "runs_msgs_per_s": rates[1:],
            "median_msgs_per_s": median(rates[1:]),
            "link_counters": counters,
        }
        if rtts:
            p50s = [percentile(r, 50) for r in rtts[1:]]
            p99s = [percentile(r, 99) for r in rtts[1:]]
            latency[label] = {
                "runs_p50_us": p50s,
                "runs_p99_us": p99s,
                "median_p50_us": median(p50s),
                "median_p99_us": median(p99s),
            }


def _measure_references(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The hand-written acked sender, then bench/transport.py's blocking pyzmq driver."""
    acker = _Child("acker")
    try:
        hand = _handwritten(acker.endpoint, args.throughput_n, args.reps + 1)[1:]
    finally:
        acker.close()
    handwritten = {"runs_msgs_per_s": hand, "median_msgs_per_s": median(hand)}
    rates = transport_bench._measure("pyzmq", "throughput", args.raw_throughput_n, args.reps)
    rtts = transport_bench._measure("pyzmq", "latency", args.latency_n, args.reps)
    p50s = [percentile(r, 50) for r in rtts]
    p99s = [percentile(r, 99) for r in rtts]
    raw = {
        "one_way_runs_msgs_per_s": rates,
        "one_way_median_msgs_per_s": median(rates),
        "rtt_runs_p50_us": p50s,
        "rtt_runs_p99_us": p99s,
        "rtt_median_p50_us": median(p50s),
        "rtt_median_p99_us": median(p99s),
    }
    return handwritten, raw


def _report(
    reps: int,
    throughput: dict[str, Any],
    latency: dict[str, Any],
    handwritten: dict[str, Any],
    raw: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, bool]]:
    """Print the tables and the goals; return the ratios and the goals met."""
    raw_rate: float = raw["one_way_median_msgs_per_s"]
    hand_rate: float = handwritten["median_msgs_per_s"]
    raw_p50: float = raw["rtt_median_p50_us"]
    ratios: dict[str, Any] = {
        name: {
            "vs_raw_one_way": _ratio(r["median_msgs_per_s"], raw_rate),
            "vs_handwritten_acked": _ratio(r["median_msgs_per_s"], hand_rate),
        }
        for name, r in throughput.items()
    }
    for label, lat in latency.items():
        ratios[f"latency_p50_vs_raw_rtt, {label}"] = _ratio(lat["median_p50_us"], raw_p50)
    plain = next(iter(latency))
    ratios["latency_p50_vs_raw_rtt"] = ratios[f"latency_p50_vs_raw_rtt, {plain}"]
    rows: list[list[object]] = [
        [
            f"cellmesh, {name}",
            r["median_msgs_per_s"],
            ratios[name]["vs_raw_one_way"],
            ratios[name]["vs_handwritten_acked"],
        ]
        for name, r in throughput.items()
    ]
    rows.append(
        [
            f"hand-written acked, {HANDWRITTEN_IN_FLIGHT} in flight",
            hand_rate,
            _ratio(hand_rate, raw_rate),
            1.0,
        ]
    )
    rows.append(["raw pyzmq one-way, unconfirmed", raw_rate, 1.0, _ratio(raw_rate, hand_rate)])
    print_table(
        f"Throughput, tcp loopback, 64-byte payloads, median of {reps} reps",
        ["sender", "msgs/s", "x raw one-way", "x hand-written"],
        rows,
    )
    print_table(
        "Latency, one message in flight",
        ["", "p50 us", "p99 us", "x raw rtt p50"],
        [
            *(
                [
                    f"cellmesh send -> ACK, {label}",
                    lat["median_p50_us"],
                    lat["median_p99_us"],
                    ratios[f"latency_p50_vs_raw_rtt, {label}"],
                ]
                for label, lat in latency.items()
            ),
            ["raw pyzmq lockstep round trip", raw_p50, raw["rtt_median_p99_us"], 1.0],
        ],
    )
    secure = f"{SECURE_CONFIG}, CURVE"
    if secure in throughput:
        ratios["curve_vs_plaintext_throughput"] = _ratio(
            throughput[secure]["median_msgs_per_s"],
            throughput[SECURE_CONFIG]["median_msgs_per_s"],
        )
        ratios["curve_vs_plaintext_latency_p50"] = _ratio(
            latency[secure]["median_p50_us"], latency[SECURE_CONFIG]["median_p50_us"]
        )
        print(
            f"  CURVE costs: throughput x{ratios['curve_vs_plaintext_throughput']:.2f}, "
            f"latency p50 x{ratios['curve_vs_plaintext_latency_p50']:.2f} of plaintext"
        )
    for label in DURABLE:
        if label not in throughput:
            continue
        ratios[f"{label}_vs_memory_throughput"] = _ratio(
            throughput[label]["median_msgs_per_s"],
            throughput[DURABLE_CONFIG]["median_msgs_per_s"],
        )
        ratios[f"{label}_vs_memory_latency_p50"] = _ratio(
            latency[label]["median_p50_us"], latency[DURABLE_CONFIG]["median_p50_us"]
        )
        print(
            f"  {label}: throughput x{ratios[f'{label}_vs_memory_throughput']:.2f} of "
            f"in-memory, send -> ACK p50 {latency[label]['median_p50_us']:.0f} us "
            f"(in-memory {latency[DURABLE_CONFIG]['median_p50_us']:.0f} us)"
        )
    plaintext = [name for name in throughput if name in CONFIGS]
    best = max(plaintext, key=lambda name: throughput[name]["median_msgs_per_s"])
    batched = [name for name in throughput if name in BATCHES]
    best_batch = max(batched, key=lambda name: throughput[name]["median_msgs_per_s"])
    goals = {
        "confirmed throughput >= 1.0x raw one-way": ratios[best]["vs_raw_one_way"] >= 1.0,
        "batched confirmed throughput >= 1.0x raw one-way": (
            ratios[best_batch]["vs_raw_one_way"] >= 1.0
        ),
        "latency p50 <= 1.5x raw round trip": ratios["latency_p50_vs_raw_rtt"] <= 1.5,
        "durable confirmed throughput >= 0.5x in-memory": (
            ratios["durable_vs_memory_throughput"] >= 0.5
        ),
    }
    for goal, met in goals.items():
        print(f"  {'met ' if met else 'MISS'} {goal}")
    return ratios, goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=REPS)
    parser.add_argument("--throughput-n", type=int, default=THROUGHPUT_N)
    parser.add_argument("--latency-n", type=int, default=LATENCY_N)
    parser.add_argument("--raw-throughput-n", type=int, default=RAW_THROUGHPUT_N)
    parser.add_argument(
        "--secure", action="store_true", help="also measure the default window over CURVE"
    )
    parser.add_argument(
        "--spin",
        type=float,
        default=None,
        metavar="SECONDS",
        help="NodeConfig.spin of both nodes (0 turns polling before parking off)",
    )
    parser.add_argument("--child", nargs="+", metavar="ROLE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.spin is not None:
        _SPIN[0] = args.spin
        for name, config in CONFIGS.items():
            CONFIGS[name] = replace(config, spin=args.spin)
    if args.child:
        if args.child[0] == "node":
            trio.run(_serve_node, *args.child[1:])
        else:
            _serve_acker()
        return

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cellmesh-bench-keys-") as keys_dir:
        if args.secure:
            _make_keys(keys_dir)
        throughput, latency = _measure_cellmesh(args, keys_dir if args.secure else None)
    handwritten, raw = _measure_references(args)
    ratios, goals = _report(args.reps, throughput, latency, handwritten, raw)
    elapsed = time.perf_counter() - began
    path = write_json(
        "links",
        {
            "machine": {
                **machine_info(),
                "pyzmq": zmq.__version__,
                "libzmq": zmq.zmq_version(),
                "trio": trio.__version__,
            },
            "params": {
                "spin": CONFIGS["window 256"].spin,
                "payload_bytes": len(PAYLOAD),
                "throughput_n": args.throughput_n,
                "latency_n": args.latency_n,
                "raw_throughput_n": args.raw_throughput_n,
                "handwritten_in_flight": HANDWRITTEN_IN_FLIGHT,
                "batch_items": BATCHES,
                "reps": args.reps,
                "warmup_reps": 1,
                "secure": args.secure,
                "durable": DURABLE,
            },
            "cellmesh_throughput": throughput,
            "cellmesh_latency": latency,
            "handwritten_acked": handwritten,
            "raw_pyzmq": raw,
            "ratios": ratios,
            "goals": goals,
            "elapsed_s": elapsed,
        },
    )
    print(f"\n  {elapsed:.1f} s; results in {path}")


if __name__ == "__main__":
    main()
