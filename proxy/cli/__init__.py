"""The `splitter` command: a thin layer that maps flags onto the engine and server and formats output.

Exit codes (proxy/exits.py): 0 success, 2 bad rules or bad input (the message names the file and
line), 3 the server could not start.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import click
import orjson
from multidict import CIMultiDict

from proxy import __version__
from proxy.cli.against import Outcome, against_rules, against_state
from proxy.cli.catalog import catalog
from proxy.cli.history import history
from proxy.cli.parity import parity
from proxy.cli.ramps import at_option, position_lines, schedule_lines
from proxy.cli.samples import InputError, SampleDefaults, SampleEvent, SampleFields, contexts, field_path, read_inputs
from proxy.engine import (
    RulesError,
    RuleSet,
    Sample,
    against,
    compare,
    decide,
    effective_rules,
    load_rules,
    plan_report_lines,
    tally,
    transformed_events,
    verdict_lines,
)
from proxy.exits import BAD_INPUT, STARTUP_FAILURE
from proxy.geoip import GeoIP, GeoIPError, open_country_db
from proxy.settings import DURABILITY_MODES, LOG_LEVELS, ServeSettings, SettingsError, flag_default

FC = TypeVar("FC", bound=Callable[..., Any])


def _load(path: str) -> RuleSet:
    """Compile a rules file with the process environment, or exit 2 with every problem."""
    try:
        return load_rules(path, os.environ)
    except RulesError as exc:
        for line in exc.lines:
            click.echo(line, err=True)
        sys.exit(BAD_INPUT)
    except OSError as exc:
        _fail(f"{path}: cannot read rules: {exc.strerror or exc}")


def _fail(message: str) -> NoReturn:
    click.echo(f"splitter: {message}", err=True)
    sys.exit(BAD_INPUT)


def _read_inputs(paths: tuple[str, ...], fields: SampleFields) -> list[SampleEvent]:
    """Every input's events (files, directories of event files such as recorded traffic, gzip or not, `-`; none: `-`)."""
    try:
        return read_inputs(paths or ("-",), fields, sys.stdin.read, lambda line: click.echo(f"splitter: {line}", err=True))
    except InputError as exc:
        _fail(str(exc))


def _contexts(rules: RuleSet, samples: Iterable[SampleEvent], defaults: SampleDefaults) -> list[Sample]:
    """Pair each event with the context the proxy would give it (proxy/cli/samples.py); unknown keys and sources are an error."""
    try:
        return contexts(rules, samples, defaults)
    except InputError as exc:
        _fail(str(exc))


def _geoip(path: str | None) -> Callable[[str | None], str | None] | None:
    """`--geoip-db`: the country of an address, or exit 2 naming the file."""
    if path is None:
        return None
    try:
        return GeoIP(open_country_db(path)).country
    except GeoIPError as exc:
        _fail(str(exc))


def _headers(values: tuple[str, ...]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for value in values:
        name, sep, content = value.partition(":")
        if not sep or not name.strip():
            _fail(f"--header {value!r}: expected 'Name: value'")
        headers[name.strip()] = content.strip()
    return headers


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="splitter")
def main() -> None:
    """Route or mirror Segment tracking events to Segment, RudderStack or both."""


main.add_command(history)  # proxy/cli/history.py


def _flag(*decls: str, field: str, **kwargs: Any) -> Callable[[FC], FC]:
    """A `serve` option whose default is `ServeSettings.<field>`'s, shown in --help with its SPLITTER_* variable."""
    return click.option(*decls, default=flag_default(field), show_default=True, show_envvar=True, **kwargs)


