"""The SEND / ACK / ERR / no-response semantics, one outcome at a time.

Every ``send`` ends in exactly one of three ways:

* ``Ack``: the peer received the message and its compute layer processed it;
  ``ack.result`` is whatever the peer's ``receive`` returned;
* ``PeerError``: the peer received it but could not process it. ``code`` is
  the peer's ``Reject(code, detail)`` (100 and up), or a protocol code below
  100: ``COMPUTE_FAILED`` when the compute actor crashed (it is restarted by
  its supervisor), ``NO_HANDLER`` when the peer runs no compute actor;
* ``DeliveryFailed``: no answer before the deadline. Until then the message
  was retransmitted with exponential backoff up to a ceiling.

The last part prints the exact retransmission schedule, computed by the
sans-IO protocol core with a virtual clock (no sockets, no sleeping).

Run: ``.venv/bin/python examples/err_handling.py``
"""

from __future__ import annotations

import itertools
import math
import sys
import tempfile
from collections.abc import Awaitable
from typing import Any

import trio

from actors import (
    Ack,
    Actor,
    Delivery,
    DeliveryFailed,
    NodeConfig,
    PeerError,
    Reject,
    SendError,
    open_node,
)
from transport import (
    ErrCode,
    Incarnation,
    LinkSender,
    NodeId,
    SenderConfig,
    StreamId,
)
from transport.frames import (
    Data,
)

#: Bound on the whole demo, so a broken build fails instead of hanging.
DEADLINE = 15.0
#: The application's own error code for a cell it cannot use.
BAD_CELL = 422


class Checker(Actor[Any, Any]):
    """The receiving compute layer: checks cells, crashes on request."""

    async def receive(self, msg: Any) -> Any:
        assert isinstance(msg, Delivery)
        cell = msg.payload
        if cell["value"] == "boom":
            raise RuntimeError(f"compute step crashed on cell {cell['id']}")
        if not math.isfinite(cell["value"]):
            raise Reject(BAD_CELL, f"cell {cell['id']} holds {cell['value']}")
        return {"cell": cell["id"], "doubled": 2 * cell["value"]}


async def outcome(send: Awaitable[Ack]) -> Ack | SendError:
    """The outcome of one send as a value: its Ack, or the SendError it raised."""
    try:
        return await send
    except SendError as exc:
        return exc


def retry_schedule(config: SenderConfig, timeout: float) -> list[float]:
    """Times at which the protocol core transmits one unanswered message."""
    me, peer = NodeId("a"), NodeId("b")
    core = LinkSender(me, Incarnation(1), peer, now=0.0, rng=lambda: 0.5, config=config)
    core.send(StreamId("s"), b"cell", now=0.0, deadline=timeout)
    times: list[float] = []
    now = 0.0
    while now < timeout:
        core.poll(now)
        times.extend(now for frame in core.frames_to_send(now) if type(frame) is Data)
        due = core.next_deadline()
        # An idle sender always has a heartbeat due, so this never ends early.
        now = timeout if due is None else due
    return times


async def main() -> None:
    print("SEND / ACK / ERR / no response, as a sender sees them\n")
    fast = NodeConfig(sender=SenderConfig(retry_timeout=0.1, retry_ceiling=0.4))
    with tempfile.TemporaryDirectory() as tmp, trio.fail_after(DEADLINE):
        async with (
            open_node("b", bind=f"ipc://{tmp}/b.sock", peers={"a": None}, compute=Checker) as b,
            # "c" runs no compute actor; "ghost" is never started.
            open_node("c", bind=f"ipc://{tmp}/c.sock", peers={"a": None}) as c,
            open_node(
                "a",
                bind=f"ipc://{tmp}/a.sock",
                peers={"b": b.endpoint, "c": c.endpoint, "ghost": f"ipc://{tmp}/ghost.sock"},
                config=fast,
            ) as a,
        ):
            ack = await a.send("b", {"id": 1, "value": 21.0}, timeout=5)
            print(f"[ACK]  cell 1 -> ACK #{ack.seq}, result {ack.result}")

            err = await outcome(a.send("b", {"id": 2, "value": math.nan}, timeout=5))
            assert isinstance(err, PeerError), err
            print(f"[ERR]  cell 2 -> ERR code {err.code} for #{err.seq}: {err.detail!r}")
            assert err.code == BAD_CELL

            err = await outcome(a.send("b", {"id": 3, "value": "boom"}, timeout=5))
            assert isinstance(err, PeerError), err
            print(
                f"[ERR]  cell 3 -> ERR code {err.code} ({ErrCode(err.code).name}): {err.detail!r}"
            )
            assert err.code == ErrCode.COMPUTE_FAILED
            compute = b.supervisor.actor("compute")
            ack = await a.send("b", {"id": 4, "value": 1.5}, timeout=5)
            restarts = compute.statistics().restarts
            print(f"       the compute actor was restarted ({restarts}x); cell 4 -> {ack.result}")
            assert restarts == 1
            assert ack.result == {"cell": 4, "doubled": 3.0}

            err = await outcome(a.send("c", {"id": 5, "value": 1.0}, timeout=5))
            assert isinstance(err, PeerError), err
            print(f"[ERR]  cell 5 to c -> ERR code {err.code} ({ErrCode(err.code).name})")
            assert err.code == ErrCode.NO_HANDLER

            start = trio.current_time()
            failed = await outcome(a.send("ghost", {"id": 6, "value": 1.0}, timeout=1.5))
            assert isinstance(failed, DeliveryFailed), failed
            waited = trio.current_time() - start
            ghost = a.statistics().links[NodeId("ghost")].protocol
            print(
                f"[NONE] cell 6 to ghost -> DeliveryFailed after {waited:.1f} s: "
                f"{failed.reason}; resent={ghost.resent}, gave_up={ghost.gave_up}"
            )
            assert ghost.gave_up == 1
            assert ghost.resent > 0

            to_b = a.statistics().links[NodeId("b")].protocol
            print(
                f"\n       a's link to b: sent={to_b.sent} acked={to_b.acked} erred={to_b.erred} "
                f"resent={to_b.resent} (ACK and ERR both mean: b received it)"
            )
            assert (to_b.sent, to_b.acked, to_b.erred) == (4, 2, 2)

    config = SenderConfig(retry_timeout=0.2, backoff=2.0, retry_ceiling=2.0, jitter=0.0)
    times = retry_schedule(config, timeout=10.0)
    gaps = [round(t1 - t0, 3) for t0, t1 in itertools.pairwise(times)]
    print("\n[NONE] retry schedule, default timers with jitter off (0.2 s, x2, ceiling 2 s)")
    print(f"       transmissions at t = {[round(t, 3) for t in times]}")
    print(f"       waits between them  = {gaps}")
    assert gaps[:4] == [0.2, 0.4, 0.8, 1.6]
    assert all(g == 2.0 for g in gaps[4:])
    print("\nOK: every send ended in exactly one of ACK, ERR or DeliveryFailed")


if __name__ == "__main__":
    trio.run(main)
    sys.exit(0)
