"""Codec micro-benchmark: µs per frame to encode and decode, single and batched.

Run with ``.venv/bin/python bench/codec.py``. Prints a table and writes
``bench/results/codec.json``. Each figure is the best of several repeats (the
least disturbed by other load), divided by the frames per message.
"""

from __future__ import annotations

import json
import platform
import sys
import timeit
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# Run as a script, this directory would come first on the path and
# ``import transport`` would find bench/transport.py instead of the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402

from transport import (  # noqa: E402
    Incarnation,
    LinkSeq,
    NodeId,
    StreamId,
    StreamSeq,
    decode,
    encode,
)
from transport.frames import (  # noqa: E402
    AckFrame,
    Batch,
    Data,
    Frame,
)

ROOT = Path(__file__).resolve().parent.parent

BATCH = 128
REPEATS = 7
#: Run each timing for about this long, so that short cases get many loops.
TARGET_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class Row:
    case: str
    frames: int
    parts: int
    header_bytes: int
    encode_us_per_frame: float
    decode_us_per_frame: float
    encode_us_per_message: float
    decode_us_per_message: float


def _data(i: int, payload: object) -> Data:
    return Data(
        NodeId("tile-0-3"),
        Incarnation(0x1234_5678_9ABC),
        LinkSeq(i + 1),
        StreamId("halo"),
        StreamSeq(i + 1),
        StreamSeq(1),
        i,
        payload,
        LinkSeq(i),
    )


def _ack(i: int) -> AckFrame:
    return AckFrame(
        NodeId("tile-0-4"),
        Incarnation(0x2234_5678_9ABC),
        Incarnation(0x1234_5678_9ABC),
        LinkSeq(i + 1),
        LinkSeq(i + 65),
    )


def _best_us(fn: Callable[[], object]) -> float:
    loops, elapsed = timeit.Timer(fn).autorange()
    loops = max(1, int(loops * TARGET_SECONDS / max(elapsed, 1e-9)))
    return min(timeit.repeat(fn, number=loops, repeat=REPEATS)) / loops * 1e6


def _measure(case: str, frame: Frame) -> Row:
    parts = encode(frame)
    received = [bytes(p) for p in parts]
    assert decode(received) == decode(parts)
    n = len(frame.frames) if isinstance(frame, Batch) else 1
    enc = _best_us(lambda: encode(frame))
    dec = _best_us(lambda: decode(received))
    return Row(case, n, len(parts), len(parts[0]), enc / n, dec / n, enc, dec)


def main() -> None:
    payload = bytes(64)
    grid = np.zeros((256, 512), dtype=np.float64)  # 1 MiB: goes out of band
    cases: list[tuple[str, Frame]] = [
        ("DATA 64 B", _data(0, payload)),
        (f"DATA 64 B x{BATCH}", Batch(tuple(_data(i, payload) for i in range(BATCH)))),
        ("ACK", _ack(0)),
        (f"ACK x{BATCH}", Batch(tuple(_ack(i) for i in range(BATCH)))),
        ("DATA dict payload", _data(0, {"cells": [1.5] * 16, "step": 3, "tag": "halo-n"})),
        ("DATA 1 MiB array", _data(0, grid)),
    ]
    rows = [_measure(name, frame) for name, frame in cases]

    header = (
        f"{'case':<20} {'frames':>6} {'parts':>5} {'hdr B':>7} {'enc µs/fr':>10} {'dec µs/fr':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.case:<20} {r.frames:>6} {r.parts:>5} {r.header_bytes:>7}"
            f" {r.encode_us_per_frame:>10.2f} {r.decode_us_per_frame:>10.2f}"
        )

    out = ROOT / "bench" / "results" / "codec.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "codec",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "repeats": REPEATS,
        "rows": [asdict(r) for r in rows],
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
