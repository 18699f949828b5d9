"""CURVE keys, key files, and the ZAP decisions of a secure node.

ZeroMQ's CURVE mechanism (RFC 26) encrypts every connection and proves that
each side holds the secret key of the public key it shows. It does not decide
*who* may connect: a CURVE server asks a ZAP handler (RFC 27) for each new
connection, and with no handler at all it admits any key. So a secure node
sets ``ZAP_ENFORCE_DOMAIN`` (no handler means no connection, design.md §5) and
runs its own handler, whose decisions live here as a pure function of the
request: :class:`ZapPolicy`. It admits only the public keys of the node's
peers and names each admitted connection by its node id, the ZAP ``User-Id``
that libzmq then attaches to every message of that connection. That id, not
the routing id the peer chose, is who a message is from.

Key files use the ZPL certificate format of czmq and ``zmq.auth``
(``<name>.key`` holds the public key, ``<name>.key_secret`` both), so keys made
by ``cellmesh keys`` work with those tools and the other way round. A secret
key file must be readable by its owner only, as ssh insists for its keys.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import zmq
from zmq.utils import z85

__all__ = [
    "CurveKeyPair",
    "KeyFileError",
    "Security",
    "ZapDecision",
    "ZapPolicy",
    "ZapStatistics",
    "generate_key_pair",
    "public_key_path",
    "read_key_pair",
    "read_public_key",
    "secret_key_path",
    "write_key_pair",
]

#: The ZAP domain of every secure cellmesh ROUTER.
ZAP_DOMAIN: Final = b"cellmesh"

# Z85 alphabet (ZeroMQ RFC 32); a CURVE key is 32 bytes = 40 Z85 characters.
_Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_LINE = re.compile(r'\s*(public-key|secret-key)\s*=\s*"([^"]*)"\s*')
# A key file is a few hundred bytes; anything much larger is not one.
_MAX_KEY_FILE = 64 * 1024


class KeyFileError(ValueError):
    """A key is malformed, or a key file is missing, unreadable or too open."""


def check_z85_key(key: object, where: str = "key") -> str:
    """Return ``key`` if it is a 40-character Z85 CURVE key.

    Raises:
        KeyFileError: it is not.
    """
    if not isinstance(key, str) or _Z85_KEY.fullmatch(key) is None:
        raise KeyFileError(f"{where}: not a 40-character Z85 CURVE key: {key!r:.60}")
    return key


@dataclass(frozen=True, slots=True)
class CurveKeyPair:
    """One node's CURVE key pair, both halves as 40-character Z85 text.

    The secret half never appears in ``repr`` (logs, tracebacks).
    """

    public: str
    secret: str = field(repr=False)

    def __post_init__(self) -> None:
        check_z85_key(self.public, "public key")
        check_z85_key(self.secret, "secret key")
        derived = zmq.curve_public(self.secret.encode()).decode()
        if derived != self.public:
            raise KeyFileError("the public key does not belong to the secret key")


def generate_key_pair() -> CurveKeyPair:
    """A new random key pair (libzmq's ``zmq_curve_keypair``)."""
    public, secret = zmq.curve_keypair()
    return CurveKeyPair(public.decode(), secret.decode())


def public_key_path(directory: str | os.PathLike[str], name: str) -> Path:
    """Where :func:`write_key_pair` puts ``name``'s public key: ``DIR/name.key``."""
    return Path(directory) / f"{name}.key"


def secret_key_path(directory: str | os.PathLike[str], name: str) -> Path:
    """Where :func:`write_key_pair` puts ``name``'s secret key: ``DIR/name.key_secret``."""
    return Path(directory) / f"{name}.key_secret"


def write_key_pair(
    directory: str | os.PathLike[str], name: str, pair: CurveKeyPair, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``name.key`` (public) and ``name.key_secret`` (owner-only) into ``directory``.

    The secret file is created with mode 0600 from the start, never widened
    later, so no other user can read it even for a moment.

    Args:
        directory: an existing folder.
        name: the node id (the file names).
        pair: the keys to write.
        overwrite: replace existing files; by default an existing key is an
            error, so a cluster's keys are not replaced by accident.

    Returns:
        The public and the secret file's paths.

    Raises:
        FileExistsError: a file exists and ``overwrite`` is False.
        OSError: the folder is missing or not writable.
    """
    if "/" in name or name in ("", ".", ".."):
        raise KeyFileError(f"{name!r} cannot name a key file")
    public_path = public_key_path(directory, name)
    secret_path = secret_key_path(directory, name)
    header = f"#   cellmesh CURVE key of node {name!r}\n"
    public_text = f'{header}metadata\ncurve\n    public-key = "{pair.public}"\n'
    secret_text = (
        f"{header}#   SECRET: keep this file readable by its owner only (mode 0600).\n"
        f'metadata\ncurve\n    public-key = "{pair.public}"\n    secret-key = "{pair.secret}"\n'
    )
    if not overwrite:
        for path in (secret_path, public_path):
            if path.exists():
                raise FileExistsError(f"{path} exists")
    for path, text, mode in ((secret_path, secret_text, 0o600), (public_path, public_text, 0o644)):
        # A new file with its final mode, renamed into place: an existing
        # (perhaps more open) file is never rewritten in place.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(text)
            if overwrite:
                os.replace(tmp, path)
            else:
                # link() fails if the name was taken meanwhile: never replaces.
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return public_path, secret_path


def _read_keys(path: Path) -> dict[str, str]:
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    if len(raw) > _MAX_KEY_FILE:
        raise KeyFileError(f"{path}: over {_MAX_KEY_FILE} bytes, not a key file")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not a text key file") from None
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = _LINE.fullmatch(line)
        if match is None:
            continue
        kind, value = match.groups()
        if kind in keys:
            raise KeyFileError(f"{path}:{number}: a second {kind}")
        keys[kind] = check_z85_key(value, f"{path}:{number}")
    return keys


def read_public_key(path: str | os.PathLike[str]) -> str:
    """The public key in a key file (``.key`` or ``.key_secret``).

    Raises:
        KeyFileError: missing, unreadable, or holding no valid public key.
    """
    keys = _read_keys(Path(path))
    if "public-key" not in keys:
        raise KeyFileError(f"{path}: no public-key line")
    return keys["public-key"]


def read_key_pair(path: str | os.PathLike[str]) -> CurveKeyPair:
    """Load a node's key pair from its secret key file.

    Refuses a file that the group or others may read or write, with a message
    saying how to fix it: a secret that others can read is no secret.

    Raises:
        KeyFileError: missing, too open, malformed, or the halves do not match.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"{p}: no such secret key file") from None
    if not stat.S_ISREG(mode):
        raise KeyFileError(f"{p}: not a regular file")
    if mode & 0o077:
        raise KeyFileError(
            f"{p}: secret key file is accessible by others (mode {stat.S_IMODE(mode):04o}); "
            f"run `chmod 600 {p}` or make new keys with `cellmesh keys`"
        )
    keys = _read_keys(p)
    if "secret-key" not in keys or "public-key" not in keys:
        raise KeyFileError(f"{p}: a secret key file needs public-key and secret-key lines")
    return CurveKeyPair(keys["public-key"], keys["secret-key"])


@dataclass(frozen=True, slots=True)
class Security:
    """What a node needs to run encrypted and authenticated.

    Attributes:
        keys: this node's own key pair: its ROUTER's server key and its
            DEALERs' client key.
        peers: node id -> public key, for every peer the node talks to. The
            node pins these when it connects (a DEALER accepts only a server
            with that key) and admits only these when peers connect to it.

    Raises:
        KeyFileError: a key is malformed, or two nodes share a key (then the
            key would not tell them apart).
    """

    keys: CurveKeyPair
    peers: Mapping[str, str]

    def __post_init__(self) -> None:
        owners: dict[str, str] = {self.keys.public: "this node"}
        for node, key in self.peers.items():
            check_z85_key(key, f"public key of {node!r}")
            if key in owners:
                raise KeyFileError(f"{node!r} has the same public key as {owners[key]!r}")
            owners[key] = node


@dataclass(frozen=True, slots=True)
class ZapDecision:
    """What :meth:`ZapPolicy.decide` answered to one ZAP request.

    Attributes:
        reply: the ZAP reply frames (without the ROUTER envelope), or None
            when the request was too malformed to answer (libzmq never sends
            such a thing; nothing else can reach the inproc endpoint).
        node: the admitted node id, or None.
        reason: why it was refused (``"unknown-key"``, ``"mechanism"``,
            ``"domain"``, ``"malformed"``), or None when admitted.
        key: the client's public key in Z85, when the request had one.
        address: the client's IP address as libzmq reported it.
    """

    reply: list[bytes] | None
    node: str | None
    reason: str | None
    key: str | None
    address: str


@dataclass(frozen=True, slots=True)
class ZapStatistics:
    """Counters of a :class:`ZapPolicy`."""

    admitted: int
    refused: dict[str, int]


class ZapPolicy:
    """Decides ZAP requests: CURVE clients whose key belongs to a known peer get in.

    Pure: no sockets, no clock. The actor that owns the ZAP socket feeds it
    each request and sends back the reply.

    Args:
        peers: node id -> Z85 public key of every node to admit.
        domain: the only ZAP domain served (the node's ROUTER sets it).
    """

    def __init__(self, peers: Mapping[str, str], *, domain: bytes = ZAP_DOMAIN) -> None:
        self._by_key: dict[bytes, str] = {
            z85.decode(key.encode()): node for node, key in peers.items()
        }
        self._domain = domain
        self._admitted = 0
        self._refused: dict[str, int] = {}

    def decide(self, request: Sequence[bytes]) -> ZapDecision:
        """Answer one ZAP request (RFC 27 frames, envelope removed)."""
        if len(request) < 6 or request[0] != b"1.0":
            return self._refuse(None, "malformed", None, "")
        version, request_id, domain, address, _identity, mechanism, *credentials = request
        where = address.decode("ascii", "replace")[:64]
        if mechanism != b"CURVE":
            return self._refuse(request_id, "mechanism", None, where)
        if len(credentials) != 1 or len(credentials[0]) != 32:
            return self._refuse(request_id, "malformed", None, where)
        key = z85.encode(credentials[0]).decode()
        if domain != self._domain:
            return self._refuse(request_id, "domain", key, where)
        node = self._by_key.get(credentials[0])
        if node is None:
            return self._refuse(request_id, "unknown-key", key, where)
        self._admitted += 1
        reply = [version, request_id, b"200", b"OK", node.encode(), b""]
        return ZapDecision(reply, node, None, key, where)

    def _refuse(
        self, request_id: bytes | None, reason: str, key: str | None, address: str
    ) -> ZapDecision:
        self._refused[reason] = self._refused.get(reason, 0) + 1
        reply = None
        if request_id is not None:
            reply = [b"1.0", request_id, b"400", reason.encode(), b"", b""]
        return ZapDecision(reply, None, reason, key, address)

    def statistics(self) -> ZapStatistics:
        """A snapshot of the counters."""
        return ZapStatistics(admitted=self._admitted, refused=dict(self._refused))
