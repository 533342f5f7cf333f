"""Argument types shared by the command-line front ends (cli.py, server/, bench.py)."""

import argparse


class UsageError(Exception):
    """The command line is wrong (a missing or clashing option): `nprerank` exits with code 2."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, else a usage error (exit 2) that quotes what was given."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value
