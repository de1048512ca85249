"""Cloud push deliveries end to end: Firehose (EKS), Pub/Sub push (GKE) and AKS records posted to
a real receiver on loopback, detections from examples/detections evaluated, storage read back.

The payloads are written from the cloud formats (tests/data/cloud, docs/sources.md); the audit
events inside the EKS and AKS ones are the real samples of tests/data/audit-samples.
"""

from __future__ import annotations

import base64
import gzip
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
import yaml
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from tests.e2e_support import (
    Running,
    get_json,
    post,
    running_receiver,
    secret_doc,
    stored,
    stream_doc,
    write_yaml,
)
from tests.test_receive import Follower

from auditwatch.receive import Receiver

CLOUD = Path("tests/data/cloud")
SAMPLES = Path("tests/data/audit-samples")
DETECTIONS = Path("examples/detections")
FIREHOSE_KEY = "firehose-key-0123456789"
PUSH_TOKEN = "push-token-abcdef"
AUDIENCE = "https://auditwatch.example/api/v1/pubsub/gke-oidc"
PUSHER = "pubsub-push@acme-prod.iam.gserviceaccount.com"
GOOGLE = "https://accounts.google.com"

SIGNING_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks() -> str:
    key = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(SIGNING_KEY.public_key()))
    return orjson.dumps({"keys": [key | {"kid": "k1", "alg": "RS256", "use": "sig"}]}).decode()


def id_token(key: rsa.RSAPrivateKey = SIGNING_KEY, **claims: Any) -> str:
    """An ID token as Pub/Sub push sends it (Google-signed; here signed by the test's key)."""
    now = int(time.time())
    body = {
        "iss": GOOGLE,
        "aud": AUDIENCE,
        "email": PUSHER,
        "email_verified": True,
        "iat": now,
        "exp": now + 3600,
        "sub": "1234567890",
    } | claims
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


def detection(name: str, stream: str) -> dict[str, Any]:
    """An AuditAlert of the detection library, as shipped, over `stream`."""
    doc: dict[str, Any] = yaml.safe_load((DETECTIONS / f"{name}.yaml").read_text())
    doc["metadata"]["name"] = f"{name}-{stream}"
    doc["spec"]["stream"] = stream
    return doc


def cluster_alert(stream: str, cluster: str) -> dict[str, Any]:
    return {
        "apiVersion": "auditwatch.dev/v1alpha1",
        "kind": "AuditAlert",
        "metadata": {"name": f"cluster-{stream}"},
        "spec": {
            "stream": stream,
            "message": "{cluster}",
            "rule": {"type": "composite", "config": f'cluster = "{cluster}"'},
            "targets": [],
        },
    }


IN_THREADS_AND_WORKERS = pytest.mark.parametrize(
    "server", [0, 1], ids=["in-process", "decode-worker"], indirect=True
)
"""Decoding in a thread, and in a worker process as `auditwatch serve` does (the source's
envelope kind travels to the worker with the body)."""


@pytest.fixture
async def server(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Running]:
    resources = tmp_path / "resources"
    oidc = stream_doc("gke-oidc")
    oidc["spec"]["auth"] = {
        "oidc": {
            "issuer": GOOGLE,
            "audience": AUDIENCE,
            "serviceAccountEmail": PUSHER,
            "jwks": jwks(),
        }
    }
    fleet = stream_doc("fleet")
    fleet["spec"]["cluster"] = "on-prem-1"
    write_yaml(
        resources / "streams.yaml",
        stream_doc("eks", bearer_secret="firehose"),
        stream_doc("gke", bearer_secret="push"),
        oidc,
        stream_doc("aks", bearer_secret="push"),
        fleet,
        secret_doc("firehose", token=FIREHOSE_KEY),
        secret_doc("push", token=PUSH_TOKEN),
    )
    write_yaml(
        resources / "alerts.yaml",
        detection("k8s-pod-exec-attach", "eks"),
        detection("k8s-pod-exec-attach", "aks"),
        detection("k8s-request-denied-burst", "gke"),
        cluster_alert("eks", "prod-eu"),
        cluster_alert("gke", "gke-prod"),
        cluster_alert("fleet", "on-prem-1"),
    )
    workers = getattr(request, "param", 0)
    async with running_receiver(resources, tmp_path / "data", workers) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def matches(session: aiohttp.ClientSession, server: Running, alert: str) -> int:
    status = await get_json(session, server.url + "/api/v1/status")
    count: int = status["alerts"][f"default/{alert}"].get("matches", 0)
    return count


