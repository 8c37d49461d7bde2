"""The live event catalog of one process (proxy/observe/catalog.py), its views and its files: counts and
windows, routes, caps and `(other)`, types that change, sampling that depends only on the requests,
the snapshot round trip, merged views, and the document the admin port serves from a state directory."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.engine import OTHER, CatalogSettings, event_shape
from proxy.observe.catalog import Catalog, RouteKey, Sampled
from proxy.observe.catalog_files import CatalogKeeper, catalog_document
from proxy.observe.catalog_view import merge_views, only_source, view_of

T0 = 1_800_000_000.0  # a moment on a 5-minute boundary (1800000000 / 300 is whole)
SETTINGS = CatalogSettings()
SEG, RS = ("segment",), ("rudderstack",)


def route(name: str, event_type: str = "track", primary: tuple[str, ...] = SEG, mirror: tuple[str, ...] = (), rule: str = "r") -> tuple[RouteKey, str]:
    return (rule, primary, mirror, event_type), name


def routed(counts: dict[tuple[RouteKey, str], int]) -> dict[RouteKey, dict[str, int]]:
    """prepare()'s counts: per routing key, per name."""
    nested: dict[RouteKey, dict[str, int]] = {}
    for (key, name), count in counts.items():
        nested.setdefault(key, {})[name] = count
    return nested


def shaped(name: str, properties: dict[str, Any], event_type: str = "track") -> Sampled:
    return (event_type, name, event_shape({"properties": properties}, 3, 300), None)


def view(catalog: Catalog, now: float, source: str = "web") -> dict[str, dict[str, Any]]:
    """The catalog's view at `now`, one source's events by name."""
    found = view_of(catalog.snapshot(None, now), now)["sources"].get(source, {"events": []})
    return {event["name"]: event for event in found["events"]}


def test_counts_routes_and_first_and_last_seen() -> None:
    catalog = Catalog()
    catalog.record(SETTINGS, "web", routed({route("Order Completed"): 3, route("Order Completed", primary=RS, mirror=SEG, rule="split"): 2,
                                            route("identify", "identify"): 1}), now=T0 + 10)
    catalog.record(SETTINGS, "web", routed({route("Order Completed"): 1}), now=T0 + 20)
    catalog.record(SETTINGS, "ios", routed({route("Order Completed"): 5}), now=T0 + 30)
    web = view(catalog, T0 + 40)
    order = web["Order Completed"]
    assert (order["type"], order["total"], order["last_hour"], order["last_24h"]) == ("track", 6, 6, 6)
    assert order["routed"] == {"segment": {"primary": 4, "mirror": 2}, "rudderstack": {"primary": 2}}
    assert (order["first_seen"], order["last_seen"]) == ("2027-01-15T08:00:10Z", "2027-01-15T08:00:20Z")
    assert web["identify"]["type"] == "identify" and web["identify"]["total"] == 1
    assert view(catalog, T0 + 40, "ios")["Order Completed"]["total"] == 5  # per source


def test_the_last_hour_and_day_move_on_with_time() -> None:
    catalog = Catalog()
    catalog.record(SETTINGS, "web", routed({route("E"): 1}), now=T0)
    catalog.record(SETTINGS, "web", routed({route("E"): 10}), now=T0 + 2 * 3600)  # a later bucket: what came before is folded first
    catalog.record(SETTINGS, "web", routed({route("E"): 100}), now=T0 + 2 * 3600 + 600)
    assert {k: view(catalog, T0 + 2 * 3600 + 700)["E"][k] for k in ("total", "last_hour", "last_24h")} == {"total": 111, "last_hour": 110, "last_24h": 111}
    assert {k: view(catalog, T0 + 3 * 3600 + 700)["E"][k] for k in ("total", "last_hour", "last_24h")} == {"total": 111, "last_hour": 0, "last_24h": 111}
    assert {k: view(catalog, T0 + 25 * 3600 + 700)["E"][k] for k in ("total", "last_hour", "last_24h")} == {"total": 111, "last_hour": 0, "last_24h": 110}
    assert {k: view(catalog, T0 + 26 * 3600 + 700)["E"][k] for k in ("total", "last_hour", "last_24h")} == {"total": 111, "last_hour": 0, "last_24h": 0}


def test_event_names_past_the_cap_are_counted_under_other() -> None:
    catalog = Catalog()
    settings = CatalogSettings(max_events=3)
    catalog.record(settings, "web", routed({route(f"E{i}"): i + 1 for i in range(5)}), now=T0)
    catalog.record(settings, "web", routed({route("E0"): 1, route("E9"): 4}), [shaped("E9", {"p": 1})], now=T0 + 1)
    web = view(catalog, T0 + 2)
    assert sorted(web) == [OTHER, "E0", "E1", "E2"]  # the first names seen (in the order their requests came) take the places
    assert web["E0"]["total"] == 2
    assert web[OTHER]["total"] == 4 + 5 + 4 and web[OTHER]["type"] == OTHER  # nothing is dropped
    assert web[OTHER]["paths"] == {} and web[OTHER]["sampled"] == 0  # counted, not described
    assert sum(e["total"] for e in web.values()) == 1 + 2 + 3 + 4 + 5 + 1 + 4


