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


def usage_error(exc: BaseException) -> tuple[str, int] | None:
    """``(one line, exit code)`` of a command-line usage error (unknown command or option, missing
    or bad value), else None. Typer raises its own copy of click's exceptions (``typer._click``),
    so they are recognised by their class names, not by ``isinstance`` against ``click``."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "ClickException" not in names or not hasattr(exc, "format_message"):
        return None
    message = " ".join(str(exc.format_message()).split())
    code = int(getattr(exc, "exit_code", 2) or 2)
    if "UsageError" in names:
        names, ctx = [], getattr(exc, "ctx", None)
        while ctx is not None and getattr(ctx, "parent", None) is not None:  # the root's name depends on how it was started
            names.append(str(ctx.info_name))
            ctx = ctx.parent
        return f"{message} (see `{' '.join(['cropmap', *reversed(names)])} --help`)", 2
    return message, code
