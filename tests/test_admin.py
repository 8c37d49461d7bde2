"""The admin app over a real loopback server: probes, metrics, reload, masked config, bearer token."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.admin import build_admin_app, public_url
from proxy.control.reload import Reloader
from proxy.control.state import ActiveRules
from proxy.engine import load_rules, mask
from proxy.metrics import Metrics

WRITE_KEY = "wk_live_web_0123456789abcdef"
RS_KEY = "rs_live_web_fedcba9876543210"
TOKEN = "admin-token-7f3c9e"
Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]


def rules_yaml(percent: int = 10, salt: str = "s1", total: int = 100) -> str:
    return f"""version: 1
destinations:
  rudderstack: {{kind: rudderstack, url: "https://127.0.0.1:9/dp?api_key=q-secret", timeout: 5}}
  segment: {{kind: segment, url: "http://127.0.0.1:9"}}
sources:
  - name: web
    write_keys: ["{WRITE_KEY}", "short"]
    credentials: {{rudderstack: "{RS_KEY}"}}
cohort:
  key: [anonymousId, userId]
  salt: "{salt}"
rules:
  - name: checkout
    when: {{type: track, event: ["Checkout *"]}}
    route: {{to: [segment], mirror: [rudderstack]}}
  - name: rollout
    route:
      split: {{rudderstack: {percent}, segment: {total - percent}}}
