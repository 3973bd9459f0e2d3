"""`cropmap auth check`: Earth Engine credentials."""

from __future__ import annotations

import typer

from cropmap.pipeline.errors import CropmapError

from .app import _setup, _state, app

auth_app = typer.Typer(no_args_is_help=True, help="Earth Engine credentials for `source: gee` sites.")
app.add_typer(auth_app, name="auth")


@auth_app.command("check")
def auth_check(
    site: str | None = typer.Option(None, "--site", help="Use this site's gee.project."),
    connect: bool = typer.Option(False, "--connect", help="Also initialise Earth Engine and evaluate a constant (needs network)."),
) -> None:
    """Say which Cloud project and credentials Earth Engine stages would use, and what is missing."""
    _setup(_state["debug"])
    from cropmap.pipeline.errors import AuthError
    from cropmap.pipeline.ingest.gee.auth import check_auth, initialize

    project = None
    if site is not None:
        from cropmap.pipeline.sites import load_site

        s = load_site(site)
        if s.gee is None:
            raise CropmapError(f"site {site!r} has source {s.source!r}, not 'gee'", fix="it needs no Earth Engine credentials")
        project = s.gee.project
    status = check_auth(project)
    for line in status.lines():
        typer.echo(line)
    if not status.ok:
        raise AuthError("Earth Engine is not set up: " + "; ".join(status.problems))
    if connect:
        import ee

        initialize(status)
        ee.Number(1).getInfo()
        typer.echo(f"connected: Earth Engine answered for project {status.project}")
