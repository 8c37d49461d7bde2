"""The admin console (GET / on the admin port, proxy/console): in headless Chromium after real, partly hostile traffic, and without JavaScript.

The browser test runs a real `splitter serve` (admin token set, as on any port but loopback) with
stand-in receivers, sends demo-like traffic (loadtest/demo.py's events, a server source cut over
to RudderStack with a Segment mirror, a poison event RudderStack refuses) plus events whose names
and property paths are HTML (`<img src=x onerror=alert(1)>`, `"><script>...`, quotes), waits until
everything is delivered or dead-lettered, then opens the page in Chromium (playwright-core, as the
analytics.js test does: tests/clients/browser/console.js): it asks for the token, the page loads
with no console error, no dialog, no CSP violation and no element made from a name; the parity and
catalog numbers on it are /admin/ledger's and /admin/catalog's; the search finds an event; the
explain box answers for a user as `splitter explain` does; a full-page screenshot is written to
the test's tmp dir and to tests/artifacts/console.png (git-ignored; docs/images/console.png is a
copy of one).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import shutil
import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from loadtest.demo import sample_events
from loadtest.process import SplitterProcess, launch_splitter
from loadtest.receivers import start_receiver
from proxy.console.model import RateWindow
from proxy.engine import iso
from tests.proxy_harness import DEFAULT_RULES, SERVER_KEY, WEB_KEY, proxy_stack
from tests.system_tools import find, needs
from tests.test_clients_browser import CLIENTS_DIR, node_modules  # noqa: F401  (node_modules is a fixture)

ROOT = Path(__file__).resolve().parent.parent
DRIVER = CLIENTS_DIR / "browser" / "console.js"
ARTIFACTS = ROOT / "tests" / "artifacts"
NODE, CHROMIUM = find("node"), os.environ.get("CHROMIUM") or find("chromium")
TOKEN = "console-admin-token-5f2c9a"
WEB_WRITE_KEY, SERVER_WRITE_KEY = "web-write-key-0123456789", "server-write-key-0123456789"
RUDDER_KEYS = {"web": "rs-web-key-0123456789", "server": "rs-server-key-0123456789"}
SECRETS = (TOKEN, WEB_WRITE_KEY, SERVER_WRITE_KEY, *RUDDER_KEYS.values(), "hunter3")

HOSTILE_NAMES = [
    "<img src=x onerror=alert(1)>",
    "\"><script>window.__pwned='script'</script>",
    "it's \"quoted\" & <b>bold</b>",
]
HOSTILE_PAGE = "<svg onload=alert(2)>"
HOSTILE_PATHS = {"\"><img src=x onerror=window.__pwned=1>": 1, "it's <i>\"odd\"</i>": "x"}


def rules_text(now: datetime) -> str:
    """rules/default.yaml's migration (10 % to RudderStack, Segment mirrored) as a ramp, a server source cut over, and
    a destination no rule uses whose URL holds credentials (the console must not show them)."""
    day = timedelta(days=1)
    return f"""\
version: 1
destinations:
  segment:     {{kind: segment,     url: "${{SEGMENT_URL}}", delivery: {{flush_interval: 0.005}}}}
  rudderstack: {{kind: rudderstack, url: "${{RUDDERSTACK_DATA_PLANE_URL}}", delivery: {{flush_interval: 0.005, retry_base: 0.02, retry_max: 0.2}}}}
  warehouse:   {{kind: segment,     url: "http://127.0.0.1:9/import?key=hunter3"}}
sources:
  - name: web
    write_keys: ["{WEB_WRITE_KEY}"]
    credentials: {{rudderstack: "{RUDDER_KEYS['web']}"}}
  - name: server
    write_keys: ["{SERVER_WRITE_KEY}"]
    credentials: {{rudderstack: "{RUDDER_KEYS['server']}"}}
