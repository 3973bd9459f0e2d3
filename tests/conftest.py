"""Shared fixtures: the real embedded demo data, and a fast variant of the demo site."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from cropmap.regions import DATA_DIR, SITES_DIR

DEMO_DATA = DATA_DIR / "demo"
TILE_FULL = "0000280849BAC91C"  # S2 10 m + 20 m + S1, label year 2019
TILE_NO10M = "000028085BF08E7E"  # the export lacks its S2 10 m file


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
    doc["training"] = {**doc.get("training", {}), "epochs": 1, "max_pixels_per_parcel": 15, "split_seeds": [0, 1], **training}
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
