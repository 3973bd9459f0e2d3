"""The HTML report renders in a real browser (headless Chromium) with its plots.

Skipped where no Chromium is installed (``apt-get install chromium``); the CI image has none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from conftest import cropmap, demo_doc, write_site
from PIL import Image

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium on this machine")


def screenshot(html, png, height=6000):
    proc = subprocess.run([BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={png}", f"--window-size=1200,{height}", html.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert png.exists(), proc.stderr
    return np.asarray(Image.open(png).convert("RGB"))


def test_demo_report_renders_with_its_plots(tmp_path, sites_dir):
    write_site(sites_dir, demo_doc())
    out = tmp_path / "runs"
    proc = cropmap("run", "--site", "demo-fast", "--out", out, env={**os.environ, "CROPMAP_SITES_DIR": str(sites_dir)})
    assert proc.returncode == 0, proc.stderr
    ydir = out / "demo-fast" / "2019"
    report = ydir / json.loads((ydir / "run.json").read_text())["outputs"]["report"]
    img = screenshot(report, tmp_path / "report.png")
    legend = json.loads((ydir / "map" / "crops.tif.classes.json").read_text())
    colours = {tuple(int(c["color"][i:i + 2], 16) for i in (1, 3, 5)) for c in legend}
    flat = img.reshape(-1, 3)
    # the map preview and the bar plots paint class colours: a report whose images failed to load
    # would be text on white
    painted = sum(int(np.all(flat == c, axis=1).sum()) for c in colours)
    assert painted > 20000, painted
    # the page is long (preview, tables, several plots): content goes well below the first screen
    rows = np.nonzero((img < 200).any(axis=(1, 2)))[0]
    assert rows.max() > 2500, rows.max()