cohort: {{key: [anonymousId, userId], salt: "segment-to-rudderstack"}}
rules:
  - name: server-cutover
    when: {{source: server}}
    route: {{to: [rudderstack], mirror: [segment]}}
  - name: cohort-rollout
    route:
      split: {{rudderstack: 5, segment: 95}}
      mirror: [segment]
      ramp:
        - {{at: {iso(now - 7 * day)}, rudderstack: 10}}
        - {{at: {iso(now + 7 * day)}, rudderstack: 25}}
        - {{at: {iso(now + 14 * day)}, rudderstack: 50}}
"""


PAGE_TAGS = {"html", "head", "meta", "title", "link", "script", "body", "header", "h1", "h2", "h3", "p", "code", "span", "section", "form", "label",
             "input", "button", "main", "div", "table", "thead", "tbody", "tr", "th", "td", "br", "ol", "li", "ul", "details", "summary", "strong",
             "select", "option", "textarea"}


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))


def elements(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Elements()
    parser.feed(html)
    return parser.found


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode(), "Content-Type": "application/json"}


def traffic(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(web batches' events, server events): the demo's sample, the hostile names, server events and one poison event."""
    batches, singles = sample_events(rng)
    web = [e for batch in batches for e in batch] + singles
    for i, name in enumerate(HOSTILE_NAMES):
        web.append({"type": "track", "event": name, "anonymousId": f"anon-hostile-{i}", "messageId": f"hostile-{i}", "properties": dict(HOSTILE_PATHS)})
    web.append({"type": "page", "name": HOSTILE_PAGE, "anonymousId": "anon-hostile-page", "messageId": "hostile-page", "properties": {"<title>": "x"}})
    server = [{"type": "track", "event": rng.choice(["Invoice Paid", "Order Refunded"]), "userId": f"user-{n % 40:05d}", "messageId": f"server-{n}",
               "properties": {"amount": n, "currency": "EUR"}} for n in range(120)]
    server.append({"type": "track", "event": "Invoice Paid", "userId": "user-poison", "messageId": "poison-1", "properties": {"amount": "oops"}})
    return web, server


async def send(ingress: str, web: list[dict[str, Any]], server: list[dict[str, Any]]) -> None:
    async with aiohttp.ClientSession() as client:
        async def post(events: list[dict[str, Any]], key: str) -> None:
            async with client.post(ingress + "/v1/batch", data=orjson.dumps({"batch": events}), headers=basic(key)) as response:
                assert response.status == 200, await response.text()

        await asyncio.gather(*(post(web[i:i + 50], WEB_WRITE_KEY) for i in range(0, len(web), 50)),
                             *(post(server[i:i + 40], SERVER_WRITE_KEY) for i in range(0, len(server), 40)))


async def admin_json(admin: str, path: str, token: str | None = TOKEN) -> Any:
    async with aiohttp.ClientSession() as client, client.get(admin + path, headers={"Authorization": f"Bearer {token}"} if token else {}) as response:
        assert response.status == 200, (path, response.status, await response.text())
        return await response.json()


async def settled(admin: str, timeout: float = 30.0) -> dict[str, Any]:
    """/admin/console once every event routed to a destination has been delivered, dead-lettered or dropped there."""
    async with asyncio.timeout(timeout):
        while True:
            console = await admin_json(admin, "/admin/console")
            routed: dict[str, int] = defaultdict(int)
            for row in console["traffic"]:
                routed[row["destination"]] += row["total"]
            settled = {row["destination"]: row["delivered"] + row["dead_lettered"] + row["dropped"] for row in console["health"] if row["destination"] in routed}
            if routed and settled == routed and not any(row["spool_records"] or row["in_flight"] for row in console["health"]):
                return dict(console)
            await asyncio.sleep(0.2)


async def drive(config: dict[str, Any], timeout: float = 90.0) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        NODE or "node", str(DRIVER), json.dumps(config), cwd=str(CLIENTS_DIR), env=dict(os.environ, CHROMIUM=CHROMIUM or "/usr/bin/chromium"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"console.js did not finish within {timeout} s") from None
    assert process.returncode == 0, f"console.js exited {process.returncode}: {stderr.decode('utf-8', 'replace')[-3000:]}"
    return dict(json.loads(stdout.decode().strip().splitlines()[-1]))


