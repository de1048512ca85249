"""The configuration model: what AuditStream and AuditAlert resources mean, with secrets resolved.

One model, two sources: YAML files in standalone mode (`config.files`) and the Kubernetes API in
the operator (`kube`). Everything downstream (receiver, rule evaluation, alert state, notifiers)
sees only these plain objects and never a raw resource dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from cryptography import x509

from auditwatch.config.trust import TrustList
from auditwatch.rules.ast import Expr, Rule, disjunction

TargetType = Literal["webhook", "slack", "alertmanager"]

DEFAULT_REPEAT_INTERVAL = timedelta(seconds=200)
"""Parseable's default repeat interval."""
DEFAULT_REPEAT_TIMES = 5
"""Parseable's default number of notifications per firing."""
DEFAULT_RESOLVE_AFTER = timedelta(minutes=5)
"""Quiet period without a match after which a firing alert resolves."""
DEFAULT_TARGET_TIMEOUT = timedelta(seconds=10)
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
"""Parseable's request body limit."""
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
DEFAULT_NAMESPACE = "default"
"""The namespace of an AuditAlert file that names none (what kubectl would use)."""


class ConfigError(Exception):
    """A resource that cannot be used as it is: bad field, bad rule, missing Secret.

    `reason` is a CamelCase word for status conditions (`InvalidRule`, `SecretNotFound`,
    `StreamNotFound`, `InvalidSpec`); the message says what and where.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ClientCertificateAuth:
    """A stream's client-certificate auth: certificates issued by one of `authorities` (and,
    when `common_names` is not empty, with one of these subject common names)."""

    authorities: tuple[x509.Certificate, ...]
    authorities_pem: str
    """The bundle as given, for the TLS layer's trust store (`tls.ServerTLS.trust_clients`)."""
    common_names: frozenset[str] = frozenset()


@dataclass(frozen=True)
class OidcAuth:
    """An OIDC ID token a sender must present (Pub/Sub push): checked against these, offline."""

    issuer: str
    audience: str
    jwks: str
    """The issuer's JSON Web Key Set, as JSON text (no key is ever fetched over the network)."""
    email: str | None = None
    """The service account the token must name (its verified `email` claim), if set."""


@dataclass(frozen=True)
class IngestAuth:
    """Credentials a sender must present to a stream: basic auth, a bearer token (also the
    Firehose access key and the Pub/Sub push URL token), a client certificate (over HTTPS), or
    an OIDC token."""

    username: str | None = None
    password: str | None = None
    bearer_token: str | None = None
    client_certificate: ClientCertificateAuth | None = None
    oidc: OidcAuth | None = None


NamespaceSource = Literal["All", "Same", "Selector", "None"]