# `auto_envvar_prefix` on `serve` itself (not on the group, which would name them SPLITTER_SERVE_*):
# every flag reads SPLITTER_<FLAG NAME>, e.g. --drain-timeout from SPLITTER_DRAIN_TIMEOUT.
@main.command(context_settings={"auto_envvar_prefix": "SPLITTER"})
@click.option("--config", required=True, metavar="RULES.yaml", show_envvar=True, help="The rules file (hot-reloaded).")
@_flag("--listen", field="listen", help="Ingress address for SDK traffic.")
@_flag("--admin", field="admin", help="Admin address: /metrics /healthz /readyz /admin/*.")
@_flag("--region", field="region", help="This replica's region, for `region` conditions.")
@_flag("--drain-timeout", field="drain_timeout", type=float, help="Seconds to finish in-flight work on SIGTERM.")
@_flag("--reload-interval", field="reload_poll_interval", type=float, help="Seconds between checks of the rules file.")
@_flag("--trusted-proxies", field="trusted_proxies", help="Peers whose X-Forwarded-For is believed (CIDRs, comma-separated).")
@_flag("--cors-origins", field="cors_origins", help="Browser origins allowed to send (comma-separated, * for any).")
@_flag("--max-in-flight", field="max_in_flight", type=int, help="Concurrent client requests before answering 429.")
@_flag("--header-timeout", field="header_timeout", type=float, help="Seconds for a request's headers to arrive (then 408 and close).")
@_flag("--body-timeout", field="body_timeout", type=float, help="Seconds for a request's body to arrive after its headers (then 408).")
@_flag("--spool-dir", field="spool_dir", help="Where undelivered events wait (keep it on a volume).")
@_flag("--durability", field="durability", metavar="[" + "|".join(DURABILITY_MODES) + "]",
       help="fsync: a 200 waits for the spool's fsync; interval: for the write (a crash of splitter loses nothing), fsync every --sync-interval.")
@_flag("--sync-interval", field="sync_interval", type=float, help="Seconds between spool fsyncs with --durability interval.")
@_flag("--dead-letter-dir", field="dead_letter_dir", help="Where events refused for good are written.")
@_flag("--state-dir", field="state_dir", help="Where the last good rules are kept, to start on them if the file would be refused (keep it on a volume).")
@_flag("--cdn-url", field="cdn_url", help="CDN that GET /v1/projects/*/settings and /analytics.js/* are forwarded to.")
@_flag("--public-url", field="public_url",
       help="splitter's address as browsers see it (e.g. https://analytics.example.com); written into the settings' apiHost. Default: the request's host.")
@_flag("--cdn-cache-seconds", field="cdn_cache_seconds", type=float, help="Seconds to cache CDN answers (0 disables).")
@_flag("--log-level", field="log_level", type=click.Choice(LOG_LEVELS))
@_flag("--workers", field="workers", type=int, help="Worker processes sharing the ingress port (SO_REUSEPORT); each owns <spool-dir>/worker-<i>.")
@_flag("--geoip-db", field="geoip_db", metavar="PATH",
       help="A MaxMind DB file (GeoLite2-Country or -City): `country` from the client's address when no CDN header gives it. Reloaded when replaced.")
@_flag("--replica-id", field="replica_id", metavar="NAME",
       help="This replica in the tier view shared on dedup.store (letters, digits, _ . -; unique per replica). Default: the host's name.")
@_flag("--tier-ttl", field="tier_ttl", type=float, help="Seconds a process's catalog and ledger stay in the tier view after its last publish.")
def serve(**flags: Any) -> None:
    """Run the proxy. The admin token, when the admin port is not loopback, comes from SPLITTER_ADMIN_TOKEN."""
    # Before prometheus_client is imported: it picks multiprocess mode from the environment once. An
    # inherited directory (another app's, or one long gone) would crash start-up or hide the rules
    # gauges; `--workers N` gives its workers a fresh one of its own (proxy/process/supervisor.py).
    for name in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
        if (inherited := os.environ.pop(name, None)) is not None:
            click.echo(f"splitter: ignoring {name}={inherited}: splitter manages its own metrics directory", err=True)
    try:
        settings = ServeSettings.from_flags(flags, admin_token=os.environ.get("SPLITTER_ADMIN_TOKEN"))
    except SettingsError as exc:
        click.echo(f"splitter: {exc}", err=True)
        sys.exit(STARTUP_FAILURE)
    from proxy.process.supervisor import supervise
    from proxy.server import run  # here, not at the top: `check`, `explain` and `simulate` need no server

    sys.exit(supervise(settings) if settings.workers > 1 else run(settings))


