"""The stage runner: manifest, skip when unchanged, rerun what depends on a change, resume."""

import json

import pytest

from cropmap.pipeline.runner import Runner, Stage


class Recorder:
    def __init__(self):
        self.ran = []
        self.fail_in = None

    def stage(self, name, after=(), config=None, inputs=()):
        def run(ctx):
            self.ran.append(name)
            if self.fail_in == name:
                raise RuntimeError(f"boom in {name}")
            text = name + "".join(p["out"].read_text() for p in ctx.upstream.values())
            out = ctx.path(f"{name}.txt")
            out.write_text(text + json.dumps(config or {}))
            ctx.report["chars"] = len(text)
            return {"out": f"{name}.txt"}

        return Stage(name, run, after=list(after), config=config or {}, inputs=list(inputs))


def graph(rec, cfg_b=1, inputs=()):
    return [rec.stage("a", inputs=inputs), rec.stage("b", ["a"], {"k": cfg_b}), rec.stage("c", ["a"]), rec.stage("d", ["b", "c"])]


def outputs(done):
    return {"final": done["d"]["out"]}


def run(tmp_path, rec, **kw):
    return Runner(tmp_path, {"site": "t", "year": 1}).run(graph(rec, **kw), outputs)


def test_manifest_records_every_stage(tmp_path):
    rec = Recorder()
    m = run(tmp_path, rec)
    assert rec.ran == ["a", "b", "c", "d"]
    on_disk = json.loads((tmp_path / "run.json").read_text())
    assert on_disk["status"] == "succeeded" and on_disk["outputs"] == {"final": "d.txt"}
    for name in "abcd":
        st = on_disk["stages"][name]
        assert st["status"] == "done" and st["outputs"]["out"]["path"] == f"{name}.txt"
        assert len(st["outputs"]["out"]["sha256"]) == 64 and st["seconds"] >= 0 and st["started"] and st["finished"]
    assert on_disk["environment"]["gdal"] and m["site"] == "t"


def test_rerun_skips_everything(tmp_path):
    run(tmp_path, Recorder())
    rec = Recorder()
    m = run(tmp_path, rec)
    assert rec.ran == []
    assert all(s["skipped"] for s in m["stages"].values())


def test_changed_config_reruns_that_stage_and_its_dependents(tmp_path):
    run(tmp_path, Recorder())
    rec = Recorder()
    run(tmp_path, rec, cfg_b=2)
    assert rec.ran == ["b", "d"]


def test_deleted_output_reruns_only_what_depends_on_it(tmp_path):
    run(tmp_path, Recorder())
    (tmp_path / "c.txt").unlink()
    rec = Recorder()
    run(tmp_path, rec)
    assert rec.ran == ["c"]  # c's output comes back identical, so d's inputs are unchanged


def test_tampered_output_is_detected(tmp_path):
    run(tmp_path, Recorder())
    (tmp_path / "a.txt").write_text("corrupted")
    rec = Recorder()
    run(tmp_path, rec)
    assert rec.ran == ["a"]


def test_changed_external_input_reruns(tmp_path):
    src = tmp_path / "input.nc"
    src.write_text("v1")
    run(tmp_path, Recorder(), inputs=[src])
    src.write_text("v2")
    rec = Recorder()
    run(tmp_path, rec, inputs=[src])
    assert rec.ran == ["a"]


def test_crash_is_recorded_and_the_next_run_resumes(tmp_path):
    rec = Recorder()
    rec.fail_in = "c"
    with pytest.raises(RuntimeError, match="boom"):
        run(tmp_path, rec)
    m = json.loads((tmp_path / "run.json").read_text())
    assert m["status"] == "failed"
    assert m["stages"]["c"]["status"] == "failed" and "boom in c" in m["stages"]["c"]["error"]
    assert "d" not in m["stages"]
    rec2 = Recorder()
    run(tmp_path, rec2)
    assert rec2.ran == ["c", "d"]  # a and b finished before the crash


def test_force_reruns_all(tmp_path):
    run(tmp_path, Recorder())
    rec = Recorder()
    Runner(tmp_path, {"site": "t", "year": 1}, force=True).run(graph(rec), outputs)
    assert rec.ran == ["a", "b", "c", "d"]