@dataclass(frozen=True)
class LabelRequirement:
    """One `matchExpressions` entry of a Kubernetes label selector."""

    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: frozenset[str] = frozenset()

    def holds(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        inside = self.key in labels and labels[self.key] in self.values
        return inside if self.operator == "In" else not inside


@dataclass(frozen=True)
class NamespaceFilter:
    """Which namespaces a grant covers, as Gateway API's `allowedRoutes.namespaces` says it.

    `Same` is the namespace the AuditStream's own Secrets default to: the operator's namespace
    in a cluster, `default` in standalone files.
    """

    source: NamespaceSource
    same: str = DEFAULT_NAMESPACE
    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[LabelRequirement, ...] = ()

    def admits(self, namespace: str, labels: Mapping[str, str]) -> bool:
        if self.source == "All":
            return True
        if self.source == "Same":
            return namespace == self.same
        if self.source == "None":
            return False
        return all(labels.get(key) == value for key, value in self.match_labels) and all(
            requirement.holds(labels) for requirement in self.match_expressions
        )


@dataclass(frozen=True)
class AlertGrant:
    """What an AuditStream grants AuditAlerts: who may attach, and who sees the whole cluster.

    Everyone else who may attach sees only events about its own namespace.
    """

    namespaces: NamespaceFilter = NamespaceFilter("All")
    cluster_wide: NamespaceFilter = NamespaceFilter("Same")


@dataclass(frozen=True)
class StreamSpec:
    """An AuditStream: where events arrive and how long they are kept."""

    name: str
    auth: IngestAuth | None = None
    allowed_alerts: AlertGrant = AlertGrant()
    trust_lists: dict[str, TrustList] = field(default_factory=dict)
    """Identities the alerts on this stream may except by naming a list (`config/trust.py`)."""
    retention: timedelta | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    cluster: str | None = None
    """The cluster to name on events whose envelope names none (docs/sources.md)."""
    generation: int = 1


@dataclass(frozen=True)
class RepeatSpec:
    """How often a firing alert is notified again, and how many notifications in all."""

    interval: timedelta = DEFAULT_REPEAT_INTERVAL
    times: int = DEFAULT_REPEAT_TIMES


@dataclass(frozen=True)
class TargetSpec:
    """Where notifications go, with every secret already resolved."""

    type: TargetType
    endpoint: str
    name: str
    """Stable identifier of this target within its alert, for status and metrics."""
    headers: dict[str, str] = field(default_factory=dict)
    skip_tls_check: bool = False
    username: str | None = None
    password: str | None = None
    repeat: RepeatSpec = RepeatSpec()
    timeout: timedelta = DEFAULT_TARGET_TIMEOUT


DEFAULT_MAX_GROUPS = 1000
"""Groups a grouped threshold tracks at once, unless `threshold.maxGroups` says otherwise."""


@dataclass(frozen=True)
class ThresholdSpec:
    """`count` matches within `window` of event time, per group of `group_by` values."""

    count: int
    window: timedelta
    group_by: tuple[str, ...] = ()
    """The fields as written (`user.username`): names of the group in notices and status."""
    columns: tuple[str, ...] = ()
    """The typed column of each `group_by` field (`rules.window.group_column`)."""
    max_groups: int = DEFAULT_MAX_GROUPS


@dataclass(frozen=True)
class AlertSpec:
    """An AuditAlert: a rule over a stream, a message, targets."""

    namespace: str
    name: str
    stream: str
    rule: Rule
    rule_type: Literal["column", "composite"]
    rule_text: str
    """The rule as the user wrote it (composite string, or column config as JSON)."""
    message: str
    targets: tuple[TargetSpec, ...]
    resolve_after: timedelta = DEFAULT_RESOLVE_AFTER
    severity: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    """Extra labels sent to Alertmanager (from the resource's spec.labels)."""
    generation: int = 1
    threshold: ThresholdSpec | None = None
    """Fire per group on `count` matches within a window (`groups.py`); None: every match
    counts for the alert as a whole (with the rule's `repeats`)."""
    cluster_wide: bool = False
    """Sees every event of its stream, as the stream grants; else only events about its own
    namespace (set by `config.build.check_stream`)."""
    exceptions: Expr | None = None
    """The events its own `spec.exceptions` (fields and values) except."""
    trust_lists: tuple[str, ...] = ()
    """The stream's trust lists its `spec.exceptions` name."""
    trusted: Expr | None = None
    """The events those trust lists except (set by `config.build.check_stream`)."""

    @property
    def key(self) -> str:
        """`namespace/name`: unique across alerts, used for state, status and metrics."""
        return f"{self.namespace}/{self.name}"

    @property
    def scope(self) -> str | None:
        """The one namespace whose events this alert sees; None: the whole stream."""
        return None if self.cluster_wide else self.namespace

    @property
    def unless(self) -> Expr | None:
        """Every event the alert excepts: matched by its rule, counted, never reported."""
        parts = [part for part in (self.exceptions, self.trusted) if part is not None]
        return disjunction(parts) if parts else None


@dataclass(frozen=True)
class InvalidAlert:
    """An AuditAlert that cannot run: its status says Invalid with this reason and message."""

    namespace: str
    name: str
    stream: str | None
    reason: str
    message: str
    generation: int = 1

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"
