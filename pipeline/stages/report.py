"""Report: one self-contained HTML page per run.

Map preview and legend, mapped area per class (hectares, counted from the COG block by block),
accuracy on held-out parcels with the confusion matrix and per-class metrics as plots, mapped
acreage against the label source, changes since last year's map (area per class, a change
preview and the class transitions where both maps have data), what last year's model brought
(cross-year transfer), and the run's provenance from ``run.json`` (inputs with checksums, code
and library versions, stage timings). Plots are matplotlib PNGs inlined as data URIs, so the
file can be mailed or published as is. Nothing from the environment (credentials) is read.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import rasterio
import rasterio.enums
import rasterio.windows

from cropmap.pipeline.fsio import write_text
from cropmap.pipeline.sites import Legend, Site
from cropmap.pipeline.stages.maps import read_class_table

REPORT_VERSION = "3"  # 3: the model choice section (auto)


def _e(v) -> str:
    return html.escape(str(v))


def _row(cells: list[str], tag: str = "td") -> str:
    return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>"


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return f'<img alt="{_e(fig.get_label() or "plot")}" style="max-width:100%" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _figure(w: float, h: float, label: str, layout: str | None = None):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout=layout)
    fig.set_label(label)
    return fig


def class_pixels(map_path: Path) -> tuple[dict[int, int], float]:
    """Pixels per class code of a class COG (block by block, bounded memory) and the pixel area in m²."""
    counts = np.zeros(256, dtype=np.int64)
    with rasterio.open(map_path) as ds:
        for _, window in ds.block_windows(1):
            counts += np.bincount(ds.read(1, window=window).ravel(), minlength=256)
        area = abs(ds.transform.a * ds.transform.e)
    return {int(c): int(n) for c, n in enumerate(counts) if c > 0 and n > 0}, area


def class_hectares(map_path: Path) -> dict[str, float]:
    """Mapped hectares per class name."""
    names = {c.code: c.name for c in read_class_table(map_path)}
    px, area = class_pixels(map_path)
    return {names.get(c, str(c)): round(n * area / 1e4, 2) for c, n in sorted(px.items())}


def label_comparison(map_path: Path, labels_dir: Path, tiles: list[str]) -> dict[str, dict[str, float]]:
    """Per class: label-source hectares on the run's tiles, and the mapped hectares on the same labelled pixels."""
    names = {c.code: c.name for c in read_class_table(map_path)}
    lab_px, map_px = np.zeros(256, np.int64), np.zeros(256, np.int64)
    area = None
    with rasterio.open(map_path) as m:
        for tid in tiles:
            path = Path(labels_dir) / f"{tid}_class.tif"
            if not path.exists():
                continue
            with rasterio.open(path) as ds:
                lab = ds.read(1)
                win = rasterio.windows.from_bounds(*ds.bounds, transform=m.transform)
                mapped = m.read(1, window=win, out_shape=lab.shape, boundless=True, fill_value=0)
                area = abs(ds.transform.a * ds.transform.e)
            valid = lab > 0
            lab_px += np.bincount(lab[valid], minlength=256)
            map_px += np.bincount(mapped[valid], minlength=256)
    out = {}
    for c in sorted(set(np.nonzero(lab_px)[0]) | set(np.nonzero(map_px)[0])):
        if c == 0:
            continue
        out[names.get(int(c), str(c))] = {"label_ha": round(lab_px[c] * area / 1e4, 2), "mapped_ha": round(map_px[c] * area / 1e4, 2)}
    return out


def _read_small(path: Path, shape: tuple[int, int]) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)


