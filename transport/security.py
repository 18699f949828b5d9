"""CURVE keys and the ZAP policy of a secure node (docs/security.md).

Apart from the top-level face because a plaintext node never needs them and a
secure one needs them together: make and store key pairs, build the
:class:`Security` a node runs with, decide who may connect.
"""

from __future__ import annotations

from ._security import (
    CurveKeyPair,
    KeyFileError,
    Security,
    ZapDecision,
    ZapPolicy,
    ZapStatistics,
    generate_key_pair,
    public_key_path,
    read_key_pair,
    read_public_key,
    secret_key_path,
    write_key_pair,
)

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
