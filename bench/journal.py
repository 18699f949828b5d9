"""Journal benchmark: what one commit of a durable node costs (issue 18).

A durable node (``open_node(journal=...)``) commits once per run of up to 64
messages: the compute actor's state, the run's answers and the sessions'
marks in one sqlite transaction (actors/_journal.py). This measures that
transaction alone, with a small state (an int) and with a larger one (a
list of 5,000 ints), for ``synchronous=NORMAL`` and ``FULL``:

* inline: ``JournalStore.write`` called on the Trio task, as the node does;
* in a thread: the same call through ``trio.to_thread.run_sync``, the
  alternative the node does not take (it would also let the I/O task run in
  the middle of a commit).

Run: ``.venv/bin/python bench/journal.py``; writes ``bench/results/journal.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import cbor2  # noqa: E402
import trio  # noqa: E402

from actors._journal import AnswerRow, JournalStore, JournalSync  # noqa: E402
from bench._common import machine_info, median, percentile, print_table, write_json  # noqa: E402
from transport import Incarnation, LinkSeq, NodeId  # noqa: E402
from transport.frames import ItemAck  # noqa: E402

COMMITS = 2_000
RUN = 64
PEER = NodeId("a")


async def _measure(store: JournalStore, state: bytes, commits: int, threaded: bool) -> list[float]:
    """µs per commit of ``RUN`` answers, the watermark moving as a sender's would."""
    times = []
    seq = 1
    for _ in range(commits):
        rows = [AnswerRow(PEER, LinkSeq(seq + i), 0, ItemAck(None)) for i in range(RUN)]
        # The sender's watermark trails by about one window (256).
        marks = {PEER: (Incarnation(1), LinkSeq(max(1, seq - 256)))}
        t0 = time.perf_counter()
        if threaded:
            await trio.to_thread.run_sync(store.write, state, marks, rows, {})
        else:
            store.write(state, marks, rows, {})
        times.append((time.perf_counter() - t0) * 1e6)
        seq += RUN
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--commits", type=int, default=COMMITS)
    args = parser.parse_args()
    states: dict[str, Any] = {"int state": 12345, "5,000-int state": list(range(5000))}
    results: dict[str, Any] = {}
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="cellmesh-bench-journal-") as folder:
        syncs: tuple[JournalSync, ...] = ("normal", "full")
        for sync in syncs:
            for label, value in states.items():
                state = cbor2.dumps(value)
                for threaded in (False, True):
                    path = Path(folder) / f"{sync}-{len(state)}-{threaded}.db"
                    store = JournalStore(path, NodeId("b"), Incarnation(1), sync=sync)
                    try:
                        commits = args.commits if sync == "normal" else args.commits // 10
                        times = trio.run(_measure, store, state, commits, threaded)
                    finally:
                        store.close()
                    how = "to_thread" if threaded else "inline"
                    name = f"{sync}, {label}, {how}"
                    p50, p99 = percentile(times, 50), percentile(times, 99)
                    results[name] = {"p50_us": p50, "p99_us": p99, "median_us": median(times)}
                    rows.append([name, p50, p99, p50 / RUN])
    print_table(
        f"One commit of {RUN} answers (a durable node commits once per run of <= {RUN})",
        ["sync, state, where", "p50 us", "p99 us", "p50 us per message"],
        rows,
    )
    path = write_json(
        "journal",
        {
            "machine": machine_info(),
            "params": {"commits": args.commits, "answers_per_commit": RUN},
            "results": results,
        },
    )
    print(f"\n  results in {path}")


if __name__ == "__main__":
    main()
