"""benchmarks/gpu_check.py runs unchanged on CPU (tiny sizes) and prints every figure it promises."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_on_cpu_prints_every_section(tmp_path):
    """The script as a user runs it, in its own process (its DDP smoke run owns a process group)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "auto", "--size", "tiny", "--threads", "1", "--models", "tempcnn", "ltae",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    text, doc = proc.stdout, json.loads(out.read_text())
    for section in ("## matmul", "## pixel models", "## host series", "## DDP smoke", "## patch model", "## Iowa projection"):
        assert section in text
    assert doc["device"] == "cpu" and out.is_file()
    assert doc["matmul_tflops"]["fp32"] > 0 and doc["matmul_tflops"]["bf16"] > 0
    for m in doc["models"]:
        for k in ("train_sps_fp32", "train_sps_amp", "infer_pps_fp32", "infer_pps_amp", "mflop_per_px"):
            assert m[k] > 0 and math.isfinite(m[k])
        assert m["compile_skipped"] == "n/a (CPU)"
    assert doc["ddp"]["loss_finite"] and doc["ddp"]["weights_in_sync"] and doc["ddp"]["backend"] == "gloo"
    assert doc["patch"]["train_patches_s"] > 0 and doc["patch"]["infer_px_s"] > 0
    assert [r["model"] for r in doc["iowa"]] == ["tempcnn", "ltae"] and all(r["wall_s"] > 0 for r in doc["iowa"])


def test_gpu_check_rejects_a_missing_gpu_and_unknown_models():
    gc = load()
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            gc.main(["--device", "cuda"])
    with pytest.raises(SystemExit, match="not auto, cpu or cuda"):
        gc.main(["--device", "tpu"])
    with pytest.raises(SystemExit, match="unknown model"):
        gc.main(["--device", "cpu", "--size", "tiny", "--models", "nope"])
