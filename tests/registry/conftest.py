"""Fixtures for the registry tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty $ADAPTERHUB_HOME."""
    path = tmp_path / "home"
    monkeypatch.setenv("ADAPTERHUB_HOME", str(path))
    return path
