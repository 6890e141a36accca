"""Fixtures for runtime tests."""

from __future__ import annotations

import pytest
from runtime_helpers import Journal


@pytest.fixture
def journal() -> Journal:
    return Journal()
