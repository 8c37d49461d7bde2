"""Which write key a request presents, the ways Segment and RudderStack accept it.

HTTP Basic with the key as user name (with or without the trailing colon), a `writeKey` query
parameter (RudderStack's form: its browser SDK's `navigator.sendBeacon` cannot set headers), or a
`writeKey` field at the top level of the body; `Bearer` (OAuth) requests carry the key in the body.
When a request carries more than one, the first of that list wins: the Authorization header, then
the query, then the body. The key picks the source; splitter never forwards it as-is unless the
source configures no credential, and never logs or echoes it unmasked.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

from proxy.engine import RuleSet, Source, mask
from proxy.ingress.request import IngestRequest
from proxy.ingress.responses import IngressError

# A write key in a URL: `?writeKey=KEY` and the CDN paths' `/v1/projects/KEY/`, `/analytics.js/v1/KEY/`.
_KEY_IN_URL = re.compile(r"""(writeKey=|/v1/projects/|/analytics\.js/v1/)([^&/\s'"]+)""", re.IGNORECASE)


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


def key_from_query(query: Mapping[str, str]) -> str | None:
    """`?writeKey=KEY`, as RudderStack's gateway takes it on its beacon and webhook routes."""
    return query.get("writeKey") or None


def request_key(request: IngestRequest) -> str | None:
    """The key from the Authorization header, else from the query (parsed only when the URL has one)."""
    return key_from_header(request.headers) or (key_from_query(request.query) if request.rel_url.raw_query_string else None)


def mask_keys_in(text: str) -> str:
    """`text` (say, aiohttp's message quoting a request line it could not parse) with URL write keys masked."""
    return _KEY_IN_URL.sub(lambda found: found[1] + mask(found[2]), text)


def key_from_body(body: Any) -> str | None:
    if isinstance(body, dict):
        key = body.get("writeKey")
        if isinstance(key, str) and key:
            return key
    return None


def authenticate(rules: RuleSet, presented: str | None, body: Any) -> tuple[Source, str]:
    """(source, presented key) or a 401 that says which part was wrong. `presented`: the key from
    the header or the query (`request_key`), which wins over the body's."""
    key = presented or key_from_body(body)
    if key is None:
        raise IngressError(401, "missing_write_key",
                           "no write key: send it as the HTTP Basic user name, as ?writeKey= in the URL or as writeKey in the body")
    source = rules.source_for_key(key)
    if source is None:
        raise IngressError(401, "invalid_write_key", "unknown write key")
    return source, key
