"""Both Presto forms chosen by name in a site file: the demo run trains, maps and evaluates with them."""

from __future__ import annotations

import json

import pytest
from conftest import cropmap, demo_doc, write_site


@pytest.mark.slow
@pytest.mark.parametrize("model", ["presto-embed", "presto"])
def test_site_file_selects_presto(model, tmp_path, sites_dir):
    write_site(sites_dir, demo_doc("demo-presto", model=model, model_options={}, split_seeds=[0], epochs=2))
    proc = cropmap("run", "--site", "demo-presto", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "demo-presto" / "2019"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == model and 0 <= metrics["overall_accuracy"] <= 1
    assert {"baseline", "boosting"} <= set(metrics)
    config = json.loads((run / "models" / "seed-0" / "config.json").read_text())
    assert config["model"] == model and len(config["model_config"]["location"]) == 2  # from the tile grid
    assert (run / "map" / "crops.tif").is_file()
