"""Report: one self-contained HTML page per run (map preview, legend, metrics, provenance).

Everything is inlined (the preview as a data URI), so the file can be mailed or published as is.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .fsio import write_text
from .sites import Legend, Site


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _row(cells: list[str], tag: str = "td") -> str:
    return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>"


def write_report(path: Path, *, site: Site, year: int, legend: Legend, metrics: dict, preview: Path, run_dir: Path) -> Path:
    png = base64.b64encode(Path(preview).read_bytes()).decode()
    m, b, cmp = metrics, metrics["baseline"], metrics["comparison"]
    scal = [("overall accuracy", "overall_accuracy"), ("kappa", "kappa"), ("macro F1", "macro_f1"),
            ("weighted F1", "weighted_f1"), ("mIoU", "miou")]
    rows = [_row(["metric", f"{html.escape(m['model'])} (mean ± sd)", "random forest (mean ± sd)"], "th")]
    for label, k in scal:
        rows.append(_row([label, f"{m[k]:.3f} ± {m[k + '_std']:.3f}", f"{b[k]:.3f} ± {b[k + '_std']:.3f}"]))
    pc = [_row(["class", "F1", "IoU", "precision", "recall", "test pixels (all runs)"], "th")]
    for name, v in m["per_class"].items():
        pc.append(_row([html.escape(name), f"{v['f1']:.3f}", f"{v['iou']:.3f}", f"{v['precision']:.3f}", f"{v['recall']:.3f}", str(v["support"])]))
    legend_rows = "".join(
        f'<li><span class="sw" style="background:{c.color}"></span>{c.code} {html.escape(c.name)}</li>' for c in legend.classes
    )
    first = m["runs"][0]["model"]
    names = list(first["per_class"])
    cm = [_row(["true \\ predicted"] + [html.escape(n) for n in names], "th")]
    for name, r in zip(names, first["confusion_matrix"]):
        cm.append(_row([f"<b>{html.escape(name)}</b>"] + [str(v) for v in r]))
    manifest = run_dir / "run.json"
    env = json.loads(manifest.read_text()).get("environment", {}) if manifest.exists() else {}
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cropmap: {html.escape(site.name)} {year}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}}td:first-child{{text-align:left}}.sw{{display:inline-block;width:1em;height:1em;margin-right:.4em;vertical-align:middle;border:1px solid #666}}
ul.legend{{list-style:none;padding:0;columns:2}}p.note{{color:#555;font-size:90%}}</style></head><body>
<h1>Crop map of {html.escape(site.title or site.name)}, {year}</h1>
<img alt="crop map preview" style="max-width:100%" src="data:image/png;base64,{png}">
<h2>Legend</h2><ul class="legend">{legend_rows}</ul>
<h2>Accuracy on held-out parcels</h2>
<p>{html.escape(m['protocol'])}</p>
<table>{''.join(rows)}</table>
<p>Gain over the random forest: overall accuracy {cmp['overall_accuracy_gain']:+.3f} ± {cmp['overall_accuracy_gain_std']:.3f},
macro F1 {cmp['macro_f1_gain']:+.3f}; better in {cmp['model_better_overall_accuracy_runs']} split(s).
Evaluated classes: {html.escape(', '.join(m['evaluated_classes']))}. Train-only classes (too few parcels to hold one out):
{html.escape(', '.join(m['train_only_classes']) or 'none')}.</p>
<h3>Per class ({html.escape(m['model'])}, mean over splits)</h3><table>{''.join(pc)}</table>
<h3>Confusion matrix (split seed {m['runs'][0]['seed']}, pixels)</h3><table>{''.join(cm)}</table>
<h2>Provenance</h2><p class="note">Run directory: {html.escape(str(run_dir))}. Versions: {html.escape(', '.join(f'{k} {v}' for k, v in env.items()))}.
Inputs, configs and output checksums: run.json.</p>
</body></html>
"""
    return write_text(path, doc)
