"""Shared fixtures. Every test starts with no ANTHROPIC_* or CONVO_* variables set."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("ANTHROPIC_", "CONVO_")) and name != "CONVO_TEST_POSTGRES_URL":
            monkeypatch.delenv(name, raising=False)
