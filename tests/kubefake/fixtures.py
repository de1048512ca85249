"""Pytest fixtures of the fake apiserver (imported into conftest.py by the coordinator)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from tests.kubefake.server import KubeFake


@pytest_asyncio.fixture
async def kube_fake() -> AsyncIterator[KubeFake]:
    """A running fake apiserver; the test fails if the fake itself crashed on some request."""
    async with KubeFake() as fake:
        yield fake
    assert not fake.errors, f"kubefake failed internally: {fake.errors!r}"
