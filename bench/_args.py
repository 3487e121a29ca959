"""Argparse types the bench scripts share: a bad value is a usage error (exit 2, naming the
option), not a traceback minutes into a run.

The scripts import it as `_args` inside main(): run as `python bench/X.py`, bench/ is
sys.path[0]; a test that loads a script's module by path never calls main().
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _number(kind: type, low: float, strict: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


positive_int = _number(int, 0, True, "a positive integer")
non_negative_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a positive number")
non_negative_float = _number(float, 0.0, False, "a number >= 0")


def existing_file(text: str) -> Path:
    """A path that names a file (an input read later in the run)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no file at {text}")
    return path


def existing_dir(text: str) -> str:
    """A path that names a directory (an export, a prepared run's data), kept as the text given
    (the scripts pass it on as a str, and some dump their arguments as JSON)."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no directory at {text}")
    return text
