"""`cropmap ingest` from the command line (offline plan, its errors) and CLI usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

NO_CREDENTIALS = ("GOOGLE_APPLICATION_CREDENTIALS", "EE_PROJECT", "GOOGLE_CLOUD_PROJECT", "EARTHENGINE_TOKEN")


def cropmap(*args, env=None, home=None):
    full_env = {k: v for k, v in os.environ.items() if k not in NO_CREDENTIALS}
    if home is not None:
        full_env["HOME"] = str(home)  # no ~/.config/earthengine credentials either
    return subprocess.run([sys.executable, "-m", "cropmap.pipeline.cli", *map(str, args)], capture_output=True, text=True,
                          env={**full_env, **(env or {})}, timeout=300)


def one_line_error(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cropmap: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_ingest_plan_json_without_credentials(tmp_path):
    proc = cropmap("ingest", "--site", "iowa", "--year", "2024", "--plan", "--json", "--out", tmp_path / "runs", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    ids = {c["id"] for c in doc["collections"]}
    assert {"COPERNICUS/S2_SR_HARMONIZED", "GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED", "COPERNICUS/S1_GRD", "USDA/NASS/CDL/2024"} <= ids
    assert doc["limits"]["all_within"] and doc["totals"]["tiles"] == 228 and doc["totals"]["eecu_hours"] > 0
    assert [z["crs"] for z in doc["zones"]] == ["EPSG:32615"] and not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_ingest_plan_text_of_a_two_zone_site(tmp_path):
    proc = cropmap("ingest", "--site", "illinois", "--year", "2024", "--plan", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Zone EPSG:32615 (site illinois-utm15n)" in proc.stdout and "Zone EPSG:32616 (site illinois-utm16n)" in proc.stdout
    assert "every export within Earth Engine's documented limits" in proc.stdout and "EECU-hours" in proc.stdout


def test_ingest_errors_are_one_line(tmp_path):
    one_line_error(cropmap("ingest", "--site", "atlantis", "--plan"), 2, "unknown site 'atlantis'")
    one_line_error(cropmap("ingest", "--site", "iowa", "--year", "20x4", "--plan"), 2, "not a four-digit year")
    one_line_error(cropmap("ingest", "--site", "iowa", "--year", "2030", "--plan"), 75, "CDL 2030", "not published yet")
    one_line_error(cropmap("ingest", "--site", "iowa", "--year", "2021", "--plan"), 2, "has no data for year 2021")
    one_line_error(cropmap("ingest", "--site", "demo", "--plan"), 2, "nothing to export from Earth Engine")


def test_ingest_from_polygon_prints_a_valid_site(tmp_path):
    area = tmp_path / "area.geojson"
    area.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
        [[-93.0, 42.0], [-92.6, 42.0], [-92.6, 42.3], [-93.0, 42.0]]]}}))
    proc = cropmap("ingest", "--site", "mine", "--from-polygon", area)
    assert proc.returncode == 0, proc.stderr
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "mine.yaml").write_text(proc.stdout)
    plan = cropmap("ingest", "--site", "mine", "--plan", "--json", env={"CROPMAP_SITES_DIR": str(sites)})
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["zones"][0]["crs"] == "EPSG:32615"


def test_usage_errors_are_one_line_with_exit_2():
    one_line_error(cropmap("nosuchcommand"), 2, "No such command 'nosuchcommand'", "cropmap --help")
    one_line_error(cropmap("run", "--nosuch"), 2, "No such option: --nosuch", "cropmap run --help")
    one_line_error(cropmap("run", "--site"), 2, "'--site' requires an argument")
    one_line_error(cropmap("ingest", "--plan"), 2, "Missing option '--site'")
