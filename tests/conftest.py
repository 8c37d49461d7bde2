"""Shared fixtures: paths, the environment the shipped rule files need, and a rules-file builder."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.ingress.implementation import Implementation, compiled, disabled
from tests.redis_server import PASSWORD, RedisServer
from tests.system_tools import missing, skip_reason

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "rules"
SHARED_GOLDEN = ROOT.parent / "shared" / "golden" / "cohort-buckets.ndjson"
VENDORED_GOLDEN = Path(__file__).resolve().parent / "data" / "cohort-buckets.ndjson"

# Every ${VAR} the shipped rule files reference, with loopback values: enough to compile them all.
RULES_ENV = {
    "SEGMENT_URL": "http://127.0.0.1:9",
    "RUDDERSTACK_DATA_PLANE_URL": "http://127.0.0.1:9",
    "RUDDERSTACK_EU_DATA_PLANE_URL": "http://127.0.0.1:9",
    "SPLITTER_WRITE_KEY": "splitter-demo-key",
    "RUDDERSTACK_WRITE_KEY": "rudder-demo-key",
    "SEGMENT_WRITE_KEY_WEB": "seg-web-key",
    "RUDDERSTACK_WRITE_KEY_WEB": "rs-web-key",
    "SEGMENT_WRITE_KEY_IOS": "seg-ios-key",
    "SEGMENT_WRITE_KEY_IOS_VIA_SPLITTER": "seg-ios-via-splitter-key",
    "SEGMENT_WRITE_KEY_ANDROID_VIA_SPLITTER": "seg-android-via-splitter-key",
    "RUDDERSTACK_WRITE_KEY_IOS": "rs-ios-key",
    "SEGMENT_WRITE_KEY_ANDROID": "seg-android-key",
    "RUDDERSTACK_WRITE_KEY_ANDROID": "rs-android-key",
    "SEGMENT_WRITE_KEY_BACKEND": "seg-backend-key",
    "RUDDERSTACK_WRITE_KEY_BACKEND": "rs-backend-key",
    "SEGMENT_WEBHOOK_SECRET": "webhook-secret-0123456789",
    "PII_SALT": "test-pii-salt",
}


def splitter_command(*args: str) -> list[str]:
    """The CLI as users run it, through the interpreter running the tests."""
    return [sys.executable, "-m", "proxy", *args]


@pytest.fixture
def rules_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RULES_ENV)
    return env


def pytest_unconfigure(config: pytest.Config) -> None:
    """End the run with one line of counts, after pytest's own summary: what ran, what failed,
    what skipped, and above it each skip's reason (a missing program names its Debian package)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not hasattr(reporter, "stats"):
        return
    stats = reporter.stats
    passed = len(stats.get("passed", []))
    failed = len(stats.get("failed", [])) + len(stats.get("error", []))
    skipped = [report for report in stats.get("skipped", []) if getattr(report, "when", "") in ("setup", "call")]
    if not (passed or failed or skipped):
        return
    reasons: dict[str, int] = {}
    for report in skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in sorted(reasons.items()):
        print(f"  skipped {count}: {reason}")
    print(f"tests: {passed} passed, {failed} failed, {len(skipped)} skipped")


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of the test's own (tests/redis_server.py), killed after it."""
    server = RedisServer(tmp_path, PASSWORD)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def compiled_twin() -> Implementation:
    """The compiled `prepare()` (proxy/ingress/_compiled.pyx). Skips, naming the packages, only where no C
    compiler is installed to build it; where one is, a module that was not built is a failure."""
    if disabled(os.environ):
        pytest.skip("SPLITTER_NO_EXTENSIONS is set: the compiled prepare() is neither built nor run")
    try:
        return compiled()
    except ImportError as exc:
        absent = missing(("cc", "python3-config"))
        if absent:
            pytest.skip(skip_reason(absent))
        raise AssertionError(f"the compiled prepare() is not built although a C compiler is here ({exc}): `.venv/bin/pip install -e .` builds it") from None
