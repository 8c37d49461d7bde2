"""Where a p99 comes from: the event loop's busy stretches in a py-spy recording, and what ran in them.

A request waits when the loop is busy with something else, so a latency spike is a stretch of samples
in which the main thread never went back to the loop. A flame graph adds those samples up with all
the others and hides them; this keeps the samples in order (py-spy's speedscope format does), finds
the stretches of at least `--min-ms` without an idle sample, and says what filled them: the callback
the loop ran (the frame right under `Runner.run`), the functions anywhere on the stack, and the
innermost frames.

Record with idle samples and a known rate, the proxy pinned as in the benchmark and py-spy on the
other core, while an open-loop load runs (`loadtest.openloop`, or `loadtest.bench --keep-running`):

    taskset -c 0 py-spy record --pid PID --idle --rate 1000 --duration 6 --format speedscope -o loop.json --nonblocking
    python -m loadtest.stretches loop.json --rate 1000 --min-ms 8

A sample whose stack ends at the loop's own frame counts as idle: the loop waiting in epoll, or inside
uvloop's C code (socket reads and writes), which py-spy cannot see into.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOP_FRAME = "Runner.run"  # asyncio.Runner.run: the frame every loop callback runs under (uvloop.run included)


@dataclass(frozen=True)
class Stretches:
    samples: int
    busy: int
    lengths: list[int]  # samples per stretch, in order
    callbacks: Counter[str]  # the frame right under the loop's, over the stretches' samples
    anywhere: Counter[str]  # every function on the stack, once per sample
    innermost: Counter[str]  # the last frames of each sample's stack


def _name(frame: dict[str, Any]) -> str:
    file = str(frame.get("file", "")).rsplit("/", 1)[-1]
    return f"{frame['name']} ({file})" if file else str(frame["name"])


def _below_loop(stack: list[str]) -> list[str]:
    """The frames under the loop's; the whole stack when the loop's frame is not on it (a thread)."""
    for index, name in enumerate(stack):
        if name.startswith(LOOP_FRAME + " "):
            return stack[index + 1:]
    return stack


def main_thread_samples(profile: dict[str, Any]) -> list[list[str]]:
    """The main thread's samples, in order, each as its stack of names from the outermost frame."""
    frames = [_name(frame) for frame in profile["shared"]["frames"]]
    threads = [p for p in profile["profiles"] if p.get("type") == "sampled"]
    if not threads:
        raise ValueError("no sampled profile in the file: record with py-spy --format speedscope")
    main = next((p for p in threads if "MainThread" in str(p.get("name", ""))), threads[0])
    return [[frames[index] for index in sample] for sample in main["samples"]]


def busy_stretches(samples: list[list[str]], min_samples: int, depth: int = 4) -> Stretches:
    """Runs of at least `min_samples` consecutive samples that are busy (something under the loop's frame)."""
    lengths: list[int] = []
    callbacks: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    innermost: Counter[str] = Counter()
    run: list[list[str]] = []
    busy = 0
    for stack in [*samples, []]:
        below = _below_loop(stack) if stack else []
        if below:
            busy += 1
            run.append(below)
            continue
        if len(run) >= min_samples:
            lengths.append(len(run))
            for sample in run:
                callbacks[sample[0]] += 1
                anywhere.update(set(sample))
                innermost[" > ".join(sample[-depth:])] += 1
        run = []
    return Stretches(len(samples), busy, lengths, callbacks, anywhere, innermost)


def report(found: Stretches, ms_per_sample: float, most: int) -> str:
    total = sum(found.lengths)
    lines = [f"{found.samples} samples, busy {found.busy} ({100 * found.busy / max(found.samples, 1):.0f} %); "
             f"{len(found.lengths)} stretches, {total * ms_per_sample:.0f} ms in all; longest "
             f"{', '.join(f'{n * ms_per_sample:.0f}' for n in sorted(found.lengths)[-8:][::-1]) or '-'} ms"]
    for title, counts in (("callbacks the loop ran", found.callbacks), ("anywhere on the stack", found.anywhere),
                          ("innermost frames", found.innermost)):
        lines.append(f"== {title} (share of the stretches' samples)")
        lines.extend(f"{100 * n / max(total, 1):5.1f} %  {name}" for name, n in counts.most_common(most))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("profile", type=Path, help="py-spy record --format speedscope --idle output")
    parser.add_argument("--rate", type=float, default=100.0, help="py-spy's --rate (samples per second; its default is 100)")
    parser.add_argument("--min-ms", type=float, default=8.0, help="shortest stretch to count")
    parser.add_argument("--most", type=int, default=15, help="rows per table")
    args = parser.parse_args(argv)
    ms_per_sample = 1000.0 / args.rate
    try:
        samples = main_thread_samples(json.loads(args.profile.read_text()))
    except (OSError, ValueError, KeyError) as exc:
        print(f"stretches: {args.profile}: {exc}", file=sys.stderr)
        return 2
    print(report(busy_stretches(samples, max(1, round(args.min_ms / ms_per_sample))), ms_per_sample, args.most))
    return 0


if __name__ == "__main__":
    sys.exit(main())
