"""The ``cellmesh`` command line."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    """Run the ``cellmesh`` command line; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="cellmesh", description=__doc__)
    parser.parse_args(argv)
    parser.print_help()
    return 0
