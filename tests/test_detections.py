"""The shipped detections (examples/detections/) catch what they say, and stay quiet next to it.

Every detection is evaluated over one corpus: the real audit logs of tests/data/audit-samples
plus the hand-written events of tests/detection_events/ (real API shapes for what the samples
lack, including near-misses). Each test names exactly which events fire, so a detection that
starts firing on a near-miss, or stops firing on an attack, fails loudly. Both evaluators run:
the vectorised one over a normalised batch (what the server does) and `reference.matches` per
event (the language's meaning); they must agree on every event.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from tests.sample_data import SAMPLES

from auditwatch import paths
from auditwatch.config.build import build_alert, build_stream, check_stream
from auditwatch.config.model import StreamSpec
from auditwatch.decode import decode_file
from auditwatch.groups import GroupedTracker
from auditwatch.normalise import normalise
from auditwatch.rules.ast import Expr, Not, Rule, conjunction
from auditwatch.rules.evaluate import compile_rule
from auditwatch.rules.parse import parse_rule
from auditwatch.rules.plan import PlanAlert, StreamPlan
from auditwatch.rules.reference import matches
from auditwatch.sources import gke_event

REPO = Path(__file__).resolve().parent.parent
DETECTIONS_DIR = REPO / "examples" / "detections"
STREAM_FILE = REPO / "examples" / "cluster" / "kube-audit-stream.yaml"
DOCS = REPO / "docs" / "detections.md"
EVENTS_DIR = Path(__file__).resolve().parent / "detection_events"
SAMPLES_DIR = SAMPLES
SAMPLE_LOGS = sorted(SAMPLES_DIR.glob("*.log"))

SEVERITIES = {"info", "low", "medium", "high", "critical"}

HAND_WRITTEN = {
    "secret-get-by-developer": "aacf876d-75cb-4ee3-987b-22c0b8d75ed6",
    "secret-list-by-ci-serviceaccount": "6d54b10b-40ab-4fee-a168-fb839d5db84d",
    "secret-get-by-controller-manager": "69cfd3f2-7e70-4249-a209-7df4232a5534",
    "secret-get-by-kubelet": "4244dc48-a3fb-4752-9b91-ea90e6682e1c",
    "secret-get-denied-for-developer": "316e67e2-561e-494a-aa7b-b6da82db36f5",
    "secret-get-not-found": "3bf6de82-3341-485c-beb1-6fe3271a8dfe",
    "secret-created-by-developer": "0297f8d2-708b-4e20-a7f1-f0d67e413605",
    "sa-token-secret-created-by-token-controller": "23075750-33e8-42d2-aaa0-6fb59f1188d9",
    "sa-token-secret-created-by-developer": "7bf7da10-e1b5-4aa9-b08f-d41a40bf6faf",
    "secret-deleted-by-ci-serviceaccount": "b943f1c8-5037-4bab-a175-7a71f184d3c1",
    "secret-created-in-kube-system-by-developer": "ab88b81d-8b20-475a-b28d-1cc2d4b160b1",
    "pod-created-unprivileged": "336c55df-0ee3-4a93-b944-5de2234f20dc",
    "pod-privileged-init-container": "ae9abe26-5859-4eb8-8c6c-0ccd5f008de5",
    "pod-privileged-init-container-dry-run": "6296ad31-f1cc-4f6c-8f40-5470831ffea7",
    "pod-privileged-denied-by-pod-security": "9fed35aa-a5e3-4689-aa29-97c53995cd13",
    "pod-host-pid": "850c5e80-e0a5-4dbc-b15f-3baf06c09d2b",
    "pod-host-ipc": "a2e55aae-1a9b-46ca-b6b9-cbe52e6ffa1d",
    "pod-hostpath-proc": "84343f10-e843-46aa-ac8e-6f0f830cbf37",
    "pod-hostpath-data-and-localtime": "188f6a53-ef64-4f0c-8f94-9faf57265300",
    "pod-hostpath-kubelet-pki-subdir": "008fa6cc-0bf2-43eb-872b-71d937305b3b",
    "pod-kube-system-by-daemonset-controller": "e9b4a13b-828e-4d18-87ba-5359ee2b636a",
    "pod-kube-system-by-developer": "cd37a6f0-d69d-4de3-8411-ce906b12ea6c",
    "pod-kube-system-by-stolen-controller-token": "c2f4a6e8-1b3d-4f5a-9c7e-0d2b4f6a8c10",
    "pod-kube-system-eks-aws-node-by-daemonset-controller": "0e8d6c4a-2f1b-4d3e-a5c7-9b8a7f6e5d41",
    "pod-binding-by-scheduler-kube-system": "7f4fb96d-e495-4cef-82ec-74a9bf0ec1ff",
    "pod-attach": "f96fa4b0-b03c-4d86-bec8-caca2e5af2f0",
    "pod-exec-websocket-get": "c744e154-5eba-4a29-884e-65ad35cb9ed2",
    "pod-exec-websocket-get-forbidden": "5d0e2b7a-91c4-4f3e-8a6b-2c7d9e1f0a34",
    "pod-exec-spdy-create-after-websocket-refused": "8a3f6c1e-47b2-4d95-b0e8-3f1a2c4d5e67",
    "pod-log-read": "96830711-4c42-4ef0-b801-804f02f6c626",
    "pod-portforward": "007774b3-2191-4103-841c-f6fa1d5ddbb3",
    "pod-debug-privileged-ephemeral-container": "3f257d90-c183-4c5f-b7bf-60e46b3e189a",
    "daemonset-privileged-hostnetwork-docker-sock": "86a8cd30-dfc3-40e6-8033-252cf5148ddb",
    "deployment-created-unprivileged": "13c0a117-6341-4a85-8c72-f89bd83623d7",
    "deployment-created-dry-run": "c122ab2b-a95a-49ea-b539-b31b9792c94f",
    "deployment-create-already-exists": "4ff16ea6-1895-4c45-8284-546c3049870b",
    "deployment-patched-privileged": "15a3f9ba-a831-4de2-9e79-f5f8467650a3",
    "deployment-deleted": "6a4f1eaf-72c6-4c3c-9ecd-ecd85931345d",
    "deployment-status-update-by-controller": "1a97d688-58fd-4539-a0a0-3d0c523aeb2f",
    "cronjob-host-pid": "f5281798-a90e-4a90-a738-a91dac975e77",
    "statefulset-host-ipc-etc-kubernetes": "f5b4e6b3-d2d4-4e88-8e9f-bc6bb126cb3e",
    "clusterrole-wildcard-verbs": "4310b258-7216-49bf-8d40-eb2081ef3113",
    "role-wildcard-resources": "e6e6e2e3-089f-4480-8cae-622ceb16119d",
    "clusterrole-read-only": "fbcf725c-5022-457d-9802-dd249bd21f13",
    "clusterrole-write-privileges": "a707b0bb-4f5a-4680-8afa-5d1b281fc271",
    "clusterrole-pod-exec": "274cbf53-eb9e-4d82-b3a5-d30fd21e99c9",
    "role-pod-exec-in-namespace": "44e2e2e7-b8f8-43b3-8c0b-c9126a2572ec",
    "system-role-kube-system-patched": "ee731e21-ecfc-4b4c-8319-36d3e8cdbefc",
    "clusterrole-aggregated-admin-updated": "e14c556f-bb9a-4a5b-9741-6a1245abab60",
    "system-clusterrole-node-patched": "3084c3f1-1bf5-4919-a1fd-3ca8e549f90a",
    "system-clusterrole-coredns-updated": "a1ee0614-72fb-4e3a-8e80-1e24ec56f012",
    "system-clusterrole-deleted": "61ed7d90-fcd3-423e-a882-becd7b000f07",
    "system-clusterrole-read": "e2ca47d5-c2ae-4332-92ca-e996807af789",
    "rolebinding-to-cluster-admin": "1afbc12f-ab2e-4952-a8f3-e68793f6fc4b",
    "clusterrolebinding-to-view": "45221ec2-6ffc-47c9-b5d3-0b47c6daaa6d",
    "clusterrolebinding-deleted": "5e365eff-2233-4a7b-b7cb-92012d06fef0",
    "service-nodeport-created": "a9ae29f5-aabe-4503-a6fb-79ab75b9842e",
    "service-clusterip-created": "4ec6bf43-02e0-4c3f-8342-512cd0119663",
    "service-patched-to-nodeport": "4b67b25e-3eab-49fc-8492-23e4a82c66ae",
    "service-deleted": "4db3c11f-7bfa-41ff-a58d-7582e4b7a454",
    "configmap-aws-keys": "1d025c1b-d8b2-4890-9767-57239f1ad29a",
    "configmap-password-key-updated": "4b091c28-2ea0-4cdc-9f6b-8f731096cd3d",
    "configmap-password-inside-file-applied": "eea7eeb4-76c5-477b-904a-deacb15bcfb3",
    "configmap-plain-settings": "8e3e3b39-242e-47a7-8c61-c7759780fb96",
    "configmap-root-ca-published": "93f1eab1-6a8b-4d29-a976-3da473677733",
    "configmap-deleted": "645c0db7-6a70-4872-b541-b805e3a40ddb",
    "configmap-aws-key-id-inside-json-patched": "0c7d2b9e-3f4a-4e61-9b2d-6a1f8e5c4d30",
    "configmap-private-key-updated": "5e1a7c42-9d8b-4f03-a6e5-2b7c9d1e0f84",
    "configmap-password-inside-env-file-patched": "a3f08d61-27c4-4b9e-8e15-7d6c5b4a3921",
    "configmap-passphrase-key-patched": "e8b4c2d0-6a15-4f7e-b3c9-0d2e1f4a5b67",
    "configmap-password-policy-applied": "71d9e3a5-0b2c-4d8f-9a6e-3c5b7d1f2e08",
    "configmap-private-key-dry-run": "2b6f4e8a-c1d3-4a57-8f90-e4d2c6b8a135",
    "configmap-public-key-and-key-id-docs": "9f3c5a17-e2b8-4d6c-a4f1-8b0e7d3c5a29",
    "namespace-created": "23e201bd-d6a2-4743-9b90-b9bcf324cf49",
    "namespace-deleted": "3c0b91c9-5ea8-433f-9b19-764fa0999404",
    "serviceaccount-default-created-by-controller": "ecd9ee01-7468-444b-91db-2b53876cada1",
    "serviceaccount-kube-system-by-controller-manager": "edf4829b-0cfd-449d-8208-2944cb6b5751",
    "serviceaccount-kube-system-by-developer": "16fd153a-0660-4e5b-92ce-899563b483f8",
    "serviceaccount-token-requested-kube-system": "64c0a67d-8541-426b-b624-3f488e8cdcb8",
    "serviceaccount-deleted": "cc171b6d-807d-49d2-afcf-a9a755e1266b",
    "anonymous-list-pods-allowed": "ddcf6c53-ac2a-4385-9fae-823e6525500f",
    "anonymous-healthz": "c5823969-f5d2-49bc-a80e-3d4d56922978",
    "anonymous-readyz-verbose": "c3d368b3-7418-4753-9cb6-7ac3e040afa3",
    "anonymous-version": "bfeca390-2c05-4259-a5ae-e547f7931310",
    "anonymous-list-secrets-forbidden": "a23a4528-01b4-4622-9af0-19065f53f0be",
    "ingress-without-tls": "3a7c9e1b-5d2f-4a6b-8c0e-1f3a5b7c9d02",
    "ingress-with-tls": "4b8d0f2c-6e3a-4b7c-9d1f-2a4b6c8d0e13",
    "ingress-without-tls-dry-run": "5c9e1a3d-7f4b-4c8d-ae20-3b5c7d9e1f24",
    "eks-ingress-without-tls": "6d0f2b4e-8a5c-4d9e-bf31-4c6d8e0f2a35",  # also RequestReceived
    "aks-ingress-without-tls": "7e1a3c5f-9b6d-4eaf-8042-5d7e9f1a3b46",  # aks-records.jsonl
    "aks-ingress-with-tls": "8f2b4d6a-0c7e-4fb0-9153-6e8f0a2b4c57",
    # peers.jsonl (eks-*: also RequestReceived; exec: ResponseStarted too), aks-peers.jsonl
    "clusterrole-nodes-proxy": "44e7ccad-1100-5c32-aba6-dbf1c45948c7",
    "eks-role-nodes-subresources": "9842f6cb-caf5-57fb-bac9-a7f8cbc71eae",
    "clusterrole-nodes-metrics": "dea3efef-a2e5-5729-a081-3fa57bd1ed64",
    "clusterrole-kubelet-api-admin-by-apiserver": "36677e14-313b-503f-b9f1-a2548997dc4d",
    "aks-role-nodes-proxy": "60b1524b-58aa-5c37-94c5-c736bdb49e7b",
    "mutatingwebhook-created": "26a060df-5b81-557d-9da6-fea894ca187d",
    "eks-validatingwebhook-deleted": "b996a94a-15d7-5807-b40f-0a1c6e7d4118",
    "validatingwebhook-cabundle-by-cainjector": "0827249b-6728-5fce-8d86-bcaf50cba239",
    "validatingwebhook-patched-by-cainjector-spoof": "fa13d172-b048-5074-ba59-d095c096c6e4",
    "mutatingwebhook-list": "34eb2e25-1549-542d-9c8c-ba301b00c463",
    "mutatingwebhook-dry-run": "e6f20361-5f5d-57c7-bde4-2bae9aa7f29d",
    "aks-mutatingwebhook-patched": "55ee4d16-2cfa-5ea4-8fdb-3f19694ad6d4",
    "csr-client-cert-by-developer": "ff533c30-e3b6-5232-91ca-3dde167ef356",
    "eks-csr-client-cert": "43517089-dd15-5f90-aaca-edcaa2c1d96b",
    "csr-kubelet-client-by-bootstrap": "8bbd0975-a87b-50b1-aa1a-432981bef7a1",
    "csr-kubelet-serving-by-node": "353a80ed-5aa0-5f94-8def-9242c9538d31",
    "csr-approved-by-admin": "83a137d0-13e9-55fa-be72-779ddada9e70",
    "aks-csr-client-cert": "1e65a6cb-d36e-5844-9208-402d1186b0b1",
    "cronjob-created": "3e644e99-023a-5c1f-a5a4-240ce7e4ea88",
    "eks-cronjob-patched": "ec329db0-721c-5927-9372-05a10e0febbc",
    "cronjob-status-by-controller": "a5937928-5713-5afd-9983-e470923b39f9",
    "job-created-by-cronjob-controller": "48a8ea8e-2ea4-5765-9af3-0c4928bdf73f",
    "cronjob-create-forbidden": "36ba5141-0daf-57d1-8e91-318ed523b6db",
    "aks-cronjob-created": "adbbd510-aaca-5fd0-aa69-65078f1fa85f",
    "daemonset-created": "ff61aab0-e439-5a6b-969e-1347a5b52886",
    "eks-daemonset-created": "714133ae-462d-5874-ae2f-3834ee112657",
    "daemonset-image-patched": "85622261-d0f8-5525-a9aa-8adbf1cfc76c",
    "daemonset-create-dry-run": "564f1166-5913-5db1-b16c-b2d3e2e7ac72",
    "aks-daemonset-created": "5603eda4-a816-55a0-9f61-dbb9a6409870",
    "pod-cap-sys-admin": "1ddc478a-a92a-5f55-9a1e-84472b9a1ebf",
    "deployment-cap-net-admin-patched": "bd2fe148-1791-5750-8586-a04b7d04f275",
    "eks-pod-cap-all": "0a18ee8b-291c-54ac-ae5d-5df9dc1b6ed7",
    "pod-cap-net-bind-service": "6079758d-e5ae-5fc5-aa44-7b0a014310a7",
    "pod-cap-drop-all": "b6549f7a-bdd7-5281-b6e6-d5a7155eb099",
    "aks-daemonset-cap-sys-ptrace": "8ab1b3c4-9dd6-5554-9e4c-b7f8e2de1a5e",
    "pod-exec-cat-sa-token": "779f5170-a4b9-55dd-bac0-7c73c31e00fc",
    "pod-exec-kubectl-cp-tar": "8b6d0c7e-f951-5bc6-a0d1-e579490d0b87",
    "eks-pod-exec-cat-irsa-token": "910d36cd-7842-57a7-893c-d9aacb9b137c",
    "pod-exec-cat-app-config": "823c563d-8667-5185-8210-6671e4f77577",
    "pod-exec-tar-forbidden": "f63d33c8-3e7b-5ccc-9243-0cb53e2b103e",
    "aks-pod-exec-cat-azure-token": "ab37c247-4ad7-5de8-a417-78326b154d3d",
    "eks-token-requested": "9f3e38ce-4308-5918-919d-afea58f8263d",
    "token-requested-by-kubelet": "f634456c-a3c1-54b0-8ea7-bd4590ba0c87",
    "token-request-forbidden": "b946d682-9d89-579a-8b63-a243a352c966",
    "aks-token-requested": "6e48cd2d-44b2-5723-a879-f37e199741f0",
    "secret-watch-all-by-developer": "65e99781-bafd-5ffe-8935-d3fbf649c771",
    "eks-secret-list-all": "e2509532-2186-5e8e-8f54-c03cc85c06a4",
    "secret-watch-all-by-ingress-nginx": "37ee59e3-e28d-51c9-af22-0ba4dbe45f32",
    "secret-list-all-by-controller-manager": "c8acc333-2342-5766-aac7-2ae1404a3bdc",
    "eks-secret-get-not-found": "27bfb559-c0f9-5056-9b83-57eac30aa3ff",
    "secret-get-not-found-by-cert-manager": "3ae42d87-b4e7-5ce7-a73c-88bc97fd861b",
    "secret-get-not-found-by-kube-system-controller": "738321d5-4dcb-5dec-995d-4ddc7e5b5c71",
    "aks-secret-list-all": "6027840f-05bc-5b92-9fd9-0ec4c6583e88",
    "aks-secret-get-not-found": "21a37e78-8bbf-5d03-aaa4-1a4f49ed5cd9",
    "token-secret-filled-by-token-controller": "58571d02-76fd-54b3-bf80-fa63d19c7937",
    "token-secret-created-by-token-controller": "92ea8a24-7cea-56c7-b9b6-1cfa2da3f418",
    "secret-updated-by-developer": "aa527f5a-867c-5e23-91b1-fa01121dd396",
    "eks-token-secret-filled": "97177b6e-ebaf-5d1f-a73a-4f14427d3933",
    "aks-token-secret-filled": "a3a3b185-289d-5bf3-88d9-a50a2e2d68b9",
    # peers.jsonl and aks-peers.jsonl: system principals by address, containers as root
    "node-credential-from-public-ip": "15abcf1c-f4a8-542f-9c5c-35d6f3215e3d",
    "node-credential-from-private-ip": "d6a9b43a-8582-5094-97fb-b18760533c5c",
    "scheduler-forwarded-for-public-ip": "614e64da-127b-581c-9de6-449a9f4b6bc9",
    "controller-manager-from-public-ipv6": "9b982e4f-210e-5312-97ea-c91cd759da4b",
    "bootstrap-token-from-ipv4-mapped-public-ip": "c1ca50cc-9f6e-5d1a-9fa1-43929bb6c106",
    "kube-system-sa-from-cgnat-and-link-local": "3133cb16-3ce8-556c-ad80-e15e99800e69",
    "kube-system-sa-from-ipv6-unique-local": "1b8e78a5-a271-58f4-b7ae-57a5ec650ca3",
    "lookalike-kube-system-sa-from-public-ip": "7ee84be4-8c1f-5a81-b49b-50154484d813",
    "kube-proxy-from-172-32": "96e5e43e-7c2e-5662-a7b6-fbff9d343533",
    "eks-node-credential-from-public-ip": "0f84bb90-9be5-5755-8a99-161714946ce5",
    "eks-node-from-private-ip": "79010797-843d-5458-9008-03ef19c8a966",
    "aks-kube-system-sa-from-public-ip": "7e8954f1-f182-5c47-a6c2-52d87a03cbcf",
    "aks-node-from-private-ip": "69815964-a5c7-50f7-bcba-584b6fdb83e5",
    "pod-run-as-user-0": "2e5183e0-2031-52b9-ba3e-b1a832b358eb",
    "pod-run-as-user-1000": "06576be4-8a4b-5290-884b-623373ec7295",
    "pod-run-as-user-0-dry-run": "fa593c15-8ffb-5cf5-ab31-ebc1deef363f",
    "deployment-run-as-non-root-false-patched": "a7fcdc22-d774-5498-bf8c-5c3eb9f2951f",
    "pod-debug-ephemeral-container-as-root": "b3b12564-08f5-5307-a11a-72094e7c7f44",
    "pod-run-as-root-by-replicaset-controller": "2f4dd654-f043-554e-b44e-af0f7be30860",
    "pod-run-as-root-by-stolen-replicaset-controller-token": "5417d65e-8bae-5f37-a73c-f35088fe80b6",
    "replicaset-run-as-root-by-deployment-controller": "140bed00-8733-57d1-b066-d0331f4f7009",
    "eks-job-init-container-run-as-root": "8696cdb9-a91f-5ad2-8802-d87c84f9ef63",
    "aks-cronjob-run-as-root": "1a50d196-814f-5807-8cc7-5d1886312679",
    "aks-deployment-run-as-non-root": "888d7529-80eb-5333-a7ba-a0baf61c2258",
}
"""The auditIDs of tests/detection_events/, by what each event is (tests name events this way)."""

CLOUD_DIR = Path(__file__).resolve().parent / "data" / "cloud"
GKE_ENTRIES = sorted(CLOUD_DIR.glob("gke-logentry-*.json"))
"""GKE Cloud Audit Logs entries (no stage, GKE's user names and status codes), in the corpus as
`sources.gke_event` maps them; labelled by file name (`gke-logentry-exec`)."""

LABEL_BY_AUDIT_ID = {audit_id: label for label, audit_id in HAND_WRITTEN.items()} | {
    orjson.loads(path.read_bytes())["insertId"]: path.stem for path in GKE_ENTRIES
}

# Real events from the samples, by auditID.
IMPERSONATION_403S = [  # impersonation-and-403s.log: every request refused with 403
    "033d17af-082d-4b24-aa22-627752e83d71",
    "d857fef6-5a24-4889-9597-ffbcb6108444",
    "0c0d86ba-4cbd-4e35-ba05-25df8e630bcb",
    "60006562-ced6-4178-ac95-e1a50225b012",
    "d7cd2b04-940b-42cb-ad2a-b4b8f937aa0e",
    "25de0e17-3586-40d9-bbba-e7c3334b9cdf",
    "524c5a19-63b0-4af8-acc7-bf75fdad18dc",
    "62684124-32b1-4c41-962f-1d80531b9fc9",
    "3f81cdbb-a594-4f63-9501-54d1d33a8b14",
    "99356a22-4c41-41c0-a86c-5356e1e9fcff",
    "4b814005-0bfa-4756-bf3e-3750de5b8769",
]
IMPERSONATED_SECRET_LIST_403 = "4b814005-0bfa-4756-bf3e-3750de5b8769"
IMPERSONATED_POD_LIST_200 = "719a5b90-e21b-44a2-94ec-67e16493dad6"
RECON_SECRET_LIST_403 = "a02486f1-3a7c-4bca-8bcb-9019fa43dac4"  # secret-recon-then-exec.log
RECON_EVENTS_LIST_403 = "24444640-7e57-4ac9-b7e8-c3bf5a2942d9"
RECON_EXEC = "927fcde7-74e5-4a57-af53-dceacefaf47c"  # ResponseStarted + ResponseComplete
RECON_ROLE_LIST = "8084daec-f59f-4d90-b343-f59f4f3cd67c"
MINIKUBE_EXEC = "57a794de-44d3-40ee-a0ad-c0eb096eef6c"  # pod-exec.log
MINIKUBE_PRIVILEGED_POD = "9ac5187c-29a2-4bf8-ba6e-21dc887f5d34"  # privileged-pod.log
SEKOIA_ADMIN_BINDINGS = [  # sekoia-mixed.log: two ClusterRoleBindings to cluster-admin
    "cc1dcb56-f0e4-4720-bad1-433ce652add7",
    "2028e1f9-4561-4668-9df4-bc0dcd3ae11b",
]
SEKOIA_PRIVILEGED_POD = "8cb523a6-0be6-4198-8886-ed4fa57bd375"
SEKOIA_HOSTNETWORK_POD = "762eda6e-4122-4997-9a87-ada5442d43d5"
SEKOIA_HOSTPATH_TMP_POD = "29480e0b-5b7a-43b0-8618-d5122aff5817"  # hostPath /tmp/testdir
SEKOIA_EXEC = "91afc40c-f1ef-4956-b85a-7e12d09511e9"
SEKOIA_POD_LIST = "bdeb089c-5d70-4776-b6af-88e739fb0dd5"
SEKOIA_SCALE_PATCH = "bbd6d83f-4b6d-4a3d-b3cd-840a0691c19f"


@dataclass(frozen=True)
class Detection:
    """One AuditAlert file of examples/detections/, parsed."""

    path: Path
    resource: dict[str, Any]
    rule: Rule
    unless: Expr | None
    """Its exceptions, the stream's trust lists resolved, as the operator runs them."""


def _load(path: Path) -> Detection:
    resource = yaml.safe_load(path.read_text())
    spec_rule = resource["spec"]["rule"]
    alert = check_stream(build_alert(resource, _no_secret), {"kube-audit": kube_audit_stream()})
    return Detection(
        path, resource, parse_rule(spec_rule["type"], spec_rule["config"]), alert.unless
    )


def _no_secret(namespace: str | None, name: str, key: str) -> str:
    return "placeholder"


@cache
def kube_audit_stream() -> StreamSpec:
    """The stream the detections watch, with its shipped trust lists."""
    (stream,) = [
        document
        for document in yaml.safe_load_all(STREAM_FILE.read_text())
        if document["kind"] == "AuditStream"
    ]
    return build_stream(stream, _no_secret)


DETECTION_FILES = sorted(p for p in DETECTIONS_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


@cache
def detections() -> dict[str, Detection]:
    return {path.stem: _load(path) for path in DETECTION_FILES}


@cache
def corpus() -> list[dict[str, Any]]:
    """Every sample and hand-written event, in file order, then the GKE entries mapped."""
    files = SAMPLE_LOGS + sorted(EVENTS_DIR.glob("*.jsonl"))
    gke = [gke_event(orjson.loads(path.read_bytes())) for path in GKE_ENTRIES]
    return [event for path in files for event in decode_file(path)] + gke


def label(event: dict[str, Any]) -> str:
    audit_id = str(event.get("auditID"))
    return LABEL_BY_AUDIT_ID.get(audit_id, audit_id)


@cache
def fired(name: str) -> list[str]:
    """Labels of the corpus events that detection `name` reports."""
    detection = detections()[name]
    condition = detection.rule.condition
    if detection.unless is not None:  # what is reported: the rule, less its exceptions
        condition = conjunction([condition, Not(detection.unless)])
    return fired_on(condition, name)


def fired_on(condition: Expr, name: str) -> list[str]:
    """Labels of the corpus events `condition` matches, checked by both evaluators."""
    events = corpus()
    batch = normalise(events, datetime(2025, 1, 1, tzinfo=UTC))
    vectorised = compile_rule(condition).evaluate(batch).to_pylist()
    per_event = [matches(condition, event) for event in events]
    disagreements = [
        label(e) for e, v, p in zip(events, vectorised, per_event, strict=True) if v != p
    ]
    assert not disagreements, f"{name}: evaluators disagree on {disagreements}"
    return [label(event) for event, hit in zip(events, per_event, strict=True) if hit]


def expect(name: str, fires: list[str], silent: list[str]) -> None:
    """`name` fires exactly once per event of `fires`, and on none of the near-misses `silent`."""
    known = {label(event) for event in corpus()}
    unknown = [s for s in fires + silent if s not in known]
    assert not unknown, f"not in the corpus: {unknown}"
    assert Counter(fired(name)) == Counter(fires)
    assert not set(silent) & set(fired(name))


# ---------------------------------------------------------------------------------------------
# The resources themselves


@pytest.mark.parametrize("path", DETECTION_FILES, ids=lambda p: p.stem)
def test_detection_resource_is_a_complete_auditalert(path: Path) -> None:
    detection = _load(path)
    resource = detection.resource
    metadata, spec = resource["metadata"], resource["spec"]
    assert resource["apiVersion"] == "auditwatch.dev/v1alpha1"
    assert resource["kind"] == "AuditAlert"
    assert metadata["name"] == path.stem
    assert metadata["labels"]["app.kubernetes.io/part-of"] == "auditwatch"
    assert metadata["labels"]["auditwatch.dev/severity"] == spec["severity"]
    assert spec["severity"] in SEVERITIES
    assert metadata["annotations"]["auditwatch.dev/description"].strip()
    assert "\n" not in metadata["annotations"]["auditwatch.dev/description"]
    assert metadata["annotations"]["auditwatch.dev/falco-rule"].strip()
    assert spec["stream"] == "kube-audit"
    assert spec["targets"] == []
    assert spec["resolveAfter"] == "5m"


@pytest.mark.parametrize("path", DETECTION_FILES, ids=lambda p: p.stem)
def test_message_fields_exist_in_the_events_that_fire(path: Path) -> None:
    """A typo in a message placeholder would render as nothing in every notification."""
    hits = [e for e in corpus() if matches(detections()[path.stem].rule.condition, e)]
    assert hits
    for name in re.findall(r"\{([^{}]+)\}", detections()[path.stem].resource["spec"]["message"]):
        assert any(paths.lookup(event, name) for event in hits), f"{{{name}}} never resolves"


def test_every_detection_is_listed_in_kustomization_and_docs() -> None:
    kustomization = yaml.safe_load((DETECTIONS_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in DETECTION_FILES]
    docs = DOCS.read_text()
    assert [p.name for p in DETECTION_FILES if f"`{p.name}`" not in docs] == []


def test_every_test_named_in_the_docs_exists() -> None:
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", DOCS.read_text()))
    assert len(named) >= len(DETECTION_FILES)
    assert sorted(n for n in named if n not in globals()) == []


# ---------------------------------------------------------------------------------------------
# Secrets

# Trusted infrastructure (tests/detection_events/trusted-infrastructure.jsonl): each add-on is
# trusted for what its job needs, by the kube-audit stream's shipped trust list.
CERT_MANAGER_GET_IN_TEAM_A = "3ed47648-6035-5ac4-9910-aafcf24a4c88"
KUBE_STATE_METRICS_LIST = "8fbcbd82-bc49-5e6a-a15b-0c5a6e4203a2"
KUBE_STATE_METRICS_GET = "3f7bf79a-f632-5234-ae85-1d927aef9717"  # it only ever lists
ARGOCD_SERVER_GET_IN_ARGOCD = "2236e579-e188-554c-8b3f-ce8f5cc60732"
ARGOCD_SERVER_GET_IN_PAYMENTS = "91394b87-f5c8-5b78-8a2d-256dd05810a4"  # outside its namespace
SPOOFED_CERT_MANAGER_IN_TEAM_A = "3822318a-5518-5087-88f1-ec99fb05bf34"  # same name, not it
AUDITWATCH_GET_REFERENCED = "1cc240ac-ce40-5548-96dc-d2e4a8162624"
TRUSTED_DOING_THEIR_JOB = [
    CERT_MANAGER_GET_IN_TEAM_A,
    KUBE_STATE_METRICS_LIST,
    ARGOCD_SERVER_GET_IN_ARGOCD,
    AUDITWATCH_GET_REFERENCED,
]
TRUSTED_BEYOND_THEIR_JOB = [
    KUBE_STATE_METRICS_GET,
    ARGOCD_SERVER_GET_IN_PAYMENTS,
    SPOOFED_CERT_MANAGER_IN_TEAM_A,
]


def test_secret_read() -> None:
    expect(
        "k8s-secret-read",
        fires=[
            "secret-get-by-developer",
            "secret-list-by-ci-serviceaccount",
            "eks-secret-list-all",
            "aks-secret-list-all",
            "gke-logentry-secret-list-all",
            *TRUSTED_BEYOND_THEIR_JOB,
        ],
        silent=[
            "secret-get-by-controller-manager",
            "secret-get-by-kubelet",
            "secret-get-denied-for-developer",
            "secret-get-not-found",
            RECON_SECRET_LIST_403,
            IMPERSONATED_SECRET_LIST_403,
            *TRUSTED_DOING_THEIR_JOB,
        ],
    )


def test_secret_read_silences_trusted_infrastructure_by_its_trust_list_not_its_rule() -> None:
    """The rule matches every add-on read: the exception naming the stream's trust list is what
    excepts those doing their job (`test_secret_read`), so removing it (a patch setting it to
    null) switches the defaults off. The operator's own account is an entry one can see."""
    rule = detections()["k8s-secret-read"].rule.condition
    ids = {e["auditID"] for e in corpus() if matches(rule, e)}
    assert set(TRUSTED_DOING_THEIR_JOB + TRUSTED_BEYOND_THEIR_JOB) <= ids
    resource = detections()["k8s-secret-read"].resource
    assert resource["spec"]["exceptions"] == {
        "trusted-infrastructure": {"trustList": "infrastructure"}
    }
    entries = kube_audit_stream().trust_lists["infrastructure"].entries
    operator = [entry for entry in entries if entry.name == "auditwatch"]
    assert [e.service_accounts for e in operator] == [(("auditwatch", "auditwatch"),)]


def test_secret_read_denied() -> None:
    expect(
        "k8s-secret-read-denied",
        fires=[
            IMPERSONATED_SECRET_LIST_403,
            RECON_SECRET_LIST_403,  # its RequestReceived stage must not count twice
            "anonymous-list-secrets-forbidden",
            "secret-get-denied-for-developer",
            "gke-logentry-secret-denied",  # GKE sends no stage
            "scheduler-forwarded-for-public-ip",
        ],
        silent=["secret-get-not-found", "secret-get-by-developer", RECON_EVENTS_LIST_403],
    )


def test_secret_created_deleted() -> None:
    expect(
        "k8s-secret-created-deleted",
        fires=["secret-created-by-developer", "secret-deleted-by-ci-serviceaccount"],
        silent=[
            "sa-token-secret-created-by-token-controller",
            "sa-token-secret-created-by-developer",
            "secret-created-in-kube-system-by-developer",
            "secret-get-by-developer",
        ],
    )


# ---------------------------------------------------------------------------------------------
# Pods: exec, port-forward, privileges, host namespaces and paths


EXEC_SESSIONS_BOTH_STAGES = [  # ResponseStarted (101) and ResponseComplete of one session
    RECON_EXEC,
    "pod-attach",
    "pod-exec-websocket-get",
    # kubectl >= 1.30: a refused WebSocket get (403, at both stages too), then the SPDY create.
    "pod-exec-spdy-create-after-websocket-refused",
    "pod-exec-cat-sa-token",
    "pod-exec-kubectl-cp-tar",
    "pod-exec-cat-app-config",
    "eks-pod-exec-cat-irsa-token",
    "aks-pod-exec-cat-azure-token",
]
EXEC_SESSIONS_COMPLETION_ONLY = [MINIKUBE_EXEC, SEKOIA_EXEC]  # logs without ResponseStarted
EXEC_NEAR_MISSES = [
    "pod-log-read",
    "pod-portforward",
    "pod-created-unprivileged",
    "pod-exec-websocket-get-forbidden",
    "pod-exec-tar-forbidden",
]
GKE_EXECS = ["gke-logentry-exec", "gke-logentry-exec-tar"]  # no stage, GKE's status 0 as 200
EXEC_AT_COMPLETION = DETECTIONS_DIR / "components" / "exec-at-completion"


def test_pod_exec_attach() -> None:
    """Once per session, when it opens: at ResponseStarted, or on GKE's single entry. A log
    without ResponseStarted is the component's case (next test)."""
    expect(
        "k8s-pod-exec-attach",
        fires=[*EXEC_SESSIONS_BOTH_STAGES, *GKE_EXECS],
        silent=[*EXEC_SESSIONS_COMPLETION_ONLY, *EXEC_NEAR_MISSES],
    )
    sessions = [
        e
        for e in corpus()
        if label(e) in EXEC_SESSIONS_BOTH_STAGES
        and matches(detections()["k8s-pod-exec-attach"].rule.condition, e)
    ]
    assert {e["stage"] for e in sessions} == {"ResponseStarted"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_pod_exec_attach_at_completion_component(tmp_path: Path) -> None:
    """The kustomize component for logs without ResponseStarted moves both exec rules to the
    completing event and changes nothing else: every session still counts once, those logs
    included."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    shutil.copytree(DETECTIONS_DIR, tmp_path / "detections")
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../detections]\n"
        "components: [../detections/components/exec-at-completion]\n"
    )
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    alerts = {d["metadata"]["name"]: d for d in yaml.safe_load_all(rendered.stdout) if d}
    assert sorted(alerts) == sorted(detections())
    for alert in alerts.values():
        assert alert["metadata"].pop("namespace") == "auditwatch"  # the kustomization's
    rules = {  # parsed: kustomize may re-indent a folded rule's continuation lines
        name: parse_rule("composite", alert["spec"]["rule"]["config"]).condition
        for name, alert in alerts.items()
    }
    changed = sorted(name for name in alerts if rules[name] != detections()[name].rule.condition)
    assert changed == ["k8s-pod-exec-attach", "k8s-pod-exec-sensitive-command"]
    at_start = '(stage = "ResponseStarted" or not stage exists) and '
    at_completion = 'not stage in ("RequestReceived", "ResponseStarted") and '
    for name in changed:
        shipped, patched = detections()[name].resource, alerts[name]
        assert patched["metadata"] == shipped["metadata"]
        assert {**patched["spec"], "rule": None} == {**shipped["spec"], "rule": None}
        shipped_rule = shipped["spec"]["rule"]["config"]
        assert shipped_rule.startswith(at_start)
        moved = shipped_rule.replace(at_start, at_completion, 1)
        assert rules[name] == parse_rule("composite", moved).condition
    fires = [*EXEC_SESSIONS_BOTH_STAGES, *EXEC_SESSIONS_COMPLETION_ONLY, *GKE_EXECS]
    assert Counter(fired_on(rules["k8s-pod-exec-attach"], "exec-at-completion")) == Counter(fires)
    sensitive = fired_on(rules["k8s-pod-exec-sensitive-command"], "exec-at-completion")
    assert Counter(sensitive) == Counter(fired("k8s-pod-exec-sensitive-command"))


def test_pod_portforward() -> None:
    expect(
        "k8s-pod-portforward",
        fires=["pod-portforward"],
        silent=["pod-attach", "pod-log-read", MINIKUBE_EXEC],
    )


def test_privileged_container() -> None:
    expect(
        "k8s-privileged-container",
        fires=[
            MINIKUBE_PRIVILEGED_POD,
            SEKOIA_PRIVILEGED_POD,
            "pod-privileged-init-container",
            "pod-privileged-denied-by-pod-security",  # an attempt, as in Falco
            "pod-kube-system-by-daemonset-controller",
            "pod-kube-system-by-stolen-controller-token",
            "pod-kube-system-eks-aws-node-by-daemonset-controller",
            "pod-debug-privileged-ephemeral-container",
            "daemonset-privileged-hostnetwork-docker-sock",
            "deployment-patched-privileged",
        ],
        silent=[
            "pod-created-unprivileged",
            "pod-privileged-init-container-dry-run",
            "deployment-created-unprivileged",
            SEKOIA_HOSTNETWORK_POD,
            SEKOIA_HOSTPATH_TMP_POD,
        ],
    )


def test_hostnetwork_pod() -> None:
    expect(
        "k8s-hostnetwork-pod",
        fires=[
            SEKOIA_HOSTNETWORK_POD,
            "pod-kube-system-by-daemonset-controller",
            "pod-kube-system-by-stolen-controller-token",
            "pod-kube-system-eks-aws-node-by-daemonset-controller",
            "daemonset-privileged-hostnetwork-docker-sock",
        ],
        silent=["pod-created-unprivileged", "pod-host-pid", SEKOIA_PRIVILEGED_POD],
    )


def test_hostpid_pod() -> None:
    expect(
        "k8s-hostpid-pod",
        fires=["pod-host-pid", "cronjob-host-pid"],
        silent=["pod-created-unprivileged", "pod-host-ipc", SEKOIA_HOSTNETWORK_POD],
    )


def test_hostipc_pod() -> None:
    expect(
        "k8s-hostipc-pod",
        fires=["pod-host-ipc", "statefulset-host-ipc-etc-kubernetes"],
        silent=["pod-created-unprivileged", "pod-host-pid", SEKOIA_HOSTNETWORK_POD],
    )


def test_sensitive_hostpath() -> None:
    expect(
        "k8s-sensitive-hostpath",
        fires=[
            "pod-hostpath-proc",
            "pod-hostpath-kubelet-pki-subdir",
            "daemonset-privileged-hostnetwork-docker-sock",
            "statefulset-host-ipc-etc-kubernetes",
        ],
        silent=[
            "pod-hostpath-data-and-localtime",
            SEKOIA_HOSTPATH_TMP_POD,
            "pod-created-unprivileged",
            SEKOIA_PRIVILEGED_POD,
        ],
    )


def test_pod_in_kube_namespace() -> None:
    expect(
        "k8s-pod-in-kube-namespace",
        fires=[
            "pod-kube-system-by-developer",
            # A kube-system user, but not a control-plane image: allowlisted by image, not user.
            "pod-kube-system-by-stolen-controller-token",
        ],
        silent=[
            "pod-kube-system-by-daemonset-controller",
            "pod-kube-system-eks-aws-node-by-daemonset-controller",  # EKS's own ECR images
            "pod-binding-by-scheduler-kube-system",
            "pod-created-unprivileged",
        ],
    )


# ---------------------------------------------------------------------------------------------
# Service accounts, RBAC


def test_serviceaccount_in_kube_namespace() -> None:
    expect(
        "k8s-serviceaccount-in-kube-namespace",
        fires=["serviceaccount-kube-system-by-developer"],
        silent=[
            "serviceaccount-kube-system-by-controller-manager",
            "serviceaccount-token-requested-kube-system",
            "serviceaccount-default-created-by-controller",
        ],
    )


def test_role_wildcard() -> None:
    expect(
        "k8s-role-wildcard",
        fires=["clusterrole-wildcard-verbs", "role-wildcard-resources"],
        silent=[
            "clusterrole-read-only",
            "clusterrole-write-privileges",
            "clusterrole-aggregated-admin-updated",
        ],
    )


def test_role_write_privileges() -> None:
    expect(
        "k8s-role-write-privileges",
        fires=[
            "clusterrole-wildcard-verbs",
            "clusterrole-write-privileges",
            "role-pod-exec-in-namespace",
            "system-role-kube-system-patched",
            "clusterrole-nodes-proxy",  # create on nodes/proxy
            "gke-logentry-clusterrole-nodes-proxy",
        ],
        silent=[
            "clusterrole-read-only",
            "clusterrole-pod-exec",
            "role-wildcard-resources",
            "clusterrole-aggregated-admin-updated",
        ],
    )


def test_role_pod_exec() -> None:
    expect(
        "k8s-role-pod-exec",
        fires=["clusterrole-pod-exec", "role-pod-exec-in-namespace"],
        silent=["clusterrole-read-only", "clusterrole-write-privileges", RECON_ROLE_LIST],
    )


def test_cluster_admin_binding() -> None:
    expect(
        "k8s-cluster-admin-binding",
        fires=[
            *SEKOIA_ADMIN_BINDINGS,
            "rolebinding-to-cluster-admin",
            "gke-logentry-clusterrolebinding",
        ],
        silent=["clusterrolebinding-to-view", "clusterrolebinding-deleted"],
    )


def test_system_role_modified() -> None:
    expect(
        "k8s-system-role-modified",
        fires=[
            "system-clusterrole-node-patched",
            "system-role-kube-system-patched",
            "system-clusterrole-deleted",
        ],
        silent=[
            "system-clusterrole-coredns-updated",
            "system-clusterrole-read",
            "clusterrole-aggregated-admin-updated",
        ],
    )


# ---------------------------------------------------------------------------------------------
# Services, ConfigMaps, anonymous access, denials


def test_nodeport_service() -> None:
    expect(
        "k8s-nodeport-service",
        fires=["service-nodeport-created", "service-patched-to-nodeport"],
        silent=["service-clusterip-created", "service-deleted"],
    )


def test_configmap_credentials() -> None:
    expect(
        "k8s-configmap-credentials",
        fires=[
            "configmap-aws-keys",
            "configmap-password-key-updated",
            "configmap-password-inside-file-applied",
            # Found in the values by `requestObject.data.*`, whatever the key is called:
            "configmap-aws-key-id-inside-json-patched",
            "configmap-private-key-updated",
            "configmap-password-inside-env-file-patched",  # no last-applied annotation
            "configmap-passphrase-key-patched",
        ],
        silent=[
            "configmap-plain-settings",
            "configmap-root-ca-published",  # a certificate is not a private key
            "configmap-deleted",
            # "password" in the name, labels, a key and values, but no password set:
            "configmap-password-policy-applied",
            "configmap-private-key-dry-run",
            "configmap-public-key-and-key-id-docs",  # a public key; "AKIA" without a key id
            "secret-created-by-developer",  # the same data belongs in a Secret
        ],
    )


def test_ingress_without_tls() -> None:
    expect(
        "k8s-ingress-without-tls",
        fires=[
            "ingress-without-tls",
            "eks-ingress-without-tls",  # its RequestReceived stage must not count twice
            "aks-ingress-without-tls",  # read from the AKS diagnostic record
            "gke-logentry-ingress-without-tls",  # no stage
        ],
        silent=[
            "ingress-with-tls",
            "aks-ingress-with-tls",
            "ingress-without-tls-dry-run",
            "service-clusterip-created",
        ],
    )


def test_anonymous_request_allowed() -> None:
    expect(
        "k8s-anonymous-request-allowed",
        fires=["anonymous-list-pods-allowed"],
        silent=[
            "anonymous-healthz",
            "anonymous-readyz-verbose",
            "anonymous-version",
            "anonymous-list-secrets-forbidden",
        ],
    )


def test_request_denied_burst() -> None:
    """Each refusal by the authorizer counts; a 403 the authorizer allowed (admission) does not."""
    expect(
        "k8s-request-denied-burst",
        fires=[
            *IMPERSONATION_403S,  # the impersonation check refuses without a decision annotation
            RECON_SECRET_LIST_403,
            RECON_EVENTS_LIST_403,
            "anonymous-list-secrets-forbidden",
            "secret-get-denied-for-developer",
            "pod-exec-websocket-get-forbidden",  # written at ResponseStarted too: counted once
            "pod-exec-tar-forbidden",  # the same
            "cronjob-create-forbidden",
            "token-request-forbidden",
            "gke-logentry-secret-denied",
            "scheduler-forwarded-for-public-ip",
        ],
        silent=[
            "pod-privileged-denied-by-pod-security",  # 403 with decision "allow"
            IMPERSONATED_POD_LIST_200,
            "secret-get-not-found",
            SEKOIA_POD_LIST,
        ],
    )


def burst_groups(events: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The groups k8s-request-denied-burst fires for on `events` (one request), as the engine
    runs it: the stream's plan, then the alert's grouped threshold (the detection has no
    targets: its status tells)."""
    spec = build_alert(detections()["k8s-request-denied-burst"].resource, lambda *_: None)
    assert spec.threshold is not None
    tracker = GroupedTracker(spec)
    plan = StreamPlan([PlanAlert(spec.key, spec.rule.condition, group_by=spec.threshold.columns)])
    batch = normalise(events, received_at=datetime.now(UTC))
    for result in plan.evaluate(batch):
        assert result.groups is not None
        tracker.observe_groups(result.groups, batch.event, datetime.now(UTC))
    return [entry["group"] for entry in tracker.status()["groups"]["top"]]


def again(label_or_id: str, user: str, seconds: list[int]) -> list[dict[str, Any]]:
    """A corpus event re-sent by `user` at these seconds of event time (fresh auditIDs)."""
    [event] = [e for e in corpus() if label(e) == label_or_id]
    return [
        event
        | {
            "auditID": f"{event['auditID'][:-8]}{user[:4]}{at:04d}",
            "user": {"username": user},
            "stageTimestamp": f"2025-06-01T10:{at // 60:02d}:{at % 60:02d}.000000Z",
        }
        for at in seconds
    ]


def test_request_denied_burst_fires_per_user_within_a_minute() -> None:
    """Five refusals of one user within a minute fire, for that user; what issue #12 saw fire
    (403s spread over minutes, from several users) and what issue #15 saw fire (403s the
    authorizer allowed) stays quiet."""
    threshold = detections()["k8s-request-denied-burst"].resource["spec"]["threshold"]
    assert (threshold["count"], threshold["window"]) == (5, "1m")
    denied = "secret-get-denied-for-developer"
    assert burst_groups(again(denied, "mallory", [0, 10, 20, 30, 55])) == [
        {"user.username": "mallory"}
    ]
    # The impersonation log: 11 refusals over 34 minutes, at most 4 within a minute.
    assert burst_groups(decode_file(SAMPLES_DIR / "impersonation-and-403s.log")) == []
    assert burst_groups(decode_file(SAMPLES_DIR / "secret-recon-then-exec.log")) == []
    assert (
        burst_groups(again(denied, "mallory", [0, 20, 40, 60, 80, 100])) == []
    )  # 1 a 20 s... 3/min
    five_users = [e for n in range(5) for e in again(denied, f"user-{n}", [n])]
    assert burst_groups(five_users) == []
    admission = again("pod-privileged-denied-by-pod-security", "dev", [0, 1, 2, 3, 4, 5])
    assert burst_groups(admission) == []
    # The same burst among other users' refusals still fires for its user alone.
    mixed = five_users + again(denied, "mallory", [0, 1, 2, 3, 4])
    assert burst_groups(mixed) == [{"user.username": "mallory"}]


# ---------------------------------------------------------------------------------------------
# Activity trail: creations and deletions


def test_deployment_created_deleted() -> None:
    expect(
        "k8s-deployment-created-deleted",
        fires=[
            "deployment-created-unprivileged",
            "deployment-deleted",
            "aks-deployment-run-as-non-root",
        ],
        silent=[
            "deployment-created-dry-run",
            "deployment-create-already-exists",
            "deployment-patched-privileged",
            "deployment-status-update-by-controller",
            SEKOIA_SCALE_PATCH,
        ],
    )


def test_service_created_deleted() -> None:
    expect(
        "k8s-service-created-deleted",
        fires=["service-nodeport-created", "service-clusterip-created", "service-deleted"],
        silent=["service-patched-to-nodeport"],
    )


def test_configmap_created_deleted() -> None:
    expect(
        "k8s-configmap-created-deleted",
        fires=[
            "configmap-aws-keys",
            "configmap-password-inside-file-applied",
            "configmap-plain-settings",
            "configmap-root-ca-published",
            "configmap-deleted",
        ],
        silent=["configmap-password-key-updated"],
    )


def test_namespace_created_deleted() -> None:
    expect(
        "k8s-namespace-created-deleted",
        fires=["namespace-created", "namespace-deleted"],
        silent=["serviceaccount-default-created-by-controller"],
    )


def test_serviceaccount_created_deleted() -> None:
    expect(
        "k8s-serviceaccount-created-deleted",
        fires=[
            "serviceaccount-default-created-by-controller",
            "serviceaccount-kube-system-by-controller-manager",
            "serviceaccount-kube-system-by-developer",
            "serviceaccount-deleted",
        ],
        silent=["serviceaccount-token-requested-kube-system"],
    )


def test_role_created_deleted() -> None:
    expect(
        "k8s-role-created-deleted",
        fires=[
            "clusterrole-wildcard-verbs",
            "role-wildcard-resources",
            "clusterrole-read-only",
            "clusterrole-write-privileges",
            "clusterrole-pod-exec",
            "role-pod-exec-in-namespace",
            "system-clusterrole-deleted",
            "clusterrole-nodes-proxy",
            "clusterrole-nodes-metrics",
            "clusterrole-kubelet-api-admin-by-apiserver",
            "aks-role-nodes-proxy",
            "gke-logentry-clusterrole-nodes-proxy",
        ],
        silent=["system-clusterrole-node-patched", "clusterrole-aggregated-admin-updated"],
    )


def test_rolebinding_created_deleted() -> None:
    expect(
        "k8s-rolebinding-created-deleted",
        fires=[
            *SEKOIA_ADMIN_BINDINGS,
            "rolebinding-to-cluster-admin",
            "clusterrolebinding-to-view",
            "clusterrolebinding-deleted",
            "gke-logentry-clusterrolebinding",
        ],
        silent=[RECON_ROLE_LIST, "clusterrole-read-only"],
    )


# ---------------------------------------------------------------------------------------------
# Peer detections (issue #12 section 2): each fires on self-managed, EKS-shaped (with its
# RequestReceived stage), AKS-record and GKE events, and stays silent on its near-misses.


def test_role_nodes_proxy() -> None:
    expect(
        "k8s-role-nodes-proxy",
        fires=[
            "clusterrole-nodes-proxy",
            "eks-role-nodes-subresources",  # nodes/* covers nodes/proxy
            "aks-role-nodes-proxy",
            "gke-logentry-clusterrole-nodes-proxy",
        ],
        silent=[
            "clusterrole-nodes-metrics",
            "clusterrole-kubelet-api-admin-by-apiserver",  # the RBAC bootstrap
            "clusterrole-read-only",
            "clusterrole-wildcard-verbs",  # k8s-role-wildcard's
        ],
    )


def test_webhook_configuration_changed() -> None:
    expect(
        "k8s-webhook-configuration-changed",
        fires=[
            "mutatingwebhook-created",
            "eks-validatingwebhook-deleted",  # switching a policy engine off
            "aks-mutatingwebhook-patched",
            "gke-logentry-validatingwebhook-created",
            # a ServiceAccount of the same name in another namespace is not cert-manager's
            "validatingwebhook-patched-by-cainjector-spoof",
        ],
        silent=[
            "validatingwebhook-cabundle-by-cainjector",  # the trust list's
            "mutatingwebhook-list",
            "mutatingwebhook-dry-run",
        ],
    )
    rule = detections()["k8s-webhook-configuration-changed"].rule.condition
    cainjector = [e for e in corpus() if label(e) == "validatingwebhook-cabundle-by-cainjector"]
    assert [matches(rule, e) for e in cainjector] == [True]  # excepted, not unmatched


def test_csr_client_certificate() -> None:
    expect(
        "k8s-csr-client-certificate",
        fires=[
            "csr-client-cert-by-developer",
            "eks-csr-client-cert",
            "aks-csr-client-cert",
            "gke-logentry-csr-client-cert",
        ],
        silent=[
            "csr-kubelet-client-by-bootstrap",
            "csr-kubelet-serving-by-node",
            "csr-approved-by-admin",
        ],
    )


def test_cronjob_created_modified() -> None:
    expect(
        "k8s-cronjob-created-modified",
        fires=[
            "cronjob-created",
            "cronjob-host-pid",
            "eks-cronjob-patched",
            "aks-cronjob-created",
            "aks-cronjob-run-as-root",
            "gke-logentry-cronjob-created",
        ],
        silent=[
            "cronjob-status-by-controller",
            "job-created-by-cronjob-controller",
            "cronjob-create-forbidden",
        ],
    )


def test_daemonset_created() -> None:
    expect(
        "k8s-daemonset-created",
        fires=[
            "daemonset-created",
            "daemonset-privileged-hostnetwork-docker-sock",
            "eks-daemonset-created",
            "aks-daemonset-created",
            "aks-daemonset-cap-sys-ptrace",
            "gke-logentry-daemonset-cap-sys-module",
        ],
        silent=["daemonset-image-patched", "daemonset-create-dry-run", "deployment-deleted"],
    )


def test_dangerous_capabilities() -> None:
    expect(
        "k8s-dangerous-capabilities",
        fires=[
            "pod-cap-sys-admin",
            "deployment-cap-net-admin-patched",  # lower case: runtimes accept it
            "eks-pod-cap-all",
            "aks-daemonset-cap-sys-ptrace",  # CAP_ prefixed
            "gke-logentry-daemonset-cap-sys-module",
        ],
        silent=[
            "pod-cap-net-bind-service",
            "pod-cap-drop-all",  # dropping SYS_ADMIN is not adding it
            "pod-created-unprivileged",
            SEKOIA_PRIVILEGED_POD,  # k8s-privileged-container's
        ],
    )


def test_pod_exec_sensitive_command() -> None:
    """Once per session, when it opens, like k8s-pod-exec-attach: the command from the URI's
    query (percent-encoded, `+` for spaces), or GKE's request body."""
    expect(
        "k8s-pod-exec-sensitive-command",
        fires=[
            "pod-exec-cat-sa-token",
            "pod-exec-kubectl-cp-tar",
            "eks-pod-exec-cat-irsa-token",  # sh -c "cat /var/run/secrets/eks.amazonaws.com/..."
            "aks-pod-exec-cat-azure-token",
            "gke-logentry-exec-tar",
        ],
        silent=[
            "pod-exec-cat-app-config",  # /var/run/secrets/app: not an identity token
            "pod-exec-tar-forbidden",
            "pod-exec-websocket-get",  # a shell
            "gke-logentry-exec",
            "pod-attach",
        ],
    )


def test_serviceaccount_token_requested() -> None:
    expect(
        "k8s-serviceaccount-token-requested",
        fires=[
            "serviceaccount-token-requested-kube-system",
            "eks-token-requested",
            "aks-token-requested",
            "gke-logentry-token-requested",
        ],
        silent=["token-requested-by-kubelet", "token-request-forbidden", "serviceaccount-deleted"],
    )


def test_secret_list_all_namespaces() -> None:
    expect(
        "k8s-secret-list-all-namespaces",
        fires=[
            "secret-list-by-ci-serviceaccount",
            "secret-watch-all-by-developer",  # ResponseStarted and ResponseComplete: once
            "eks-secret-list-all",
            "aks-secret-list-all",
            "gke-logentry-secret-list-all",
        ],
        silent=[
            KUBE_STATE_METRICS_LIST,  # trusted to list
            "secret-watch-all-by-ingress-nginx",  # trusted to watch
            "secret-list-all-by-controller-manager",
            "secret-get-by-developer",  # one namespace: k8s-secret-read's
            "anonymous-list-secrets-forbidden",
        ],
    )


def test_secret_get_not_found() -> None:
    expect(
        "k8s-secret-get-not-found",
        fires=[
            "secret-get-not-found",
            "eks-secret-get-not-found",
            "aks-secret-get-not-found",
            "gke-logentry-secret-get-not-found",  # google.rpc NOT_FOUND (5) as 404
        ],
        silent=[
            "secret-get-not-found-by-cert-manager",  # trusted: reads before it creates
            "secret-get-not-found-by-kube-system-controller",
            "secret-get-denied-for-developer",  # 403: k8s-secret-read-denied's
            "secret-get-by-developer",
        ],
    )


def test_serviceaccount_token_secret() -> None:
    """Secret bodies are never logged: the token controller filling a Secret somebody created
    (an update, as kube-apiserver 1.20 recorded it) tells a long-lived token was made."""
    expect(
        "k8s-serviceaccount-token-secret",
        fires=[
            "token-secret-filled-by-token-controller",
            "eks-token-secret-filled",
            "aks-token-secret-filled",
            "gke-logentry-token-secret-filled",
        ],
        silent=[
            "token-secret-created-by-token-controller",  # its own, before Kubernetes 1.24
            "secret-updated-by-developer",
            "sa-token-secret-created-by-developer",  # the creation: k8s-secret-created-deleted
        ],
    )


SYSTEM_PRINCIPALS_PRIVATE = [  # nodes, controllers and kube-system accounts at home
    "secret-get-by-kubelet",
    "secret-get-by-controller-manager",
    "pod-kube-system-by-daemonset-controller",
    "pod-binding-by-scheduler-kube-system",
    "csr-kubelet-client-by-bootstrap",
    "aks-token-secret-filled",  # 10.224.0.4
    "node-credential-from-private-ip",
    "eks-node-from-private-ip",
    "aks-node-from-private-ip",
    "kube-system-sa-from-cgnat-and-link-local",  # 100.64/10, 169.254/16
    "kube-system-sa-from-ipv6-unique-local",  # fc00::/7, fe80::/10
    "gke-logentry-node-from-gce-internal-ip",  # GKE names internal callers, not an address
]


def test_system_principal_public_ip() -> None:
    expect(
        "k8s-system-principal-public-ip",
        fires=[
            "node-credential-from-public-ip",
            "pod-kube-system-by-stolen-controller-token",  # replicaset-controller, 198.51.100.77
            "scheduler-forwarded-for-public-ip",  # X-Forwarded-For before 127.0.0.1; refused too
            "controller-manager-from-public-ipv6",
            "bootstrap-token-from-ipv4-mapped-public-ip",
            "kube-proxy-from-172-32",  # outside 172.16/12
            "eks-node-credential-from-public-ip",  # its RequestReceived stage must not count twice
            "aks-kube-system-sa-from-public-ip",
            "gke-logentry-node-from-public-ip",
        ],
        silent=[
            *SYSTEM_PRINCIPALS_PRIVATE,
            "lookalike-kube-system-sa-from-public-ip",  # kube-systemx is another namespace
            "eks-secret-list-all",  # a person from a public address: not a system principal
            "anonymous-list-pods-allowed",  # system:anonymous: k8s-anonymous-request-allowed's
        ],
    )


def address_is_public(text: str) -> bool:
    """The detection's meaning of "public", by the ipaddress module: an IP address outside
    loopback, RFC 1918, CGNAT, link-local, unique-local, and their IPv4-mapped forms."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    private = PRIVATE_V4 if isinstance(address, ipaddress.IPv4Address) else PRIVATE_V6
    return not any(address in network for network in private)


PRIVATE_V4 = [
    ipaddress.IPv4Network(n)
    for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
] + [ipaddress.IPv4Network("169.254.0.0/16")]
PRIVATE_V6 = [ipaddress.IPv6Network(n) for n in ("::1/128", "fc00::/7", "fe80::/10")]
IPV6_SAMPLES = [
    "::1",
    "fc00::1",
    "fd12:3456:789a::1",
    "FD00::5",  # upper case
    "fe80::1",
    "febf:ffff::1",
    "fec0::1",  # deprecated site-local: outside fe80::/10
    "fe7f::1",
    "fbff::1",
    "ff02::1",
    "fc0::1",  # 0fc0::, not fc00::
    "2001:db8::7",
    "2a00:1450:4001:829::200e",
    "64:ff9b::198.51.100.7",  # NAT64
    "::ffff:10.1.2.3",
    "::ffff:172.31.0.1",
    "::ffff:8.8.8.8",
    "::FFFF:198.51.100.7",
]
NOT_ADDRESSES = ["gce-internal-ip", "private", "", "256.1.2.3", "1.2.3", "10.0.0.1.5", "x1.2.3.4"]


def test_system_principal_public_ip_regex_agrees_with_the_ipaddress_module() -> None:
    """Every IPv4 /16 at its lowest and highest address, canonical IPv6 samples around each
    private range, and strings that are not addresses: the rule reports exactly the public
    ones, through both evaluators. Limits, documented: IPv6 written from `::` counts only as
    `::ffff:` plus a public IPv4 (`::`, `::1` and the deprecated `::a.b.c.d` do not), and a
    malformed text of hex digits, dots and colons after a public first group counts."""
    v4 = [f"{a}.{b}.{c}" for a in range(256) for b in range(256) for c in ("0.0", "255.255")]
    samples = v4 + IPV6_SAMPLES + NOT_ADDRESSES
    condition = detections()["k8s-system-principal-public-ip"].rule.condition
    events = [
        {
            "auditID": str(index),
            "stage": "ResponseComplete",
            "verb": "get",
            "user": {"username": "system:node:worker-1"},
            "sourceIPs": [text],
        }
        for index, text in enumerate(samples)
    ]
    vectorised = compile_rule(condition).evaluate(normalise(events, datetime.now(UTC)))
    assert vectorised.to_pylist() == [address_is_public(text) for text in samples]
    sample = v4[::997] + IPV6_SAMPLES + NOT_ADDRESSES
    assert [matches(condition, e) for e in events if e["sourceIPs"][0] in sample] == [
        address_is_public(text) for text in samples if text in sample
    ]


def test_container_run_as_root() -> None:
    """Pods and ReplicaSets/Jobs that the workload controllers create from a template (their
    own ServiceAccount, a controller ownerReference) are not reported again; the same account
    creating a pod of its own is."""
    expect(
        "k8s-container-run-as-root",
        fires=[
            "pod-run-as-user-0",
            "deployment-run-as-non-root-false-patched",
            "pod-debug-ephemeral-container-as-root",
            "pod-run-as-root-by-stolen-replicaset-controller-token",
            "eks-job-init-container-run-as-root",  # its RequestReceived stage must not count twice
            "aks-cronjob-run-as-root",
            "gke-logentry-statefulset-run-as-root",
        ],
        silent=[
            "pod-run-as-root-by-replicaset-controller",
            "replicaset-run-as-root-by-deployment-controller",
            "pod-run-as-user-1000",  # runAsGroup 0 and fsGroup 0 are not the root user
            "pod-run-as-user-0-dry-run",
            "aks-deployment-run-as-non-root",
            "pod-created-unprivileged",
            SEKOIA_PRIVILEGED_POD,  # no runAsUser: the image decides, the log cannot tell
        ],
    )
