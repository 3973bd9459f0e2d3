"""The one-tile live check to run before a state-wide run: ``pytest -m live`` (needs Earth Engine).

Skipped by default (``-m 'not slow and not live'``) and whenever credentials or a project are
missing. On ``CROPMAP_LIVE_SITE`` (default ``iowa``) and its default year (``CROPMAP_LIVE_YEAR``),
it fetches a 2.56 km window at the centre of the site through computePixels (no bucket, a few
requests, a few EECU-seconds) with the very builders a run exports, and checks what they compute:

* Sentinel-1 is not empty: most composite periods have VV/VH values (the empty-S1 bug of a
  to_linear without system:time_start gives none);
* Sentinel-2 clear fraction: the share of (period, pixel) pairs with a clear acquisition is
  above 20 % over the season (Cloud Score+ linked and the mask not rejecting everything);
* CDL classes: the year's CDL is published, has the cropland band, and the confident labels in
  the window map to at least two legend classes over at least 30 % of its pixels.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def live():
    from cropmap.pipeline.ingest.gee.auth import check_auth, initialize
    from cropmap.pipeline.ingest.gee.client import EarthEngineClient, LocalExports
    from cropmap.pipeline.sites import load_site

    site = load_site(os.environ.get("CROPMAP_LIVE_SITE", "iowa"))
    status = check_auth(site.gee.project)
    if not status.ok:
        pytest.skip("Earth Engine is not set up: " + "; ".join(status.problems))
    year = int(os.environ.get("CROPMAP_LIVE_YEAR", site.default_year))
    client = EarthEngineClient(status.project, LocalExports(os.devnull), initialize=lambda: initialize(status))
    return site, year, client


def _window(site):
    from cropmap.pipeline.ingest.gee.tiles import ExportTile

    xmin, ymin, xmax, ymax = site.extent
    res = site.resolution
    ox, oy = site.gee.grid_origin
    cx = ox + round(((xmin + xmax) / 2 - ox) / res) * res
    cy = oy + round(((ymin + ymax) / 2 - oy) / res) * res
    return ExportTile("live", site.epsg, cx, cy, 256, 256, res)


def test_one_tile_s1_s2_and_cdl(live):
    from cropmap.pipeline.ingest.gee import builders as b
    from cropmap.pipeline.ingest.gee.pixels import fetch_pixels
    from cropmap.pipeline.ingest.gee.source import GeeSource
    from cropmap.pipeline.sites import load_legend

    site, year, client = live
    tile = _window(site)
    region = b.tile_geometry(tile)
    periods = b.composite_periods(site.gee, year)
    bands2, bands1 = list(site.bands.s2), list(site.bands.s1)

    s1 = fetch_pixels(client, b.s1_composites(region, periods, site.gee, bands1), tile.grid,
                      b.period_band_names(len(periods), bands1), np.float32, concurrency=4)
    with_s1 = (s1 != b.S1_NODATA).reshape(len(periods), -1).mean(axis=1) > 0.5
    print(f"S1: {with_s1.sum()} of {len(periods)} periods with values")
    assert with_s1.mean() >= 0.6, f"Sentinel-1 is empty in {(~with_s1).sum()} of {len(periods)} periods"

    s2 = fetch_pixels(client, b.s2_composites(region, periods, site.gee, bands2), tile.grid,
                      b.period_band_names(len(periods), [*bands2, "clear"]), np.uint16, concurrency=4)
    clear = s2.reshape(len(periods), len(bands2) + 1, -1)[:, -1] > 0
    print(f"S2: clear fraction {clear.mean():.1%} over {len(periods)} periods")
    assert clear.mean() > 0.2, f"Sentinel-2 clear fraction {clear.mean():.1%}"

    has_conf, note = GeeSource(site, year, lambda s: client).check_cdl()
    labels = fetch_pixels(client, b.cdl_labels(year, site.gee, has_confidence=has_conf), tile.grid, ["label"], np.uint16)[0]
    lookup = load_legend(site.legend).source_lookup()
    classes = np.vectorize(lambda v: lookup.get(int(v), 0))(labels)
    present = sorted(set(np.unique(classes[classes > 0]).tolist()))
    print(f"CDL: {note}; legend classes {present}, {np.mean(classes > 0):.1%} of pixels labelled")
    assert len(present) >= 2 and np.mean(classes > 0) >= 0.3
