"""One exception root for every error a user can fix.

The CLI prints ``str(err)`` as a single line on stderr and exits non-zero; anything that is
not a :class:`CropmapError` is a bug and gets a traceback only with ``--debug``.
"""

from __future__ import annotations


class CropmapError(Exception):
    """A user-facing error: the message says what is wrong, which value, and how to fix it."""

    exit_code = 2

    def __init__(self, what: str, *, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(what if not fix else f"{what}; {fix}")


class SiteError(CropmapError):
    """Unknown site, or a site/legend file that does not validate."""


class DataError(CropmapError):
    """A missing, truncated or malformed input data file."""


class SamplesError(CropmapError):
    """A `--samples` table or store that does not follow the documented format."""


class OutputError(CropmapError):
    """An output location that cannot be written."""


class ModelError(CropmapError):
    """A model directory that is missing, incomplete or incompatible with the data."""


class StageError(CropmapError):
    """A stage that failed for a reason the user can act on."""


class AuthError(CropmapError):
    """Earth Engine credentials or Cloud project missing or unusable."""


class LockError(CropmapError):
    """Another live run holds the run directory's lock."""


class NotReadyError(CropmapError):
    """No year of the site has its inputs and labels available yet: nothing to run, try later.

    Exits 75 (``EX_TEMPFAIL`` of sysexits.h), so a scheduler can tell "wait" from "failed".
    """

    exit_code = 75
