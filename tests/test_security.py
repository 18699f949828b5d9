"""CURVE security: key files, the ZAP policy, and secure nodes over real sockets."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq
import zmq.auth
from zmq.utils import z85

import actors._node
from actors import (
    Actor,
    Delivery,
    DeliveryFailed,
    Node,
    NodeConfig,
    NodeSpec,
    Topology,
    load_security,
    open_node,
)
from transport import (
    Incarnation,
    LinkSeq,
    LocalProtocolError,
    NodeId,
    SenderConfig,
    Socket,
    StreamId,
    StreamSeq,
    dealer_socket,
    encode,
)
from transport.frames import (
    Data,
)
from transport.security import (
    KeyFileError,
    Security,
    ZapPolicy,
    generate_key_pair,
    read_key_pair,
    read_public_key,
    secret_key_path,
    write_key_pair,
)

# --- key files ---------------------------------------------------------------------------


def test_written_keys_read_back_and_the_secret_file_is_owner_only(tmp_path: Path) -> None:
    pair = generate_key_pair()
    public_path, secret_path = write_key_pair(tmp_path, "n1", pair)
    assert os.stat(secret_path).st_mode & 0o777 == 0o600
    assert read_public_key(public_path) == pair.public
    assert read_key_pair(secret_path) == pair
    assert pair.secret not in repr(pair)
    # zmq.auth reads our files too (the czmq certificate format).
    assert zmq.auth.load_certificate(secret_path) == (
        pair.public.encode(),
        pair.secret.encode(),
    )


def test_keys_are_not_overwritten_by_accident(tmp_path: Path) -> None:
    write_key_pair(tmp_path, "n1", generate_key_pair())
    with pytest.raises(FileExistsError):
        write_key_pair(tmp_path, "n1", generate_key_pair())
    # Replacing a secret file that had been opened up makes it owner-only again.
    secret_key_path(tmp_path, "n1").chmod(0o644)
    fresh = generate_key_pair()
    write_key_pair(tmp_path, "n1", fresh, overwrite=True)
    assert secret_key_path(tmp_path, "n1").stat().st_mode & 0o777 == 0o600
    assert read_key_pair(secret_key_path(tmp_path, "n1")) == fresh
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n1.key", "n1.key_secret"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_secret_key_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    _, secret_path = write_key_pair(tmp_path, "n1", generate_key_pair())
    os.chmod(secret_path, mode)
    with pytest.raises(KeyFileError, match=r"accessible by others .*chmod 600"):
        read_key_pair(secret_path)


def test_malformed_key_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.key_secret"
    path.write_text('curve\n    public-key = "short"\n')
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="Z85"):
        read_key_pair(path)
    one, other = generate_key_pair(), generate_key_pair()
    path.write_text(f'    public-key = "{one.public}"\n    secret-key = "{other.secret}"\n')
    with pytest.raises(KeyFileError, match="does not belong"):
        read_key_pair(path)
    with pytest.raises(KeyFileError, match="no such"):
        read_key_pair(tmp_path / "missing.key_secret")


def test_two_nodes_may_not_share_a_key() -> None:
    mine, theirs = generate_key_pair(), generate_key_pair()
    with pytest.raises(KeyFileError, match="same public key"):
        Security(mine, {"a": theirs.public, "b": theirs.public})


# --- the ZAP policy (pure) ---------------------------------------------------------------


def _zap_request(
    key: bytes, *, mechanism: bytes = b"CURVE", domain: bytes = b"cellmesh"
) -> list[bytes]:
    return [b"1.0", b"7", domain, b"10.0.0.9", b"", mechanism, key]


def test_zap_admits_peer_keys_as_their_node_and_refuses_the_rest() -> None:
    a, stranger = generate_key_pair(), generate_key_pair()
    policy = ZapPolicy({"a": a.public})
    ok = policy.decide(_zap_request(z85.decode(a.public.encode())))
    assert ok.reply == [b"1.0", b"7", b"200", b"OK", b"a", b""]
    assert (ok.node, ok.reason) == ("a", None)
    raw_stranger = z85.decode(stranger.public.encode())
    refused = [
        policy.decide(_zap_request(raw_stranger)),
        policy.decide(_zap_request(b"", mechanism=b"NULL")),
        policy.decide(_zap_request(raw_stranger, domain=b"other")),
        policy.decide(_zap_request(b"short")),
        policy.decide([b"2.0", b"7"]),
    ]
    assert [d.reason for d in refused] == [
        "unknown-key",
        "mechanism",
        "domain",
        "malformed",
        "malformed",
    ]
    assert refused[0].key == stranger.public
    assert refused[0].reply is not None
    assert refused[0].reply[2] == b"400"
    assert refused[-1].reply is None
    stats = policy.statistics()
    assert stats.admitted == 1
    assert stats.refused == {"unknown-key": 1, "mechanism": 1, "domain": 1, "malformed": 2}


# --- secure nodes over real sockets ------------------------------------------------------


class Recorder(Actor[Any, Any]):
    def __init__(self, seen: list[Any]) -> None:
        self.seen = seen

    async def receive(self, msg: Any) -> Any:
        assert isinstance(msg, Delivery)
        self.seen.append((msg.peer, msg.payload))
        return len(msg.payload)


Keys = dict[str, Any]


def make_keys(*names: str) -> Keys:
    return {name: generate_key_pair() for name in names}


def security_of(keys: Keys, me: str, *peers: str) -> Security:
    return Security(keys[me], {p: keys[p].public for p in peers})


FAST = NodeConfig(sender=SenderConfig(retry_timeout=0.05, retry_ceiling=0.2))


@asynccontextmanager
async def secure_pair(
    keys: Keys, seen: list[Any], b_hears: tuple[str, ...] = ("a",)
) -> AsyncIterator[tuple[Node, Node]]:
    """Node a sends to node b; b admits the keys of ``b_hears``."""
    async with (
        open_node(
            "b",
            bind="tcp://127.0.0.1:*",
            peers=dict.fromkeys(b_hears),
            compute=lambda: Recorder(seen),
            security=security_of(keys, "b", *b_hears),
            config=FAST,
        ) as b,
        open_node(
            "a",
            bind="tcp://127.0.0.1:*",
            peers={"b": b.endpoint},
            security=security_of(keys, "a", "b"),
            config=FAST,
        ) as a,
    ):
        yield a, b


async def wait_until(check: Callable[[], bool], seconds: float = 10.0) -> None:
    # Counters of another thread's doing (libzmq's handshakes): polled, bounded.
    with trio.fail_after(seconds):
        while not check():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_secure_nodes_exchange_encrypted_and_authenticated() -> None:
    seen: list[Any] = []
    keys = make_keys("a", "b")
    with trio.fail_after(20):
        async with secure_pair(keys, seen) as (a, b):
            acks = [await a.send("b", f"m{i}".encode()) for i in range(50)]
            assert [ack.result for ack in acks] == [2] * 10 + [3] * 40
            assert seen == [("a", f"m{i}".encode()) for i in range(50)]
            sec = b.statistics().security
            assert sec.secure
            assert sec.admitted >= 1
            assert sec.refused == {}


async def test_plaintext_node_warns_loudly(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once per process: as if no node of this test process had warned yet.
    monkeypatch.setattr(actors._node, "_plaintext_warned", False)
    monkeypatch.delenv("CELLMESH_PLAINTEXT_WARNED", raising=False)
    with caplog.at_level(logging.WARNING, logger="cellmesh.security"):
        async with open_node("solo", bind="tcp://127.0.0.1:*") as node:
            assert not node.statistics().security.secure
    assert any("UNAUTHENTICATED" in r.getMessage() for r in caplog.records)


async def test_security_must_cover_every_peer() -> None:
    keys = make_keys("a", "b")
    with pytest.raises(LocalProtocolError, match=r"no public key for peers \['c'\]"):
        async with open_node(
            "a",
            bind="tcp://127.0.0.1:*",
            peers={"b": None, "c": None},
            security=security_of(keys, "a", "b"),
        ):
            pass


async def wait_refused(node: Node, reason: str, seconds: float = 10.0) -> int:
    await wait_until(lambda: node.statistics().security.refused.get(reason, 0) > 0, seconds)
    return node.statistics().security.refused[reason]


async def test_plaintext_peer_is_refused_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Any] = []
    keys = make_keys("a", "b")
    with trio.fail_after(20), caplog.at_level(logging.WARNING, logger="cellmesh.security"):
        async with (
            secure_pair(keys, seen) as (a, b),
            # The same node id, no keys: its messages must never arrive.
            open_node("a", bind="tcp://127.0.0.1:*", peers={"b": b.endpoint}) as plain,
        ):
            handle = plain.send_nowait("b", b"sneaky", timeout=1.0)
            assert await wait_refused(b, "plaintext") >= 1
            # The secure link still works alongside.
            assert (await a.send("b", b"real")).result == 4
            with pytest.raises(DeliveryFailed) as failed:
                await handle.wait()
            assert not failed.value.held
        assert seen == [("a", b"real")]
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]


async def test_unknown_key_is_refused_by_zap_and_counted() -> None:
    seen: list[Any] = []
    keys = make_keys("a", "b", "mallory")
    with trio.fail_after(20):
        async with secure_pair(keys, seen) as (a, b):
            # Knows b's public key (it is public) but has a key b never heard of.
            mallory = Security(keys["mallory"], {"b": keys["b"].public})
            async with open_node(
                "a", bind="tcp://127.0.0.1:*", peers={"b": b.endpoint}, security=mallory
            ) as m:
                handle = m.send_nowait("b", b"let me in", timeout=1.0)
                assert await wait_refused(b, "unknown-key") >= 1
                with pytest.raises(DeliveryFailed) as failed:
                    await handle.wait()
                assert not failed.value.held
            assert (await a.send("b", b"still fine")).result == 10
    assert seen == [("a", b"still fine")]


def _data_from(node: str, payload: bytes) -> list[Any]:
    frame = Data(
        NodeId(node),
        Incarnation(1),
        LinkSeq(1),
        StreamId("default"),
        StreamSeq(1),
        StreamSeq(1),
        None,
        payload,
        LinkSeq(1),
    )
    return encode(frame)


async def test_a_known_key_claiming_another_node_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[Any] = []
    keys = make_keys("a", "b", "c")
    with trio.fail_after(20), caplog.at_level(logging.WARNING, logger="cellmesh.security"):
        async with secure_pair(keys, seen, b_hears=("a", "c")) as (a, b):
            assert (await a.send("b", b"first")).result == 5
            # c holds a key b admits, but claims to be a: by the routing id it
            # sets and in the frames themselves.
            ctx = zmq.Context()
            try:
                c_keys = keys["c"]
                evil: Socket = dealer_socket(
                    ctx,
                    routing_id=b"a",
                    curve_serverkey=keys["b"].public.encode(),
                    curve_publickey=c_keys.public.encode(),
                    curve_secretkey=c_keys.secret.encode(),
                )
                async with evil:
                    evil.connect(b.endpoint)
                    for i in range(20):
                        await evil.send_multipart(_data_from("a", f"forged {i}".encode()))
                    count = await wait_refused(b, "impersonation")
                    await wait_until(lambda: b.statistics().security.refused["impersonation"] == 20)
                    assert count >= 1
                    # Claiming a's routing id took nothing from a: on a secure
                    # node routing ids are the ROUTER's, and answers follow keys.
                    assert (await a.send("b", b"second")).result == 6
                    assert b.statistics().inbound.unroutable == 0
            finally:
                ctx.destroy(linger=0)
    assert seen == [("a", b"first"), ("a", b"second")]
    # Twenty forgeries, one log line.
    claims = [r for r in caplog.records if "claim to be 'a'" in r.getMessage()]
    assert len(claims) == 1


async def test_a_client_pinning_the_wrong_server_key_never_connects() -> None:
    seen: list[Any] = []
    keys = make_keys("a", "b", "impostor")
    with trio.fail_after(20):
        async with open_node(
            "b",
            bind="tcp://127.0.0.1:*",
            peers={"a": None},
            compute=lambda: Recorder(seen),
            security=security_of(keys, "b", "a"),
        ) as b:
            # a believes b's key is the impostor's: the handshake fails.
            wrong = Security(keys["a"], {"b": keys["impostor"].public})
            async with open_node(
                "a", bind="tcp://127.0.0.1:*", peers={"b": b.endpoint}, security=wrong
            ) as a:
                handle = a.send_nowait("b", b"x", timeout=1.0)
                assert await wait_refused(b, "handshake-failed") >= 1
                with pytest.raises(DeliveryFailed) as failed:
                    await handle.wait()
                assert not failed.value.held
    assert seen == []


# --- keyed topologies ---------------------------------------------------------------------


def test_load_security_reads_the_secret_file_and_the_peers_from_the_topology(
    tmp_path: Path,
) -> None:
    keys = make_keys("a", "b", "c")
    for name, pair in keys.items():
        write_key_pair(tmp_path, name, pair)
    topo = Topology.build(
        [NodeSpec(n, f"tcp://127.0.0.1:{5601 + i}") for i, n in enumerate(keys)],
        [("a", "b"), ("b", "c")],
    )
    with pytest.raises(KeyFileError, match="no public_key for 'b'"):
        load_security(topo, "a", tmp_path)
    keyed = topo.with_public_keys({n: k.public for n, k in keys.items()})
    sec = load_security(keyed, "b", tmp_path)
    assert sec.keys == keys["b"]
    assert dict(sec.peers) == {"a": keys["a"].public, "c": keys["c"].public}
    swapped = keyed.with_public_keys({"b": keys["a"].public, "a": keys["b"].public})
    with pytest.raises(KeyFileError, match="does not match"):
        load_security(swapped, "b", tmp_path)


# --- limits against an admitted but misbehaving peer ---------------------------------------


def test_one_session_per_peer_identity_however_many_incarnations_it_claims() -> None:
    from transport import LinkReceiver, ReceiverConfig

    core = LinkReceiver(
        NodeId("b"), Incarnation(1), config=ReceiverConfig(window=8, max_entries=16)
    )
    now = 0.0
    for incarnation in range(1, 1001):
        # Each new incarnation floods far past the window as well.
        for seq in (1, 2, 500):
            frame = Data(
                NodeId("a"),
                Incarnation(incarnation),
                LinkSeq(seq),
                StreamId("s"),
                StreamSeq(seq),
                StreamSeq(1),
                None,
                b"x",
                LinkSeq(1),
            )
            core.receive_frame(NodeId("a"), frame, now)
        now += 0.001
        core.poll(now)
        core.frames_to_send(now)
        core.take_events()
    stats = core.statistics()
    assert len(stats.sessions) == 1
    [session] = stats.sessions
    assert session.incarnation == 1000
    # Only the two messages inside the window are held; the far one was refused.
    assert session.held == 2
    assert session.retry_later_sent == 1
    assert stats.sessions_ended == 999


async def test_without_a_zap_handler_a_secure_router_admits_nobody() -> None:
    from zmq.utils.monitor import parse_monitor_message

    from transport import ZmqNetwork

    keys = make_keys("a", "b")
    server = ZmqNetwork(security=security_of(keys, "b", "a"))
    client = ZmqNetwork(security=security_of(keys, "a", "b"))
    try:
        with trio.fail_after(20):
            router = server.router()
            monitor = server.monitor(router)
            dealer = client.dealer(b"a", peer="b")
            async with router, monitor, dealer:
                dealer.connect(router.bind("tcp://127.0.0.1:*"))
                # The right keys, but nobody answers ZAP: the handshake fails.
                event = parse_monitor_message(await monitor.recv_multipart())
                assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                with pytest.raises(trio.WouldBlock):
                    router.recv_multipart_nowait()
                # Once a handler serves ZAP, the same client gets in, as "a",
                # when it redials after the stalled handshake (HANDSHAKE_IVL).
                policy = ZapPolicy({"a": keys["a"].public})
                async with server.zap_socket() as zap, trio.open_nursery() as nursery:

                    async def serve_zap() -> None:
                        while True:
                            rid, empty, *request = await zap.recv_multipart()
                            reply = policy.decide(request).reply
                            assert reply is not None
                            await zap.send_multipart([rid, empty, *reply])

                    nursery.start_soon(serve_zap)
                    # IMMEDIATE: the send waits for a completed (admitted) connection.
                    await dealer.send_multipart([b"hello"])
                    user, parts = await _recv_authenticated(router)
                    # Known by its key; the routing id is the ROUTER's own pick.
                    assert (user, parts[1:]) == ("a", [b"hello"])
                    assert parts[0] != b"a"
                    nursery.cancel_scope.cancel()
                assert policy.statistics().admitted >= 1
    finally:
        client.close()
        server.close()


async def _recv_authenticated(sock: Socket) -> tuple[str | None, list[bytes]]:
    while True:
        try:
            return sock.recv_authenticated_nowait()
        except trio.WouldBlock:
            await sock.wait_ready()
