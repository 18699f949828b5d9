"""cellmesh's runtime: actors, supervision, and the node that links peers."""

from __future__ import annotations

__all__: list[str] = []
