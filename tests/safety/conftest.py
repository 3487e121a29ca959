"""Fixtures for the crisis-screen tests: one screen per session (the embedding model loads once),
and a terminal summary of every recall / false-positive measurement."""

from __future__ import annotations

import pytest

from soulray.config import SafetyConfig
from soulray.safety.screen import build_screen

_LINES: list[str] = []


@pytest.fixture(scope="session")
def screen():
    return build_screen(SafetyConfig())


@pytest.fixture(scope="session")
def safety_report():
    """Record a measurement; all of them are printed in the run's terminal summary."""
    return _LINES.append


def pytest_terminal_summary(terminalreporter):
    if _LINES:
        terminalreporter.section("crisis screen: recall and false-positive rates")
        for line in _LINES:
            terminalreporter.write_line(line)
