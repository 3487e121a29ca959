"""Paths and helpers the test modules import (tests/ is on sys.path through pytest's pythonpath).

Kept apart from conftest.py: several folders have a conftest.py, and `from conftest import ...`
would bind to whichever of them was imported first.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
SOULRAY = str(Path(sys.executable).parent / "soulray")


def shared_path(relative: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (the real corpora live in ../shared/data beside the repo)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