@main.command()
@click.argument("rules_path", metavar="RULES.yaml")
@click.option("--against", "old_path", metavar="LAST_GOOD.yaml", default=None,
              help="Judge RULES.yaml as a reload from these rules would: exit 2 with the reasons if it would be refused, else list the rollbacks.")
@click.option("--against-state", "state_dir", metavar="DIR", default=None,
              help="The same against the last good rules `serve --state-dir DIR` kept: what a restart compares the file with.")
def check(rules_path: str, old_path: str | None, state_dir: str | None) -> None:
    """Validate a rules file: exit 0 with a summary, or 2 with every problem as FILE:LINE: path: message.

    With --against or --against-state, also the verdict a reload would give (proxy/cli/against.py):
    exit 2 with the reasons when it would be refused (a reshuffle without `reshuffle: true`)."""
    if old_path is not None and state_dir is not None:
        _fail("give --against or --against-state, not both")
    rules = _load(rules_path)
    outcome: Outcome | None = None
    if old_path is not None:
        outcome = against_rules(rules, rules_path, _load(old_path), old_path, datetime.now(UTC))
    elif state_dir is not None:
        outcome = against_state(rules, rules_path, state_dir, os.environ, datetime.now(UTC))
    for line in outcome.warnings if outcome is not None else ():
        click.echo(line, err=True)
    if outcome is not None and outcome.refused:
        for line in outcome.lines:
            click.echo(line, err=True)
        sys.exit(BAD_INPUT)
    splits = sum(1 for rule in rules.rules if rule.route.split)
    click.echo(
        f"{rules_path}: ok: {len(rules.rules)} rules ({splits} with a split), "
        f"{len(rules.destinations)} destinations ({', '.join(rules.destinations)}), "
        f"{len(rules.sources)} sources, sha256 {rules.sha256[:12]}"
    )
    for line in schedule_lines(rules, datetime.now(UTC)):
        click.echo(line)
    for line in outcome.lines if outcome is not None else ():
        click.echo(line)


_header_option = click.option("--header", "header_values", multiple=True, metavar="'Name: value'", help="A request header, e.g. a geo header for `country`.")
_region_option = click.option("--region", envvar="SPLITTER_REGION", default=None, help="The proxy's region, for `region` conditions.")
_geoip_option = click.option("--geoip-db", "geoip_path", metavar="PATH", envvar="SPLITTER_GEOIP_DB", default=None,
                             help="A MaxMind DB file, as serve's: an event's country from its context.ip when nothing else names one.")
_key_option = click.option("--write-key", default=None, help="The write key clients present (selects the source).")
_source_option = click.option("--source", "source_name", default=None, help="The source by name, e.g. a webhook source that has no write keys.")


