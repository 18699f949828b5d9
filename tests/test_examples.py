"""Every FAQ example runs as its own process, exits 0 and prints its proof.

Each example asserts its own claim (a message processed once, frames in
order, no retransmission, ...) and exits non-zero if it did not hold; this
test runs them the way a reader would and checks for the line that states
the result.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: example -> a line its output must contain (the claim it proved).
EXAMPLES = {
    "q1_server_offline.py": "OK: the same client node carried on after the server came back",
    "pollers.py": "OK: a Poller multiplexes sockets; in cellmesh, Trio does that for you",
    "fan_out.py": "OK: concurrent one-to-one sends, each confirmed by its own id",
    "err_handling.py": "OK: every send ended in exactly one of ACK, ERR or DeliveryFailed",
    "in_order.py": "OK: in order, buffered while out of order, and gaps reported explicitly",
    "duplicates.py": "OK: every message was processed exactly once despite duplicates and resends",
    "concurrent_compute.py": "OK: concurrent compute, asynchronous ACKs, no retransmissions",
    "secure_nodes.py": "OK: only keys in the topology get in; intruders are refused and counted",
}

#: What may appear on stderr: the cellmesh.security logger's start-up notice
#: of a plaintext node, and its once-per-peer refusal lines.
EXPECTED_STDERR = (
    "runs UNAUTHENTICATED",
    "(logged once; node.statistics().security counts each)",
    # err_handling.py crashes its compute actor on purpose; the supervisor says so.
    "child compute crashed (RuntimeError: compute step crashed on cell 3); restarting it",
)

#: Seconds one example may take on two noisy cores (they take 0.3-5 s).
TIMEOUT = 30


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_and_proves_its_claim(name: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert EXAMPLES[name] in proc.stdout.splitlines(), proc.stdout
    noise = [
        line
        for line in proc.stderr.splitlines()
        if not any(expected in line for expected in EXPECTED_STDERR)
    ]
    assert noise == [], proc.stderr


def test_every_example_named_in_the_faq_is_tested() -> None:
    faq = (ROOT / "docs" / "faq.md").read_text()
    for name in EXAMPLES:
        assert f"examples/{name}" in faq, f"docs/faq.md does not point at examples/{name}"
