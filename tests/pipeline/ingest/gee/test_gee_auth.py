"""Credentials checks (no network), `cropmap auth check`, and site validation of gee sites."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import gee_demo_doc, write_site

from cropmap.pipeline.errors import AuthError, SiteError
from cropmap.pipeline.ingest.gee.auth import check_auth, require_auth
from cropmap.pipeline.sites import list_site_names, load_site

SECRET = "-----BEGIN PRIVATE KEY-----NOT-A-REAL-KEY"


def key_file(tmp_path, **fields):
    path = tmp_path / "key.json"
    path.write_text(json.dumps({"type": "service_account", "client_email": "svc@p.iam.gserviceaccount.com",
                                "private_key": SECRET, **fields}))
    return path


def test_service_account_and_project(tmp_path):
    st = check_auth(None, {"GOOGLE_APPLICATION_CREDENTIALS": str(key_file(tmp_path)), "EE_PROJECT": "p1", "HOME": str(tmp_path)})
    assert st.ok and st.project == "p1" and "svc@p.iam.gserviceaccount.com" in st.credentials
    assert SECRET not in "\n".join(st.lines())
    assert check_auth("site-proj", {"EE_PROJECT": "p1", "HOME": str(tmp_path)}).project == "site-proj"


def test_missing_everything_is_named(tmp_path):
    st = check_auth(None, {"HOME": str(tmp_path)})
    assert not st.ok and len(st.problems) == 2
    assert "EE_PROJECT" in st.problems[0] and "GOOGLE_APPLICATION_CREDENTIALS" in st.problems[1]
    st = check_auth("p", {"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "nope.json"), "HOME": str(tmp_path)})
    assert "does not exist" in st.problems[0]


def test_user_tokens_are_flagged_and_adc_found(tmp_path):
    adc = tmp_path / ".config" / "gcloud" / "application_default_credentials.json"
    adc.parent.mkdir(parents=True)
    adc.write_text(json.dumps({"type": "authorized_user", "refresh_token": "SECRET-TOKEN"}))
    st = check_auth("p", {"HOME": str(tmp_path)})
    assert st.ok and "application default credentials" in st.credentials and "expire" in st.notes[0]
    assert "SECRET-TOKEN" not in "\n".join(st.lines())


def test_require_auth_is_one_line(monkeypatch, tmp_path):
    for var in ("GOOGLE_APPLICATION_CREDENTIALS", "EE_PROJECT", "GOOGLE_CLOUD_PROJECT", "CROPMAP_EE_METADATA_CREDENTIALS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(AuthError) as err:
        require_auth(None)
    assert "\n" not in str(err.value) and "cropmap auth check" in str(err.value)


def _cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "cropmap.pipeline.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def test_cli_auth_check_and_run_without_credentials(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GOOGLE_APPLICATION_CREDENTIALS", "EE_PROJECT", "GOOGLE_CLOUD_PROJECT")}
    env["HOME"] = str(tmp_path)
    r = _cli(["auth", "check"], env, tmp_path)
    assert r.returncode == 2 and "project:     MISSING" in r.stdout and r.stderr.count("\n") == 1
    ok = _cli(["auth", "check", "--site", "iowa"], {**env, "GOOGLE_APPLICATION_CREDENTIALS": str(key_file(tmp_path)), "EE_PROJECT": "p"}, tmp_path)
    assert ok.returncode == 0 and "svc@p.iam" in ok.stdout and SECRET not in ok.stdout + ok.stderr
    run = _cli(["run", "--site", "iowa", "--out", str(tmp_path / "runs")], env, tmp_path)
    lines = [line for line in run.stderr.splitlines() if line.strip()]  # rich's transient progress leaves a blank line
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("cropmap: error: stage ingest: Earth Engine is not set up")
    manifest = json.loads((tmp_path / "runs" / "iowa" / "2024" / "run.json").read_text())
    assert manifest["status"] == "failed" and SECRET not in json.dumps(manifest)


def test_gee_sites_validate_and_are_listed():
    assert {"demo", "iowa", "eure-et-loir"} <= set(list_site_names())
    iowa, fr = load_site("iowa"), load_site("eure-et-loir")
    assert (iowa.source, iowa.label_source, iowa.gee.bucket) == ("gee", "cdl", "cropmap-exports")
    assert fr.label_source == "parcels" and fr.parcels.code_column == "CODE_GROUP" and fr.gee.orbit_pass == "DESCENDING"


@pytest.mark.parametrize("change, message", [
    ({"gee": None}, "source 'gee' needs a 'gee:' section"),
    ({"label_source": "parcel-raster"}, "label_source 'parcel-raster' needs source 'local'"),
    ({"label_source": "parcels"}, "label_source 'parcels' needs a 'parcels:' section"),
    ({"gee": {"bucket": "Bad_Bucket!"}}, "is not a Cloud Storage bucket name"),
    ({"gee": {"bucket": "bkt", "file_dimensions": 1000}}, "multiple of the 256-pixel shard size"),
    ({"gee": {"bucket": "bkt", "cs_cdf_threshold": 0.95}}, "cs_cdf_threshold"),
    ({"gee": {"bucket": "bkt", "tile_size_m": 1005}}, "not a multiple of resolution"),
    ({"gee": {"tile_size_m": 640}}, "set `bucket`"),
])
def test_bad_gee_site_is_one_clear_error(sites_dir, tmp_path, change, message):
    doc = gee_demo_doc(tmp_path)
    doc.update(change)
    if doc.get("gee") is None:
        doc.pop("gee")
    write_site(sites_dir, doc)
    with pytest.raises(SiteError, match="demo-gee.yaml is invalid") as err:
        load_site("demo-gee")
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.live
def test_live_earth_engine_answers_and_cdl_is_listed():
    """Needs real credentials (GOOGLE_APPLICATION_CREDENTIALS, EE_PROJECT) and network: `pytest -m live`."""
    from cropmap.pipeline.ingest.gee.source import GeeSource, make_client

    src = GeeSource(load_site("iowa"), 2023, make_client)
    has_conf, note = src.check_cdl()
    assert "CDL 2023" in note
