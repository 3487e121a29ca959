"""Every benchmark script answers --help (a user's first call) without running anything."""

from __future__ import annotations

import subprocess
import sys

import pytest
from soulray_testing import ROOT

# the scripts (serve_soak.py is a module serve_load.py imports)
SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if "__main__" in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_exits_0_and_shows_usage(script) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")


def test_every_bench_script_is_checked() -> None:
    assert len(SCRIPTS) >= 14  # a rename that empties the glob must not pass silently