def _field_path(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    try:
        return None if value is None else field_path(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


_source_field_option = click.option("--source-field", metavar="PATH", default=None, callback=_field_path,
                                    help="Each event's source name is in this field (e.g. source_name of a warehouse export); removed before the rules see it.")
_country_field_option = click.option("--country-field", metavar="PATH", default=None, callback=_field_path,
                                     help="Each event's country code is in this field; removed before the rules see it.")


@main.command()
@click.argument("rules_path", metavar="RULES.yaml")
@click.argument("input_paths", metavar="[INPUT]...", nargs=-1)
@_key_option
@_source_option
@_header_option
@_region_option
@_source_field_option
@_country_field_option
@_geoip_option
@at_option
def explain(rules_path: str, input_paths: tuple[str, ...], write_key: str | None, source_name: str | None, header_values: tuple[str, ...], region: str | None,
            source_field: tuple[str, ...] | None, country_field: tuple[str, ...] | None, geoip_path: str | None, at: datetime) -> None:
    """Print the decision for each event of INPUT (files, directories such as recorded traffic, gzip or not, or -): one JSON line per event.

    When the rules declare transforms, each line also has `transformed`: the event each destination
    with transforms would receive (the others receive it unchanged). An event's own `_splitter`
    object ({"source": NAME, "country": CC, "region": R}) wins over the options for that event."""
    rules = effective_rules(_load(rules_path), at)
    events = _read_inputs(input_paths, SampleFields(source_field, country_field))
    samples = _contexts(rules, events, SampleDefaults(write_key, source_name, _headers(header_values), region, _geoip(geoip_path)))
    out = sys.stdout.buffer
    for event, ctx in samples:
        decision = decide(rules, event, ctx)
        row = decision.as_dict()
        if rules.transforms:
            row["transformed"] = transformed_events(rules.transforms, decision, event)
        out.write(orjson.dumps(row) + b"\n")
    out.flush()


@main.command()
@click.argument("rules_path", metavar="RULES.yaml")
@click.argument("events_paths", metavar="EVENTS...", nargs=-1, required=True)
@click.option("--against", "old_path", metavar="OLD.yaml", default=None, help="Compare with these rules: which users would change destination.")
@_key_option
@_source_option
@_header_option
@_region_option
@_source_field_option
@_country_field_option
@_geoip_option
@at_option
def simulate(rules_path: str, events_paths: tuple[str, ...], old_path: str | None, write_key: str | None, source_name: str | None,
             header_values: tuple[str, ...], region: str | None, source_field: tuple[str, ...] | None, country_field: tuple[str, ...] | None,
             geoip_path: str | None, at: datetime) -> None:
    """Tally where a sample of events goes, per rule and destination; rehearse a change with --against or a ramp step with --at.

    EVENTS: files or directories of event files (the directory a proxy records traffic into), gzip or not, or -.

    Each event's source, country and region (its `_splitter` object, the options) are settled once,
    with RULES.yaml, and --against replays the events with the same ones through OLD.yaml."""
    rules = effective_rules(_load(rules_path), at)
    events = _read_inputs(events_paths, SampleFields(source_field, country_field))
    samples = _contexts(rules, events, SampleDefaults(write_key, source_name, _headers(header_values), region, _geoip(geoip_path)))
    result = tally(rules, samples)
    click.echo(f"{result.events} events, {result.keys} distinct cohort keys ({rules_path})")
    for line in position_lines(rules, at):
        click.echo(line)
    click.echo(f"{'rule':<24} {'destination':<16} {'role':<8} {'events':>8} {'%events':>8} {'keys':>8} {'%keys':>7}")
    for row in result.rows:
        click.echo(
            f"{row.rule:<24} {row.destination:<16} {row.role:<8} {row.events:>8} {row.events_percent:>7.2f}% {row.keys:>8} {row.keys_percent:>6.2f}%"
        )
    for line in plan_report_lines(rules, samples):  # violations are reported, not failed on: the exit code stays 0
        click.echo(line)
    if old_path is None:
        return
    old = effective_rules(_load(old_path), at)
    moved = against(old, rules, samples)
    share = 100.0 * moved.keys_changed / moved.keys if moved.keys else 0.0
    click.echo(f"\nagainst {old_path}: {moved.keys_changed} of {moved.keys} cohort keys ({share:.2f}%) change primary destination; "
               f"{moved.events_changed} events")
    for (before, after), count in moved.transitions.most_common():
        click.echo(f"  {before} -> {after}: {count} keys")
    if moved.copies:
        click.echo("copies per destination (primary or mirror; none: the destination no longer gets the event):")
        for (destination, before, after), copy in sorted(moved.copies.items()):
            click.echo(f"  {destination}: {before} -> {after}: {copy.events} events, {len(copy.keys)} keys")
    for line in verdict_lines(compare(old, rules, samples)):
        click.echo(line)


main.add_command(catalog)  # proxy/cli/catalog.py
main.add_command(parity)  # proxy/cli/parity.py
