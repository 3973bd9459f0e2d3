"""`cropmap runs` (run versions), `schedule` (yearly reruns) and `mosaic` (maps of several UTM zones)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cropmap.pipeline.errors import CropmapError

from .app import _setup, _state, app


@app.command("runs")
def runs_cmd(
    site: str | None = typer.Option(None, "--site", help="Only this site."),
    out: Path = typer.Option(Path("runs"), "--out", help="Output root of the runs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON list on stdout."),
) -> None:
    """List the run versions under OUT with their status (* = the current version of its year)."""
    _setup(_state["debug"], quiet=as_json)
    from cropmap.pipeline.production import list_runs

    rows = list_runs(out, site)
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo(f"no runs under {out}" + (f" for site {site}" if site else ""))
        return
    for r in rows:
        extra = "".join([f" stage={r['stage']}" if r["stage"] and r["status"] != "succeeded" else "",
                         f" until={r['early_season_until']}" if r["early_season_until"] else "",
                         f" transfer={r['transfer_from']}" if r["transfer_from"] else ""])
        typer.echo(f"{'*' if r['current'] else ' '} {r['site']:<14} {r['year']} {r['version']:<4} {r['status']:<11} "
                   f"{r['finished'] or r['started'] or '-':<25} code={r['code_version'] or '?'}{extra}")


@app.command()
def schedule(
    site: str = typer.Option(..., "--site", help="Site to rerun (see `cropmap sites`)."),
    at: str = typer.Option("0 6 * * 1", "--at", help="When, as a cron expression (default: Mondays 06:00)."),
    out: Path = typer.Option(Path("runs"), "--out", help="Output root of the scheduled runs."),
    kind: str = typer.Option("cron", "--kind", help="cron, systemd or kubernetes."),
    print_: bool = typer.Option(False, "--print", help="Print the entry."),
    install: bool = typer.Option(False, "--install", help="Install it (crontab, or systemd user units)."),
    image: str = typer.Option("cropmap:latest", "--image", help="Docker image (kubernetes)."),
) -> None:
    """Print or install a schedule for `cropmap run --site SITE --year auto` (cron, systemd timer, Kubernetes CronJob)."""
    _setup(_state["debug"])
    from cropmap.pipeline import schedule as sched
    from cropmap.pipeline.sites import load_site

    if print_ == install:
        raise CropmapError("pass exactly one of --print and --install", fix="--print shows the entry, --install adds it")
    if kind not in sched.KINDS:
        raise CropmapError(f"unknown --kind {kind!r}", fix=f"use one of: {', '.join(sched.KINDS)}")
    load_site(site)
    if kind == "cron":
        entry = sched.cron_entry(site, at, out)
        if print_:
            typer.echo(entry)
            return
        sched.install_cron(entry, site)
        typer.echo(f"installed in the crontab: {entry}")
    elif kind == "systemd":
        units = sched.systemd_units(site, at, out)
        if print_:
            for name, text in units.items():
                typer.echo(f"# {name}\n{text}")
            return
        for line in sched.install_systemd(units, site):
            typer.echo(line)
    else:
        if install:
            raise CropmapError("--install does not apply a Kubernetes CronJob", fix="--print it and `kubectl apply -f` the output")
        typer.echo(sched.kubernetes_cronjob(site, at, image))


@app.command()
def mosaic(
    maps: list[Path] = typer.Argument(..., help="Class maps (crops.tif) of the sites of one region, in any UTM zones."),
    out: Path = typer.Option(..., "--out", help="The VRT to write."),
    crs: str | None = typer.Option(None, "--crs", help="CRS of the mosaic (default: the map with the lowest EPSG code's)."),
) -> None:
    """One VRT of class maps made in several UTM zones (nearest neighbour; the eastern zone wins overlaps)."""
    _setup(_state["debug"])
    from cropmap.pipeline.stages.mosaic import zone_mosaic

    typer.echo(str(zone_mosaic(maps, out, crs=crs)))
