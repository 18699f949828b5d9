"""Fixtures of the foreign-peer suite: a real node process, always reaped, and a zmq context."""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

HERE = Path(__file__).parent
#: Bound on every wait for the node process: a broken node fails the test, never hangs it.
REPLY_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NodeProcess:
    """``node_under_test.py`` as a subprocess, driven by JSON lines (see its docstring)."""

    def __init__(self, node_id: str, peers: list[str], tmp: Path) -> None:
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        args = [sys.executable, str(HERE / "node_under_test.py"), "--id", node_id]
        args += ["--bind", self.endpoint]
        for peer in peers:
            args += ["--peer", peer]
        self.stderr_path = tmp / f"node-{node_id[:16]}-{self.port}.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self._ids = itertools.count(1)
        self._lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self._answers: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ready = self._next_line(REPLY_TIMEOUT)
        self.incarnation: int = ready["incarnation"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))

    def _next_line(self, timeout: float) -> dict[str, Any]:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(self.describe(f"no line from the node in {timeout} s")) from None

    def describe(self, what: str) -> str:
        self._stderr.flush()
        tail = self.stderr_path.read_text(errors="replace")[-3000:]
        return f"{what} (exit status {self.proc.poll()}); node stderr:\n{tail}"

    def start(self, op: str, **fields: Any) -> int:
        """Send one command; its answer is collected by ``result``."""
        with self._lock:
            cmd_id = next(self._ids)
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps({"id": cmd_id, "op": op, **fields}) + "\n").encode())
            self.proc.stdin.flush()
        return cmd_id

    def result(self, cmd_id: int, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        while cmd_id not in self._answers:
            line = self._next_line(timeout)
            self._answers[line["id"]] = line
        return self._answers.pop(cmd_id)

    def poll(self, cmd_id: int) -> dict[str, Any] | None:
        """The answer to ``cmd_id`` if it has arrived, without waiting."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return self._answers.pop(cmd_id, None)
            self._answers[line["id"]] = line

    def call(self, op: str, timeout: float = REPLY_TIMEOUT, **fields: Any) -> dict[str, Any]:
        return self.result(self.start(op, **fields), timeout)

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def rejected(self) -> dict[str, int]:
        counts: dict[str, int] = self.stats()["rejected"]
        return counts

    def deliveries(self, peer: str | None = None) -> list[dict[str, Any]]:
        """What the compute actor was handed (Deliveries and Gaps), from ``peer`` or all."""
        log: list[dict[str, Any]] = self.stats()["deliveries"]
        return [
            d for d in log if peer is None or d.get("peer", d.get("gap", {}).get("peer")) == peer
        ]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """End the process: EOF on stdin first, then SIGKILL; always reaped."""
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


@pytest.fixture
def zctx() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Any]:
    """Start node processes on 127.0.0.1; every one is stopped and reaped at the end."""
    started: list[NodeProcess] = []

    def start(node_id: str, peers: list[str]) -> NodeProcess:
        node = NodeProcess(node_id, peers, tmp_path)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()
