"""`cropmap ingest`: the ingest and labels stages on their own, or with ``--plan`` the offline plan of
what an Earth Engine ingestion would export (logic in :mod:`cropmap.pipeline.ingest.plan`)."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import _setup, _state, app


@app.command()
def ingest(
    site: str = typer.Option(..., "--site", help="Site name (see `cropmap sites`); with --from-polygon, the new site's name."),
    year: str | None = typer.Option(None, "--year", help="Season year (default: the site's default year)."),
    out: Path = typer.Option(Path("runs"), "--out", help="Output root: runs go to OUT/SITE/YEAR; --plan reads earlier runs' task state there."),
    plan: bool = typer.Option(False, "--plan", help="Dry run, no network or credentials: the exports, their limits, sizes and an EECU/time estimate."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout (fields in the README)."),
    from_polygon: Path | None = typer.Option(None, "--from-polygon", help="Print a site file for the area of this polygon file (GeoJSON, GeoPackage, Shapefile)."),
    labels: str = typer.Option("cdl", "--labels", help="With --from-polygon: cdl (USDA CDL) or parcels (a local parcel file)."),
) -> None:
    """Ingest a site's time series and labels only (prefetch), or --plan what that would export."""
    _setup(_state["debug"], quiet=as_json)
    from cropmap.pipeline.ingest.plan import ingest_command, site_file_from_polygon

    if from_polygon is not None:
        typer.echo(site_file_from_polygon(from_polygon, site, label_source=labels), nl=False)
        return
    ingest_command(site, year, out, plan=plan, as_json=as_json, echo=typer.echo)
