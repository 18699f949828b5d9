"""The MUSTs of docs/protocol.md §11 that no narrower test file checks.

Each test names the rule it checks; the table in §11 maps every MUST to its
test. Real sockets on 127.0.0.1 where only the real wire can show the rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq

from actors import (
    open_node,
)
from transport import (
    PROTOCOL_VERSION,
    decode,
    router_socket,
)
from transport.frames import (
    Hello,
)
from transport.testing import (
    MemoryNetwork,
)

Ctx = zmq.Context[zmq.Socket[bytes]]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ctx() -> Iterator[Ctx]:
    context: Ctx = zmq.Context()
    yield context
    context.destroy(linger=0)


async def test_dealer_routing_id_is_the_node_id_and_there_is_no_delimiter(ctx: Ctx) -> None:
    # §11.1: a DEALER whose routing id is the node id in UTF-8, no delimiter
    # part; §5.5: a new link with nothing to send opens with a HELLO request,
    # which carries this node's version (§5.7).
    router = router_socket(ctx)
    try:
        endpoint = router.bind("tcp://127.0.0.1:*")
        with trio.fail_after(10):
            async with open_node("nœud-1", bind="tcp://127.0.0.1:*", peers={"b": endpoint}):
                parts: list[Any] = await router.recv_multipart()
        routing_id, header, *rest = parts
        assert routing_id == "nœud-1".encode()
        assert rest == []
        assert header != b""
        hello = decode([header])
        assert type(hello) is Hello
        assert (hello.node, hello.reply, hello.version) == ("nœud-1", False, PROTOCOL_VERSION)
    finally:
        router.close()


async def test_each_start_of_a_node_gets_a_greater_incarnation() -> None:
    # §11.1: every process start gets an incarnation greater than all earlier
    # ones of its node id (the reference takes time.time_ns() at start).
    net = MemoryNetwork()
    seen = []
    for _ in range(3):
        async with open_node("a", bind="mem://a", network=net) as a:
            seen.append(a.incarnation)
    assert seen == sorted(seen)
    assert len(set(seen)) == 3


def test_every_must_of_section_11_names_tests_that_exist() -> None:
    # protocol.md §11.4 maps each MUST of §11.1 and §11.2 (S1.., R1..) to its
    # tests: every MUST has a row, and every test a row names is defined.
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    section = text[text.index("### 11.1") : text.index("### 11.4")]
    table = text[text.index("### 11.4") :]
    musts = re.findall(r"^- ([SR]\d+):", section, flags=re.MULTILINE)
    rows = dict(re.findall(r"^\| (\S+|§11\.3[^|]*?) \| (.+) \|$", table, flags=re.MULTILINE))
    assert len(musts) == 20
    assert set(musts) <= set(rows)
    named = re.findall(r"`([\w/]+\.py)(?:::(\w+))?`", "\n".join(rows.values()))
    assert len(named) > len(musts)
    for path, name in named:
        source = (ROOT / "tests" / path).read_text(encoding="utf-8")
        if name:
            assert re.search(rf"^(async )?def {name}\(", source, flags=re.MULTILINE), (path, name)