async def cli_explain(rules_path: Path, env: dict[str, str], event: dict[str, Any], *args: str) -> list[dict[str, Any]]:
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "explain", str(rules_path), "-", *args, env=env,
                                                   stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate(orjson.dumps(event))
    assert process.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines()]


def parity_expected(ledger: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, str]]:
    """What each parity row of the page must say: /admin/ledger's rows, roles added up per destination, and its fan-out rows."""
    expected: dict[tuple[str, str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in ledger["rows"]:
        cells = expected[row["source"], row["type"], row["event"]]
        for column in ("accepted", "delivered", "pending", "dead_lettered"):
            cells[f"{row['destination']}.{column}"] += row[column]
    for row in ledger["fanout"]["rows"]:
        cells = expected[row["source"], row["type"], row["event"]]
        for column in ("reached_all", "reached_some", "reached_none"):
            cells[f"fanout.{column}"] += row[column]
        cells["fanout.in_flight"] += row["in_flight_some"] + row["in_flight_none"]
    return {key: {col: str(n) for col, n in cells.items()} for key, cells in expected.items()}


@needs("node", "npm", "chromium")
async def test_console_in_chromium_after_hostile_traffic(tmp_path: Path, node_modules: Path) -> None:
    segment = await start_receiver("segment", record=True)
    rudder = await start_receiver("rudderstack", record=True, valid_keys=list(RUDDER_KEYS.values()))
    rudder.receiver.faults.reject_message_ids = {"poison-1"}
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(rules_text(datetime.now(UTC).replace(microsecond=0)))
    env = dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_DATA_PLANE_URL=rudder.url, SPLITTER_ADMIN_TOKEN=TOKEN)
    splitter = await launch_splitter(str(rules_path), env, ["--spool-dir", str(tmp_path / "spool"), "--dead-letter-dir", str(tmp_path / "dead"),
                                                            "--state-dir", str(tmp_path / "state"), "--drain-timeout", "2"])
    try:
        web, server = traffic(random.Random(2026))
        await send(splitter.ingress, web, server)
        console = await settled(splitter.admin)
        ledger = await admin_json(splitter.admin, "/admin/ledger")
        catalog = await admin_json(splitter.admin, "/admin/catalog")
        known = next(e for e in web if e.get("anonymousId", "").startswith("anon-") and "userId" not in e)
        screenshot = tmp_path / "console.png"
        report = await drive({"url": splitter.admin + "/", "screenshot": str(screenshot), "token": TOKEN, "search": "order",
                              "explain": {"user": known["anonymousId"], "key": "anonymousId", "source": "web"}, "unfold": HOSTILE_NAMES[0]})
        print(json.dumps({k: report[k] for k in ("console", "failed", "dialogs", "after", "explained", "searched")}, indent=1))

        # Nothing ran: no dialog, no global set by a payload, no CSP violation, no element made from a name, no error.
        assert report["dialogs"] == [], report["dialogs"]
        assert report["after"]["pwned"] is None
        assert report["after"]["violations"] == [], report["after"]["violations"]
        assert report["shown"]["injected"] == 0 and report["after"]["injected"] == 0
        assert report["firstStatus"] == 401 and report["failed"] == [f"http 401: GET {splitter.admin}/"], report["failed"]
        errors = [line for line in report["console"] if not line.startswith(("log:", "info:", "debug:"))]
        assert errors in ([], ["error: Failed to load resource: the server responded with a status of 401 (Unauthorized)"]), report["console"]
        # The locked page showed nothing but the token form; the token went only into headers, on every admin request.
        assert "cohort-rollout" not in report["lockedText"] and HOSTILE_NAMES[0] not in report["lockedText"]
        assert report["tokenInUrl"] == [] and report["adminRequests"] and all(r["auth"] == "bearer" for r in report["adminRequests"])

        # The hostile names and paths are on the page, as text.
        catalog_shown = {(row["source"], row["type"], row["name"]): row for row in report["shown"]["catalog"]}
        for name in HOSTILE_NAMES:
            assert catalog_shown["web", "track", name]["shown_name"] == name
        assert catalog_shown["web", "page", HOSTILE_PAGE]["shown_name"] == HOSTILE_PAGE
        assert {f"properties.{path}" for path in HOSTILE_PATHS} <= set(report["unfoldedPaths"]), report["unfoldedPaths"]
        assert report["after"]["openAfterRedraw"] == 1  # the unfolded row stayed open across a redraw

        # Catalog: /admin/catalog's events and totals, every event sent counted once.
        listed = {(source, e["type"], e["name"]): str(e["total"]) for source, body in catalog["sources"].items() for e in body["events"]}
        assert {key: row["total"] for key, row in catalog_shown.items()} == listed
        assert sum(int(row["total"]) for row in catalog_shown.values()) == len(web) + len(server)

        # Traffic and health: the routed totals, what the receivers got, the poison event's dead letter.
        routed = {(row["destination"], row["role"]): row["total"] for row in console["traffic"]}
        assert {(d, role): int(total) for d, role, rate, total in report["shown"]["traffic"]} == routed
        assert all(rate != "—" and float(rate) >= 0 for _, _, rate, _ in report["shown"]["traffic"])
        health = {row[0]: row for row in report["shown"]["health"]}
        assert set(health) == {"segment", "rudderstack", "warehouse"}
        assert health["segment"][1] == health["rudderstack"][1] == "closed"
        assert health["segment"][5] == str(segment.receiver.count) and health["rudderstack"][5] == str(rudder.receiver.count)  # delivered
        assert health["segment"][2] == health["rudderstack"][2] == "0" and health["rudderstack"][6] == "1"  # spooled, dead letters

        # Parity: /admin/ledger's numbers, row for row (nothing moved while the browser looked); they add up to the above.
        after_ledger = await admin_json(splitter.admin, "/admin/ledger")
        assert after_ledger["rows"] == ledger["rows"] and after_ledger["fanout"]["rows"] == ledger["fanout"]["rows"]
        expected = parity_expected(ledger)
        shown = {(row["source"], row["type"], row["event"]): row for row in report["shown"]["parity"]}
        assert set(shown) == set(expected)
        for key, cells in expected.items():
            assert {col: text for col, text in shown[key]["cells"].items() if text != ""} == cells, key
            assert shown[key]["shown_name"] == key[2]
        poison = shown["server", "track", "Invoice Paid"]["cells"]
        assert poison["rudderstack.dead_lettered"] == "1" and poison["fanout.reached_some"] == "1"
        assert shown["web", "track", HOSTILE_NAMES[0]]["cells"]["segment.delivered"] == "1"
        accepted: dict[tuple[str, str], int] = defaultdict(int)
        delivered: dict[str, int] = defaultdict(int)
        for row in ledger["rows"]:
            accepted[row["destination"], row["role"]] += row["accepted"]
            delivered[row["destination"]] += row["delivered"]
        assert accepted == routed and delivered == {"segment": segment.receiver.count, "rudderstack": rudder.receiver.count}

        # Rules and ramp, and the history's start.
        rules_text_shown = report["shown"]["rules"]
        assert "cohort-rollout" in rules_text_shown and "server-cutover" in rules_text_shown
        assert "rudderstack 10 %, segment 90 % ← now" in rules_text_shown and "rudderstack 50 %, segment 50 %" in rules_text_shown
        assert "start" in report["shown"]["history"] and "success" in report["shown"]["history"]
        for secret in SECRETS:
            assert secret not in json.dumps(report["shown"]), secret

        # The search narrowed the catalog to the events whose name or a property path holds "order".
        assert "Order Completed" in report["searched"] and "Order Refunded" in report["searched"]
        assert "Signed Up" not in report["searched"] and len(report["searched"]) < len(catalog_shown)

        # The explain box answers as `splitter explain` does for that user.
        assert report["explained"]["state"] == "done", report["explained"]
        (line,) = await cli_explain(rules_path, env, {"type": "track", "anonymousId": known["anonymousId"]}, "--source", "web")
        assert json.loads(report["explained"]["json"]) == line
        fields = report["explained"]["fields"]
        assert fields["rule"] == line["rule"] == "cohort-rollout" and fields["bucket"] == str(line["bucket"])
        assert fields["primary"] == ", ".join(line["primary"]) and fields["cohort_key"] == line["cohort_key"]

        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copyfile(screenshot, ARTIFACTS / "console.png")
    finally:
        assert await splitter.stop() == 0
        await segment.close()
        await rudder.close()


async def test_without_javascript_the_page_has_the_rules_and_the_catalog_as_text() -> None:
    rules = DEFAULT_RULES.replace("rules:\n", 'country_headers: ["CF-IPCountry"]\nrules:\n').replace(
        "  rudderstack: {kind: rudderstack,", '  warehouse: {kind: segment, url: "http://127.0.0.1:9/x?key=hunter3#frag-hunter4"}\n  rudderstack: {kind: rudderstack,')
    async with proxy_stack(rules) as stack:
        batch = [{"type": "track", "event": name, "anonymousId": f"a{i}", "properties": dict(HOSTILE_PATHS)} for i, name in enumerate(HOSTILE_NAMES)]
        batch.append({"type": "track", "event": "Split test", "anonymousId": "u1", "properties": {"plan": "pro"}})
        assert (await stack.post("/v1/batch", {"batch": batch}))[0] == 200
        async with stack.session.get(stack.admin_url + "/") as response:
            assert response.status == 200
            html = await response.text()
            headers = response.headers
        csp = headers["Content-Security-Policy"]
        for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'", "img-src 'self' data:",
                          "frame-ancestors 'none'", "base-uri 'none'", "form-action 'self'"):
            assert directive in csp
        assert "unsafe" not in csp and headers["X-Content-Type-Options"] == "nosniff" and headers["Content-Type"].startswith("text/html")
        # The rules, the split and the catalog are there as text, the client-supplied names escaped.
        for text in ("mirrored", "split", "everyone", "rudderstack 50 %, segment 50 %", "type: track; event: Mirror *", "Split test", "properties.plan",
                     "&lt;img src=x onerror=alert(1)&gt;", "&#34;&gt;&lt;script&gt;window.__pwned=&#39;script&#39;&lt;/script&gt;",
                     "it&#39;s &#34;quoted&#34; &amp; &lt;b&gt;bold&lt;/b&gt;", "properties.&#34;&gt;&lt;img src=x onerror=window.__pwned=1&gt;"):
            assert text in html, text
        parity = html[html.index('id="parity-body"'):html.index('<section id="catalog">')]  # the ledger's rows, the names escaped there too
        assert 'data-event="&lt;img src=x onerror=alert(1)&gt;"' in parity and 'data-col="segment.delivered"' in parity
        for raw in ("<img", "<script>window", "<b>bold", "<i>"):
            assert raw not in html, raw
        # Parsed as a browser would: only the page's own elements, one script (a file), no inline style or handler.
        tags = elements(html)
        assert {tag for tag, _ in tags} <= PAGE_TAGS, {tag for tag, _ in tags} - PAGE_TAGS
        assert [attrs for tag, attrs in tags if tag == "script"] == [{"src": "/console/console.js", "defer": None}]
        assert not [(tag, name) for tag, attrs in tags for name in attrs if name.startswith("on") or name == "style"]
        # Nothing /admin/config masks: no write key, credential, or URL userinfo and query.
        for secret in (WEB_KEY, SERVER_KEY, "seg-web-key", "rs-web-key", "hunter3", "hunter4"):
            assert secret not in html, secret
        async with stack.session.get(stack.admin_url + "/admin/console") as response:
            data = await response.read()
            assert response.status == 200 and response.headers["X-Content-Type-Options"] == "nosniff"
        for secret in (WEB_KEY, "hunter3", "hunter4"):
            assert secret.encode() not in data
        # The search and the sort work without JavaScript (a GET form).
        async with stack.session.get(stack.admin_url + "/", params={"q": "SPLIT", "sort": "name"}) as response:
            searched = await response.text()
        found = searched[searched.index('id="catalog-body"'):searched.index('<section id="history">')]
        assert "Split test" in found and "&lt;img src=x" not in found and '<option value="name" selected>' in searched
        # The static files: the script and the stylesheet, with their types, and no data in them.
        for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
            async with stack.session.get(f"{stack.admin_url}/console/{name}") as response:
                body = await response.text()
                assert response.status == 200 and response.headers["Content-Type"].startswith(kind) and response.headers["X-Content-Type-Options"] == "nosniff"
        script = "\n".join(line for line in (ROOT / "proxy" / "console" / "static" / "console.js").read_text().splitlines()
                           if not line.lstrip().startswith("//"))  # the code, not the comment that names what it never uses
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in script, sink
        assert body  # the stylesheet


