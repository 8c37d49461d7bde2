"""Alternating saturation pairs of two checkouts of splitter: the A/B behind the README's "pairs".

    python -m loadtest.pairs OLD_TREE NEW_TREE [--kind batch|/v1/t|/v1/track] [--durability interval|fsync]
                             [--seconds 8] [--pairs 5]

Make OLD_TREE with `git worktree add --detach /tmp/old <commit>` (copy `proxy/ingress/_compiled*.so`
into it, or it runs the pure-Python `prepare()`). Each run starts `splitter serve` from its own tree,
pinned to the proxy core, saturates it with wrk for `--seconds` after 2 s of warm-up (and the
delivery of what the warm-up spooled), and prints the proxy's CPU per request, counted until the
run's events are delivered (saturated, part of them is sent after wrk stops), as `loadtest.bench`
does. The run's Python starts in that tree's directory with only that tree on its path: `python -m`
puts the working directory first on `sys.path`, so a run started elsewhere would measure whichever
tree it was started from.

Runs alternate old, new, old, new: on a shared VM the machine drifts between runs by as much as a
change moves, so only runs taken side by side compare, and the median of the pairs is the figure.
Each run is bounded (warm-up + `--seconds` + start and stop) and stops its receivers. A tree's run
needs only what every tree since the llhttp connection has (`loadtest.subjects`, `loadtest.harness`,
`loadtest.payloads`, `loadtest.bench_delivery`), so the old tree needs no copy of this file.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

RUN = """
import asyncio, sys
from loadtest import subjects
from loadtest.bench_delivery import CONNECTIONS, prepare_load
from loadtest.harness import cpu_seconds, run_wrk
from loadtest.payloads import batch_payload, single_payload

async def main() -> None:
    kind, mode, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    receivers, env, rules, bodies, auth = prepare_load()
    try:
        payload = batch_payload(bodies) if kind == "batch" else single_payload(rules, kind)
        async with subjects.splitter(env, mode) as subject:
            await asyncio.to_thread(run_wrk, subject.url, payload.path, payload.bodies, auth, seconds=2, connections=CONNECTIONS)
            await subject.settle()
            before = cpu_seconds(subject.pids())
            run = await asyncio.to_thread(run_wrk, subject.url, payload.path, payload.bodies, auth, seconds=seconds, connections=CONNECTIONS)
            await subject.settle()
            spent = cpu_seconds(subject.pids()) - before
            print(f"RESULT {run.requests / seconds:.0f} {1e6 * spent / run.requests:.1f}", flush=True)
    finally:
        receivers.stop()

asyncio.run(main())
"""
RESULT = re.compile(r"^RESULT (\d+) ([\d.]+)$", re.M)


def one_run(tree: Path, kind: str, durability: str, seconds: float) -> tuple[int, float] | None:
    """(requests/s, CPU µs per request) of one saturation run of `tree`, or None when it failed (said on stderr)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    try:
        done = subprocess.run([sys.executable, "-c", RUN, kind, durability, str(seconds)], cwd=tree, env=env, capture_output=True,
                              text=True, timeout=seconds + 120)
    except subprocess.TimeoutExpired:
        print(f"{tree}: the run did not end in time", file=sys.stderr)
        return None
    found = RESULT.search(done.stdout)
    if found is None:
        print(f"{tree}: no result (exit {done.returncode}): {done.stderr.strip()[-2000:]}", file=sys.stderr)
        return None
    return int(found.group(1)), float(found.group(2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.pairs", description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the tree before the change (a git worktree)")
    parser.add_argument("new", type=Path, help="the tree after it")
    parser.add_argument("--kind", default="/v1/track", help="batch, or a single-call path such as /v1/t or /v1/track (default /v1/track)")
    parser.add_argument("--durability", choices=("interval", "fsync"), default="interval")
    parser.add_argument("--seconds", type=float, default=8.0, help="saturation per run, after 2 s of warm-up (default 8)")
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args(argv)
    trees = [args.old.resolve(), args.new.resolve()]
    for tree in trees:
        if not (tree / "proxy" / "__init__.py").is_file() or not (tree / "loadtest").is_dir():
            parser.error(f"{tree}: not a splitter checkout (no proxy/ and loadtest/)")
    figures: dict[Path, list[float]] = {tree: [] for tree in trees}
    print(f"{args.kind}, --durability {args.durability}, {args.seconds:g} s saturated per run; CPU µs per request, old / new")
    for pair in range(1, args.pairs + 1):
        results = [one_run(tree, args.kind, args.durability, args.seconds) for tree in trees]
        if any(result is None for result in results):
            return 1
        old, new = (result[1] for result in results if result is not None)
        figures[trees[0]].append(old)
        figures[trees[1]].append(new)
        print(f"pair {pair}: {old:.1f} / {new:.1f} ({100 * (new - old) / old:+.0f} %)", flush=True)
    old_median, new_median = (statistics.median(figures[tree]) for tree in trees)
    print(f"medians: {old_median:.1f} / {new_median:.1f} ({100 * (new_median - old_median) / old_median:+.0f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
