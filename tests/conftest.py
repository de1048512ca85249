"""Shared fixtures: the real audit samples beside the repository, and the fake Kubernetes API."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.kubefake.fixtures import kube_fake

__all__ = ["kube_fake"]

SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "audit-samples"


@pytest.fixture(scope="session")
def samples() -> Path:
    """../shared/audit-samples: real events from real clusters (read-only)."""
    if not SAMPLES.is_dir():
        pytest.fail(f"the audit samples are missing: expected them at {SAMPLES}")
    return SAMPLES