async def test_explain_answers_as_splitter_explain_does(tmp_path: Path) -> None:
    async with proxy_stack(DEFAULT_RULES.replace("rules:\n", 'country_headers: ["CF-IPCountry"]\nrules:\n'), region="eu-west-1") as stack:
        rules_path = tmp_path / "rules.yaml"
        rules_path.write_text(DEFAULT_RULES.replace("rules:\n", 'country_headers: ["CF-IPCountry"]\nrules:\n'))
        env = dict(os.environ, SEGMENT_URL=stack.segment_running.url, RUDDERSTACK_URL=stack.rudder_running.url, SPLITTER_REGION="eu-west-1")
        body = {"batch": [{"type": "track", "event": f"Split {n}", "anonymousId": f"anon-{n}"} for n in range(20)]
                + [{"type": "track", "event": "Mirror x", "userId": "u-1", "_splitter": {"source": "server", "country": "de"}},
                   {"type": "identify", "userId": "u-2"}], "context": {"app": {"version": "1.0"}}, "writeKey": WEB_KEY}

        async def ask(question: Any) -> tuple[int, Any]:
            async with stack.session.post(stack.admin_url + "/admin/explain", data=orjson.dumps(question), headers={"Content-Type": "application/json"}) as r:
                return r.status, orjson.loads(await r.read())

        status, answer = await ask({"event": json.dumps(body)})
        assert status == 200, answer
        lines = await cli_explain(rules_path, env, body)
        assert [r["decision"] for r in answer["results"]] == lines
        assert answer["results"][0]["context"] == {"source": "web", "country": None, "region": "eu-west-1"}
        assert answer["results"][20]["context"] == {"source": "server", "country": "DE", "region": "eu-west-1"}
        assert answer["sha256"] == stack.active.current.sha256 and WEB_KEY.encode() not in orjson.dumps(answer)
        # An id alone: a track event with that id; the box's source and country as --source and a country header.
        status, answer = await ask({"user": "anon-7", "key": "anonymousId", "source": "server", "country": "fr"})
        assert status == 200
        assert [r["decision"] for r in answer["results"]] == await cli_explain(rules_path, env, {"type": "track", "anonymousId": "anon-7"},
                                                                                 "--source", "server", "--header", "CF-IPCountry: FR")
        # The no-JavaScript form posts form fields.
        async with stack.session.post(stack.admin_url + "/admin/explain", data={"user": "anon-7", "key": "anonymousId", "source": "web", "event": ""}) as r:
            assert r.status == 200 and (await r.json())["results"][0]["context"]["source"] == "web"
        # Questions it cannot answer, said; a write key typed as a source is never echoed.
        for question, message in (({"event": "{nope"}, "not JSON"), ({}, "paste an event"), ({"user": "x", "source": "ios"}, "no such source"),
                                  ({"user": "x", "source": WEB_KEY}, "that is a write key"), ({"user": "x", "key": "email"}, "choose one of"),
                                  ({"user": "x", "country": "Germany"}, "two-letter"), ({"event": json.dumps({"type": "track", "writeKey": "nope-nope-nope"})}, "unknown write key"),
                                  ({"event": json.dumps({"batch": [{"type": "track"}] * 101})}, "at most 100")):
            status, answer = await ask(question)
            assert status == 400 and message in answer["message"], (question, answer)
            assert WEB_KEY not in answer["message"] and "nope-nope-nope" not in answer["message"]
        # It reads only: nothing was routed, counted or delivered.
        assert stack.metric("splitter_events_total", source="web", type="track", rule="split", destination="segment", role="primary") == 0
        assert stack.segment.count == 0 and stack.rudder.count == 0


