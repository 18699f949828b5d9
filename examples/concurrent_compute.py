"""Requirement 5 (and the server half of question 6): process N at once, ACK later.

Node b's compute step is slow (0.1-0.4 s per message, longer than the
sender's 0.2 s retry timeout) and b runs it for up to ``CONCURRENCY`` messages
at once (``NodeConfig(compute_concurrency=N)``). Node a sends 16 messages at
once. What happens:

* b takes messages off the wire without waiting for the compute layer, and
  tells a at once that it holds them (RECEIVED). So a does not retransmit,
  although every compute step outlasts a's retry timeout: ``resent=0``;
* b works on 8 messages at the same time and answers each ACK as soon as its
  own step is done: the ACKs come back asynchronously, in completion order,
  not in sending order;
* all 16 finish in about two compute steps, not sixteen.

Messages of one ordered stream are still *handed* to the compute actor in
order; with N > 1 they may *finish* in any order. Use one actor at a time
(the default, N = 1) when a step needs the previous one's result.

Run: ``.venv/bin/python examples/concurrent_compute.py``
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any

import trio

from actors import Actor, Delivery, NodeConfig, SendHandle, open_node
from transport import NodeId

#: Bound on the whole demo, so a broken build fails instead of hanging.
DEADLINE = 15.0
CONCURRENCY = 8
MESSAGES = 16


class SlowStep(Actor[Any, Any]):
    """A compute step whose duration depends on the cell; tracks concurrency."""

    def __init__(self, gauge: dict[str, int]) -> None:
        self.gauge = gauge

    async def receive(self, msg: Any) -> Any:
        assert isinstance(msg, Delivery)
        self.gauge["now"] += 1
        self.gauge["peak"] = max(self.gauge["peak"], self.gauge["now"])
        try:
            # 0.1 .. 0.4 s, so later cells sometimes finish first.
            await trio.sleep(0.1 + 0.1 * ((msg.payload * 5) % 4))
        finally:
            self.gauge["now"] -= 1
        return msg.payload * msg.payload


async def main() -> None:
    gauge = {"now": 0, "peak": 0}
    b_config = NodeConfig(compute_concurrency=CONCURRENCY)
    print(f"requirement 5: a sends {MESSAGES} cells at once; b's compute takes 0.1-0.4 s each")
    print(f"and runs {CONCURRENCY} at a time (a's retry timeout is 0.2 s)\n")
    with tempfile.TemporaryDirectory() as tmp, trio.fail_after(DEADLINE):
        async with (
            open_node(
                "b",
                bind=f"ipc://{tmp}/b.sock",
                peers={"a": None},
                compute=lambda: SlowStep(gauge),
                config=b_config,
            ) as b,
            open_node("a", bind=f"ipc://{tmp}/a.sock", peers={"b": b.endpoint}) as a,
        ):
            await a.wait_all_up()
            start = trio.current_time()
            finished: list[tuple[int, float]] = []

            async def collect(cell: int, handle: SendHandle) -> None:
                ack = await handle.wait()
                assert ack.result == cell * cell
                finished.append((cell, trio.current_time() - start))

            peak_held = 0
            async with trio.open_nursery() as nursery:
                for cell in range(MESSAGES):
                    nursery.start_soon(collect, cell, a.send_nowait("b", cell, timeout=10))
                # While b computes, a's link knows which messages b holds.
                while len(finished) < MESSAGES:
                    held = a.statistics().links[NodeId("b")].protocol.held
                    peak_held = max(peak_held, held)
                    await trio.sleep(0.005)
            elapsed = trio.current_time() - start
            link = a.statistics().links[NodeId("b")].protocol

            print("ACKs in the order they came back (cell @ seconds after sending):")
            print("    " + ", ".join(f"{cell}@{t:.2f}" for cell, t in finished))
            print(
                f"\nb worked on up to {gauge['peak']} cells at once; all {MESSAGES} done in "
                f"{elapsed:.2f} s (one at a time would take about "
                f"{sum(0.1 + 0.1 * ((c * 5) % 4) for c in range(MESSAGES)):.1f} s)"
            )
            print(
                f"a's link: sent={link.sent} resent={link.resent} acked={link.acked}; "
                f"b confirmed holding up to {peak_held} at once (RECEIVED) before answering"
            )
            assert gauge["peak"] == CONCURRENCY
            assert [cell for cell, _ in finished] != list(range(MESSAGES))
            assert sorted(cell for cell, _ in finished) == list(range(MESSAGES))
            assert link.resent == 0
            assert link.acked == MESSAGES
            assert peak_held >= CONCURRENCY
    print("\nOK: concurrent compute, asynchronous ACKs, no retransmissions")


if __name__ == "__main__":
    trio.run(main)
    sys.exit(0)
