"""An in-process fake Kubernetes apiserver for running the real kopf operator in tests."""

from tests.kubefake.kopfrun import fast_settings, run_kopf
from tests.kubefake.server import KubeFake, RecordedRequest
from tests.kubefake.store import JSON_PATCH, MERGE_PATCH, KubeApiError, ResourceType, Store

__all__ = [
    "JSON_PATCH",
    "MERGE_PATCH",
    "KubeApiError",
    "KubeFake",
    "RecordedRequest",
    "ResourceType",
    "Store",
    "fast_settings",
    "run_kopf",
]
