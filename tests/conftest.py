"""Shared fixtures: the real audit samples in tests/data, and the fake Kubernetes API.

Tests that need a tool (Alertmanager, kubectl, Lua) skip where it is missing; with
AUDITWATCH_REQUIRE_TOOLS=1 (set by .ci/run, which installs them) such a skip fails instead, so
CI cannot pass by silently not running them. The real control-plane suite
(tests/test_real_cluster.py) is one of them: .ci/run builds kube-apiserver and sets
$AUDITWATCH_KUBE_APISERVER. Only the test against a cluster of the user's own
(AUDITWATCH_REAL_CLUSTER, tests/test_operator.py) may skip there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.kubefake.fixtures import kube_fake
from tests.sample_data import SAMPLES

__all__ = ["kube_fake"]

SKIPS_ALLOWED_IN_CI = ("needs a real cluster: set AUDITWATCH_REAL_CLUSTER=1",)


@pytest.fixture(scope="session")
def samples() -> Path:
    """tests/data/audit-samples: real events from real clusters (see its README for provenance)."""
    if not SAMPLES.is_dir():
        pytest.fail(f"the audit samples are missing: expected them at {SAMPLES}")
    return SAMPLES


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if (
        os.environ.get("AUDITWATCH_REQUIRE_TOOLS") == "1"
        and report.skipped
        and not any(allowed in str(report.longrepr) for allowed in SKIPS_ALLOWED_IN_CI)
    ):
        report.outcome = "failed"
        report.longrepr = f"skipped where every tool should be installed: {report.longrepr}"
