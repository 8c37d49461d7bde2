"""GeoIP for `country` (issue 20): `serve --geoip-db`, and `explain` / `simulate --geoip-db`.

Each test builds its own small MaxMind DB with mmdb-writer (no download): documentation networks
mapped to countries, as GeoLite2 lays them out (an IPv6 tree with IPv4 under ::/96). Sockets stay
on loopback: the client sends from 127.0.0.1, a trusted proxy by default, and names the address to
look up in `X-Forwarded-For`. Real `splitter serve` processes, real stand-in receivers, real files
replaced under a running proxy; nothing of splitter's own is mocked.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import orjson
import pytest
import yaml
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from loadtest.process import SplitterProcess, launch_splitter
from loadtest.receivers import RunningReceiver, start_receiver
from proxy.geoip import CACHE_SIZE, GeoIPError, open_country_db
from tests.conftest import ROOT, RULES_ENV
from tests.test_cli_engine import run

WRITE_KEY = "geoip-web-key-0123"
RUDDER_KEY = "geoip-rs-key-0123"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(), "Content-Type": "application/json"}
FAST = "{retry_base: 0.02, retry_max: 0.2, flush_interval: 0.002}"
RULES = f"""\
version: 1
destinations:
  segment:     {{kind: segment,     url: "${{SEGMENT_URL}}", delivery: {FAST}}}
  rudderstack: {{kind: rudderstack, url: "${{RUDDERSTACK_DATA_PLANE_URL}}", timeout: 5, delivery: {FAST}}}
sources:
  - name: web
    write_keys: ["{WRITE_KEY}"]
    credentials: {{rudderstack: "{RUDDER_KEY}"}}
cohort: {{key: [userId], salt: "geo"}}
rules:
  - name: germany
    when: {{country: DE}}
    route: rudderstack
  - name: france
    when: {{country: [FR]}}
    route: [segment, rudderstack]
  - name: everyone-else
    route: segment
