"""The two sides of every protocol failure, after h11's split.

A :class:`RemoteProtocolError` means the *peer* (or the network) sent
something we cannot accept: it is counted and answered, never a crash.
A :class:`LocalProtocolError` means *this program* misused the API: the
message says what to do instead.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of the protocol errors."""


class RemoteProtocolError(ProtocolError):
    """Bytes or frames from the network violate the wire protocol.

    ``reason`` is a short stable token (``"truncated"``, ``"too-large"``,
    ``"unknown-kind"``, ...) used as the key when rejections are counted.
    """

    def __init__(self, message: str, *, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class LocalProtocolError(ProtocolError):
    """The caller used the API in a way the protocol cannot honour."""
