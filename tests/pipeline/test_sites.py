import pytest
import yaml
from conftest import demo_doc, write_site

from cropmap.pipeline.errors import SiteError
from cropmap.pipeline.sites import list_site_names, load_legend, load_site


def test_demo_site_loads_with_its_legend():
    site = load_site("demo")
    assert site.crs == "EPSG:32631" and site.epsg == 32631
    assert site.resolve_year(None) == 2019
    assert [t.id for t in site.local.tiles] == ["00002806639B424A", "0000280849BAC91C", "000028085BF08E7E"]
    legend = load_legend(site.legend)
    assert legend.names[0] == "maize"
    assert legend.source_lookup()[1200] == 1 and legend.source_lookup()[9120] == 5
    assert site.data_root().is_dir()


def test_every_catalogued_site_is_valid():
    assert {"demo", "demo-tanzania"} <= set(list_site_names())
    for name in list_site_names():
        load_site(name)


def test_unknown_site_names_the_known_ones():
    with pytest.raises(SiteError, match="unknown site 'atlantis'.*demo"):
        load_site("atlantis")


@pytest.mark.parametrize("name", ["../demo", "Demo", "a/b", ""])
def test_site_names_cannot_escape_the_catalogue(name):
    with pytest.raises(SiteError, match="invalid site name"):
        load_site(name)


def test_year_outside_the_site_is_refused():
    with pytest.raises(SiteError, match="no data for year 2030.*2018, 2019"):
        load_site("demo").resolve_year(2030)


def test_malformed_yaml_is_one_clear_error(sites_dir):
    (sites_dir / "broken.yaml").write_text("name: broken\ncrs: [unclosed\n")
    with pytest.raises(SiteError, match="not valid YAML at line"):
        load_site("broken")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"crs": "WGS84"}, "crs"),
        ({"extent": [10, 0, 5, 1]}, "extent"),
        ({"default_year": 1999}, "default_year 1999"),
        ({"bands": {"s2": ["B99"]}}, "B99"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_fields_are_named(sites_dir, change, message):
    doc = {**demo_doc("bad"), **change}
    write_site(sites_dir, doc)
    with pytest.raises(SiteError, match=message) as err:
        load_site("bad")
    assert "\n" not in str(err.value)


def test_a_legend_that_maps_a_code_twice_is_refused(sites_dir, tmp_path):
    legends = sites_dir.parent / "legends"
    legends.mkdir()
    (legends / "twice.yaml").write_text(yaml.safe_dump({"name": "twice", "classes": [
        {"code": 1, "name": "a", "color": "#000000", "source_codes": [5]},
        {"code": 2, "name": "b", "color": "#ffffff", "source_codes": [5]}]}))
    write_site(sites_dir, {**demo_doc("twice"), "legend": "twice"})
    with pytest.raises(SiteError, match="source code 5 is mapped to both"):
        load_site("twice")


@pytest.mark.parametrize("value", [0, -5, "wide"])
def test_block_size_is_validated(sites_dir, value):
    doc = demo_doc("blocks")
    doc["training"] = {**doc.get("training", {}), "block_size_m": value}
    write_site(sites_dir, doc)
    with pytest.raises(SiteError, match="block_size_m"):
        load_site("blocks")


def test_block_splits_are_the_default():
    from cropmap.pipeline.sites import Training

    assert Training().split == "blocks" and Training().block_size_m == 1000.0
    assert load_site("demo").training.block_size_m == 320.0
