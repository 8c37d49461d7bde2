"""CDN pass-through: settings and analytics.js forwarded to a stand-in CDN on loopback, cached,
and the settings' apiHost pointed at splitter."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import splitter_command
from multidict import CIMultiDictProxy
from proxy_harness import Stack, proxy_stack

from proxy.engine.masking import mask
from proxy.ingress.cdn import (
    MAX_ANSWER_BYTES,
    CdnCache,
    masked,
    rewrite_settings,
    write_key_in,
)
from proxy.settings import ServeSettings, SettingsError

KEY = "web-key-0123456789"
JS = b"/* analytics.js stand-in */\n!function(){window.analytics={loaded:true}}();\n"


@dataclass
class Cdn:
    server: TestServer
    hits: Counter[str] = field(default_factory=Counter)
    queries: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def cdn() -> AsyncIterator[Cdn]:
    holder: dict[str, Cdn] = {}

    async def settings(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        holder["cdn"].hits[request.path] += 1
        holder["cdn"].queries.append(request.rel_url.raw_query_string)
        if key == "missing":
            return web.json_response({"message": "not found"}, status=404)
        body = {"integrations": {"Segment.io": {"apiKey": key, "apiHost": "api.segment.io/v1"}}, "metrics": {"host": "api.segment.io/v1"},
                "plan": {"track": {"__default": {"enabled": True}}}}
        return web.json_response(body, headers={"Cache-Control": "public, max-age=60", "ETag": '"settings-1"'})

    async def bundle(request: web.Request) -> web.Response:
        holder["cdn"].hits[request.path] += 1
        holder["cdn"].queries.append(request.rel_url.raw_query_string)
        return web.Response(body=JS, content_type="application/javascript", headers={"Cache-Control": "public, max-age=3600", "ETag": '"js-1"'})

    app = web.Application()
    app.router.add_get("/v1/projects/{key}/settings", settings)
    app.router.add_get("/analytics.js/v1/{key}/analytics.min.js", bundle)
    app.router.add_get("/next-integrations/{tail:.*}", bundle)
    app.router.add_get("/analytics-next/bundles/{tail:.*}", bundle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    holder["cdn"] = Cdn(server)
    try:
        yield holder["cdn"]
    finally:
        await server.close()


async def get(stack: Stack, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, CIMultiDictProxy[str]]:
    async with stack.session.get(stack.url + path, headers=headers or {}) as response:
        return response.status, await response.read(), response.headers


def segment_io(body: bytes) -> tuple[dict[str, str], dict[str, str]]:
    parsed = orjson.loads(body)
    return parsed["integrations"]["Segment.io"], parsed["metrics"]


async def test_settings_rewritten_to_the_public_url(cdn: Cdn) -> None:
    async with proxy_stack(cdn_url=cdn.url, public_url="https://analytics.example.com") as stack:
        status, body, headers = await get(stack, f"/v1/projects/{KEY}/settings")
    assert status == 200, body
    integration, metrics = segment_io(body)
    assert integration == {"apiKey": KEY, "apiHost": "analytics.example.com/v1", "protocol": "https"}
    assert metrics["host"] == "analytics.example.com/v1"
    assert orjson.loads(body)["plan"] == {"track": {"__default": {"enabled": True}}}  # the rest untouched
    assert headers["Content-Type"].startswith("application/json")
    assert headers["Cache-Control"] == "public, max-age=60"


async def test_settings_rewritten_to_the_request_host_without_public_url(cdn: Cdn) -> None:
    async with proxy_stack(cdn_url=cdn.url) as stack:
        status, body, _ = await get(stack, f"/v1/projects/{KEY}/settings")
        host = stack.url.removeprefix("http://")
    assert status == 200
    integration, metrics = segment_io(body)
    assert integration["apiHost"] == f"{host}/v1" and integration["protocol"] == "http"
    assert metrics["host"] == f"{host}/v1"


async def test_js_passes_through_byte_identical(cdn: Cdn) -> None:
    async with proxy_stack(cdn_url=cdn.url) as stack:
        status, body, headers = await get(stack, f"/analytics.js/v1/{KEY}/analytics.min.js")
        other = [await get(stack, "/next-integrations/integrations/vendor/commons.js"),
                 await get(stack, "/analytics-next/bundles/ajs-destination.bundle.js")]
    assert status == 200 and body == JS
    assert headers["Content-Type"].startswith("application/javascript")
    assert headers["Cache-Control"] == "public, max-age=3600" and headers["ETag"] == '"js-1"'
    assert [(s, b) for s, b, _ in other] == [(200, JS), (200, JS)]


async def test_cache_hit_then_expiry(cdn: Cdn) -> None:
    path = f"/v1/projects/{KEY}/settings"
    async with proxy_stack(cdn_url=cdn.url, cdn_cache_seconds=0.2) as stack:
        first, second = await get(stack, path), await get(stack, path)
        assert first[0] == second[0] == 200 and first[1] == second[1]
        assert cdn.hits[path] == 1
        await asyncio.sleep(0.3)
        assert (await get(stack, path))[0] == 200
        assert cdn.hits[path] == 2


async def test_cache_disabled_with_zero(cdn: Cdn) -> None:
    path = f"/analytics.js/v1/{KEY}/analytics.min.js"
    async with proxy_stack(cdn_url=cdn.url, cdn_cache_seconds=0) as stack:
        await get(stack, path)
        await get(stack, path)
    assert cdn.hits[path] == 2


async def test_cdn_404_passes_through_and_is_not_cached(cdn: Cdn) -> None:
    path = "/v1/projects/missing/settings"
    async with proxy_stack(cdn_url=cdn.url) as stack:
        for _ in range(2):
            status, body, _ = await get(stack, path)
            assert status == 404 and orjson.loads(body) == {"message": "not found"}
        # a path the stand-in CDN does not know at all
        assert (await get(stack, "/analytics.js/v1/x/other.js"))[0] == 404
    assert cdn.hits[path] == 2


async def test_cdn_down_is_502_json() -> None:
    probe = TestServer(web.Application(), host="127.0.0.1")
    await probe.start_server()
    dead = str(probe.make_url("")).rstrip("/")
    await probe.close()  # nothing listens there any more
    async with proxy_stack(cdn_url=dead) as stack:
        status, body, headers = await get(stack, f"/v1/projects/{KEY}/settings", {"Origin": "https://shop.example"})
    assert status == 502
    answer = orjson.loads(body)
    assert answer["success"] is False and answer["code"] == "cdn_unavailable" and answer["message"]
    assert headers["Access-Control-Allow-Origin"] == "*"


@pytest.fixture
async def sized_cdn() -> AsyncIterator[tuple[str, Counter[str]]]:
    """A CDN whose answer is `?mb=N` MiB of JSON-ish filler, streamed; `&length=1` announces it."""
    served: Counter[str] = Counter()

    async def sized(request: web.Request) -> web.StreamResponse:
        served[request.rel_url.raw_path_qs] += 1
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        size = int(request.query["mb"]) * 1024 * 1024
        if request.query.get("length"):
            response.content_length = size
        await response.prepare(request)
        piece = b" " * 1024 * 1024
        try:
            for _ in range(size // len(piece)):
                await response.write(piece)
        except ConnectionError:
            pass  # splitter stopped reading and closed
        return response

    app = web.Application()
    app.router.add_get("/v1/projects/{key}/settings", sized)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), served
    finally:
        await server.close()


@pytest.mark.parametrize("length", ["", "&length=1"])
async def test_cdn_answer_over_the_bound_is_502_json_and_one_at_the_bound_passes(sized_cdn: tuple[str, Counter[str]], length: str) -> None:
    url, served = sized_cdn
    over = MAX_ANSWER_BYTES // (1024 * 1024) + 1
    async with proxy_stack(cdn_url=url) as stack:
        for _ in range(2):
            status, body, _ = await get(stack, f"/v1/projects/{KEY}/settings?mb={over}{length}")
            assert status == 502 and orjson.loads(body)["code"] == "cdn_answer_too_large"
        status, body, _ = await get(stack, f"/v1/projects/{KEY}/settings?mb={over - 1}{length}")
        assert status == 200 and len(body) == MAX_ANSWER_BYTES  # unparseable settings pass as they are
    assert served[f"/v1/projects/{KEY}/settings?mb={over}{length}"] == 2  # a refused answer is not cached


def test_write_keys_in_cdn_paths_are_found_and_masked() -> None:
    assert write_key_in(f"/v1/projects/{KEY}/settings") == KEY
    assert write_key_in(f"/analytics.js/v1/{KEY}/analytics.min.js") == KEY
    assert write_key_in("/next-integrations/integrations/a.js") is None and write_key_in("/v1/projects//settings") is None
    text = masked(f"GET /v1/projects/{KEY}/settings failed: url='https://cdn/v1/projects/{KEY}/settings'", KEY)
    assert KEY not in text and text.count(mask(KEY)) == 2
    assert "a%2Fb" not in masked("x a%2Fb a/b", "a%2Fb") and "a/b" not in masked("x a%2Fb a/b", "a%2Fb")
    assert masked("nothing to hide", None) == "nothing to hide"


async def test_query_string_forwarded_and_part_of_the_cache_key(cdn: Cdn) -> None:
    path = f"/analytics.js/v1/{KEY}/analytics.min.js"
    async with proxy_stack(cdn_url=cdn.url) as stack:
        assert (await get(stack, path + "?v=1&x=a%20b"))[0] == 200
        assert (await get(stack, path + "?v=2"))[0] == 200
        assert (await get(stack, path + "?v=1&x=a%20b"))[0] == 200
    assert cdn.queries == ["v=1&x=a%20b", "v=2"]


async def test_cors_on_get_and_preflight(cdn: Cdn) -> None:
    origin = {"Origin": "https://shop.example"}
    async with proxy_stack(cdn_url=cdn.url, cors_origins=("https://shop.example",)) as stack:
        status, _, headers = await get(stack, f"/v1/projects/{KEY}/settings", origin)
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://shop.example"
        status, _, headers = await stack.request("OPTIONS", f"/v1/projects/{KEY}/settings", headers={**origin, "Access-Control-Request-Method": "GET"})
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://shop.example"
        assert "GET" in headers["Access-Control-Allow-Methods"]
        status, _, headers = await stack.request("OPTIONS", "/v1/t", headers={**origin, "Access-Control-Request-Method": "POST"})
        assert status == 204 and "POST" in headers["Access-Control-Allow-Methods"]


async def test_metric_labels_are_route_templates(cdn: Cdn) -> None:
    async with proxy_stack(cdn_url=cdn.url) as stack:
        await get(stack, f"/v1/projects/{KEY}/settings")
        await get(stack, "/v1/projects/other-key/settings")
        await get(stack, "/v1/projects/missing/settings")
        await get(stack, f"/analytics.js/v1/{KEY}/analytics.min.js")
        await get(stack, "/next-integrations/integrations/a.js")
        await get(stack, "/analytics-next/bundles/b.js")
        labels = {(s.labels["path"], s.labels["code"]): s.value
                  for metric in stack.metrics.registry.collect() if metric.name == "splitter_requests"
                  for s in metric.samples if s.name == "splitter_requests_total"}
    assert labels == {
        ("/v1/projects/{write_key}/settings", "200"): 2,
        ("/v1/projects/{write_key}/settings", "404"): 1,
        ("/analytics.js/v1/{tail}", "200"): 1,
        ("/next-integrations/{tail}", "200"): 1,
        ("/analytics-next/bundles/{tail}", "200"): 1,
    }


def test_cache_bounds() -> None:
    cache = CdnCache(60, max_entries=2, max_bytes=10)
    cache.put("a", 200, b"1234", ())
    cache.put("b", 200, b"1234", ())
    cache.put("c", 200, b"1234", ())  # over the entry cap: the oldest goes
    assert cache.get("a") is None and cache.get("b") is not None and len(cache) == 2
    cache.put("d", 200, b"12345678", ())  # over the byte cap: b and c go
    assert len(cache) == 1 and cache.get("d") is not None
    cache.put("e", 200, b"x" * 11, ())  # larger than the whole cache: not kept
    cache.put("f", 404, b"", ())  # only 200s
    assert cache.get("e") is None and cache.get("f") is None


def test_rewrite_leaves_unexpected_shapes_alone() -> None:
    assert rewrite_settings(b"not json", "h/v1", "https") == b"not json"
    assert orjson.loads(rewrite_settings(b'{"integrations": {}}', "h/v1", "https")) == {"integrations": {}}


@pytest.mark.parametrize("kwargs", [{"cdn_url": "cdn.segment.com"}, {"cdn_url": "ftp://cdn.example"}, {"public_url": "analytics.example.com"},
                                    {"cdn_cache_seconds": -1}])
def test_settings_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(SettingsError):
        ServeSettings(config="x.yaml", **kwargs)  # type: ignore[arg-type]


def test_serve_help_lists_the_flags() -> None:
    result = subprocess.run(splitter_command("serve", "--help"), capture_output=True, text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    for flag in ("--cdn-url", "--public-url", "--cdn-cache-seconds"):
        assert flag in result.stdout


def test_bad_cdn_url_stops_serve(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(splitter_command("serve", "--config", str(tmp_path / "r.yaml"), "--cdn-url", "nope"), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 3 and "--cdn-url" in result.stderr
