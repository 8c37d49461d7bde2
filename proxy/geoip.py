"""The country of a client address, from a MaxMind DB file (`serve --geoip-db`, `explain`/`simulate --geoip-db`).

One job: open a `.mmdb` file (GeoLite2-Country or -City, GeoIP2's, or any database in the same
format), check that it can answer, and give the country of an address. The engine never sees the
file: the ingress puts what `country()` answers into `EventContext.country`, after a CDN's country
header and before the event's own `context.location.country` (docs/configuration.md, "GeoIP").

- **Which country.** A record's `country.iso_code` (where MaxMind locates the address), else its
  `registered_country.iso_code` (where the block is registered: some anycast, satellite and
  EU-wide blocks have only that), upper case. A record with neither, or no record: None.
- **Addresses with no country.** Loopback, private (RFC 1918, RFC 6598 shared, IPv6 unique-local),
  link-local, multicast and unspecified addresses are never looked up: None, so the event's own
  location counts. An IPv4-mapped IPv6 address (`::ffff:203.0.113.7`) is looked up as its IPv4.
- **A private copy.** The file is read once into memory the process owns (a memfd, mapped by the
  maxminddb C extension; the pure-Python reader where there is none), so a file overwritten in place
  later (`cp` rather than geoipupdate's rename) can never tear the database a running process
  reads. Memory: the file's size per process (GeoLite2-Country about 10 MB, -City about 60 MB).
- **Cached.** Each opened database keeps the countries of its last CACHE_SIZE addresses (an LRU);
  a new file starts with an empty cache, so a new mapping counts from the first request after it.

`GeoIP` is the database in use; the watcher (proxy/control/geoip_watch.py) swaps a newly opened
one in whole, so a lookup never sees half of an old file and half of a new one.
"""

from __future__ import annotations

import functools
import io
import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import maxminddb

CACHE_SIZE = 32_768  # addresses per opened database: at most ~5 MB of cache
# MaxMind's products in the same format that hold no location: a database that can never answer.
NO_COUNTRY_TYPES = frozenset({
    "GeoLite2-ASN", "GeoIP2-ASN", "GeoIP2-ISP", "GeoIP2-Domain", "GeoIP2-Connection-Type", "GeoIP2-User-Connection-Type",
    "GeoIP2-Anonymous-IP", "GeoIP-Anonymous-Plus", "GeoIP2-IP-Risk", "DBIP-ASN-Lite", "DBIP-ASN", "DBIP-ISP",
})
_NO_COUNTRY_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"))
# Probed at open: a search tree or data section too damaged to walk fails here, not on a request.
_PROBES = ("1.1.1.1", "8.8.8.8", "81.2.69.142", "203.0.113.7")
_PROBES_V6 = ("2001:4860:4860::8888", "2a02:ff0::1")

FileIdentity = tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns): what a replacement changes


class GeoIPError(ValueError):
    """A database that cannot be used; the message starts with its path."""


def file_identity(path: str) -> FileIdentity:
    """The identity of the file at `path` (symlinks followed, as a Kubernetes volume's are); OSError if it cannot be read."""
    info = os.stat(path)
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


@dataclass(frozen=True, slots=True)
class Description:
    """What an opened database is, for logs and the build-time gauge."""

    path: str
    database_type: str
    build_epoch: int
    ip_version: int


class CountryDB:
    """One opened database file; `country(address)` is cached per address (LRU of CACHE_SIZE)."""

    def __init__(self, reader: maxminddb.Reader, description: Description, identity: FileIdentity) -> None:
        self._reader = reader
        self.description = description
        self.identity = identity  # of the file as it was read
        self.country: Callable[[str], str | None] = functools.lru_cache(maxsize=CACHE_SIZE)(self._country)

    def _country(self, address: str) -> str | None:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified or any(ip in n for n in _NO_COUNTRY_NETWORKS):
            return None
        if ip.version == 6 and self.description.ip_version == 4:
            return None  # an IPv4-only database has nothing for an IPv6 client
        try:
            record = self._reader.get(ip)
        except (ValueError, maxminddb.InvalidDatabaseError):  # a damaged record, or a reader already closed by a swap: no country
            return None
        return iso_code(record)

    def close(self) -> None:
        self._reader.close()


def iso_code(record: Any) -> str | None:
    """`country.iso_code`, else `registered_country.iso_code`, upper case; None without either."""
    if not isinstance(record, dict):
        return None
    for key in ("country", "registered_country"):
        section = record.get(key)
        if isinstance(section, dict):
            code = section.get("iso_code")
            if isinstance(code, str) and code.strip():
                return code.strip().upper()
    return None


def open_country_db(path: str) -> CountryDB:
    """Read and check the database at `path`; GeoIPError naming the path when it cannot serve countries."""
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            data = handle.read()
    except OSError as exc:
        raise GeoIPError(f"{path}: cannot read the GeoIP database: {exc.strerror or exc}") from None
    identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if data[:2] == b"\x1f\x8b":
        raise GeoIPError(f"{path}: not a MaxMind DB (.mmdb) file: it is gzip-compressed (a GeoLite2 download is a .tar.gz: extract the .mmdb)")
    try:
        reader = _reader_of(data)
    except (maxminddb.InvalidDatabaseError, ValueError, TypeError, OSError) as exc:
        detail = re.sub(r"\s*\(/proc/self/fd/\d+\)", "", str(exc))  # the private copy's name means nothing to an operator
        raise GeoIPError(f"{path}: not a MaxMind DB (.mmdb) file: {detail}") from None
    try:
        metadata = reader.metadata()
        description = Description(path, str(metadata.database_type), int(metadata.build_epoch), int(metadata.ip_version))
        if description.database_type in NO_COUNTRY_TYPES:
            raise GeoIPError(f"{path}: a {description.database_type} database has no countries; use GeoLite2-Country or GeoLite2-City")
        for probe in _PROBES + (_PROBES_V6 if description.ip_version == 6 else ()):
            try:
                reader.get(probe)
            except (maxminddb.InvalidDatabaseError, ValueError) as exc:
                raise GeoIPError(f"{path}: damaged MaxMind DB: looking up {probe} failed: {exc}") from None
    except BaseException:
        reader.close()
        raise
    return CountryDB(reader, description, identity)


def _reader_of(data: bytes) -> maxminddb.Reader:
    """A reader over a private copy of `data`: a memfd the C extension maps, else the pure-Python reader in memory."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("splitter-geoip", os.MFD_CLOEXEC)
        try:
            with open(fd, "wb", closefd=False) as copy:
                copy.write(data)
            try:
                return maxminddb.open_database(f"/proc/self/fd/{fd}", maxminddb.MODE_AUTO)
            except OSError:
                pass  # no /proc to reopen the memfd by: read from memory below
        finally:
            os.close(fd)  # the reader's mapping keeps the copy alive
    return maxminddb.open_database(io.BytesIO(data), maxminddb.MODE_FD)


class GeoIP:
    """The database in use. `country()` is what the ingress calls once per request; `swap()` replaces the database whole."""

    def __init__(self, db: CountryDB) -> None:
        self.current = db

    def country(self, address: str | None) -> str | None:
        return self.current.country(address) if address else None

    def swap(self, db: CountryDB) -> CountryDB:
        """Put `db` in use and return the one it replaces (the caller closes it: no lookup runs
        between the swap and the close, both happen on the event loop that serves requests)."""
        old, self.current = self.current, db
        return old

    def close(self) -> None:
        self.current.close()
