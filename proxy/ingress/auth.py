"""Which write key a request presents, the ways Segment accepts it.

HTTP Basic with the key as user name (with or without the trailing colon), or a `writeKey` field
at the top level of the body; `Bearer` (OAuth) requests carry the key in the body. The key picks
the source; splitter never forwards it as-is unless the source configures no credential.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from proxy.engine import RuleSet, Source
from proxy.ingress.responses import IngressError


def key_from_header(headers: Mapping[str, str]) -> str | None:
    value = headers.get("Authorization")
    if not value:
        return None
    scheme, _, credentials = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None  # Bearer: the write key travels in the body
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise IngressError(401, "invalid_authorization", "Authorization: Basic credentials are not valid base64") from None
    return decoded.partition(":")[0] or None


def key_from_body(body: Any) -> str | None:
    if isinstance(body, dict):
        key = body.get("writeKey")
        if isinstance(key, str) and key:
            return key
    return None


def authenticate(rules: RuleSet, header_key: str | None, body: Any) -> tuple[Source, str]:
    """(source, presented key) or a 401 that says which part was wrong."""
    key = header_key or key_from_body(body)
    if key is None:
        raise IngressError(401, "missing_write_key", "no write key: send it as the HTTP Basic user name or as writeKey in the body")
    source = rules.source_for_key(key)
    if source is None:
        raise IngressError(401, "invalid_write_key", "unknown write key")
    return source, key