def test_paths_past_the_cap_are_counted_under_other_once_per_event() -> None:
    catalog = Catalog()
    settings = CatalogSettings(max_paths=2)
    catalog.record(settings, "web", routed({route("E"): 2}), [shaped("E", {"a": 1, "b": "x", "c": True, "d": None})], now=T0)
    catalog.record(settings, "web", {}, [shaped("E", {"a": 2, "e": 1.5})], now=T0 + 1)
    paths = view(catalog, T0 + 2)["E"]["paths"]
    assert list(paths) == [OTHER, "properties.a", "properties.b"]
    assert paths[OTHER] == {"seen": 2, "types": {"boolean": 1, "null": 1, "number": 1}, "mixed": True}
    assert paths["properties.a"]["seen"] == 2


def test_a_type_that_changes_is_visible_with_its_counts() -> None:
    catalog = Catalog()
    for i, price in enumerate([19.99, 5, "19.99", 7.5, None]):
        catalog.record(SETTINGS, "web", routed({route("Product Viewed"): 1}), [shaped("Product Viewed", {"price": price, "qty": i})], now=T0 + i)
    event = view(catalog, T0 + 10)["Product Viewed"]
    assert event["sampled"] == 5
    assert event["paths"]["properties.price"] == {"seen": 5, "types": {"number": 2, "integer": 1, "null": 1, "string": 1}, "mixed": True}
    assert event["paths"]["properties.qty"] == {"seen": 5, "types": {"integer": 5}, "mixed": False}


def test_integers_and_numbers_alone_are_not_a_type_change() -> None:
    catalog = Catalog()
    for price in (19.99, 5):
        catalog.record(SETTINGS, "web", routed({route("E"): 1}), [shaped("E", {"price": price})], now=T0)
    assert view(catalog, T0)["E"]["paths"]["properties.price"]["mixed"] is False


def test_sampling_takes_every_request_until_n_then_one_in_k_and_depends_only_on_the_requests() -> None:
    settings = CatalogSettings(schema_samples=3, sample_every=4)

    def run() -> list[bool]:
        catalog = Catalog()
        answers = []
        for i in range(20):
            wanted = catalog.wants_sample(settings, "web", "track", "E")
            answers.append(wanted)
            catalog.record(settings, "web", routed({route("E"): 2}), [shaped("E", {"i": i})] if wanted else [], now=T0 + i)
        return answers

    first = run()
    assert first == [True, True, True, False, False, False, True, False, False, False, True, False, False, False, True, False, False, False, True, False]
    assert run() == first  # the same requests, the same samples


def test_sampling_stops_for_names_past_the_cap_and_when_samples_are_off() -> None:
    catalog = Catalog()
    settings = CatalogSettings(max_events=1)
    catalog.record(settings, "web", {}, [shaped("A", {"x": 1})], now=T0)
    assert catalog.wants_sample(settings, "web", "track", "B") is False  # no room for another name: nothing to describe it in
    assert catalog.wants_sample(CatalogSettings(schema_samples=0), "new-source", "track", "A") is False


def test_a_turned_off_catalog_counts_nothing() -> None:
    catalog = Catalog()
    catalog.record(CatalogSettings(enabled=False), "web", routed({route("E"): 1}), now=T0)
    assert view(catalog, T0) == {}


def test_a_snapshot_round_trip_keeps_everything_and_counting_goes_on() -> None:
    catalog = Catalog()
    payload = {"type": "track", "event": "E", "properties": {"plan": "team"}}
    catalog.record(SETTINGS, "web", routed({route("E", primary=SEG, mirror=RS): 3}), [("track", "E", event_shape(payload, 3, 300), payload)], now=T0)
    snapshot = orjson.loads(orjson.dumps(catalog.snapshot("worker-1", T0 + 1)))
    assert snapshot["process"] == "worker-1" and snapshot["format"] == 1
    restored = Catalog()
    restored.load(snapshot)
    assert view(restored, T0 + 2) == view(catalog, T0 + 2)
    assert view(restored, T0 + 2)["E"]["sample"] == payload
    restored.record(SETTINGS, "web", routed({route("E"): 1}), now=T0 + 3)
    assert view(restored, T0 + 4)["E"]["total"] == 4 and view(restored, T0 + 4)["E"]["last_hour"] == 4


@pytest.mark.parametrize("snapshot", [{}, {"kind": "splitter-catalog", "format": 99, "sources": {}},
                                      {"kind": "splitter-catalog", "format": 1, "sources": {"web": [{"type": "track"}]}}])
