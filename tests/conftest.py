"""Shared fixtures: the real embedded demo data, and a fast variant of the demo site."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cropmap.regions import DATA_DIR, SITES_DIR

DEMO_DATA = DATA_DIR / "demo"
TILE_FULL = "0000280849BAC91C"  # S2 10 m + 20 m + S1, label year 2019
TILE_NO10M = "000028085BF08E7E"  # the export lacks its S2 10 m file
TEST_DATA = Path(__file__).resolve().parent / "data"


def cropmap(*args, env=None, cwd=None):
    """Run the `cropmap` command in a subprocess (this interpreter)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "cropmap.pipeline.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=900)


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("cropmap: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr  # progress lines may precede it
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def write_site(directory: Path, doc: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def demo_doc(name: str = "demo-fast", **training) -> dict:
    """The demo site file with an absolute data root and a cheap training recipe."""
    doc = yaml.safe_load((SITES_DIR / "demo.yaml").read_text())
    doc["name"] = name
    doc["local"]["root"] = str(DEMO_DATA)
    base = {k: v for k, v in doc.get("training", {}).items() if k != "candidates"}
    # one cheap model unless a test asks for auto (tests of the choice: tests/pipeline/levels/pixel/test_auto.py)
    base.update(model="stnet", model_options={"pooling": "mean"})
    doc["training"] = {**base, "epochs": 1, "max_pixels_per_parcel": 15, "split_seeds": [0, 1], **training}
    return doc


@pytest.fixture
def sites_dir(tmp_path, monkeypatch) -> Path:
    """An extra site directory searched before regions/sites (CROPMAP_SITES_DIR)."""
    d = tmp_path / "sites"
    d.mkdir()
    monkeypatch.setenv("CROPMAP_SITES_DIR", str(d))
    return d


@pytest.fixture
def data_copy(tmp_path) -> Path:
    """A writable copy of the demo archive (to damage in tests)."""
    dst = tmp_path / "data"
    shutil.copytree(DEMO_DATA, dst)
    return dst


@pytest.fixture(scope="session")
def ee_offline():
    """The real earthengine-api client initialised with no server (EARTH_ENGINE.md, "Testing offline").

    Touches private attributes of earthengine-api, hence the pinned version range in pyproject.toml
    and ``test_gee_builders.py::test_offline_fixture_initialises_the_real_client``.
    """
    import ee
    from ee import apitestcase

    ee.Reset()
    ee.data._install_cloud_api_resource = lambda: None
    ee.data.getAlgorithms = apitestcase.GetAlgorithms
    ee.deprecation._FetchDataCatalogStac = lambda: {}
    ee.Initialize(None, "", project="test")
    yield ee
    ee.Reset()


def gee_demo_doc(export_folder: Path, name: str = "demo-gee", **gee) -> dict:
    """A ``source: gee`` site over the demo tile 0000280849BAC91C (one 640 m export tile)."""
    return {
        "name": name, "crs": "EPSG:32631", "resolution": 10, "extent": [574680, 5621800, 575320, 5622440],
        "source": "gee", "label_source": "cdl", "legend": "demo", "years": [2019],
        "gee": {"export_folder": str(export_folder), "bucket": "test-bucket", "tile_size_m": 640,
                "grid_origin": [574680, 5621800], "composite_days": 10, "samples_per_class": 20, **gee},
        "training": {"epochs": 1, "split_seeds": [0]},
    }


def seasonal_series(n=120, seed=0):
    """Pixel series of two classes whose NDVI peaks at different days; irregular dates, radar-only dates, gaps."""
    from cropmap.models.series import Series

    rng = np.random.default_rng(seed)
    vals, days, lengths, y = [], [], [], []
    for i in range(n):
        c = i % 2
        t = np.sort(rng.choice(np.arange(-60, 300, 5), size=rng.integers(20, 50), replace=False)).astype(np.float32)
        peak = 120 if c == 0 else 200
        ndvi = 0.2 + 0.6 * np.exp(-((t - peak) / 40) ** 2)
        red = 0.08 * (1 - ndvi) + rng.normal(0, 0.005, len(t))
        nir = red * (1 + ndvi) / (1 - ndvi)
        vv = -12 + 3 * ndvi + rng.normal(0, 0.5, len(t))
        v = np.stack([red, nir, vv], 1).astype(np.float32)
        radar_only = rng.random(len(t)) < 0.3
        v[radar_only, :2] = np.nan
        vals.append(v), days.append(t), lengths.append(len(t)), y.append(c)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return Series(np.concatenate(vals), np.concatenate(days), offsets), np.array(y)
