"""Lenient app versions and compiled version ranges for the `app_version` condition.

Mobile apps report versions in many shapes (`4.2`, `v4.2.1`, `4.2.1 (512)`, `4.2.1-beta.1`), and
an old build must never be misrouted because of its spelling, so parsing is lenient: an optional
`v`, one to four dot-separated numbers (missing ones are 0), an optional pre-release after `-` or
`+`-free suffix, and anything after whitespace (a build number) ignored. A pre-release sorts before
its release, as in semver: `4.2.0-beta.1 < 4.2.0`. What cannot be read this way matches no range.

Ranges are written `">=3.0,<4.2.0"`: comma-separated comparisons that must all hold, each one of
`>= > <= < == = !=` followed by a version (a bare version means `==`). They are parsed once, when
the rules compile, into tuples compared with plain tuple ordering on the hot path.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

Version = tuple[tuple[int, int, int, int], int, tuple[tuple[int, int | str], ...]]

_VERSION = re.compile(
    r"^\s*[vV]?(?P<release>\d+(?:\.\d+){0,3})(?:[-.]?(?P<pre>[0-9A-Za-z][0-9A-Za-z.-]*))?(?:\+[0-9A-Za-z.-]*)?(?:\s.*)?$"
)
_COMPARISON = re.compile(r"^\s*(?P<op>>=|<=|==|!=|>|<|=)?\s*(?P<version>\S.*?)\s*$")
_OPERATORS: dict[str, Callable[[Version, Version], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "=": operator.eq,
    "!=": operator.ne,
}
_RELEASE_MARK = 1  # sorts after any pre-release marker (0) of the same release


_CACHE: dict[str, Version | None] = {}
_CACHE_LIMIT = 4096  # apps report few distinct versions; the bound only guards against junk input


def parse_version(text: object) -> Version | None:
    """Read a version leniently; None when `text` is not recognisably a version.

    Memoised: the same few version strings arrive millions of times, and a parse is a regex match.
    """
    if type(text) is str:
        cached = _CACHE.get(text, _CACHE)
        if cached is not _CACHE:
            return cached  # type: ignore[return-value]
        parsed = _parse_version(text)
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        _CACHE[text] = parsed
        return parsed
    return _parse_version(text)


def _parse_version(text: object) -> Version | None:
    if not isinstance(text, str):
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = str(text)
        else:
            return None
    match = _VERSION.match(text)
    if match is None:
        return None
    numbers = [int(part) for part in match.group("release").split(".")]
    numbers += [0] * (4 - len(numbers))
    release = (numbers[0], numbers[1], numbers[2], numbers[3])
    pre = match.group("pre")
    if not pre:
        return (release, _RELEASE_MARK, ())
    return (release, 0, tuple(_pre_part(part) for part in pre.replace("-", ".").split(".") if part))


def _pre_part(part: str) -> tuple[int, int | str]:
    # Numeric identifiers sort before alphanumeric ones and compare as numbers (semver 11.4).
    return (0, int(part)) if part.isdigit() else (1, part)


@dataclass(frozen=True, slots=True)
class VersionRange:
    """All comparisons must hold; `text` is kept for explain output and error messages."""

    text: str
    checks: tuple[tuple[Callable[[Version, Version], bool], Version], ...]

    def contains(self, version: Version) -> bool:
        for compare, bound in self.checks:
            if not compare(version, bound):
                return False
        return True


def parse_range(text: str) -> VersionRange:
    """Compile a range such as `>=3.0,<4.2.0`; raises ValueError naming the bad part."""
    parts = [part for part in text.split(",")]
    if not text.strip():
        raise ValueError("empty version range")
    checks = []
    for part in parts:
        match = _COMPARISON.match(part)
        if match is None:
            raise ValueError(f"empty comparison in version range {text!r}")
        bound = match.group("version")
        version = None if any(ch.isspace() for ch in bound) else parse_version(bound)  # bounds are strict: "3.0 <4" is a typo
        if version is None:
            raise ValueError(f"{match.group('version')!r} in version range {text!r} is not a version")
        checks.append((_OPERATORS[match.group("op") or "=="], version))
    return VersionRange(text, tuple(checks))
