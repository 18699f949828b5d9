"""Issue 14: no peer can hurt another peer, measured from outside.

A well-behaved foreign peer in its own process sends one DATA every 10 ms to a real node while
another foreign process attacks the same node: a valid DATA at the top of the seq range
(seq = watermark = 2**63-1) resent every 20 ms, invalid frames in a tight loop from a
configured and an unknown peer, and headers just under the node's size limit built to be
costly to decode. The good peer's answers must stay fast: p99 under 100 ms (the issue's bound).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import HERE, NodeProcess

GOOD_SECONDS = 3.0
ATTACK_SECONDS = 4.5
#: The issue's bound on the good peer's answers while another peer attacks.
P99_BOUND = 0.100


def spawn(role: str, node: NodeProcess, peer_id: str, seconds: float, *extra: str) -> Any:
    args = [sys.executable, str(HERE / "peer_process.py"), role, node.endpoint]
    args += ["--id", peer_id, "--seconds", str(seconds), *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: Any, timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    result: dict[str, Any] = json.loads(out)
    return result


def test_good_peer_answers_stay_fast_while_another_attacks(
    node_factory: Any, tmp_path: Path
) -> None:
    node: NodeProcess = node_factory("n", ["good", "evil"])
    limit = node.stats()["limits"]["max_header_bytes"]
    before = node.rejected()
    attacker = spawn("attack", node, "evil", ATTACK_SECONDS, "--header-limit", str(limit))
    try:
        good = finish(spawn("good", node, "good", GOOD_SECONDS), timeout=GOOD_SECONDS + 20)
    finally:
        attacked = finish(attacker, timeout=ATTACK_SECONDS + 20)
    after = node.rejected()
    grown = {r: n - before.get(r, 0) for r, n in after.items() if n > before.get(r, 0)}

    assert node.alive(), node.describe("the node died under attack")
    # The attack happened, and the node refused it under its reasons.
    assert attacked["bad"] > 100, attacked
    assert {"malformed", "truncated", "bad-field", "unknown-peer", "impersonation"} <= set(grown), (
        grown
    )
    # The good peer: everything answered, and fast.
    assert good["sent"] >= GOOD_SECONDS / 0.01 * 0.8, good
    assert good["answered"] == good["sent"], good
    assert good["p99"] < P99_BOUND, (good, attacked, grown)
    # The top of the seq range is valid: it got its final answer (issue 14 item 1).
    assert attacked.get("top-acked") == 1, attacked
