"""Errors a user can act on: each names the file, the row or field, and what was expected."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (particles, maps, config). The message is shown to the user as is."""

    def __init__(self, file: object, what: str, where: str | None = None):
        self.file = str(file)
        self.where = where
        self.what = what
        loc = f"{self.file}" + (f" ({where})" if where else "")
        super().__init__(f"{loc}: {what}")