def cloudwatch(name: str) -> dict[str, Any]:
    payload: dict[str, Any] = orjson.loads((CLOUD / name).read_bytes())
    return payload


def firehose_body(*records: bytes, request_id: str = "req-1") -> bytes:
    """A Firehose HTTP endpoint delivery request body."""
    return orjson.dumps(
        {
            "requestId": request_id,
            "timestamp": 1733400000123,
            "records": [{"data": base64.b64encode(record).decode()} for record in records],
        }
    )


def firehose_headers(request_id: str = "req-1", key: str = FIREHOSE_KEY) -> dict[str, str]:
    return {
        "X-Amz-Firehose-Request-Id": request_id,
        "X-Amz-Firehose-Access-Key": key,
        "X-Amz-Firehose-Protocol-Version": "1.0",
        "Content-Type": "application/json",
    }


def gke_entry(name: str, **changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = orjson.loads((CLOUD / name).read_bytes())
    return entry | changes


def push_body(entry: dict[str, Any], message_id: str = "1001") -> dict[str, Any]:
    """A Pub/Sub push request as a Log Router sink's subscription delivers it."""
    return {
        "message": {
            "data": base64.b64encode(orjson.dumps(entry)).decode(),
            "attributes": {"logging.googleapis.com/timestamp": entry["timestamp"]},
            "messageId": message_id,
            "message_id": message_id,
            "publishTime": "2026-12-05T14:02:12.001Z",
            "publish_time": "2026-12-05T14:02:12.001Z",
        },
        "subscription": "projects/acme-prod/subscriptions/auditwatch-push",
    }


@IN_THREADS_AND_WORKERS
async def test_firehose_delivery_stores_eks_events_fires_detections_and_answers_firehose(
    server: Running, session: aiohttp.ClientSession
) -> None:
    data = cloudwatch("eks-subscription-data.json")
    control = cloudwatch("eks-subscription-control.json")
    messages = [orjson.loads(e["message"]) for e in data["logEvents"]]
    # A gzip-compressed record (Firehose's default), and control messages compressed or not.
    body = firehose_body(
        gzip.compress(orjson.dumps(data)),
        orjson.dumps(control),
        gzip.compress(orjson.dumps(control)),
    )
    url = server.url + "/api/v1/firehose/eks"
    answer = await post(
        session, url, gzip.compress(body), firehose_headers("r-1") | {"Content-Encoding": "gzip"}
    )
    assert answer.status == 200, answer.body
    assert answer.body["requestId"] == "r-1"
    assert isinstance(answer.body["timestamp"], int)
    assert "errorMessage" not in answer.body
    # The exec of secret-recon-then-exec.log, once, when it opened (ResponseStarted); that of
    # pod-exec.log has only its completing event, which the shipped rule leaves to the
    # exec-at-completion component (docs/detections.md, Conventions).
    assert await matches(session, server, "k8s-pod-exec-attach-eks") == 1
    assert await matches(session, server, "cluster-eks") == len(messages)

    # Re-delivery after a lost answer: acknowledged, nothing kept twice.
    again = await post(session, url, body, firehose_headers("r-1"))
    assert again.status == 200 and again.body["requestId"] == "r-1"
    assert await matches(session, server, "k8s-pod-exec-attach-eks") == 1

    # The same events as extracted messages (message extraction on), one per line.
    extracted = b"\n".join(orjson.dumps(m) for m in messages[:2]) + b"\n"
    answer = await post(
        session, url, firehose_body(extracted, request_id="r-2"), firehose_headers("r-2")
    )
    assert answer.status == 200, answer.body
    assert await matches(session, server, "k8s-pod-exec-attach-eks") == 1  # duplicates

    await server.close()
    kept = stored(server.data, "eks")
    assert len(kept) == len(messages)
    assert sorted(orjson.dumps(e, option=orjson.OPT_SORT_KEYS) for e in kept) == sorted(
        orjson.dumps(m | {"cluster": "prod-eu"}, option=orjson.OPT_SORT_KEYS) for m in messages
    )


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"X-Amz-Firehose-Access-Key": ""}, 401),
        ({"X-Amz-Firehose-Access-Key": "wrong"}, 403),
    ],
)
async def test_firehose_with_a_bad_access_key_is_refused_in_firehose_shape(
    server: Running, session: aiohttp.ClientSession, headers: dict[str, str], status: int
) -> None:
    body = firehose_body(gzip.compress(orjson.dumps(cloudwatch("eks-subscription-data.json"))))
    answer = await post(
        session, server.url + "/api/v1/firehose/eks", body, firehose_headers("r-9") | headers
    )
    assert answer.status == status
    assert answer.body["requestId"] == "r-9"
    assert FIREHOSE_KEY not in answer.body["errorMessage"]
    await server.close()
    assert stored(server.data, "eks") == []