def year_changes(current: Path, previous: Path) -> dict:
    """Area per class in both maps, and transitions where both have data (same site grid)."""
    cur_names = {c.code: c.name for c in read_class_table(current)}
    prev_names = {c.code: c.name for c in read_class_table(previous)}
    with rasterio.open(current) as a, rasterio.open(previous) as b:
        same_grid = a.shape == b.shape and a.transform.almost_equals(b.transform) and a.crs == b.crs
        area = abs(a.transform.a * a.transform.e)
        trans = np.zeros((256, 256), np.int64)
        if same_grid:
            for _, w in a.block_windows(1):
                x, y = b.read(1, window=w).ravel(), a.read(1, window=w).ravel()
                both = (x > 0) & (y > 0)
                np.add.at(trans, (x[both], y[both]), 1)
    transitions = [{"from": prev_names.get(int(i), str(i)), "to": cur_names.get(int(j), str(j)), "ha": round(trans[i, j] * area / 1e4, 2)}
                   for i, j in zip(*np.nonzero(trans))]
    overlap = int(trans.sum())
    return {"previous": class_hectares(previous), "current": class_hectares(current), "same_grid": bool(same_grid),
            "overlap_ha": round(overlap * area / 1e4, 2), "changed_ha": round((overlap - int(np.trace(trans))) * area / 1e4, 2),
            "transitions": sorted(transitions, key=lambda t: -t["ha"])}


def _bars(title: str, series: dict[str, dict[str, float]], colors: dict[str, str] | None = None, ylabel: str = "hectares"):
    """Grouped bars: ``series`` name -> {category: value}."""
    cats = sorted({k for s in series.values() for k in s})
    fig = _figure(max(5, 0.9 * len(cats) + 2), 3.4, title)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        xs = np.arange(len(cats)) + i * width - 0.4 + width / 2
        ax.bar(xs, [vals.get(c, 0) for c in cats], width, label=name,
               color=[colors.get(c, "#888") for c in cats] if colors and len(series) == 1 else None)
    ax.set_xticks(np.arange(len(cats)), cats, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    return _png(fig)


def _confusion_plot(names: list[str], cm: list[list[int]], title: str) -> str:
    a = np.asarray(cm, dtype=float)
    norm = a / np.maximum(a.sum(1, keepdims=True), 1)
    fig = _figure(1.0 + 0.7 * len(names), 0.8 + 0.6 * len(names), title)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            if a[i, j]:
                ax.text(j, i, f"{int(a[i, j])}", ha="center", va="center", fontsize=8, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="row fraction")
    return _png(fig)


def _per_class_plot(per_class: dict) -> str:
    names = list(per_class)
    fig = _figure(max(5, 0.9 * len(names) + 2), 3.4, "per-class F1 and IoU")
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x - 0.2, [per_class[n]["f1"] for n in names], 0.4, yerr=[per_class[n].get("f1_std", 0) for n in names], label="F1")
    ax.bar(x + 0.2, [per_class[n]["iou"] for n in names], 0.4, label="IoU")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("per-class F1 (± sd over splits) and IoU")
    return _png(fig)


def data_regions(maps: list[Path], *, max_regions: int = 6, coarse: int = 2048, pad: int = 3) -> list[tuple[int, int, int, int]]:
    """Windows ``(col_off, row_off, width, height)`` around the parts of the maps that hold data.

    The maps (same grid) are read at a coarse scale (longest side at most ``coarse`` px), the
    cells where any map has a class are grouped into connected regions (after a small dilation,
    so one field split by nodata stays one region), and each region's bounding box is returned
    in full-resolution pixels, largest regions first. A site whose tiles lie tens of kilometres
    apart thus gets one window per tile instead of a few dots in an empty frame.
    """
    from scipy import ndimage

    with rasterio.open(maps[0]) as ds:
        width, height = ds.width, ds.height
    scale = max(1, int(np.ceil(max(width, height) / coarse)))
    shape = (max(1, int(np.ceil(height / scale))), max(1, int(np.ceil(width / scale))))
    any_data = np.zeros(shape, bool)
    for m in maps:
        any_data |= _read_small(m, shape) > 0
    if not any_data.any():
        return []
    labels, n = ndimage.label(ndimage.binary_dilation(any_data, iterations=pad))
    boxes = ndimage.find_objects(labels)
    sizes = ndimage.sum(any_data, labels, index=np.arange(1, n + 1))
    order = np.argsort(-sizes)[:max_regions]
    out = []
    for i in order:
        rs, cs = boxes[i]
        c0, r0 = cs.start * scale, rs.start * scale
        c1, r1 = min(width, cs.stop * scale), min(height, rs.stop * scale)
        out.append((int(c0), int(r0), int(c1 - c0), int(r1 - r0)))
    return sorted(out, key=lambda w: (w[1], w[0]))


