"""`cropmap run` (every stage for a site and year) and `cropmap sites`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from cropmap.pipeline.errors import CropmapError

from .app import _check_device, _console, _run_stages, _setup, _state, _threads, app


@app.command()
def sites() -> None:
    """List the sites of regions/ with their source, label source and years."""
    _setup(_state["debug"])
    from cropmap.pipeline.sites import list_site_names, load_site

    for name in list_site_names():
        try:
            s = load_site(name)
            typer.echo(f"{s.name:16s} source={s.source:6s} labels={s.label_source:14s} years={','.join(map(str, s.years))}  {s.title}")
        except CropmapError as exc:
            typer.echo(f"{name:16s} INVALID: {exc}")


@app.command()
def run(
    site: str = typer.Option(..., "--site", help="Site name (see `cropmap sites`)."),
    year: str | None = typer.Option(None, "--year", help="Season year (default: the site's default year), or `auto`: the latest year whose inputs and labels are available (exit 75 when none is yet)."),
    out: Path = typer.Option(Path("runs"), "--out", help="Output root; the run goes to OUT/SITE/YEAR."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    epochs: int | None = typer.Option(None, "--epochs", help="Override the site's training epochs."),
    force: bool = typer.Option(False, "--force", help="Rerun every stage even when unchanged (as a new run version)."),
    until: str | None = typer.Option(None, "--until", help="Early season: cut every series at this day of its year (MM-DD)."),
    transfer: str | None = typer.Option(None, "--transfer", help="none or previous-year: start from last year's models (default: the site's training.transfer)."),
    level: str | None = typer.Option(None, "--level", help="pixel, parcel or patch (default: the site's level; parcel: PSE-TSA on parcels; patch: STCLN/U-TAE segmentation)."),
    workers: int | None = typer.Option(None, "--workers", help="Tiled stages (tensors, predict) on a local dask cluster of N worker processes (0 or unset: one process)."),
    scheduler: str | None = typer.Option(None, "--scheduler", help="Tiled stages on an existing dask cluster: its scheduler address (tcp://HOST:PORT); workers must see the run directory."),
) -> None:
    """Run every stage for a site and year: ingest, labels, tensors, train, predict, evaluate, report.

    Runs are versioned under OUT/SITE/YEAR/versions/ (OUT/SITE/YEAR/run.json describes the current one) and locked."""
    _setup(_state["debug"])
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from cropmap.pipeline import production
    from cropmap.pipeline.runner import Runner
    from cropmap.pipeline.sites import load_site
    from cropmap.pipeline.workflow import LEVELS, build_stages, get_level

    t0 = time.perf_counter()
    device = _check_device(device)
    if level not in (None, *LEVELS):
        raise CropmapError(f"unknown --level {level!r}", fix=f"use --level {', '.join(LEVELS)}")
    from cropmap.pipeline.levels.pixel.distributed import cluster_spec, probe

    cluster = cluster_spec(workers, scheduler)
    probe(cluster)
    s = load_site(site)
    console = _console()
    y, notes = production.resolve_year(s, year)
    for note in notes:
        console.print(f"  [yellow]note:[/yellow] {note}")
    opts = production.run_options(s, y, out, until=until, transfer=transfer, level=level)
    lv = get_level(level or s.level)
    stages, _ = build_stages(s, y, device=device, epochs=epochs, level=lv.name, cluster=cluster, **opts.stage_args)
    for note in opts.notes:
        console.print(f"  [yellow]note:[/yellow] {note}")
    if lv.name != "pixel" and cluster.distributed:
        console.print(f"  [yellow]note:[/yellow] the {lv.name} stages run in this process; --workers/--scheduler apply to pixel-level runs")
    run_dir = production.run_dir(out, s.name, y)
    _threads()
    with Progress(TextColumn("  {task.description:<16}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:

        def make_progress(desc: str, total: int | None):
            task = progress.add_task(desc, total=total)
            return lambda n=1: progress.advance(task, n)

        def on_event(name: str, event: str, record: dict) -> None:
            if event == "skipped":
                console.print(f"[dim]- {name:<9} unchanged, skipped[/dim]")
            elif event == "done":
                console.print(f"[green]✓[/green] {name:<9} {record['seconds']:.1f} s")
                for note in record.get("report", {}).get("notes", []):
                    console.print(f"  [yellow]note:[/yellow] {note}")

        with production.locked(run_dir) as versioned:
            plan, header = versioned(stages, {"site": s.name, "year": y, "command": " ".join(["cropmap", *sys.argv[1:]]), **opts.header}, force)
            runner = Runner(plan.dir, header, on_event=on_event, progress=make_progress, reuse_from=plan.reuse_from,
                            on_save=lambda doc: production.publish(plan, doc))
            manifest = _run_stages(runner, stages, lv.outputs)
    metrics = json.loads((plan.dir / manifest["outputs"]["metrics"]).read_text())
    b, cmp = metrics["baseline"], metrics["comparison"]
    reused = f", unchanged stages linked from {plan.reuse_from.name}" if plan.reuse_from else ""
    console.print(f"\n[bold]{s.name} {y}[/bold] done in {time.perf_counter() - t0:.0f} s ({run_dir / 'run.json'}; run version {plan.name}{reused})")
    console.print(f"  held-out {lv.held_out}, {metrics['n_runs']} splits: {metrics['model']} OA {metrics['overall_accuracy']:.3f} ± {metrics['overall_accuracy_std']:.3f}, "
                  f"macro F1 {metrics['macro_f1']:.3f}; random forest OA {b['overall_accuracy']:.3f} ± {b['overall_accuracy_std']:.3f}, "
                  f"macro F1 {b['macro_f1']:.3f} (gain {cmp['overall_accuracy_gain']:+.3f})")
    if "transfer" in manifest["outputs"]:
        g = json.loads((plan.dir / manifest["outputs"]["transfer"]).read_text()).get("mean_gain") or {}
        if g:
            console.print(f"  initialised from {y - 1}: OA {g['overall_accuracy']:+.3f}, macro F1 {g['macro_f1']:+.3f} vs training from scratch ({y} tiles' test pixels)")
    for key in ("map", "confidence", "preview", *(["parcel_map"] if "parcel_map" in manifest["outputs"] else []), "metrics", "model", "report"):
        console.print(f"  {key:<10} {run_dir / manifest['outputs'][key]}")