"""
GERMAN, AMERICAN, REGISTERED_ONLY, UNMAPPED = "203.0.113.7", "198.51.100.20", "192.0.2.33", "8.8.8.8"
# The database a weekly update replaces: 203.0.113.0/24 moves from Germany to France.
FIRST = {"203.0.113.0/24": {"country": {"iso_code": "DE"}, "registered_country": {"iso_code": "DE"}},
         "198.51.100.0/24": {"country": {"iso_code": "US"}, "registered_country": {"iso_code": "US"}},
         "192.0.2.0/24": {"registered_country": {"iso_code": "FR"}},  # no location: the registration country counts
         "2001:db8:de::/48": {"country": {"iso_code": "de"}}}
UPDATED = {**FIRST, "203.0.113.0/24": {"country": {"iso_code": "FR"}, "registered_country": {"iso_code": "FR"}}}


def mmdb_bytes(networks: Mapping[str, Any], tmp: Path, database_type: str = "GeoLite2-Country") -> bytes:
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type=database_type, languages=["en"], description="splitter test")
    for network, record in networks.items():
        writer.insert_network(IPSet([network]), record)
    scratch = tmp / f".build-{time.monotonic_ns()}.mmdb"
    writer.to_db_file(str(scratch))
    data = scratch.read_bytes()
    scratch.unlink()
    return data


def replace_atomically(path: Path, data: bytes) -> None:
    """As geoipupdate does: a temporary file in the same directory, renamed over the old one."""
    temporary = path.with_name(path.name + ".temporary")
    temporary.write_bytes(data)
    os.replace(temporary, path)


@pytest.fixture
def geoip_db(tmp_path: Path) -> Path:
    path = tmp_path / "geoip" / "GeoLite2-Country.mmdb"
    path.parent.mkdir()
    replace_atomically(path, mmdb_bytes(FIRST, tmp_path))
    return path


# --------------------------------------------------------------------------- the reader

def test_country_of_an_address(geoip_db: Path) -> None:
    db = open_country_db(str(geoip_db))
    try:
        assert db.description.database_type == "GeoLite2-Country"
        assert db.country(GERMAN) == "DE" and db.country(AMERICAN) == "US"
        assert db.country(REGISTERED_ONLY) == "FR"  # registered_country when the record has no country
        assert db.country("2001:db8:de::1") == "DE"  # upper-cased
        assert db.country("::ffff:" + GERMAN) == "DE"  # an IPv4-mapped IPv6 address is its IPv4
        assert db.country(UNMAPPED) is None
        for private in ("127.0.0.1", "::1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "100.64.0.1", "169.254.0.1", "fe80::1", "fd00::1",
                        "0.0.0.0", "224.0.0.1"):
            assert db.country(private) is None, private
        assert db.country("not an address") is None and db.country("") is None
        before = db.country.cache_info()  # type: ignore[attr-defined]
        assert before.maxsize == CACHE_SIZE
        assert db.country(GERMAN) == "DE"
        assert db.country.cache_info().hits == before.hits + 1  # type: ignore[attr-defined]
    finally:
        db.close()


def test_files_that_cannot_serve_are_refused_naming_the_path(tmp_path: Path, geoip_db: Path) -> None:
    missing = tmp_path / "nowhere.mmdb"
    garbage = tmp_path / "garbage.mmdb"
    garbage.write_bytes(b"<html>402 Payment Required</html>")
    truncated = tmp_path / "truncated.mmdb"
    truncated.write_bytes(geoip_db.read_bytes()[: geoip_db.stat().st_size // 2])
    gzipped = tmp_path / "GeoLite2-Country.tar.gz"
    gzipped.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 64)
    asn = tmp_path / "GeoLite2-ASN.mmdb"
    asn.write_bytes(mmdb_bytes({"203.0.113.0/24": {"autonomous_system_number": 64496}}, tmp_path, "GeoLite2-ASN"))
    expected = {
        missing: f"{missing}: cannot read the GeoIP database: No such file or directory",
        garbage: f"{garbage}: not a MaxMind DB (.mmdb) file: ",
        truncated: f"{truncated}: not a MaxMind DB (.mmdb) file: ",
        gzipped: f"{gzipped}: not a MaxMind DB (.mmdb) file: it is gzip-compressed (a GeoLite2 download is a .tar.gz: extract the .mmdb)",
        asn: f"{asn}: a GeoLite2-ASN database has no countries; use GeoLite2-Country or GeoLite2-City",
        tmp_path: f"{tmp_path}: cannot read the GeoIP database: Is a directory",
    }
    for path, message in expected.items():
        with pytest.raises(GeoIPError) as refused:
            open_country_db(str(path))
        assert str(refused.value).startswith(message), str(refused.value)
        assert "/proc/self/fd" not in str(refused.value)


# --------------------------------------------------------------------------- a running proxy

@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[RunningReceiver, RunningReceiver]]:
    segment = await start_receiver("segment", record=True)
    rudder = await start_receiver("rudderstack", record=True, valid_keys=[RUDDER_KEY])
    yield segment, rudder
    await segment.close()
    await rudder.close()


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


def env_for(upstreams: tuple[RunningReceiver, RunningReceiver], **extra: str) -> dict[str, str]:
    segment, rudder = upstreams
    env = {name: value for name, value in os.environ.items() if not name.startswith("SPLITTER_")}
    return {**env, "SEGMENT_URL": segment.url, "RUDDERSTACK_DATA_PLANE_URL": rudder.url, **extra}


async def rule_counts(client: aiohttp.ClientSession, splitter: SplitterProcess) -> dict[str, float]:
    """Events routed so far per rule (primary copies), from the proxy's own /metrics."""
    async with client.get(splitter.admin + "/metrics") as response:
        text = await response.text()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("splitter_events_total{") and 'role="primary"' in line:
            rule = line.partition('rule="')[2].partition('"')[0]
            counts[rule] = counts.get(rule, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


async def metric(client: aiohttp.ClientSession, splitter: SplitterProcess, sample: str) -> float | None:
    async with client.get(splitter.admin + "/metrics") as response:
        text = await response.text()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " ")]
    return values[0] if values else None


SENT = iter(range(1_000_000))


