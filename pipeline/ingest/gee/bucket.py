"""The export bucket of a ``source: gee`` site, checked before anything is submitted.

Every gee run exports (the CDL labels always; cubes and sample tables unless fetched
interactively) to ``gee.bucket``. An unset bucket or one of the placeholder names a site file
template may carry would only fail once Earth Engine has been authenticated and tasks are being
submitted; :func:`require_bucket` stops the run at once instead, before credentials or network.
"""

from __future__ import annotations

from cropmap.pipeline.errors import SiteError
from cropmap.pipeline.sites import Site

PLACEHOLDER_BUCKETS = frozenset({"cropmap-exports", "your-bucket", "my-bucket", "example-bucket", "bucket",
                                 "changeme", "change-me", "replace-me", "todo"})
"""Names that stand for "set your bucket here" (iowa.yaml ships ``your-bucket``; ``cropmap-exports`` it shipped before)."""


def bucket_problem(site: Site) -> str | None:
    """Why ``site`` cannot export (its ``gee.bucket`` unset or a placeholder), or None."""
    if site.source != "gee" or site.gee is None:
        return None
    bucket = site.gee.bucket
    if not bucket:
        return f"site {site.name!r} has no gee.bucket: Earth Engine exports need a Cloud Storage bucket"
    if bucket.lower() in PLACEHOLDER_BUCKETS:
        return f"site {site.name!r} has the placeholder gee.bucket {bucket!r}: Earth Engine exports need your own Cloud Storage bucket"
    return None


def require_bucket(site: Site) -> None:
    """Raise one clear :class:`SiteError` naming ``gee.bucket`` when :func:`bucket_problem` finds one."""
    problem = bucket_problem(site)
    if problem:
        raise SiteError(problem, fix=f"set gee.bucket in the site file of {site.name!r} to a bucket the project can write "
                                     "(gee.export_folder alone only reads exports already made)")
