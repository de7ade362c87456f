"""One exception type for mistakes a user can fix.

The CLI prints these as a single message (no traceback) and exits with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SaelabError(Exception):
    """Bad input: says what was expected, what was found, and what to do."""

    def __init__(self, problem: str, *, expected: str | None = None, found: str | None = None,
                 fix: str | None = None) -> None:
        self.problem = problem
        self.expected = expected
        self.found = found
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        lines = [self.problem]
        if self.expected is not None:
            lines.append(f"  expected: {self.expected}")
        if self.found is not None:
            lines.append(f"  found:    {self.found}")
        if self.fix is not None:
            lines.append(f"  fix:      {self.fix}")
        return "\n".join(lines)