async def routed(client: aiohttp.ClientSession, splitter: SplitterProcess, *, forwarded_for: str | None = None,
                 headers: Mapping[str, str] | None = None, location: str | None = None, path: str = "/v1/batch") -> str:
    """Send one event from 127.0.0.1 and return the rule that routed it."""
    event: dict[str, Any] = {"type": "track", "event": "Geo", "userId": f"u-{next(SENT)}"}
    if location is not None:
        event["context"] = {"location": {"country": location}}
    sent = {**AUTH, **(headers or {}), **({"X-Forwarded-For": forwarded_for} if forwarded_for is not None else {})}
    body = {"batch": [event]} if path == "/v1/batch" else event
    before = await rule_counts(client, splitter)
    async with client.post(splitter.ingress + path, data=orjson.dumps(body), headers=sent) as response:
        assert response.status == 200, await response.text()
    after = await rule_counts(client, splitter)
    (rule,) = [name for name, count in after.items() if count > before.get(name, 0.0)]
    return rule


async def launch(rules: Path, env: Mapping[str, str], *extra: str) -> SplitterProcess:
    return await launch_splitter(str(rules), env, ["--reload-interval", "0.2", "--drain-timeout", "5", *extra])


async def test_routes_by_the_client_address_through_a_running_proxy(rules: Path, geoip_db: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    splitter = await launch(rules, env_for(upstreams), "--geoip-db", str(geoip_db))
    try:
        opened = await splitter.wait_for_log("geoip_db_opened")
        assert (opened["path"], opened["database_type"]) == (str(geoip_db), "GeoLite2-Country")
        async with aiohttp.ClientSession() as client:
            assert await routed(client, splitter, forwarded_for=GERMAN) == "germany"
            assert await routed(client, splitter, forwarded_for=AMERICAN) == "everyone-else"
            assert await routed(client, splitter, forwarded_for=REGISTERED_ONLY) == "france"
            assert await routed(client, splitter, forwarded_for="2001:db8:de::42") == "germany"
            # Browser calls too (a short path), whose event carries the client's address upstream.
            assert await routed(client, splitter, forwarded_for=GERMAN, path="/v1/t") == "germany"
            built = await metric(client, splitter, "splitter_geoip_database_build_timestamp_seconds")
            assert built is not None and abs(built - time.time()) < 3600
        await rudder.receiver.wait_for(4)
        await segment.receiver.wait_for(2)  # the American and the registered-only (France: both)
        by_ip = {r.event.get("context", {}).get("ip") for r in rudder.receiver.events}
        assert GERMAN in by_ip  # the /v1/t event: context.ip from the trusted X-Forwarded-For
    finally:
        assert await splitter.stop() == 0


async def test_a_cdn_header_then_geoip_then_the_events_own_location(rules: Path, geoip_db: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    splitter = await launch(rules, env_for(upstreams), "--geoip-db", str(geoip_db))
    try:
        async with aiohttp.ClientSession() as client:
            # A CDN's country header wins over GeoIP and over the event.
            assert await routed(client, splitter, forwarded_for=GERMAN, headers={"CF-IPCountry": "FR"}, location="DE") == "france"
            # GeoIP wins over the event's own context.location.country.
            assert await routed(client, splitter, forwarded_for=AMERICAN, location="DE") == "everyone-else"
            assert await routed(client, splitter, forwarded_for=GERMAN, location="FR") == "germany"
            # No country for the address (loopback, private, not in the database): the event's location counts.
            assert await routed(client, splitter, location="DE") == "germany"  # the peer, 127.0.0.1, is the client
            assert await routed(client, splitter, forwarded_for="10.20.30.40", location="FR") == "france"
            assert await routed(client, splitter, forwarded_for=UNMAPPED, location="DE") == "germany"
            assert await routed(client, splitter, forwarded_for=UNMAPPED) == "everyone-else"
    finally:
        assert await splitter.stop() == 0


async def test_an_untrusted_x_forwarded_for_is_not_looked_up(rules: Path, geoip_db: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    # 127.0.0.1 is not a trusted proxy here: what it claims in X-Forwarded-For is ignored, and the
    # client is 127.0.0.1 itself, which has no country.
    splitter = await launch(rules, env_for(upstreams), "--geoip-db", str(geoip_db), "--trusted-proxies", "10.0.0.0/8")
    try:
        async with aiohttp.ClientSession() as client:
            assert await routed(client, splitter, forwarded_for=GERMAN) == "everyone-else"
            assert await routed(client, splitter, forwarded_for=GERMAN, location="FR") == "france"
    finally:
        assert await splitter.stop() == 0
    # Trusted (the default), only the right-most address that is not a trusted proxy counts: a
    # client cannot forge its country by writing an address in front of its own.
    splitter = await launch(rules, env_for(upstreams), "--geoip-db", str(geoip_db))
    try:
        async with aiohttp.ClientSession() as client:
            assert await routed(client, splitter, forwarded_for=f"{GERMAN}, {AMERICAN}") == "everyone-else"
            assert await routed(client, splitter, forwarded_for=f"{AMERICAN}, {GERMAN}, 127.0.0.5") == "germany"
    finally:
        assert await splitter.stop() == 0


async def wait_metric(client: aiohttp.ClientSession, splitter: SplitterProcess, sample: str, value: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := await metric(client, splitter, sample)) != value:
        assert time.monotonic() < deadline, f"{sample} = {seen}, expected {value}"
        await asyncio.sleep(0.05)


async def test_a_replaced_database_takes_effect_and_a_bad_one_keeps_the_old(rules: Path, geoip_db: Path, tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    splitter = await launch(rules, env_for(upstreams, SPLITTER_GEOIP_DB=str(geoip_db)))  # the variable, as the manifests set it
    success, error = 'splitter_geoip_reloads_total{result="success"}', 'splitter_geoip_reloads_total{result="error"}'
    try:
        async with aiohttp.ClientSession() as client:
            assert await routed(client, splitter, forwarded_for=GERMAN) == "germany"
            assert (await metric(client, splitter, success), await metric(client, splitter, error)) == (0.0, 0.0)

            # geoipupdate's weekly update: a new file renamed over the old one. No restart.
            replace_atomically(geoip_db, mmdb_bytes(UPDATED, tmp_path))
            reloaded = await splitter.wait_for_log("geoip_reloaded")
            assert reloaded["path"] == str(geoip_db)
            assert await routed(client, splitter, forwarded_for=GERMAN) == "france"
            await wait_metric(client, splitter, success, 1.0)

            # A damaged download: logged with the path, counted, and the database in use keeps serving.
            replace_atomically(geoip_db, b"\x00" * 4096)
            failed = await splitter.wait_for_log("geoip_reload_failed")
            assert failed["path"] == str(geoip_db) and str(failed["error"]).startswith(f"{geoip_db}: not a MaxMind DB (.mmdb) file")
            await wait_metric(client, splitter, error, 1.0)
            await asyncio.sleep(0.6)  # three more polls of the same bad file
            assert await routed(client, splitter, forwarded_for=GERMAN) == "france"
            assert await routed(client, splitter, forwarded_for=AMERICAN) == "everyone-else"
            assert await metric(client, splitter, error) == 1.0  # counted once, not once per poll

            # The file gone: the same. Then a good file, even one copied over in place, is picked up.
            geoip_db.unlink()
            await wait_metric(client, splitter, error, 2.0)
            assert await routed(client, splitter, forwarded_for=GERMAN) == "france"
            replace_atomically(geoip_db, mmdb_bytes(FIRST, tmp_path))
            await wait_metric(client, splitter, success, 2.0)
            assert await routed(client, splitter, forwarded_for=GERMAN) == "germany"
            geoip_db.write_bytes(mmdb_bytes(UPDATED, tmp_path))  # `cp` over the file: same inode, new content
            await wait_metric(client, splitter, success, 3.0)
            assert await routed(client, splitter, forwarded_for=GERMAN) == "france"
        reloads = [e["event"] for e in splitter.log if str(e.get("event", "")).startswith("geoip_reload")]
        assert reloads[:4] == ["geoip_reloaded", "geoip_reload_failed", "geoip_reload_failed", "geoip_reloaded"]
        assert reloads[-1] == "geoip_reloaded"  # (a poll that caught the in-place copy half written would add a failure before it)
    finally:
        assert await splitter.stop() == 0


async def test_several_workers_look_up_and_reload_each_their_own(rules: Path, geoip_db: Path, tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    splitter = await launch(rules, env_for(upstreams), "--geoip-db", str(geoip_db), "--workers", "2")
    try:
        async with aiohttp.ClientSession() as client:
            assert {await routed(client, splitter, forwarded_for=GERMAN) for _ in range(6)} == {"germany"}
            replace_atomically(geoip_db, mmdb_bytes(UPDATED, tmp_path))
            await wait_metric(client, splitter, 'splitter_geoip_reloads_total{result="success"}', 2.0)  # each worker counts its own
            assert {await routed(client, splitter, forwarded_for=GERMAN) for _ in range(6)} == {"france"}
    finally:
        assert await splitter.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_missing_or_bad_database_at_start_exits_2_naming_it(rules: Path, tmp_path: Path, upstreams, workers: str) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "GeoLite2-Country.mmdb"
    with pytest.raises(RuntimeError, match="exited during start-up with code 2") as failure:
        await launch(rules, env_for(upstreams), "--geoip-db", str(missing), "--workers", workers)
    assert f"{missing}: cannot read the GeoIP database: No such file or directory" in str(failure.value)
    assert "geoip_db_invalid" in str(failure.value)
    bad = tmp_path / "bad.mmdb"
    bad.write_text("not a database\n")
    with pytest.raises(RuntimeError, match="exited during start-up with code 2") as failure:
        await launch(rules, env_for(upstreams, SPLITTER_GEOIP_DB=str(bad)), "--workers", workers)
    assert f"{bad}: not a MaxMind DB (.mmdb) file" in str(failure.value)


# --------------------------------------------------------------------------- explain and simulate

def ndjson(*events: dict[str, Any]) -> str:
    return "".join(orjson.dumps(e).decode() + "\n" for e in events)


@pytest.fixture
def cli_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("SPLITTER_")}
    return {**env, **RULES_ENV, "SEGMENT_URL": "http://127.0.0.1:9", "RUDDERSTACK_DATA_PLANE_URL": "http://127.0.0.1:9"}


def test_explain_looks_up_each_events_context_ip(rules: Path, geoip_db: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    sample = tmp_path / "sample.ndjson"
    sample.write_text(ndjson(
        {"type": "page", "userId": "u-1", "context": {"ip": GERMAN}},
        {"type": "page", "userId": "u-2", "context": {"ip": AMERICAN, "location": {"country": "DE"}}},  # GeoIP over the event's location
        {"type": "page", "userId": "u-3", "context": {"ip": GERMAN}, "_splitter": {"country": "FR"}},  # its own country wins
        {"type": "page", "userId": "u-4", "context": {"ip": "10.0.0.1", "location": {"country": "FR"}}},  # private: the location counts
        {"type": "page", "userId": "u-5", "context": {"location": {"country": "DE"}}},  # no address: the location counts
        {"context": {"ip": REGISTERED_ONLY}, "batch": [{"type": "page", "userId": "u-6"}]},  # the batch envelope's context.ip
    ))
    result = run(["explain", str(rules), str(sample), "--geoip-db", str(geoip_db)], cli_env)
    assert result.returncode == 0, result.stderr
    assert [orjson.loads(line)["rule"] for line in result.stdout.splitlines()] == [
        "germany", "everyone-else", "france", "france", "germany", "france"]
    # A header on the command line stands for a CDN's: it wins over GeoIP, not over an event's own country.
    result = run(["explain", str(rules), str(sample), "--geoip-db", str(geoip_db), "--header", "CF-IPCountry: US"], cli_env)
    assert [orjson.loads(line)["rule"] for line in result.stdout.splitlines()] == [
        "everyone-else", "everyone-else", "france", "everyone-else", "everyone-else", "everyone-else"]
    # Without --geoip-db nothing is looked up; SPLITTER_GEOIP_DB does the same as the option.
    result = run(["explain", str(rules), str(sample)], cli_env)
    assert [orjson.loads(line)["rule"] for line in result.stdout.splitlines()][:2] == ["everyone-else", "germany"]
    result = run(["explain", str(rules), str(sample)], {**cli_env, "SPLITTER_GEOIP_DB": str(geoip_db)})
    assert [orjson.loads(line)["rule"] for line in result.stdout.splitlines()][:2] == ["germany", "everyone-else"]


def test_simulate_tallies_by_geoip_and_refuses_a_bad_database(rules: Path, geoip_db: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    sample = tmp_path / "sample.ndjson"
    sample.write_text(ndjson(*[{"type": "track", "event": "E", "userId": f"u-{i}", "context": {"ip": [GERMAN, AMERICAN, "127.0.0.1", GERMAN][i % 4]}}
                               for i in range(40)]))
    result = run(["simulate", str(rules), str(sample), "--geoip-db", str(geoip_db)], cli_env)
    assert result.returncode == 0, result.stderr
    rows = {tuple(line.split()[:3]): int(line.split()[3]) for line in result.stdout.splitlines()[2:] if line.split()[:1] in (["germany"], ["everyone-else"])}
    assert rows == {("germany", "rudderstack", "primary"): 20, ("everyone-else", "segment", "primary"): 20}
    # The same sample --against the rules without the German rule: GeoIP settles the country once, for both.
    old = tmp_path / "old.yaml"
    old.write_text(RULES.replace("  - name: germany\n    when: {country: DE}\n    route: rudderstack\n", ""))
    result = run(["simulate", str(rules), str(sample), "--geoip-db", str(geoip_db), "--against", str(old)], cli_env)
    assert result.returncode == 0, result.stderr
    assert "20 of 40 cohort keys (50.00%) change primary destination" in result.stdout
    for path, message in ((tmp_path / "none.mmdb", "cannot read the GeoIP database: No such file or directory"),
                          (sample, "not a MaxMind DB (.mmdb) file")):
        for command in ("explain", "simulate"):
            result = run([command, str(rules), str(sample), "--geoip-db", str(path)], cli_env)
            assert result.returncode == 2
            assert result.stderr.startswith(f"splitter: {path}: {message}"), result.stderr


# --------------------------------------------------------------------------- deploy

K8S = ROOT / "deploy" / "kubernetes"
MARKER = "#geoip "


def uncommented(name: str) -> str:
    """The manifest with its optional GeoIP lines switched on (the README says: remove `#geoip `)."""
    return "\n".join(line.replace(MARKER, "", 1) if line.lstrip().startswith(MARKER) else line for line in (K8S / name).read_text().splitlines())


def test_the_shared_tiers_optional_geoip_lines_make_a_valid_pod() -> None:
    name = "deployment.yaml"
    plain = next(doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc)
    pod_plain = plain["spec"]["template"]["spec"]
    assert "SPLITTER_GEOIP_DB" not in str(pod_plain)  # off unless switched on: it needs a MaxMind account
    doc = next(doc for doc in yaml.safe_load_all(uncommented(name)) if doc)
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    pod = doc["spec"]["template"]["spec"]
    splitter = next(c for c in pod["containers"] if c["name"] == "splitter")
    database = next(e["value"] for e in splitter["env"] if e["name"] == "SPLITTER_GEOIP_DB")
    mount = next(m for m in splitter["volumeMounts"] if database.startswith(m["mountPath"] + "/"))
    assert mount.get("readOnly") is True
    assert any(v["name"] == mount["name"] and "emptyDir" in v for v in pod["volumes"])
    # An init container fetches the file before splitter starts (a missing file is exit 2); a sidecar keeps it fresh.
    for container, frequency in ((pod["initContainers"][0], None), (next(c for c in pod["containers"] if c["name"] == "geoipupdate"), "24")):
        assert container["image"].startswith("ghcr.io/maxmind/geoipupdate:")
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["GEOIPUPDATE_EDITION_IDS"] == Path(database).stem
        assert database.startswith(env["GEOIPUPDATE_DB_DIR"] + "/")
        assert env.get("GEOIPUPDATE_FREQUENCY") == frequency
        assert any(m["name"] == mount["name"] and m["mountPath"] == env["GEOIPUPDATE_DB_DIR"] and not m.get("readOnly") for m in container["volumeMounts"])
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert len(plain["spec"]["template"]["spec"]["containers"]) == len(pod["containers"]) - 1


def test_the_kubernetes_readme_and_configuration_say_how_to_get_the_database() -> None:
    readme = (K8S / "README.md").read_text()
    for phrase in ("SPLITTER_GEOIP_DB", "geoipupdate", "#geoip", "GEOIPUPDATE_ACCOUNT_ID", "GEOIPUPDATE_LICENSE_KEY"):
        assert phrase in readme, phrase
    docs = (ROOT / "docs" / "configuration.md").read_text()
    for phrase in ("--geoip-db", "GeoLite2", "CC BY-SA 4.0", "EULA", "geoipupdate", "registered_country", "splitter_geoip_reloads_total",
                   f"{CACHE_SIZE:,}"):
        assert phrase in docs, phrase
