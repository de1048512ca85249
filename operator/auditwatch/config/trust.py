"""Trust lists: named sets of identities an AuditStream trusts, shared by the alerts on it.

"Trust cert-manager's controller to read Secrets" is one entry of one list, and every Secret
detection that names the list (`spec.exceptions.<name>.trustList`) excepts it. The lists live
on the AuditStream (`spec.trustLists`): the stream is cluster-scoped and written by the platform
team, so a tenant who may only create AuditAlerts in its namespace can use a list (silence its
own alerts with it) but never add itself to one, and so never exempt itself from the platform
team's alerts.

An entry names identities (service accounts, users, groups, container images) and may narrow
what they are trusted for (namespaces, resources, verbs). It compiles into a rule expression,
run by the alert's evaluation plan like any exception.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from auditwatch.rules import ast

USERNAME = ast.Field(("user", "username"))
GROUPS = ast.Field(("user", "groups"))
NAMESPACE = ast.Field(("objectRef", "namespace"))
RESOURCE = ast.Field(("objectRef", "resource"))
VERB = ast.Field(("verb",))
POD_SPECS = (("requestObject", "spec"), ("requestObject", "spec", "template", "spec"))
"""Where a request's pod spec is: a Pod's own, or the template of a workload object."""
CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")


@dataclass(frozen=True)
class TrustEntry:
    """Identities, and what they are trusted for (empty: anything)."""

    name: str
    service_accounts: tuple[tuple[str, str], ...] = ()
    """(namespace, name) of each ServiceAccount."""
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    """Image repositories: a request whose pod runs only images from these is trusted."""
    namespaces: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ()

    def expression(self) -> ast.Expr | None:
        """The events this entry trusts; None when it names no identity."""
        identities: list[ast.Expr] = []
        usernames = (
            *(f"system:serviceaccount:{ns}:{name}" for ns, name in self.service_accounts),
            *self.users,
        )
        if usernames:
            identities.append(ast.Compare(USERNAME, ast.Op.IN, tuple(usernames)))
        if self.groups:
            identities.append(ast.Compare(GROUPS, ast.Op.IN, self.groups))
        if self.images:
            identities.append(_only_images(self.images))
        if not identities:
            return None
        narrowing = [
            ast.Compare(field, ast.Op.IN, values)
            for field, values in (
                (NAMESPACE, self.namespaces),
                (RESOURCE, self.resources),
                (VERB, self.verbs),
            )
            if values
        ]
        return ast.conjunction([ast.disjunction(identities), *narrowing])


def _only_images(repositories: tuple[str, ...]) -> ast.Expr:
    """The request's pod spec has containers, and every image of it is from `repositories`
    (`repo`, `repo:tag` or `repo@digest`): one untrusted container and it is not trusted."""
    pattern = r"\A(?:" + "|".join(map(re.escape, repositories)) + r")(?:[:@][^\n]*)?\Z"
    specs = []
    for spec in POD_SPECS:
        containers = ast.Exists(ast.Field((*spec, "containers", "image")))
        only_trusted = [
            ast.Not(ast.Compare(ast.Field((*spec, kind, "image")), ast.Op.NOT_REGEX, pattern))
            for kind in CONTAINER_LISTS
        ]
        specs.append(ast.conjunction([containers, *only_trusted]))
    return ast.disjunction(specs)


@dataclass(frozen=True)
class TrustList:
    """A named list of entries on a stream."""

    name: str
    entries: tuple[TrustEntry, ...]

    def expression(self) -> ast.Expr | None:
        """The events some entry trusts; None for a list without identities.

        Entries trusted for the same namespaces, resources and verbs are merged into one test
        (one `in` over all their names): a list of twenty add-ons costs a few comparisons per
        matched row, not twenty.
        """
        merged: dict[tuple[tuple[str, ...], ...], TrustEntry] = {}
        for entry in self.entries:
            scope = (entry.namespaces, entry.resources, entry.verbs)
            known = merged.get(scope)
            merged[scope] = entry if known is None else _merged(known, entry)
        found = [e for entry in merged.values() if (e := entry.expression()) is not None]
        return ast.disjunction(found) if found else None


def _merged(first: TrustEntry, second: TrustEntry) -> TrustEntry:
    """The identities of both entries, trusted for what both are trusted for (the same)."""
    return replace(
        first,
        name=f"{first.name}+{second.name}",
        service_accounts=first.service_accounts + second.service_accounts,
        users=first.users + second.users,
        groups=first.groups + second.groups,
        images=first.images + second.images,
    )


def build_trust_lists(lists: Mapping[str, Any]) -> dict[str, TrustList]:
    """`spec.trustLists` of an AuditStream (shapes checked by the schema)."""
    return {
        name: TrustList(
            name,
            tuple(
                _entry(entry_name, entry)
                for entry_name, entry in sorted((spec.get("entries") or {}).items())
            ),
        )
        for name, spec in sorted(lists.items())
    }


def _entry(name: str, entry: Mapping[str, Any]) -> TrustEntry:
    return TrustEntry(
        name,
        service_accounts=tuple(
            (account["namespace"], account["name"]) for account in entry.get("serviceAccounts", ())
        ),
        users=tuple(entry.get("users", ())),
        groups=tuple(entry.get("groups", ())),
        images=tuple(entry.get("images", ())),
        namespaces=tuple(entry.get("namespaces", ())),
        resources=tuple(entry.get("resources", ())),
        verbs=tuple(entry.get("verbs", ())),
    )