"""


class Admin:
    def __init__(self, path: Path, token: str | None) -> None:
        path.write_text(rules_yaml())
        self.path = path
        self.first = load_rules(str(path), {})
        self.active = ActiveRules(self.first)
        self.metrics = Metrics()
        self.metrics.show_rules(self.first)
        self.ready = True
        reloader = Reloader(str(path), self.active, self.metrics, {})
        self.app = build_admin_app(active=self.active, reloader=reloader, metrics=self.metrics, token=token, is_ready=lambda: self.ready)


@pytest.fixture
async def open_admin(tmp_path: Path, aiohttp_client: MakeClient) -> tuple[Admin, Client]:
    admin = Admin(tmp_path / "rules.yaml", token=None)
    return admin, await aiohttp_client(admin.app)


@pytest.fixture
async def locked_admin(tmp_path: Path, aiohttp_client: MakeClient) -> tuple[Admin, Client]:
    admin = Admin(tmp_path / "rules.yaml", token=TOKEN)
    return admin, await aiohttp_client(admin.app)


async def test_probes(open_admin: tuple[Admin, Client]) -> None:
    admin, client = open_admin
    response = await client.get("/healthz")
    assert response.status == 200 and await response.json() == {"status": "ok"}
    response = await client.get("/readyz")
    assert response.status == 200 and await response.json() == {"status": "ready", "sha256": admin.first.sha256}
    admin.ready = False
    response = await client.get("/readyz")
    assert response.status == 503 and await response.json() == {"status": "not ready"}


async def test_metrics_exposition(open_admin: tuple[Admin, Client]) -> None:
    admin, client = open_admin
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    text = await response.text()
    assert f'splitter_config_info{{sha256="{admin.first.sha256}"}} 1.0' in text
    assert 'splitter_rollout_percent{destination="rudderstack",rule="rollout"} 10.0' in text


async def test_config_masks_keys_and_url_credentials(open_admin: tuple[Admin, Client]) -> None:
    admin, client = open_admin
    response = await client.get("/admin/config")
    assert response.status == 200
    text = await response.text()
    for secret in (WRITE_KEY, RS_KEY, "q-secret", "short"):
        assert secret not in text
    body = await response.json()
    loaded_at = datetime.fromisoformat(body.pop("loaded_at"))
    assert loaded_at.utcoffset() is not None and loaded_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert body == {
        "sha256": admin.first.sha256,
        "file": str(admin.path),
        "version": 1,
        "destinations": {
            "rudderstack": {"kind": "rudderstack", "url": "https://127.0.0.1:9/dp", "timeout": 5.0},
            "segment": {"kind": "segment", "url": "http://127.0.0.1:9", "timeout": 10.0},
        },
        "sources": [{"name": "web", "write_keys": [mask(WRITE_KEY), "****"], "credentials": {"rudderstack": mask(RS_KEY)}}],
        "cohort": {"key": ["anonymousId", "userId"], "salt": "s1"},
        "country_headers": ["CF-IPCountry", "CloudFront-Viewer-Country", "X-Country"],
        "rules": [
            {
                "name": "checkout",
                "when": {"type": "track", "event": ["Checkout *"]},
                "route": {"to": ["segment"], "split": None, "mirror": ["rudderstack"]},
                "cohort": {"key": ["anonymousId", "userId"], "salt": "s1"},
            },
            {
                "name": "rollout",
                "when": {},
                "route": {"to": [], "split": {"rudderstack": 10.0, "segment": 90.0}, "mirror": []},
                "cohort": {"key": ["anonymousId", "userId"], "salt": "s1"},
            },
        ],
    }
    assert mask(WRITE_KEY) == "wk_l****" and mask(WRITE_KEY) in text


def test_public_url_strips_userinfo_and_query() -> None:
    assert public_url("https://user:pass@host.example:8443/a/b?k=v#f") == "https://host.example:8443/a/b"
    assert public_url("http://[::1]:9") == "http://[::1]:9"


async def test_reload_success_and_rollback(open_admin: tuple[Admin, Client]) -> None:
    admin, client = open_admin
    admin.path.write_text(rules_yaml(percent=20))
    response = await client.post("/admin/reload")
    assert response.status == 200
    assert await response.json() == {"success": True, "status": "success", "sha256": admin.active.current.sha256, "rollbacks": []}

    admin.path.write_text(rules_yaml(percent=15))
    response = await client.post("/admin/reload")
    body = await response.json()
    assert response.status == 200 and body["rollbacks"] == [{"rule": "rollout", "buckets_back": 500}]

    response = await client.post("/admin/reload")
    assert response.status == 200 and (await response.json())["status"] == "unchanged"


async def test_reload_bad_file_is_400_and_keeps_rules(open_admin: tuple[Admin, Client]) -> None:
    admin, client = open_admin
    admin.path.write_text(rules_yaml(percent=10, total=90))
    response = await client.post("/admin/reload")
    assert response.status == 400
    body = await response.json()
    assert body["success"] is False and body["status"] == "error" and body["code"] == "invalid_rules"
    assert body["errors"] == [f"{admin.path}:18: rules[1].route.split: percents sum to 90, must be 100"]
    assert body["message"] == "the rules file has 1 problem(s); the previous rules stay active"
    assert admin.active.current is admin.first and body["sha256"] == admin.first.sha256
    assert admin.metrics.registry.get_sample_value("splitter_config_reloads_total", {"result": "error"}) == 1


async def test_reload_reshuffle_is_400_refused(open_admin: tuple[Admin, Client]) -> None:
    admin, client = open_admin
    admin.path.write_text(rules_yaml(salt="s2"))
    response = await client.post("/admin/reload")
    body = await response.json()
    assert response.status == 400 and body["status"] == "refused" and body["code"] == "reshuffle_refused"
    assert "reshuffle: true" in body["errors"][0]
    assert admin.active.current is admin.first


async def test_wrong_method_and_unknown_route(open_admin: tuple[Admin, Client]) -> None:
    _, client = open_admin
    assert (await client.get("/admin/reload")).status == 405
    assert (await client.post("/admin/config")).status == 405
    assert (await client.get("/admin/nope")).status == 404


@pytest.mark.parametrize("method,path", [("GET", "/admin/config"), ("POST", "/admin/reload")])
async def test_token_guards_admin_routes(locked_admin: tuple[Admin, Client], method: str, path: str) -> None:
    _, client = locked_admin
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer pässwörd"}):
        response = await client.request(method, path, headers=headers)
        assert response.status == 401, headers
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        body = await response.json()
        assert body["success"] is False and body["code"] == "unauthorized"
    response = await client.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200
    response = await client.request(method, path, headers={"Authorization": f"bearer  {TOKEN} "})
    assert response.status == 200


async def test_token_leaves_probes_and_metrics_open(locked_admin: tuple[Admin, Client]) -> None:
    _, client = locked_admin
    for path in ("/metrics", "/healthz", "/readyz"):
        assert (await client.get(path)).status == 200, path
