"""Shared fixtures: paths, the environment the shipped rule files need, and a rules-file builder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

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
