"""The run's model choice with and without the blend rule, on the candidates harness's rows.

``training.model: auto`` ranks the candidates by mean validation macro F1 over the split seeds; with
the blend rule (:data:`cropmap.pipeline.levels.selection.BLEND_CONFIDENCE`) a single model ranked
above the blend replaces it only when a paired bootstrap over the validation parcels says it is
better in at least that share of the draws. This script replays both rules on rows written by
``benchmarks/candidates.py`` (they hold every candidate's per-sample validation outputs), for the
given groups of split seeds, and says per dataset whether the pick beats both the forest and
boosting on mean *test* OA and macro F1. The choice itself reads validation figures only.

    python benchmarks/selection_rules.py benchmarks/results/candidates-bootstrap.jsonl --seeds 3,4,5 0,1,2 0,1,2,3,4,5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from candidates import _outputs  # noqa: E402

from cropmap.pipeline.levels.selection import BLEND, BLEND_CONFIDENCE, CandidateResult, choose  # noqa: E402


def pick(rows: list[dict], confidence: float | None, blend: str = "blend-all") -> str:
    """The run's choice (one candidate for all split seeds) on the validation fields of ``rows``; the row
    ``blend`` plays the run's blend, the other blends of the harness are left out."""
    names = [c for c in dict.fromkeys(r["candidate"] for r in rows)
             if c not in ("auto", "auto-run") and (c == blend or not c.startswith("blend"))]
    results = []
    for c in names:
        mine = sorted((r for r in rows if r["candidate"] == c), key=lambda r: r["seed"])
        results.append(CandidateResult(BLEND if c == blend else c, outputs=_outputs(mine),
                                       validation=[{"macro_f1": r["val_macro_f1"], "overall_accuracy": r["val_overall_accuracy"]} for r in mine]))
    win = choose(results, blend_confidence=confidence)["winner"]
    return blend if win == BLEND else win


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", type=Path)
    ap.add_argument("--seeds", nargs="+", default=["0,1,2"], help="Groups of split seeds, comma-separated.")
    ap.add_argument("--blend", default="blend-all", help="The harness candidate that plays the run's blend (blend-all, blend-pruned).")
    a = ap.parse_args()
    rows = [json.loads(line) for line in a.rows.read_text().splitlines() if line.strip()]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    for group in a.seeds:
        seeds = {int(s) for s in group.split(",")}
        print(f"\nsplit seeds {sorted(seeds)}")
        for conf, label in ((None, "highest validation macro F1"), (BLEND_CONFIDENCE, f"blend rule ({BLEND_CONFIDENCE:.0%}, blend = {a.blend})")):
            wins, parts = 0, []
            for ds in datasets:
                g = [r for r in rows if r["dataset"] == ds and r["seed"] in seeds]
                if not g:
                    continue
                w = pick(g, conf, a.blend)

                def test(c: str, k: str, g=g) -> float:
                    return float(np.mean([r[k] for r in g if r["candidate"] == c]))
                ok = all(test(w, k) > test(b, k) for b in ("forest", "boosting") for k in ("test_overall_accuracy", "test_macro_f1"))
                wins += ok
                parts.append(f"{ds}: {w} {test(w, 'test_overall_accuracy'):.3f} / {test(w, 'test_macro_f1'):.3f} "
                             f"({'beats' if ok else 'not'} both)")
            print(f"- {label}: beats forest and boosting on {wins} of {len(parts)} sets; " + "; ".join(parts))


if __name__ == "__main__":
    main()