async def test_cloud_routes_answer_an_unknown_stream_as_a_wrong_credential(
    server: Running, session: aiohttp.ClientSession
) -> None:
    """Stream names cannot be probed on the cloud routes either: an unknown stream gets the
    answer a known stream gives to missing or wrong credentials, word for word."""
    body = firehose_body(gzip.compress(orjson.dumps(cloudwatch("eks-subscription-data.json"))))
    answers = {}
    for stream in ("eks", "no-such-stream"):
        for key in ("", "wrong"):
            url = f"{server.url}/api/v1/firehose/{stream}"
            answer = await post(session, url, body, firehose_headers("r-7", key=key))
            answers[stream, "firehose", key] = (answer.status, answer.body["errorMessage"])
        push = push_body(gke_entry("gke-logentry-exec.json"))
        url = f"{server.url}/api/v1/pubsub/{stream.replace('eks', 'gke')}"
        for suffix in ("", "?token=nope"):
            answer = await post(session, url + suffix, push)
            answers[stream, "pubsub", suffix] = (answer.status, answer.body["error"])
    cases = [("firehose", "", 401), ("firehose", "wrong", 403), ("pubsub", "", 401)]
    for route, credential, status in [*cases, ("pubsub", "?token=nope", 403)]:
        assert answers["eks", route, credential][0] == status
        assert answers["no-such-stream", route, credential] == answers["eks", route, credential]


def broken_cloudwatch() -> bytes:
    data = cloudwatch("eks-subscription-data.json")
    data["logEvents"][2]["message"] = "I1205 14:02:11 not an audit event"
    return gzip.compress(orjson.dumps(data))


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("bad message", "records[1].data: logEvents[2].message is not JSON"),
        ("not base64", "records[1].data is not valid base64"),
    ],
)
async def test_firehose_malformed_record_is_a_400_and_keeps_nothing(
    server: Running, session: aiohttp.ClientSession, case: str, reason: str
) -> None:
    good = base64.b64encode(gzip.compress(orjson.dumps(cloudwatch("eks-subscription-data.json"))))
    bad = base64.b64encode(broken_cloudwatch()) if case == "bad message" else b"***"
    records = [{"data": good.decode()}, {"data": bad.decode()}]
    body = orjson.dumps({"requestId": "r-5", "timestamp": 1733400000123, "records": records})
    answer = await post(session, server.url + "/api/v1/firehose/eks", body, firehose_headers("r-5"))
    assert answer.status == 400
    assert answer.body["requestId"] == "r-5"
    assert answer.body["errorMessage"].startswith(reason), answer.body
    await server.close()
    assert stored(server.data, "eks") == []


