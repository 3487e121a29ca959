"""Fixtures for the serving tests: a tiny random export with the layout `soulray train` writes."""

from __future__ import annotations

import pytest

from soulray.serve.tiny import build_tiny_export


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """Export-shaped directory (strategy tags on) with a LoRA adapter in adapter/."""
    return build_tiny_export(tmp_path_factory.mktemp("export"), adapter=True)


@pytest.fixture(scope="session")
def tiny_model(tiny_export):
    from soulray.serve.generate import load_model

    return load_model(str(tiny_export), None, "auto")
