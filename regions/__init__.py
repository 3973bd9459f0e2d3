"""Site catalogue and class legends as data (`sites/*.yaml`, `legends/*.yaml`) and the
embedded demo data (`data/demo`, real Sentinel-1/2 exports, MIT licence)."""

from pathlib import Path

REGIONS_DIR = Path(__file__).resolve().parent
SITES_DIR = REGIONS_DIR / "sites"
LEGENDS_DIR = REGIONS_DIR / "legends"
DATA_DIR = REGIONS_DIR / "data"
