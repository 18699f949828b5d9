"""Topology: the TOML file, validation errors, the tile grid, launcher ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors._topology import (
    NodeSpec,
    Topology,
    TopologyError,
    check_endpoint,
    node_id_from_env,
    tile_node_id,
)

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"

EXAMPLE = f"""
[[node]]
id = "n1"
endpoint = "tcp://10.0.0.1:5601"
public_key = "{KEY}"
neighbours = ["n2"]

[[node]]
id = "n2"
endpoint = "ipc:///tmp/cellmesh/n2.sock"

[[node]]
id = "n3"
endpoint = "tcp://[::1]:5603"

[[link]]
a = "n3"
b = "n2"

[[link]]
a = "n2"
b = "n1"
"""


def _port(r: int, c: int) -> str:
    return f"tcp://127.0.0.1:{5600 + 10 * r + c}"


def test_load_example(tmp_path: Path) -> None:
    path = tmp_path / "topo.toml"
    path.write_text(EXAMPLE)
    topo = Topology.load(path)
    assert topo.ids == ("n1", "n2", "n3")
    assert topo.node("n1") == NodeSpec("n1", "tcp://10.0.0.1:5601", KEY)
    assert topo.node("n2").public_key is None
    assert topo.neighbours_of("n2") == ("n1", "n3")
    assert topo.neighbours_of("n1") == ("n2",)
    assert topo.peers_of("n2") == {"n1": "tcp://10.0.0.1:5601", "n3": "tcp://[::1]:5603"}
    assert topo.peers_of("n3") == {"n2": "ipc:///tmp/cellmesh/n2.sock"}
    assert topo.endpoint_of("n3") == "tcp://[::1]:5603"
    assert topo.rank_of("n3") == 2
    assert topo.link_pairs() == (("n1", "n2"), ("n2", "n3"))
    assert "n1" in topo
    assert "n9" not in topo
    assert len(topo) == 3


def test_dumps_round_trips(tmp_path: Path) -> None:
    topo = Topology.loads(EXAMPLE)
    path = tmp_path / "out.toml"
    topo.save(path)
    again = Topology.load(path)
    assert again == topo
    assert again.peers_of("n2") == topo.peers_of("n2")
    odd = Topology.build([NodeSpec('we"ird\\id ü', "ipc:///tmp/a b"), NodeSpec("x", _port(0, 1))])
    odd = Topology.build(odd.nodes, [(odd.ids[0], "x")])
    assert Topology.loads(odd.dumps()) == odd


@settings(max_examples=25, deadline=None)
@given(ty=st.integers(1, 7), tx=st.integers(1, 7))
def test_from_grid_adjacency(ty: int, tx: int) -> None:
    topo = Topology.from_grid(ty, tx, _port)
    assert topo.ids == tuple(tile_node_id(r, c) for r in range(ty) for c in range(tx))
    for r in range(ty):
        for c in range(tx):
            me = tile_node_id(r, c)
            expected = {
                tile_node_id(r + dy, c + dx)
                for dy in (-1, 0, 1)
                for dx in (-1, 0, 1)
                if (dy, dx) != (0, 0) and 0 <= r + dy < ty and 0 <= c + dx < tx
            }
            assert set(topo.neighbours_of(me)) == expected
            assert topo.peers_of(me) == {n: topo.endpoint_of(n) for n in expected}
    assert Topology.loads(topo.dumps()) == topo


def test_from_grid_corner_edge_inner_counts() -> None:
    topo = Topology.from_grid(3, 4, _port)
    assert len(topo.neighbours_of("t0-0")) == 3
    assert len(topo.neighbours_of("t2-3")) == 3
    assert len(topo.neighbours_of("t0-1")) == 5
    assert len(topo.neighbours_of("t1-0")) == 5
    assert len(topo.neighbours_of("t1-1")) == 8
    assert len(topo.neighbours_of("t1-2")) == 8
    assert Topology.from_grid(1, 1, _port).neighbours_of("t0-0") == ()
    assert Topology.from_grid(1, 3, _port).neighbours_of("t0-1") == ("t0-0", "t0-2")
    named = Topology.from_grid(2, 1, _port, node_id_for=lambda r, c: f"row{r}")
    assert named.link_pairs() == (("row0", "row1"),)
    with pytest.raises(TopologyError, match=">= 1 row"):
        Topology.from_grid(0, 2, _port)


NODE_A = '[[node]]\nid = "a"\nendpoint = "tcp://127.0.0.1:5601"\n'
NODE_B = '[[node]]\nid = "b"\nendpoint = "tcp://127.0.0.1:5602"\n'


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (NODE_A + NODE_A.replace("5601", "5602"), "duplicate node id 'a'"),
        (NODE_A + NODE_B.replace("5602", "5601"), "share endpoint"),
        (NODE_A + NODE_B + '[[link]]\na = "a"\nb = "c"\n', "unknown node 'c'; known: a, b"),
        (NODE_A + 'neighbours = ["zz"]\n' + NODE_B, "unknown node 'zz'"),
        (NODE_A + NODE_B + '[[link]]\na = "b"\nb = "b"\n', "'b' is linked to itself"),
        (NODE_A + 'neighbours = ["a"]\n', "'a' is linked to itself"),
        (NODE_A + NODE_B + '[[link]]\na = "a"\n', "needs both 'a' and 'b'"),
        (NODE_A + "endpont = 'x'\n", r"unknown key\(s\) \['endpont'\]"),
        (NODE_A + '[[links]]\na = "a"\nb = "b"\n', r"top level: unknown key\(s\) \['links'\]"),
        ('[[node]]\nid = "a"\n', "missing 'endpoint'"),
        ('[[node]]\nendpoint = "ipc:///x"\n', "missing 'id'"),
        ('[[node]]\nid = 3\nendpoint = "ipc:///x"\n', "id: must be a string"),
        ('[[node]]\nid = ""\nendpoint = "ipc:///x"\n', "must not be empty"),
        ('[[node]]\nid = " a"\nendpoint = "ipc:///x"\n', "whitespace"),
        (NODE_A + 'public_key = "short"\n', "40-character Z85"),
        (NODE_A + "neighbours = 'b'\n", "neighbours must be a list"),
        ('node = "a"\n', "array of tables"),
        ("", "no \\[\\[node\\]\\] tables"),
        ("[[node]\n", "not valid TOML"),
    ],
)
def test_load_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(TopologyError, match=match) as info:
        Topology.load(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://127.0.0.1:1", "tcp://node-7.cluster.local:65535", "tcp://[fe80::1%eth0]:5600"],
)
def test_good_endpoints(endpoint: str) -> None:
    assert check_endpoint(endpoint) == endpoint


@pytest.mark.parametrize(
    ("endpoint", "match"),
    [
        ("tcp://127.0.0.1:0", "port in 1..65535"),
        ("tcp://127.0.0.1:65536", "port in 1..65535"),
        ("tcp://127.0.0.1:http", "port in 1..65535"),
        ("tcp://127.0.0.1:*", "port in 1..65535"),
        ("tcp://*:5600", "wildcard can be bound, not connected to"),
        ("tcp://127.0.0.1", "must be tcp://host:port or ipc://path"),
        ("udp://127.0.0.1:5600", "must be tcp://host:port or ipc://path"),
        ("inproc://x", "must be tcp://host:port or ipc://path"),
        ("ipc://", "needs a path"),
        (5600, "must be a string"),
    ],
)
def test_bad_endpoints(endpoint: object, match: str) -> None:
    with pytest.raises(TopologyError, match=match):
        check_endpoint(endpoint)
    with pytest.raises(TopologyError, match=match):
        NodeSpec("a", endpoint)  # type: ignore[arg-type]


def test_in_code_validation_and_lookup_errors() -> None:
    with pytest.raises(TopologyError, match="linked to itself"):
        Topology.build([NodeSpec("a", _port(0, 1))], [("a", "a")])
    with pytest.raises(TopologyError, match="linked to itself"):
        Topology((NodeSpec("a", _port(0, 1)),), frozenset({frozenset({"a"})}))
    with pytest.raises(TopologyError, match="over 256 UTF-8 bytes"):
        NodeSpec("é" * 129, _port(0, 1))
    topo = Topology.build([NodeSpec("a", _port(0, 1))])
    for lookup in (topo.node, topo.endpoint_of, topo.peers_of, topo.neighbours_of, topo.rank_of):
        with pytest.raises(TopologyError, match="unknown node 'b'; known: a"):
            lookup("b")


def test_node_id_from_env_order_and_mapping() -> None:
    topo = Topology.from_grid(2, 2, _port)
    assert node_id_from_env({}, topo) is None
    assert node_id_from_env({"CELLMESH_NODE_ID": ""}, topo) is None
    assert node_id_from_env({"SLURM_PROCID": "2"}, topo) == "t1-0"
    assert node_id_from_env({"PMI_RANK": "3"}, topo) == "t1-1"
    assert node_id_from_env({"PMIX_RANK": "1"}, topo) == "t0-1"
    assert node_id_from_env({"OMPI_COMM_WORLD_RANK": "0"}, topo) == "t0-0"
    # The explicit id wins over every rank; SLURM wins over the MPI variables
    # (an MPI job inside an allocation has both, and they agree).
    everything = {
        "CELLMESH_NODE_ID": "t1-1",
        "SLURM_PROCID": "0",
        "PMI_RANK": "1",
        "PMIX_RANK": "2",
        "OMPI_COMM_WORLD_RANK": "2",
    }
    assert node_id_from_env(everything, topo) == "t1-1"
    del everything["CELLMESH_NODE_ID"]
    assert node_id_from_env(everything, topo) == "t0-0"
    del everything["SLURM_PROCID"]
    assert node_id_from_env(everything, topo) == "t0-1"
    del everything["PMI_RANK"]
    assert node_id_from_env(everything, topo) == "t1-0"
    # Without a topology a rank is its own id.
    assert node_id_from_env({"PMI_RANK": "5"}) == "5"
    assert node_id_from_env({"CELLMESH_NODE_ID": "anything"}) == "anything"


def test_node_id_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_PROCID", "PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CELLMESH_NODE_ID", "from-env")
    assert node_id_from_env() == "from-env"


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"SLURM_PROCID": "4"}, "SLURM_PROCID=4 but the topology has 4 nodes"),
        ({"PMI_RANK": "-1"}, "not a non-negative integer"),
        ({"PMIX_RANK": "one"}, "not a non-negative integer"),
        ({"CELLMESH_NODE_ID": "t9-9"}, "not in the topology"),
    ],
)
def test_node_id_from_env_errors(env: dict[str, str], match: str) -> None:
    with pytest.raises(TopologyError, match=match):
        node_id_from_env(env, Topology.from_grid(2, 2, _port))
