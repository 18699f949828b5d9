"""Question 7: the same message arrives twice; it must look as if it came once.

Two ways a receiver gets copies, both forced here with seeded fault injection:

* the wire duplicates messages (node a's outgoing DATA: ``duplicate=0.3``);
* B's answer is lost, A's retry timer fires and A resends (node b's outgoing
  answers: ``drop=0.3``). This is exactly the case in the question.

B's compute actor counts how often it sees each message: every one exactly
once. The copies are recognised by their message id (the link sequence
number) within the sender's session and answered again with the *same*
final answer, kept until the sender says it no longer needs it.

Run: ``.venv/bin/python examples/duplicates.py``
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from typing import Any

import trio

from actors import (
    Ack,
    Actor,
    Delivery,
    NodeConfig,
    SendHandle,
    open_node,
)
from transport import (
    NodeId,
    SenderConfig,
)
from transport.testing import (
    FaultPlan,
)

#: Bound on the whole demo, so a broken build fails instead of hanging.
DEADLINE = 20.0
STEPS = 20
PER_STEP = 10
MESSAGES = STEPS * PER_STEP


class Once(Actor[Any, Any]):
    """Counts every message it is handed; answers with its processing number."""

    def __init__(self, seen: Counter[str]) -> None:
        self.seen = seen
        self.processed = 0

    async def receive(self, msg: Any) -> Any:
        assert isinstance(msg, Delivery)
        self.seen[msg.payload] += 1
        self.processed += 1
        return self.processed


async def main() -> None:
    seen: Counter[str] = Counter()
    a_config = NodeConfig(
        faults=FaultPlan(duplicate=0.3, seed=7),
        sender=SenderConfig(retry_timeout=0.05, retry_ceiling=0.2, max_batch=1),
    )
    b_config = NodeConfig(faults=FaultPlan(drop=0.3, seed=8))
    print(f"question 7: a sends {STEPS} x {PER_STEP} messages to b over a wire that duplicates a's")
    print("messages (30%) and loses b's answers (30%), so a also resends\n")
    with tempfile.TemporaryDirectory() as tmp, trio.fail_after(DEADLINE):
        async with (
            open_node(
                "b",
                bind=f"ipc://{tmp}/b.sock",
                peers={"a": None},
                compute=lambda: Once(seen),
                config=b_config,
            ) as b,
            open_node(
                "a", bind=f"ipc://{tmp}/a.sock", peers={"b": b.endpoint}, config=a_config
            ) as a,
        ):
            acks: list[Ack] = []
            for step in range(STEPS):
                # One step's worth of cells in flight at once, then the next step.
                handles: list[SendHandle] = []
                for i in range(PER_STEP):
                    await a.wait_window("b")
                    handles.append(a.send_nowait("b", f"cell {step}.{i}", timeout=15))
                acks.extend([await h.wait() for h in handles])

            link = a.statistics().links[NodeId("b")].protocol
            [session] = [s for s in b.statistics().inbound.protocol.sessions if s.peer == "a"]
            retried = max(acks, key=lambda ack: ack.attempts)
            print(
                f"a: sent={link.sent} resent={link.resent} acked={link.acked} "
                f"duplicate answers ignored={link.duplicate_answers}"
            )
            print(
                f"b: delivered to compute={session.delivered} "
                f"duplicates suppressed (answered again, not processed)={session.duplicates}"
            )
            print(
                f"b's compute actor saw {len(seen)} distinct messages, "
                f"each {set(seen.values())} time(s)"
            )
            print(
                f"\nfor example message #{retried.seq} ({retried.attempts} transmissions): "
                f"processed once, as b's message number {retried.result}"
            )
            assert len(seen) == MESSAGES
            assert set(seen.values()) == {1}
            assert session.delivered == MESSAGES
            assert session.duplicates > 0
            assert link.resent > 0
            assert retried.attempts > 1
            # Each ACK carries the number b gave that message when it processed
            # it: all distinct, so no copy was processed a second time.
            assert sorted(ack.result for ack in acks) == list(range(1, MESSAGES + 1))
    print("\nOK: every message was processed exactly once despite duplicates and resends")


if __name__ == "__main__":
    trio.run(main)
    sys.exit(0)