@IN_THREADS_AND_WORKERS
async def test_pubsub_push_maps_gke_entries_and_fires_detections(
    server: Running, session: aiohttp.ClientSession
) -> None:
    url = f"{server.url}/api/v1/pubsub/gke?token={PUSH_TOKEN}"
    for index in range(5):
        entry = gke_entry("gke-logentry-secret-denied.json", insertId=f"denied-{index}")
        answer = await post(session, url, push_body(entry, f"m-{index}"))
        assert answer.status == 200, answer.body
    assert await matches(session, server, "k8s-request-denied-burst-gke") == 5
    binding = gke_entry("gke-logentry-clusterrolebinding.json")
    answer = await post(session, url, push_body(binding, "m-9"))
    assert answer.status == 200, answer.body
    # A re-delivered message (no ack seen by Pub/Sub) is acknowledged and not kept twice.
    again = await post(session, url, push_body(binding, "m-9"))
    assert again.status == 200 and again.body["duplicates"] == 1
    assert await matches(session, server, "cluster-gke") == 6

    await server.close()
    kept = {event["auditID"]: event for event in stored(server.data, "gke")}
    assert len(kept) == 6
    denied = kept["denied-0"]
    assert denied["verb"] == "get"
    assert "stage" not in denied
    assert denied["objectRef"] == {
        "apiVersion": "v1",
        "namespace": "payments",
        "resource": "secrets",
        "name": "stripe-key",
    }
    assert denied["responseStatus"]["code"] == 403
    assert denied["user"] == {"username": "system:serviceaccount:web:frontend"}
    assert denied["sourceIPs"] == ["203.0.113.24"]
    assert denied["annotations"]["authorization.k8s.io/decision"] == "forbid"
    assert denied["cluster"] == "gke-prod"
    assert denied["gcp.logEntry"] == gke_entry("gke-logentry-secret-denied.json") | {
        "insertId": "denied-0"
    }
    bound = kept[binding["insertId"]]
    assert bound["objectRef"]["apiGroup"] == "rbac.authorization.k8s.io"
    assert bound["requestObject"]["roleRef"]["name"] == "cluster-admin"
    assert bound["responseStatus"]["code"] == 200


async def test_pubsub_push_authenticates_by_url_token_or_oidc(
    server: Running, session: aiohttp.ClientSession
) -> None:
    body = push_body(gke_entry("gke-logentry-exec.json"))
    gke = server.url + "/api/v1/pubsub/gke"
    assert (await post(session, gke, body)).status == 401
    assert (await post(session, gke + "?token=nope", body)).status == 403
    oidc = server.url + "/api/v1/pubsub/gke-oidc"
    refused = {
        "no token": {},
        "other signer": {"Authorization": f"Bearer {id_token(OTHER_KEY)}"},
        "other audience": {"Authorization": f"Bearer {id_token(aud='https://elsewhere')}"},
        "expired": {"Authorization": f"Bearer {id_token(exp=int(time.time()) - 60)}"},
        "other account": {"Authorization": f"Bearer {id_token(email='x@evil.example')}"},
        "URL token": {},
    }
    for case, headers in refused.items():
        url = oidc + (f"?token={PUSH_TOKEN}" if case == "URL token" else "")
        answer = await post(session, url, body, headers)
        assert answer.status in (401, 403), case
        assert set(answer.body) == {"error"}, case
    accepted = await post(session, oidc, body, {"Authorization": f"Bearer {id_token()}"})
    assert accepted.status == 200, accepted.body
    await server.close()
    assert [e["auditID"] for e in stored(server.data, "gke-oidc")] == [
        gke_entry("gke-logentry-exec.json")["insertId"]
    ]
    assert stored(server.data, "gke") == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"subscription": "s"}, "the body has no message object"),
        ({"message": {"data": "%%%"}}, "message.data is not valid base64"),
        (
            {"message": {"data": base64.b64encode(b'{"textPayload": "hello"}').decode()}},
            "message.data: a LogEntry without protoPayload.methodName",
        ),
    ],
)
async def test_pubsub_malformed_message_is_a_400_and_keeps_nothing(
    server: Running, session: aiohttp.ClientSession, body: dict[str, Any], reason: str
) -> None:
    answer = await post(session, f"{server.url}/api/v1/pubsub/gke?token={PUSH_TOKEN}", body)
    assert answer.status == 400
    assert answer.body["error"].startswith(reason), answer.body
    await server.close()
    assert stored(server.data, "gke") == []


