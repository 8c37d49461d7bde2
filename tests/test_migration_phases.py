"""The runbook's promises, checked against the shipped phase files (docs/migration.md).

Offline, the way the runbook tells an operator to rehearse a step: `splitter simulate NEW sample
--against OLD` on a sample of events from every source (per-event source and country), where each
step forward moves no user back and stops no RudderStack copy, each step back is reported as a
rollback, and each phase sends what its section says. Then through a running `splitter serve` with
real stand-in receivers and traffic: the moves the phase files made before issue 17
(tests/data/migration-as-filed/) are reported by the reload, and a change that moves users both
ways is refused until the file consents.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import random
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from loadtest.process import SplitterProcess, launch_splitter
from loadtest.receivers import RunningReceiver, start_receiver
from proxy.engine import EventContext, RuleSet, decide, load_rules
from tests.conftest import splitter_command

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules"
AS_FILED = Path(__file__).resolve().parent / "data" / "migration-as-filed"
PHASES = ["migration-1-server-side", "migration-2-client-apps", "migration-3-parallel", "migration-5-widening", "migration-6-cutover"]
STEPS = list(itertools.pairwise(PHASES))
STEP_IDS = [f"{old[10]}->{new[10]}" for old, new in STEPS]
SOURCES = ("backend", "web", "ios", "android")
RUDDER_KEY = "phases-rs-key-0123456789"
ENV = {
    **{f"SEGMENT_WRITE_KEY_{s.upper()}": f"seg-{s}-key-0123456789" for s in SOURCES},
    **{f"RUDDERSTACK_WRITE_KEY_{s.upper()}": RUDDER_KEY for s in SOURCES},
    "RUDDERSTACK_DATA_PLANE_URL": "http://127.0.0.1:9",
    "SEGMENT_WRITE_KEY_IOS_VIA_SPLITTER": "seg-ios-via-splitter-0123456789",
    "SEGMENT_WRITE_KEY_ANDROID_VIA_SPLITTER": "seg-android-via-splitter-0123456789",
    "SEGMENT_WEBHOOK_SECRET": "phases-webhook-secret-0123456789",
}
EVENTS = ("Checkout Started", "Order Completed", "Product Viewed", "Signed In")


def sample_events(users: int = 400, seed: int = 17) -> Iterator[tuple[str, dict[str, Any]]]:
    """(source, event): every source, app builds old and new, four countries, checkout and other events."""
    chooser = random.Random(seed)
    for index in range(users):
        source = SOURCES[index % len(SOURCES)]
        context: dict[str, Any] = {"location": {"country": chooser.choice(["US", "DE", "GB", "FR"])}}
        if source in ("ios", "android"):
            context["app"] = {"version": chooser.choice(["4.1.0", "4.2.0", "4.3.1"])}
        for name in EVENTS:
            yield source, {"type": "track", "event": name, "anonymousId": f"user-{index}", "messageId": f"user-{index}-{name}", "context": context}


def write_sample(path: Path) -> Path:
    lines = [orjson.dumps({**event, "_splitter": {"source": source}}) for source, event in sample_events()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def simulate(new: Path, old: Path, sample: Path) -> str:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SPLITTER_")}, **ENV}
    finished = subprocess.run(splitter_command("simulate", str(new), str(sample), "--against", str(old)),
                              capture_output=True, text=True, timeout=60, env=env)
    assert finished.returncode == 0, finished.stderr
    return finished.stdout.split("\nagainst ", 1)[1]


def phase(name: str) -> RuleSet:
    return load_rules(str(RULES / f"{name}.yaml"), dict(os.environ, **ENV))


def routed(rules: RuleSet) -> Iterator[tuple[str, dict[str, Any], tuple[str, ...], tuple[str, ...]]]:
    for source, event in sample_events():
        decision = decide(rules, event, EventContext(source))
        yield source, event, decision.primary, decision.mirror


@pytest.mark.parametrize("old,new", STEPS, ids=STEP_IDS)
def test_each_step_forward_moves_no_one_back_and_stops_no_rudderstack_copy(tmp_path: Path, old: str, new: str) -> None:
    report = simulate(RULES / f"{new}.yaml", RULES / f"{old}.yaml", write_sample(tmp_path / "sample.ndjson"))
    assert "a reload would be accepted: no user moves back, no RudderStack copy stops" in report, report
    assert "rudderstack -> segment" not in report and "rudderstack: primary -> none" not in report
    assert "rudderstack: mirror -> none" not in report, report


@pytest.mark.parametrize("old,new", [("migration-6-cutover", "migration-5-widening"), ("migration-5-widening", "migration-3-parallel"),
                                     ("migration-3-parallel", "migration-2-client-apps")], ids=["6->5", "5->3", "3->2"])
def test_each_step_back_is_reported_as_a_rollback(tmp_path: Path, old: str, new: str) -> None:
    report = simulate(RULES / f"{new}.yaml", RULES / f"{old}.yaml", write_sample(tmp_path / "sample.ndjson"))
    assert "a reload would be accepted with" in report and "rollback: " in report, report
    assert "rudderstack -> segment" in report


def test_phase_1_moves_the_backend_whole_with_a_segment_mirror() -> None:
    for source, _, primary, mirror in routed(phase("migration-1-server-side")):
        assert (primary, mirror) == ((("rudderstack",), ("segment",)) if source == "backend" else (("segment",), ()))


def test_phase_2_moves_a_tenth_of_new_app_builds_and_keeps_old_builds_and_the_web_on_segment() -> None:
    on_rudderstack, new_build_users = set(), set()
    for source, event, primary, mirror in routed(phase("migration-2-client-apps")):
        version = event["context"].get("app", {}).get("version")
        if source in ("ios", "android") and version != "4.1.0":
            new_build_users.add(event["anonymousId"])
            if primary == ("rudderstack",):
                assert mirror == ("segment",)
                on_rudderstack.add(event["anonymousId"])
        elif source != "backend":
            assert (primary, mirror) == (("segment",), ())
    assert 0.03 < len(on_rudderstack) / len(new_build_users) < 0.2


def test_phase_2_with_old_builds_through_segments_webhook_keeps_the_split(tmp_path: Path) -> None:
    plain, webhook = phase("migration-2-client-apps"), phase("migration-2-client-apps-webhook")
    assert [d[2:] for d in routed(plain)] == [d[2:] for d in routed(webhook)]  # the apps' own traffic: routed the same
    for _, event in sample_events(40):
        decision = decide(webhook, event, EventContext("legacy-direct"))
        assert (decision.primary, decision.mirror) == (("rudderstack",), ())  # Segment has them already
    for app in ("ios", "android"):  # splitter's Segment copies go to another Segment source than the webhook's
        source = webhook.sources[app]
        assert source.credentials["segment"] not in source.write_keys
    report = simulate(RULES / "migration-2-client-apps-webhook.yaml", RULES / "migration-1-server-side.yaml",
                      write_sample(tmp_path / "sample.ndjson"))
    assert "a reload would be accepted: no user moves back, no RudderStack copy stops" in report, report


@pytest.mark.parametrize("name", ["migration-3-parallel", "migration-5-widening"])
def test_phases_3_and_5_keep_every_client_event_on_segment_and_the_backend_on_rudderstack_only(name: str) -> None:
    for source, _, primary, mirror in routed(phase(name)):
        if source == "backend":
            assert (primary, mirror) == (("rudderstack",), ())
        else:
            assert "segment" in primary + mirror


@pytest.mark.parametrize("old,new", STEPS, ids=STEP_IDS)
def test_rudderstack_keeps_every_event_it_received_in_the_phase_before(old: str, new: str) -> None:
    before, after = list(routed(phase(old))), list(routed(phase(new)))
    for (_, event, old_primary, old_mirror), (_, _, new_primary, new_mirror) in zip(before, after):
        if "rudderstack" in old_primary + old_mirror:
            assert "rudderstack" in new_primary + new_mirror, (new, event)


def test_phase_6_sends_everything_to_rudderstack_only() -> None:
    assert {(primary, mirror) for _, _, primary, mirror in routed(phase("migration-6-cutover"))} == {(("rudderstack",), ())}


# Through a running proxy: the moves of the files as they were filed are reported by the reload.

@pytest.fixture
async def receivers() -> AsyncIterator[tuple[RunningReceiver, RunningReceiver]]:
    segment = await start_receiver("segment", record=True)
    rudder = await start_receiver("rudderstack", record=True, valid_keys=[RUDDER_KEY])
    yield segment, rudder
    await segment.close()
    await rudder.close()


async def send_traffic(client: aiohttp.ClientSession, splitter: SplitterProcess) -> int:
    """Every sample event, in batches of up to 50 per source, paced so the proxy keeps each for its replay window."""
    by_source: dict[str, list[dict[str, Any]]] = {}
    for source, event in sample_events():
        by_source.setdefault(source, []).append(event)
    sent = 0
    for source, events in by_source.items():
        auth = "Basic " + base64.b64encode(f"{ENV[f'SEGMENT_WRITE_KEY_{source.upper()}']}:".encode()).decode()
        for start in range(0, len(events), 50):
            async with client.post(splitter.ingress + "/v1/batch", json={"batch": events[start:start + 50]},
                                   headers={"Authorization": auth}) as response:
                assert response.status == 200, await response.text()
            sent += len(events[start:start + 50])
            await asyncio.sleep(0.06)  # the replay window samples a request at most every 50 ms (proxy/control/traffic.py)
    return sent


async def reload_to(client: aiohttp.ClientSession, splitter: SplitterProcess, active: Path, text: str) -> tuple[int, dict[str, Any]]:
    active.write_text(text)
    async with client.post(splitter.admin + "/admin/reload") as response:
        return response.status, await response.json()


def rollbacks_of(answer: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [entry for entry in answer["rollbacks"] if entry.get("kind") == kind]


async def test_a_running_proxy_reports_every_move_back_and_refuses_a_reshuffle(tmp_path: Path, receivers) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = receivers
    active = tmp_path / "rules.yaml"
    active.write_text((AS_FILED / "migration-2-client-apps.yaml").read_text())
    env = {**os.environ, **ENV, "SEGMENT_URL": segment.url, "RUDDERSTACK_DATA_PLANE_URL": rudder.url}
    splitter = await launch_splitter(str(active), env, ["--reload-interval", "3600"])
    try:
        async with aiohttp.ClientSession() as client:
            assert await send_traffic(client, splitter) == 1600

            # 2 -> 3 as filed: checkout-area above new-app-builds sends that cohort's checkout events back.
            status, answer = await reload_to(client, splitter, active, (AS_FILED / "migration-3-parallel.yaml").read_text())
            assert status == 200 and answer["status"] == "success", answer
            [back] = [e for e in rollbacks_of(answer, "primary") if e["from_rule"] == "new-app-builds"]
            assert (back["rule"], back["before"], back["after"], back["share_percent"]) == ("checkout-area", "rudderstack", "segment", 10.0)
            assert back["users"] > 0 and back["events"] >= back["users"]  # seen in the traffic replayed, not only in the rules
            logged = await splitter.wait_for_log("config_rollback")
            assert logged["kind"] in ("primary", "copy_lost") and logged["level"] == "warning"

            # 3 -> 5 as filed: dropping checkout-area stops RudderStack's mirror of checkout events on the Segment side.
            await send_traffic(client, splitter)
            status, answer = await reload_to(client, splitter, active, (AS_FILED / "migration-5-widening.yaml").read_text())
            assert status == 200, answer
            lost = [e for e in rollbacks_of(answer, "copy_lost") if e["destination"] == "rudderstack" and e["before"] == "mirror"]
            assert {e["from_rule"] for e in lost} == {"checkout-area"} and sum(e["events"] for e in lost) > 0, answer

            # 5 -> 6 moves everyone forward; 6 -> 5 (the shipped file) moves users back, and says so.
            status, answer = await reload_to(client, splitter, active, (RULES / "migration-6-cutover.yaml").read_text())
            assert status == 200 and answer["rollbacks"] == [], answer
            await send_traffic(client, splitter)
            status, answer = await reload_to(client, splitter, active, (RULES / "migration-5-widening.yaml").read_text())
            assert status == 200 and {(e["before"], e["after"]) for e in rollbacks_of(answer, "primary")} == {("rudderstack", "segment")}
            assert {e["rule"] for e in rollbacks_of(answer, "primary")} == {"legacy-app-builds", "new-app-builds", "checkout-area", "web-cohort"}

            # A cohort rule replaced by one with its own salt draws its users anew: some move each way.
            shipped = (RULES / "migration-5-widening.yaml").read_text()
            reshuffled = shipped.replace("  - name: web-cohort\n", "  - name: web-cohort-v2\n    cohort: {salt: fresh}\n")
            status, answer = await reload_to(client, splitter, active, reshuffled)
            assert status == 400 and answer["status"] == "refused", answer
            assert any("rule 'web-cohort-v2'" in error and "reshuffles users" in error for error in answer["errors"])
            status, answer = await reload_to(client, splitter, active, reshuffled.replace("cohort: {salt: fresh}", "cohort: {salt: fresh, reshuffle: true}"))
            assert status == 200 and answer["status"] == "success", answer

            text = await (await client.get(splitter.admin + "/metrics")).text()
            counts = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("splitter_config_rollbacks_total{")}
            assert counts["primary"] >= 5 and counts["copy_lost"] >= 2, counts
            assert 'splitter_config_reloads_total{result="refused"} 1.0' in text
            assert RUDDER_KEY not in text and all(f"seg-{s}-key" not in text for s in SOURCES)
    finally:
        assert await splitter.stop() == 0
    assert not [e for e in splitter.log if RUDDER_KEY in orjson.dumps(e).decode()]
