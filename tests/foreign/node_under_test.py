"""A real cellmesh node in its own process, driven over stdin/stdout by the foreign-peer tests.

This is the only file of ``tests/foreign`` that imports cellmesh. It opens one node with
``open_node`` and a compute actor whose behaviour the payload chooses, so that a foreign peer
can provoke every answer of docs/protocol.md §1 (ACK, ACK with a result, ERR, RECEIVED):

- a map ``{"op": "reject", "code": c, "detail": d}`` raises ``Reject(c, d)`` (ERR c);
- ``{"op": "crash"}`` raises ``RuntimeError`` (ERR 1, COMPUTE_FAILED);
- ``{"op": "sleep", "s": x}`` sleeps ``x`` seconds, then answers ACK with result ``"slept"``
  (slower than ``received_delay``: RECEIVED first);
- ``{"op": "none"}`` answers ACK without a result;
- anything else is echoed: ACK with the payload as its result.

Commands are JSON lines on stdin, each with an ``id``; every answer is one JSON line on stdout
with the same ``id``. Commands run concurrently, so ``stats`` answers while a ``send`` waits.

- ``{"op": "stats"}``: the node's counters, the reasons it refused input under (codec and
  protocol, summed), what the compute actor was handed, and the node's limits;
- ``{"op": "send", "peer": p, "payloads": [...], "stream": s, "timeout": t}``: one
  ``send_nowait`` per payload (waiting for the window first), then the outcome of each;
- ``{"op": "send_batch", "peer": p, "payloads": [...], "stream": s, "timeout": t}``: one
  ``send_batch_nowait`` and its outcomes;
- ``{"op": "state", "peer": p}``: the link's liveness.

Payload values in JSON stand for themselves; ``{"$bytes": hex}`` stands for a byte string.
The first line written is ``{"ready": endpoint, "incarnation": n}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
from typing import Any

import trio

from actors import (
    Ack,
    Actor,
    Delivery,
    DeliveryFailed,
    Gap,
    Node,
    NodeConfig,
    PeerError,
    Reject,
    open_node,
)


def to_json(value: Any) -> Any:
    """A JSON-able picture of a payload or a statistics value."""
    if isinstance(value, bytes | bytearray | memoryview):
        if len(value) > 1024:
            # Big buffers are the size tests' padding: their length is what matters.
            return {"$len": len(value)}
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, enum.Enum):
        return to_json(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return repr(value)


def from_json(value: Any) -> Any:
    """The payload a JSON value stands for."""
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return bytes.fromhex(value["$bytes"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


class Recorder(Actor[Any, Any]):
    """The compute actor: records every Delivery and Gap, then acts as the payload says."""

    def __init__(self, log: list[dict[str, Any]]) -> None:
        self._log = log

    async def receive(self, msg: Any) -> Any:
        if isinstance(msg, Gap):
            self._log.append({"gap": to_json(msg)})
            return None
        assert isinstance(msg, Delivery)
        self._log.append(
            {
                "peer": msg.peer,
                "stream": msg.stream,
                "stream_seq": msg.stream_seq,
                "seq": msg.seq,
                "item": msg.item,
                "frame_no": msg.frame_no,
                "payload": to_json(msg.payload),
            }
        )
        payload = msg.payload
        if isinstance(payload, dict) and "op" in payload:
            op = payload["op"]
            if op == "reject":
                raise Reject(payload["code"], payload.get("detail", ""))
            if op == "crash":
                raise RuntimeError("crash requested by the payload")
            if op == "sleep":
                await trio.sleep(payload["s"])
                return payload.get("result", "slept")
            if op == "none":
                return None
        return payload


def outcome(result: Any) -> dict[str, Any]:
    if isinstance(result, Ack):
        return {
            "ack": to_json(result.result),
            "seq": result.seq,
            "stream_seq": result.stream_seq,
            "attempts": result.attempts,
        }
    if isinstance(result, PeerError):
        return {"err": result.code, "detail": result.detail}
    if isinstance(result, DeliveryFailed):
        return {"failed": str(result), "held": result.held}
    return {"other": repr(result)}


async def send_all(node: Node, cmd: dict[str, Any]) -> dict[str, Any]:
    peer = cmd["peer"]
    stream = cmd.get("stream", "default")
    timeout = cmd.get("timeout", 10.0)
    payloads = [from_json(p) for p in cmd["payloads"]]
    if cmd["op"] == "send_batch":
        await node.wait_window(peer)
        batch = node.send_batch_nowait(peer, payloads, stream=stream, timeout=timeout)
        return {"outcomes": [outcome(o) for o in await batch.wait()]}
    handles = []
    for payload in payloads:
        await node.wait_window(peer)
        handles.append(node.send_nowait(peer, payload, stream=stream, timeout=timeout))
    outcomes = []
    for handle in handles:
        try:
            outcomes.append(outcome(await handle.wait()))
        except (PeerError, DeliveryFailed) as exc:
            outcomes.append(outcome(exc))
    return {"outcomes": outcomes}


def stats(node: Node, log: list[dict[str, Any]]) -> dict[str, Any]:
    snapshot = node.statistics()
    rejected: dict[str, int] = {}
    for counts in (snapshot.inbound.rejected, snapshot.inbound.protocol.rejected):
        for reason, n in counts.items():
            rejected[str(reason)] = rejected.get(str(reason), 0) + n
    return {
        "rejected": rejected,
        "deliveries": log,
        "statistics": to_json(snapshot),
        "limits": to_json(NodeConfig().limits),
    }


async def serve(node: Node, log: list[dict[str, Any]]) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""

    def reply(answer: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()

    async def run(cmd: dict[str, Any]) -> None:
        op = cmd["op"]
        if op == "stats":
            answer = stats(node, log)
        elif op in ("send", "send_batch"):
            answer = await send_all(node, cmd)
        elif op == "state":
            answer = {"state": to_json(node.state(cmd["peer"]))}
        else:
            answer = {"error": f"unknown op {op!r}"}
        reply({"id": cmd["id"], **answer})

    async with trio.open_nursery() as nursery:
        while True:
            chunk = await stdin.receive_some(65536)
            if not chunk:
                nursery.cancel_scope.cancel()
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                nursery.start_soon(run, json.loads(line))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--id", required=True)
    parser.add_argument("--bind", required=True)
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="ID[=ENDPOINT]",
        help="a configured peer; with an endpoint this node also sends to it",
    )
    opts = parser.parse_args()
    peers: dict[str, str | None] = {}
    for spec in opts.peer:
        name, _, endpoint = spec.partition("=")
        peers[name] = endpoint or None
    log: list[dict[str, Any]] = []
    async with open_node(
        opts.id, bind=opts.bind, peers=peers, compute=lambda: Recorder(log)
    ) as node:
        ready = {"ready": node.endpoint, "incarnation": node.statistics().incarnation}
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        await serve(node, log)


if __name__ == "__main__":
    trio.run(main)
