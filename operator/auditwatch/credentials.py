"""HTTP Basic and Bearer credentials, as senders present them and as targets expect them."""

from __future__ import annotations

import base64
import binascii


def basic_authorization(username: str, password: str) -> str:
    """The `Authorization` header value for HTTP Basic auth."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def bearer_authorization(token: str) -> str:
    """The `Authorization` header value for a bearer token."""
    return f"Bearer {token}"


def parse_basic(credentials: str) -> tuple[str, str] | None:
    """The (username, password) of a Basic token (the part after `Basic `); None if malformed."""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, _, password = decoded.partition(":")
    return username, password