def test_a_snapshot_that_is_not_one_is_refused(snapshot: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Catalog().load(snapshot)


def test_views_merge_by_adding() -> None:
    one, two = Catalog(), Catalog()
    one.record(SETTINGS, "web", routed({route("E"): 2}), [shaped("E", {"price": 1})], now=T0 + 5)
    two.record(SETTINGS, "web", routed({route("E", primary=RS): 3, route("F"): 1}), [shaped("E", {"price": "1"})], now=T0 + 1)
    two.record(SETTINGS, "ios", routed({route("E"): 1}), now=T0 + 9)
    merged = merge_views([view_of(one.snapshot("worker-1", T0 + 10), T0 + 10), view_of(two.snapshot("worker-2", T0 + 10), T0 + 10)])
    assert [p["process"] for p in merged["processes"]] == ["worker-1", "worker-2"]
    assert list(merged["sources"]) == ["ios", "web"]
    event = merged["sources"]["web"]["events"][0]
    assert (event["name"], event["total"], event["last_hour"], event["sampled"]) == ("E", 5, 5, 2)
    assert event["routed"] == {"segment": {"primary": 2}, "rudderstack": {"primary": 3}}
    assert (event["first_seen"], event["last_seen"]) == ("2027-01-15T08:00:01Z", "2027-01-15T08:00:05Z")
    assert event["paths"]["properties.price"] == {"seen": 2, "types": {"integer": 1, "string": 1}, "mixed": True}
    assert only_source(merged, "ios")["sources"].keys() == {"ios"}


def keeper(state: Path, process: str | None) -> CatalogKeeper:
    return CatalogKeeper(Catalog(), state, process, lambda: 0.05)


async def test_the_keeper_writes_its_file_atomically_and_a_restart_loads_it(tmp_path: Path) -> None:
    first = keeper(tmp_path, None)
    first.load()  # no file yet: an empty catalog
    first.catalog.record(SETTINGS, "web", routed({route("E"): 2}), now=T0)
    await first.write()
    path = tmp_path / "catalog.json"
    assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["catalog.json"]  # no temporary file left
    second = keeper(tmp_path, None)
    second.load()
    second.catalog.record(SETTINGS, "web", routed({route("E"): 1}), now=T0 + 1)
    assert view(second.catalog, T0 + 2)["E"]["total"] == 3


async def test_the_keeper_writes_periodically_and_at_stop(tmp_path: Path) -> None:
    kept = keeper(tmp_path, "worker-1")
    kept.start()
    kept.catalog.record(SETTINGS, "web", routed({route("E"): 1}))
    path = tmp_path / "catalog.worker-1.json"
    for _ in range(100):
        if path.exists():
            break
        await asyncio.sleep(0.02)
    assert orjson.loads(path.read_bytes())["sources"]["web"][0]["total"] == 1
    kept.catalog.record(SETTINGS, "web", routed({route("E"): 1}))
    await kept.stop()
    assert orjson.loads(path.read_bytes())["sources"]["web"][0]["total"] == 2


async def test_a_damaged_file_is_moved_aside_and_the_process_starts_empty(tmp_path: Path) -> None:
    (tmp_path / "catalog.json").write_text("{not json")
    kept = keeper(tmp_path, None)
    kept.load()
    assert (tmp_path / "catalog.json.damaged").read_text() == "{not json"
    assert not (tmp_path / "catalog.json").exists()
    assert view(kept.catalog, T0) == {}


async def test_the_document_merges_the_live_catalog_with_every_other_process_file(tmp_path: Path) -> None:
    for name, count in (("worker-1", 2), ("worker-2", 3)):
        other = keeper(tmp_path, name)
        other.catalog.record(SETTINGS, "web", routed({route("E"): count}))
        await other.write()
    (tmp_path / "catalog.worker-3.json").write_text("[]")  # not a snapshot: reported, not fatal
    supervisor = await catalog_document(tmp_path)  # no live catalog: the files only
    assert supervisor["sources"]["web"]["events"][0]["total"] == 5
    assert {p["process"] for p in supervisor["processes"]} == {"worker-1", "worker-2"}
    assert supervisor["unreadable"] == [{"file": "catalog.worker-3.json", "error": "not a catalog snapshot"}]
    live = keeper(tmp_path, "worker-1")  # worker-1 again: its own file is its memory's, not counted twice
    live.load()
    live.catalog.record(SETTINGS, "web", routed({route("E"): 10, route("F", "page"): 1}))
    document = await catalog_document(tmp_path, live)
    assert [(e["name"], e["total"]) for e in document["sources"]["web"]["events"]] == [("E", 15), ("F", 1)]
    assert next(p for p in document["processes"] if p["live"])["process"] == "worker-1"
    assert (await catalog_document(tmp_path, live, "ios"))["sources"] == {}
