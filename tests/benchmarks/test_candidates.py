"""The benchmark's ``auto`` rows are chosen from validation figures only."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
spec = importlib.util.spec_from_file_location("candidates", BENCH / "candidates.py")
cand = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cand)


def rows(test_scale=1.0):
    out = []
    for seed, (vf, vb) in enumerate([(0.5, 0.6), (0.7, 0.6), (0.5, 0.55)]):
        for name, v, t in (("forest", vf, 0.9), ("boosting", vb, 0.1)):
            out.append({"dataset": "rpg2023", "budget": 1.0, "seed": seed, "candidate": name, "val_macro_f1": v, "val_overall_accuracy": v,
                        "test_macro_f1": t * test_scale, "test_overall_accuracy": t * test_scale})
    return out


def test_auto_picks_from_validation_and_ignores_test_figures():
    for scale in (1.0, 0.0, 5.0):
        got = cand.with_auto(rows(scale))
        per_split = {r["seed"]: r["picked"] for r in got if r["candidate"] == "auto"}
        run = {r["picked"] for r in got if r["candidate"] == "auto-run"}
        assert per_split == {0: "boosting", 1: "forest", 2: "boosting"}
        assert run == {"boosting"}  # mean validation macro F1 0.583 vs 0.567
    assert "auto-run" in cand.summarize(rows())
