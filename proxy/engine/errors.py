"""Problems found while compiling a rules file, reported all at once.

A rules file is edited by hand under pressure (a rollout is going wrong), so compiling never stops
at the first mistake: every problem is collected with the file, line and YAML path it concerns and
raised together as one `RulesError` whose text is one `FILE:LINE: path: message` line per problem.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a rules file, located precisely enough for an editor to jump to it."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}: {where}{self.message}"


class RulesError(Exception):
    """A rules file that cannot be compiled; `problems` lists every reason, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = tuple(sorted(problems, key=lambda p: (p.file, p.line, p.path)))
        super().__init__("\n".join(str(p) for p in self.problems))

    @property
    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]
