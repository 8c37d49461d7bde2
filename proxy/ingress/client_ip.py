"""The client's address, seen through a chain of proxies only as far as the chain is trusted.

`X-Forwarded-For` is written by whoever sent the request, so it is believed only when the peer is a
trusted proxy (by default loopback: the app or ingress next to the sidecar). The client is the
right-most address that is not itself a trusted proxy; upstreams receive the trusted part of the
chain with the peer appended, as nginx's `$proxy_add_x_forwarded_for` would, minus forgeries.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from proxy.settings import IPNetwork


def _trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def client_address(peer: str | None, forwarded_for: str | None, trusted: Sequence[IPNetwork]) -> tuple[str | None, str | None]:
    """(client ip, X-Forwarded-For to send upstream)."""
    if peer is None:
        return None, forwarded_for
    if not forwarded_for or not _trusted(peer, trusted):
        return peer, peer
    chain = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    client = peer
    kept: list[str] = []
    for position in range(len(chain) - 1, -1, -1):
        hop = chain[position]
        if not _is_ip(hop):
            break  # "unknown", obfuscated or garbage: nothing further left can be believed
        kept.insert(0, hop)
        client = hop
        if not _trusted(hop, trusted):
            break
    return client, ", ".join([*kept, peer])