async def test_the_page_and_its_data_need_the_token_when_the_admin_port_is_not_loopback(tmp_path: Path) -> None:
    segment = await start_receiver("segment")
    rudder = await start_receiver("rudderstack")
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(rules_text(datetime.now(UTC).replace(microsecond=0)))
    env = dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_DATA_PLANE_URL=rudder.url, SPLITTER_ADMIN_TOKEN=TOKEN)
    splitter: SplitterProcess = await launch_splitter(str(rules_path), env, ["--admin", "0.0.0.0:0", "--spool-dir", str(tmp_path / "spool"),
                                                                             "--dead-letter-dir", str(tmp_path / "dead"), "--state-dir", str(tmp_path / "state")])
    admin = splitter.admin.replace("0.0.0.0", "127.0.0.1")
    try:
        async with aiohttp.ClientSession() as client:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
                async with client.get(admin + "/", headers=headers) as response:
                    html = await response.text()
                    assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
                    assert "Content-Security-Policy" in response.headers
                assert 'id="token-form"' in html and "cohort-rollout" not in html and "segment-to-rudderstack" not in html and "eu-west" not in html
                for path in ("/admin/console", "/admin/console?part=catalog"):
                    async with client.get(admin + path, headers=headers) as response:
                        assert response.status == 401
                async with client.post(admin + "/admin/explain", json={"user": "x"}, headers=headers) as response:
                    assert response.status == 401
            async with client.get(admin + "/", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                assert response.status == 200 and "cohort-rollout" in await response.text()
            async with client.get(admin + "/console/console.js") as response:  # the script holds no data: served to anyone
                assert response.status == 200
            async with client.get(admin + "/", params={"token": TOKEN}) as response:  # a token in the URL is not a way in
                assert response.status == 401
    finally:
        assert await splitter.stop() == 0
        await segment.close()
        await rudder.close()


def test_rates_are_per_second_over_the_last_reads() -> None:
    now = [100.0]
    window = RateWindow(span=15.0, clock=lambda: now[0])

    def read(segment: float, mirror: float) -> dict[tuple[str, str], Any]:
        samples = {"splitter_events_total": [({"destination": "segment", "role": "primary", "source": "a"}, segment / 2),
                                             ({"destination": "segment", "role": "primary", "source": "b"}, segment / 2),
                                             ({"destination": "rudderstack", "role": "mirror"}, mirror)]}
        return {(row["destination"], row["role"]): (row["per_second"], row["total"]) for row in window.read(samples)}

    assert read(100, 10) == {("segment", "primary"): (None, 100), ("rudderstack", "mirror"): (None, 10)}  # one read: no rate yet
    now[0] += 2
    assert read(140, 10) == {("segment", "primary"): (20.0, 140), ("rudderstack", "mirror"): (0.0, 10)}
    now[0] += 2
    assert read(180, 30)[("segment", "primary")] == (20.0, 180)  # over the 4 s since the first read
    now[0] += 20  # the first reads fall out of the window: the rate is over what is left
    assert read(180, 30) == {("segment", "primary"): (None, 180), ("rudderstack", "mirror"): (None, 30)}
    now[0] += 1
    assert read(200, 30)[("segment", "primary")] == (20.0, 200)