async def test_aks_records_keep_the_cluster_and_fire_exec(
    server: Running, session: aiohttp.ClientSession
) -> None:
    [exec_event] = [  # the session opening: what k8s-pod-exec-attach counts
        line
        for line in (SAMPLES / "secret-recon-then-exec.log").read_text().splitlines()
        if '"ResponseStarted"' in line and '"exec"' in line
    ]
    body = {
        "records": [
            {
                "operationName": "Microsoft.ContainerService/managedClusters/diagnosticLogs/Read",
                "category": "kube-audit",
                "resourceId": "/SUBSCRIPTIONS/0000/RESOURCEGROUPS/RG/PROVIDERS/"
                "MICROSOFT.CONTAINERSERVICE/MANAGEDCLUSTERS/AKS-WEST",
                "time": "2026-12-05T14:02:11.0000000Z",
                "properties": {"log": exec_event, "stream": "stdout", "pod": "kube-apiserver-0"},
            }
        ]
    }
    headers = {"Authorization": f"Bearer {PUSH_TOKEN}"}
    answer = await post(session, server.url + "/api/v1/logstream/aks", body, headers)
    assert answer.status == 200, answer.body
    assert await matches(session, server, "k8s-pod-exec-attach-aks") == 1
    await server.close()
    [kept] = stored(server.data, "aks")
    assert kept == orjson.loads(exec_event) | {"cluster": "aks-west"}


async def test_stream_cluster_names_events_whose_envelope_names_none(
    server: Running, session: aiohttp.ClientSession
) -> None:
    messages = [
        orjson.loads(e["message"]) for e in cloudwatch("eks-subscription-data.json")["logEvents"]
    ]
    # Message extraction on: one event per record, newline-terminated.
    answer = await post(
        session,
        server.url + "/api/v1/firehose/fleet",
        firehose_body(*(orjson.dumps(m) + b"\n" for m in messages)),
        firehose_headers(),
    )
    assert answer.status == 200, answer.body
    assert await matches(session, server, "cluster-fleet") == len(messages)


async def test_a_follower_forwards_cloud_deliveries_with_their_credentials(
    server: Running, session: aiohttp.ClientSession
) -> None:
    ingestor = Follower()
    ingestor.leader = server.url
    runner = web.AppRunner(Receiver(ingestor, forward_to=ingestor.forward_to).app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        data = gzip.compress(orjson.dumps(cloudwatch("eks-subscription-data.json")))
        answer = await post(
            session, url + "/api/v1/firehose/eks", firehose_body(data), firehose_headers("f-1")
        )
        assert answer.status == 200, answer.body
        assert answer.body["requestId"] == "f-1"
        entry = gke_entry("gke-logentry-exec.json")
        answer = await post(
            session, f"{url}/api/v1/pubsub/gke?token={PUSH_TOKEN}", push_body(entry)
        )
        assert answer.status == 200, answer.body
    finally:
        await runner.cleanup()
    await server.close()
    delivered = cloudwatch("eks-subscription-data.json")["logEvents"]
    assert len(stored(server.data, "eks")) == len(delivered)
    assert [e["auditID"] for e in stored(server.data, "gke")] == [entry["insertId"]]


async def test_a_control_message_alone_is_acknowledged_and_stores_nothing(
    server: Running, session: aiohttp.ClientSession
) -> None:
    control = gzip.compress(orjson.dumps(cloudwatch("eks-subscription-control.json")))
    answer = await post(
        session, server.url + "/api/v1/firehose/eks", firehose_body(control), firehose_headers("c")
    )
    assert answer.status == 200, answer.body
    assert answer.body["requestId"] == "c"
    await server.close()
    assert stored(server.data, "eks") == []