def _change_preview(current: Path, previous: Path, prev_year: int, year: int, panel: int = 300) -> str:
    """Previous map, current map and their difference, one row of three panels per data region."""
    from matplotlib.colors import ListedColormap

    regions = data_regions([current, previous])
    if not regions:
        return "<p class='note'>Neither map has mapped pixels: no change preview.</p>"
    colors = {c.code: c.color for c in read_class_table(current)}
    colors.update({c.code: c.color for c in read_class_table(previous) if c.code not in colors})
    lut = ListedColormap(["#ffffff"] + [colors.get(i, "#888888") for i in range(1, 256)])
    change_cmap = ListedColormap(["#ffffff", "#9ecae1", "#fdae6b", "#d9d9d9", "#d62728"])
    fig = _figure(12, 0.6 + 3.8 * len(regions), "change preview", layout="constrained")
    scales = []
    with rasterio.open(current) as a, rasterio.open(previous) as b:
        for r, (col, row, w, h) in enumerate(regions):
            scale = max(1, int(np.ceil(max(w, h) / panel)))
            scales.append(scale)
            shape = (max(1, int(np.ceil(h / scale))), max(1, int(np.ceil(w / scale))))
            win = rasterio.windows.Window(col, row, w, h)
            cur = a.read(1, window=win, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)
            prev = b.read(1, window=win, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)
            change = np.zeros(cur.shape, np.uint8)  # 0 none, 1 only last year, 2 only this year, 3 same, 4 changed
            change[(prev > 0) & (cur == 0)] = 1
            change[(prev == 0) & (cur > 0)] = 2
            change[(prev > 0) & (cur > 0) & (prev == cur)] = 3
            change[(prev > 0) & (cur > 0) & (prev != cur)] = 4
            x, y = a.xy(row, col, offset="ul")
            for k, (title, arr, cmap, vmax) in enumerate([(str(prev_year), prev, lut, 255), (str(year), cur, lut, 255),
                                                          ("change", change, change_cmap, 4)]):
                ax = fig.add_subplot(len(regions), 3, 3 * r + k + 1)
                ax.imshow(arr, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
                ax.set_title(f"{title}: window at x={x:.0f}, y={y:.0f}" if k == 0 else title, fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
    px = f"1 px = {scales[0]} map px" if len(set(scales)) == 1 else f"1 px = {min(scales)}–{max(scales)} map px"
    fig.suptitle(f"{px}; change: blue = mapped only in {prev_year}, orange = only in {year}, grey = same class, red = changed")
    return _png(fig)


def _provenance(run_dir: Path) -> str:
    path = Path(run_dir) / "run.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    env = doc.get("environment", {})
    st = [_row(["stage", "status", "seconds", "skipped / reused", "fingerprint"], "th")]
    inputs = []
    for name, s in doc.get("stages", {}).items():
        how = f"reused from {s['reused_from']}" if s.get("reused_from") else ("skipped" if s.get("skipped") else "")
        status = "writing this page" if s.get("status") == "running" and name == "report" else s.get("status")
        st.append(_row([_e(name), _e(status), _e(s.get("seconds", "")), _e(how), f"<code>{_e(str(s.get('fingerprint', ''))[:12])}</code>"]))
        inputs += [(name, p, fp) for p, fp in s.get("inputs", {}).items()]
    inp = [_row(["stage", "input", "sha256"], "th")] + [_row([_e(n), _e(p), f"<code>{_e(fp[:16])}</code>"]) for n, p, fp in inputs]
    facts = {k: doc.get(k) for k in ("site", "year", "version", "code_version", "version_key", "command", "started",
                                     "early_season_until", "transfer_from") if doc.get(k) is not None}
    return (f"<table>{''.join(_row([_e(k), _e(v)]) for k, v in facts.items())}</table>"
            f"<p class='note'>Versions: {_e(', '.join(f'{k} {v}' for k, v in env.items()))}. Run directory: {_e(run_dir)}.</p>"
            f"<h3>Stages</h3><table>{''.join(st)}</table>"
            + (f"<h3>Inputs</h3><table>{''.join(inp)}</table>" if inputs else "")
            + "<p class='note'>Configs and output checksums: run.json.</p>")


def _early_season_banner(run_dir: Path, year: int) -> str:
    path = Path(run_dir) / "run.json"
    until = json.loads(path.read_text()).get("early_season_until") if path.exists() else None
    if not until:
        return ""
    return (f"<p class='banner'><b>Early-season map:</b> every series was cut at {_e(until)} of its year "
            f"(for {year}, acquisitions up to {year}-{_e(until)}); the model and the accuracy below use those dates only.</p>")


def _calibration_section(cal: dict) -> str:
    """ECE before/after temperature scaling (validation and test) and the pooled reliability diagram."""
    from cropmap.models.calibration import reliability_figure

    tab = [_row(["pixels", "ECE before", "ECE after", "seeds"], "th")]
    for part, e in cal["ece"].items():
        tab.append(_row([part, f"{e['before']:.3f}", f"{e['after']:.3f}", str(e["n_seeds"])]))
    temps = ", ".join(f"{k}: {v:.3f}" for k, v in cal["temperature"].items())
    figs = "".join(_png(reliability_figure({"before": r["before"], "after": r["after"]}, f"reliability, {part} pixels (all seeds)"))
                   for part, r in cal["reliability"].items())
    worse = [p for p, e in cal["ece"].items() if not e["lower_after"]]
    note = (f"<p class='banner'>Calibration did <b>not</b> lower the ECE on the {', '.join(worse)} pixels.</p>" if worse else "")
    return (f"<h2>Calibration of the confidence map</h2><p>{_e(cal['method'])}, fitted on {_e(cal['fitted_on'])}; "
            f"temperatures {temps}. {_e(cal['binning'])}. {_e(cal['applied_to'])}.</p>{note}<table>{''.join(tab)}</table>{figs}")


def _choice_section(choice: dict, candidates: list[dict]) -> str:
    """``training.model: auto``: every candidate's validation (the choice) and test figures, and why the winner won."""
    def cell(r: dict, key: str) -> str:
        return f"{r[key]:.3f} ± {r[key + '_sd']:.3f}" if key in r else "–"

    tab = [_row(["candidate", "validation macro F1", "validation OA", "test macro F1", "test OA", "fit seconds"], "th")]
    for r in candidates:
        name = f"<b>{_e(r['name'])}</b> (chosen)" if r.get("winner") else _e(r["name"])
        tab.append(_row([name, cell(r, "validation_macro_f1"), cell(r, "validation_overall_accuracy"), cell(r, "test_macro_f1"),
                         cell(r, "test_overall_accuracy"), f"{r.get('seconds', 0):.0f}"])
                   if "error" not in r else _row([name, _e(r["error"]), "", "", "", ""]))
    return (f"<h2>Model choice</h2><p>{_e(choice['reason'])}. Criterion: {_e(choice['criterion'])}; {_e(choice['note'])}. "
            f"The map averages the probabilities of {len(choice['ensemble'])} split-seed models of {_e(choice['winner'])}. "
            "Test figures are shown for comparison only (mean ± sd over split seeds).</p>"
            f"<table>{''.join(tab)}</table>")


def write_report(path: Path, *, site: Site, year: int, legend: Legend, metrics: dict, preview: Path, run_dir: Path,
                 map_path: Path | None = None, labels_dir: Path | None = None, label_tiles: list[str] | None = None,
                 previous_map: Path | None = None, transfer: Path | None = None) -> Path:
    png = base64.b64encode(Path(preview).read_bytes()).decode()
    m, b, cmp = metrics, metrics["baseline"], metrics["comparison"]
    colors = {c.name: c.color for c in legend.classes}
    scal = [("overall accuracy", "overall_accuracy"), ("kappa", "kappa"), ("macro F1", "macro_f1"),
            ("weighted F1", "weighted_f1"), ("mIoU", "miou")]
    rows = [_row(["metric", f"{_e(m['model'])} (mean ± sd)", "random forest (mean ± sd)"], "th")]
    for label, k in scal:
        rows.append(_row([label, f"{m[k]:.3f} ± {m[k + '_std']:.3f}", f"{b[k]:.3f} ± {b[k + '_std']:.3f}"]))
    unit = "parcels" if m.get("level") == "parcel" else "patch pixels" if m.get("level") == "patch" else "pixels"
    pc = [_row(["class", "F1", "IoU", "precision", "recall", f"test {unit} (all runs)"], "th")]
    for name, v in m["per_class"].items():
        pc.append(_row([_e(name), f"{v['f1']:.3f}", f"{v['iou']:.3f}", f"{v['precision']:.3f}", f"{v['recall']:.3f}", str(v["support"])]))
    legend_rows = "".join(f'<li><span class="sw" style="background:{c.color}"></span>{c.code} {_e(c.name)}</li>' for c in legend.classes)
    first = m["runs"][0]["model"]
    names = list(first["per_class"])
    sections = []
    if map_path is not None:
        areas = class_hectares(map_path)
        tab = [_row(["class", "mapped ha"], "th")] + [_row([_e(k), f"{v:,.2f}"]) for k, v in areas.items()]
        sections.append(f"<h2>Mapped area per class</h2><table>{''.join(tab)}</table>"
                        + (_bars(f"{year}: mapped hectares per class", {str(year): areas}, colors) if areas else ""))
        if labels_dir is not None and label_tiles:
            lc = label_comparison(map_path, labels_dir, label_tiles)
            tab = [_row(["class", "label source ha", "mapped ha (same pixels)", "mapped / label"], "th")]
            for k, v in lc.items():
                ratio = f"{v['mapped_ha'] / v['label_ha']:.2f}" if v["label_ha"] else "–"
                tab.append(_row([_e(k), f"{v['label_ha']:,.2f}", f"{v['mapped_ha']:,.2f}", ratio]))
            sections.append("<h2>Comparison with the label source</h2><p class='note'>Hectares on the labelled pixels of the "
                            f"{year} tiles ({site.label_source}): what the labels say against what the map says on the same pixels "
                            f"(training parcels included, so this is not an accuracy estimate).</p><table>{''.join(tab)}</table>"
                            + _bars("label source vs map (labelled pixels)", {"label source": {k: v["label_ha"] for k, v in lc.items()},
                                                                                "map": {k: v["mapped_ha"] for k, v in lc.items()}}))
        if previous_map is not None and Path(previous_map).exists():
            ch = year_changes(map_path, previous_map)
            keys = sorted(set(ch["previous"]) | set(ch["current"]))
            tab = [_row(["class", f"{year - 1} ha", f"{year} ha", "change ha"], "th")]
            for k in keys:
                a, c = ch["previous"].get(k, 0.0), ch["current"].get(k, 0.0)
                tab.append(_row([_e(k), f"{a:,.2f}", f"{c:,.2f}", f"{c - a:+,.2f}"]))
            tr = ("".join(_row([_e(t["from"]), _e(t["to"]), f"{t['ha']:,.2f}"]) for t in ch["transitions"][:20]))
            overlap = (f"Both maps have data on {ch['overlap_ha']:,.2f} ha, of which {ch['changed_ha']:,.2f} ha changed class."
                       if ch["overlap_ha"] else f"The {year - 1} and {year} maps share no mapped pixel (different tiles), so there are "
                       "no per-pixel transitions; the areas per class are compared.")
            sections.append(f"<h2 id='changes'>Changes since {year - 1}</h2><p>{overlap}</p><table>{''.join(tab)}</table>"
                            + _bars(f"hectares per class, {year - 1} vs {year}", {str(year - 1): ch["previous"], str(year): ch["current"]})
                            + _change_preview(map_path, previous_map, year - 1, year)
                            + (f"<h3>Transitions (largest first)</h3><table>{_row(['from', 'to', 'ha'], 'th')}{tr}</table>" if tr else ""))
    if transfer is not None and Path(transfer).exists():
        t = json.loads(Path(transfer).read_text())
        tab = [_row(["seed", "test pixels", "transfer OA", "scratch OA", "transfer macro F1", "scratch macro F1"], "th")]
        for r in t["runs"]:
            if r.get("n_test"):
                tab.append(_row([str(r["seed"]), str(r["n_test"]), f"{r['transfer']['overall_accuracy']:.3f}", f"{r['scratch']['overall_accuracy']:.3f}",
                                 f"{r['transfer']['macro_f1']:.3f}", f"{r['scratch']['macro_f1']:.3f}"]))
        g = t.get("mean_gain") or {}
        gain = (f"Mean gain of starting from last year's model: overall accuracy {g['overall_accuracy']:+.3f}, macro F1 {g['macro_f1']:+.3f}."
                if g else "No split had a test parcel on this year's tiles: no comparison.")
        sections.append(f"<h2>Cross-year transfer</h2><p>{_e(t['protocol'])}</p><p>{gain}</p><table>{''.join(tab)}</table>")
    if m.get("candidates") and m.get("choice"):
        sections.append(_choice_section(m["choice"], m["candidates"]))
    if m.get("calibration"):
        sections.append(_calibration_section(m["calibration"]))
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cropmap: {_e(site.name)} {year}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1080px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}}td:first-child{{text-align:left}}.sw{{display:inline-block;width:1em;height:1em;margin-right:.4em;vertical-align:middle;border:1px solid #666}}
ul.legend{{list-style:none;padding:0;columns:2}}p.note{{color:#555;font-size:90%}}p.banner{{background:#fff4d6;border:1px solid #e0b84f;padding:.5em}}</style></head><body>
<h1>Crop map of {_e(site.title or site.name)}, {year}</h1>
{_early_season_banner(run_dir, year)}
<img alt="crop map preview" style="max-width:100%" src="data:image/png;base64,{png}">
<h2>Legend</h2><ul class="legend">{legend_rows}</ul>
{sections[0] if sections and map_path is not None else ''}
<h2>Accuracy on held-out parcels</h2>
<p>{_e(m['protocol'])}</p>
<table>{''.join(rows)}</table>
<p>Gain over the random forest: overall accuracy {cmp['overall_accuracy_gain']:+.3f} ± {cmp['overall_accuracy_gain_std']:.3f},
macro F1 {cmp['macro_f1_gain']:+.3f}; better in {cmp['model_better_overall_accuracy_runs']} split(s).
Evaluated classes: {_e(', '.join(m['evaluated_classes']))}. Train-only classes (too few parcels to hold one out):
{_e(', '.join(m['train_only_classes']) or 'none')}.</p>
<h3>Per class ({_e(m['model'])}, mean over splits)</h3>{_per_class_plot(m['per_class']) if m['per_class'] else ''}<table>{''.join(pc)}</table>
<h3>Confusion matrix (split seed {m['runs'][0]['seed']}, {unit})</h3>{_confusion_plot(names, first['confusion_matrix'], f"confusion matrix, split seed {m['runs'][0]['seed']}")}
{''.join(sections[1:] if map_path is not None else sections)}
<h2>Provenance</h2>{_provenance(run_dir)}
</body></html>
"""
    return write_text(path, doc)


def report_stage(site: Site, year: int, legend: Legend, *, level: str, after: list[str], predict: str, evaluate: str,
                 mapped: list[tuple[str, int]], common: dict, previous_map: Path | None = None):
    """Stage ``report``: ``report.html`` from the ``evaluate`` stage's metrics and the ``predict`` stage's
    map (any level; ``labels`` and ``transfer`` are shown when they are among ``after``). Its config holds
    :data:`REPORT_VERSION`, so a changed template rebuilds reports on rerun, at every level."""
    from cropmap.pipeline.runner import Stage

    def report(ctx) -> dict[str, str]:
        evaluated, predicted = ctx.upstream[evaluate], ctx.upstream[predict]
        metrics = json.loads(evaluated["metrics"].read_text())
        write_report(ctx.path("report.html"), site=site, year=year, legend=legend, metrics=metrics,
                     preview=predicted["preview"], run_dir=ctx.run_dir, map_path=predicted.get("map"),
                     labels_dir=ctx.upstream["labels"]["labels"] if "labels" in ctx.upstream else None,
                     label_tiles=[t for t, _ in mapped], previous_map=previous_map,
                     transfer=ctx.upstream["transfer"]["transfer"] if "transfer" in ctx.upstream else None)
        return {"report": "report.html"}

    return Stage("report", report, after=after, config={**common, **({"level": level} if level != "pixel" else {}), "report": REPORT_VERSION},
                 inputs=[previous_map] if previous_map is not None else [])
