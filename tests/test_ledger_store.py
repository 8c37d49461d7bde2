"""The delivery ledger's store, unit by unit: rows and their columns, the recent windows, the name cap,
reconciling with a spool at a restart, the fan-out groups and their cap, snapshots and merging views."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from proxy.observe.fanout import FanOut
from proxy.observe.ledger import ACCEPTED, DEAD, DELIVERED, DROPPED, Ledger
from proxy.observe.ledger_files import LedgerKeeper, ledger_document
from proxy.observe.ledger_view import destinations, merge, view_of
from proxy.observe.names import OTHER, Names

T0 = 1_764_000_000.0  # a whole hour (and five minutes) since the epoch
PV = ("track", "Product Viewed")
OC = ("track", "Order Completed")


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rows(ledger: Ledger) -> dict[tuple[str, ...], dict[str, object]]:
    view = view_of(ledger.to_json(), ledger.clock())
    return {tuple(r[k] for k in ("source", "type", "event", "destination", "role")): r for r in view["rows"]}


def test_columns_add_up_and_pending_is_what_is_left() -> None:
    ledger = Ledger(clock=Clock())
    ledger.count(ACCEPTED, "web", "segment", "primary", {PV: 10, OC: 2})
    ledger.count(DELIVERED, "web", "segment", "primary", {PV: 7})
    ledger.count(DEAD, "web", "segment", "primary", {PV: 1, OC: 1}, "rejected")
    ledger.count(DEAD, "web", "segment", "primary", {PV: 1}, "credential_refused")
    ledger.count(DROPPED, "web", "rudderstack", "mirror", {PV: 4})
    found = rows(ledger)
    pv = found["web", "track", "Product Viewed", "segment", "primary"]
    assert (pv["accepted"], pv["delivered"], pv["dead_lettered"], pv["pending"]) == (10, 7, 2, 1)
    assert pv["reasons"] == {"rejected": 1, "credential_refused": 1}
    assert found["web", "track", "Order Completed", "segment", "primary"]["pending"] == 1
    assert found["web", "track", "Product Viewed", "rudderstack", "mirror"]["dropped"] == 4


def test_accepted_routes_are_spread_over_every_destination_and_role_of_the_route() -> None:
    ledger = Ledger(clock=Clock())
    route = ("everyone", ("rudderstack",), ("segment",), "track")
    ledger.accept_routes("web", [(route, {"Product Viewed": 3, "Order Completed": 1})])
    ledger.accept_routes("web", [(route, {"Product Viewed": 2}), (("legacy", ("segment",), (), "page"), {"Home": 5})])
    found = rows(ledger)
    assert found["web", "track", "Product Viewed", "rudderstack", "primary"]["accepted"] == 5
    assert found["web", "track", "Product Viewed", "segment", "mirror"]["accepted"] == 5
    assert found["web", "track", "Order Completed", "segment", "mirror"]["accepted"] == 1
    assert found["web", "page", "Home", "segment", "primary"]["accepted"] == 5
    assert len(found) == 5


def test_windows_keep_the_last_hour_in_five_minute_buckets_and_the_last_day_in_hours() -> None:
    clock = Clock()
    ledger = Ledger(clock=clock)
    for minutes_ago, events in ((26 * 60, 1000), (23 * 60, 100), (90, 10), (50, 3), (0, 1)):
        clock.now = T0 + 26 * 3600 - minutes_ago * 60
        ledger.count(ACCEPTED, "web", "segment", "primary", {PV: events})
        ledger.fold()  # what the snapshot writer does every few seconds
    clock.now = T0 + 26 * 3600
    [row] = rows(ledger).values()
    assert row["accepted"] == 1114  # since the ledger began
    assert row["last_hour"]["accepted"] == 4  # 50 minutes ago and now; not 90 minutes ago
    assert row["last_24h"]["accepted"] == 114  # not 26 hours ago
    hourly = view_of(ledger.to_json(), clock.now, hourly=True)["rows"][0]["hourly"]
    assert sum(bucket["accepted"] for bucket in hourly.values()) == 114 and all(k.endswith(":00:00+00:00") for k in hourly)


def test_names_past_the_cap_are_counted_as_other_per_source_and_kept_names_stay() -> None:
    ledger = Ledger(max_names=2, clock=Clock())
    ledger.count(ACCEPTED, "web", "segment", "primary", {("track", "a"): 1, ("track", "b"): 1, ("track", "c"): 1, ("page", "d"): 2})
    ledger.count(DELIVERED, "web", "segment", "primary", {("track", "c"): 1, ("track", "a"): 1})
    ledger.count(ACCEPTED, "ios", "segment", "primary", {("track", "c"): 1})  # another source has its own room
    found = rows(ledger)
    assert set(found) == {("web", "track", "a", "segment", "primary"), ("web", "track", "b", "segment", "primary"),
                          ("web", "track", OTHER, "segment", "primary"), ("web", "page", OTHER, "segment", "primary"),
                          ("ios", "track", "c", "segment", "primary")}
    other = found["web", "track", OTHER, "segment", "primary"]
    assert (other["accepted"], other["delivered"], other["pending"]) == (1, 1, 0)  # c's delivery lands on the row its acceptance did
    names = Names(cap=1)
    assert names.key("web", "track", "x") == ("track", "x") and names.key("web", "track", "y") == ("track", OTHER)
    names.keep("web", "track", "y")  # a snapshot's row: kept again even past the cap
    assert names.key("web", "track", "y") == ("track", "y")


def test_a_restart_makes_pending_agree_with_the_spool_both_ways() -> None:
    """The snapshot said 5 pending; the spool holds 8 of one name (accepted after the snapshot, or
    replayed) and 1 of another (settled after the snapshot): accepted grows, the rest is unrecorded."""
    ledger = Ledger(clock=Clock())
    ledger.count(ACCEPTED, "web", "segment", "primary", {PV: 10, OC: 6})
    ledger.count(DELIVERED, "web", "segment", "primary", {PV: 7, OC: 4})
    ledger.count(ACCEPTED, "web", "rudderstack", "primary", {PV: 3})  # another destination: not this spool's business
    restarted = Ledger(clock=Clock())
    restarted.load(orjson.loads(orjson.dumps(ledger.to_json())))
    restarted.recovered("segment", {("web", "primary", *PV): 8, ("web", "primary", *OC): 1, ("(unknown)", "(unknown)", "(unknown)", "(unknown)"): 4})
    found = rows(restarted)
    pv, oc = found["web", "track", "Product Viewed", "segment", "primary"], found["web", "track", "Order Completed", "segment", "primary"]
    assert (pv["accepted"], pv["delivered"], pv["unrecorded"], pv["pending"]) == (15, 7, 0, 8)
    assert (oc["accepted"], oc["delivered"], oc["unrecorded"], oc["pending"]) == (6, 4, 1, 1)
    assert found["(unknown)", "(unknown)", "(unknown)", "segment", "(unknown)"]["pending"] == 4  # a format-2 spool's records
    assert found["web", "track", "Product Viewed", "rudderstack", "primary"]["pending"] == 3
    for row in found.values():
        assert row["accepted"] == row["delivered"] + row["dead_lettered"] + row["unrecorded"] + row["pending"]
    assert pv["last_hour"]["accepted"] == 10  # what a restart adds has no time: it is in the totals only


def test_a_snapshot_round_trip_keeps_everything() -> None:
    clock = Clock()
    ledger = Ledger(clock=clock)
    ledger.count(ACCEPTED, "web", "segment", "primary", {PV: 4})
    ledger.count(DEAD, "web", "segment", "primary", {PV: 1}, "redirected")
    ledger.fanout.open("g1", "web", 2, {PV: 3})
    ledger.fanout.settle("g1", 3, True)
    ledger.fanout.open("g2", "web", 2, {OC: 1})
    ledger.restarts, ledger.unclean_restarts = 3, 1
    data = orjson.loads(orjson.dumps(ledger.to_json()))
    again = Ledger(clock=clock)
    again.load(data)
    assert again.to_json() == ledger.to_json()
    assert view_of(data, clock.now) == view_of(again.to_json(), clock.now)


def test_fanout_groups_settle_by_record_and_name_the_events_that_failed() -> None:
    fan = FanOut(Names())
    fan.open("a", "web", 2, {PV: 3, OC: 1})  # 4 events to two destinations: 8 copies
    fan.settle("a", 4, True)  # one destination's record delivered whole
    assert [(r["event"], r["in_flight_some"], r["in_flight_none"]) for r in fan.rows()] == [("Product Viewed", 3, 0), ("Order Completed", 1, 0)]
    fan.settle("a", 3, True)
    fan.settle("a", 1, False, [("m9", *OC)])  # the other dead-lettered one event
    by_name = {r["event"]: r for r in fan.rows()}
    assert (by_name["Product Viewed"]["reached_all"], by_name["Order Completed"]["reached_some"], by_name["Order Completed"]["reached_all"]) == (3, 1, 0)
    fan.open("b", "web", 2, {PV: 2})
    fan.settle("b", 1, False, [("x", *PV)])
    fan.settle("b", 1, False, [("x", *PV)])  # both copies of x failed: reached none
    fan.settle("b", 2, True)
    by_name = {r["event"]: r for r in fan.rows()}
    assert (by_name["Product Viewed"]["fanned_out"], by_name["Product Viewed"]["reached_none"], by_name["Product Viewed"]["reached_all"]) == (5, 1, 4)
    assert fan.groups == {} and fan.tracked == 0


def test_fanout_past_its_cap_counts_untracked_and_stores_nothing() -> None:
    fan = FanOut(Names(), cap=5)
    fan.open("a", "web", 2, {PV: 4})
    fan.open("b", "web", 2, {PV: 2})  # 6 > 5
    [row] = fan.rows()
    assert (row["fanned_out"], row["untracked"], row["in_flight_none"], fan.tracked) == (6, 2, 4, 4)
    fan.settle("b", 2, True)  # untracked: ignored
    fan.settle("a", 8, True)
    [row] = fan.rows()
    assert (row["reached_all"], row["untracked"], fan.tracked) == (4, 2, 0)


def test_fanout_across_a_restart_keeps_whole_groups_and_counts_the_others_unresolved() -> None:
    fan = FanOut(Names())
    fan.open("whole", "web", 2, {PV: 2})
    fan.settle("whole", 2, True)  # two copies left, both still in the spool at the restart
    fan.open("gap", "web", 2, {OC: 3})  # six copies left, but two settled after the snapshot
    fan.open("replayed", "web", 2, {PV: 1})
    fan.settle("replayed", 1, True)
    again = FanOut(Names())
    again.load(orjson.loads(orjson.dumps(fan.to_json())))
    again.found("whole", 2)
    again.found("gap", 4)
    again.found("replayed", 2)  # one more than it waited for: a replay
    again.found("unknown-group", 5)
    again.resolve()
    assert set(again.groups) == {"whole", "replayed"}
    again.settle("whole", 2, True)
    again.settle("replayed", 2, True)
    by_name = {r["event"]: r for r in again.rows()}
    assert (by_name["Product Viewed"]["reached_all"], by_name["Order Completed"]["unresolved"], by_name["Order Completed"]["reached_all"]) == (3, 3, 0)


def test_views_merge_by_adding_and_keep_every_process() -> None:
    clock = Clock()
    one, two = Ledger(clock=clock), Ledger(clock=clock)
    one.count(ACCEPTED, "web", "segment", "primary", {PV: 3})
    two.count(ACCEPTED, "web", "segment", "primary", {PV: 4, OC: 1})
    two.count(DEAD, "web", "segment", "primary", {PV: 1}, "rejected")
    two.since = T0 - 100
    one.fanout.open("a", "web", 2, {PV: 1})
    two.fanout.open("b", "web", 2, {PV: 2})
    two.fanout.settle("b", 4, True)
    merged = merge([view_of({**one.to_json(), "process": "worker-0"}, clock.now), view_of({**two.to_json(), "process": "worker-1"}, clock.now)])
    found = {r["event"]: r for r in merged["rows"]}
    assert (found["Product Viewed"]["accepted"], found["Product Viewed"]["pending"], found["Product Viewed"]["reasons"]) == (7, 6, {"rejected": 1})
    assert found["Product Viewed"]["last_hour"]["accepted"] == 7
    assert [p["name"] for p in merged["processes"]] == ["worker-0", "worker-1"]
    assert merged["since"] == view_of(two.to_json(), clock.now)["since"]
    [fan] = merged["fanout"]["rows"]
    assert (fan["fanned_out"], fan["reached_all"], fan["in_flight_none"]) == (3, 2, 1)
    [total] = destinations(merged)
    assert (total["destination"], total["accepted"], total["dead_lettered"]) == ("segment", 8, 1)


async def test_the_keeper_writes_at_start_while_counts_change_and_clean_at_stop(tmp_path: Path) -> None:
    keeper = LedgerKeeper(tmp_path, "worker-1", interval=0.05)
    keeper.load()  # nothing yet
    keeper.start()
    path = tmp_path / "ledger.worker-1.json"
    first = orjson.loads(path.read_bytes())
    assert first["process"] == "worker-1" and first["clean"] is False and first["rows"] == []
    keeper.ledger.count(ACCEPTED, "web", "segment", "primary", {PV: 2})
    for _ in range(100):
        await asyncio.sleep(0.02)
        if orjson.loads(path.read_bytes())["rows"]:
            break
    assert orjson.loads(path.read_bytes())["rows"][0][5] == 2
    await keeper.stop()
    assert orjson.loads(path.read_bytes())["clean"] is True
    assert path.stat().st_mode & 0o777 == 0o600
    again = LedgerKeeper(tmp_path, "worker-1")
    again.load()
    assert (again.ledger.restarts, again.ledger.unclean_restarts, again.ledger.since) == (1, 0, keeper.ledger.since)
    again.start()
    crashed = LedgerKeeper(tmp_path, "worker-1")  # the last write was not a stop's
    crashed.load()
    assert (crashed.ledger.restarts, crashed.ledger.unclean_restarts) == (2, 1)
    await again.stop()


async def test_a_damaged_file_is_set_aside_and_the_document_lists_unreadable_others(tmp_path: Path) -> None:
    (tmp_path / "ledger.json").write_bytes(b"{not json")
    keeper = LedgerKeeper(tmp_path, None)
    keeper.load()
    assert (tmp_path / "ledger.json.unreadable").exists() and not (tmp_path / "ledger.json").exists()
    (tmp_path / "ledger.worker-3.json").write_bytes(b'{"format": 99}')
    other = Ledger()
    other.count(ACCEPTED, "web", "segment", "primary", {PV: 5})
    (tmp_path / "ledger.worker-4.json").write_bytes(orjson.dumps({**other.to_json(), "process": "worker-4", "written_at": T0}))
    keeper.ledger.count(ACCEPTED, "web", "segment", "primary", {PV: 1})
    document = await ledger_document(tmp_path, keeper)
    [row] = document["rows"]
    assert row["accepted"] == 6
    assert [p["name"] for p in document["processes"]] == ["serve", "worker-4"] and document["processes"][0]["live"]
    assert document["unreadable"] == [{"file": "ledger.worker-3.json", "error": "not a ledger snapshot of format 1"}]
