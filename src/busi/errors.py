"""User-facing errors.

Everything a user can fix (a bad path, a corrupt PNG, an unknown config key) is
raised as :class:`BusiError`. The CLI prints it as one message -- where, what,
and how to fix it -- and exits with code 2, never with a traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2


class BusiError(Exception):
    """A problem in the user's input, with the place it was found and the fix."""

    def __init__(self, problem: str, *, where: str | None = None, fix: str | None = None):
        self.problem = problem
        self.where = where
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.where}: {self.problem}" if self.where else self.problem
        if self.fix:
            text += f" -- fix: {self.fix}"
        return text
