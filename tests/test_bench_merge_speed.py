"""benchmarks/merge_speed.py end to end on tiny models (its own run takes 15 min on 150M / 600M).

"mergekit" is stood in for by our own torch path (the benchmark only needs a ``mergekit-yaml``
command line), so every equality check runs: the real outputs must still be there when they are
compared, and the numbers in the report must come from them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import merge_speed as ms


def test_merge_speed_runs_end_to_end_and_checks_equality(tmp_path, monkeypatch):
    monkeypatch.setitem(ms.SIZES, 1, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4))
    monkeypatch.setattr(ms, "VOCAB", 512)
    monkeypatch.setattr(ms, "IN_SHARD_BYTES", 200_000)      # several input shards
    fake = tmp_path / "mergekit-yaml"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c '{ms.TORCH_PATH_CODE}' \"$@\" --quiet\n")
    fake.chmod(0o755)
    results = tmp_path / "results"
    rc = ms.main(["--sizes", "1", "--repeat", "1", "--workdir", str(tmp_path / "work"), "--mergekit-bin", str(fake),
                  "--results", str(results)])
    assert rc == 0
    report = json.loads((results / "merge_speed.json").read_text())
    rows = {(r["method"], r["tool"]): r for r in report["rows"]}
    assert all(r["rc"] == 0 for r in report["rows"]), [r["tool"] for r in report["rows"] if r["rc"]]
    ta = rows[("task_arithmetic", "mergekit-bico")]
    assert ta["imports_torch"] is False
    n_tensors = len(ms.tensor_shapes(ms.SIZES[1]))
    assert ta["equality"]["tensors"] == n_tensors and ta["equality"]["equal"] and ta["equality"]["max_abs_diff"] == 0
    assert rows[("ties", "mergekit-bico")]["imports_torch"] is True
    assert rows[("ties", "mergekit-bico, tie_break: sort")]["equality"]["tensors"] == n_tensors
    b16 = rows[(ms.BF16_METHOD, "mergekit-bico, dtype float32 (numpy path)")]["equality_torch_path"]
    assert b16["tensors"] == n_tensors and b16["max_abs_diff"] == 0
    assert rows[(ms.BF16_METHOD, "mergekit-bico, dtype bfloat16 (torch: 16-bit arithmetic)")]["equality"]["equal"]
    checks = {c["check"]: c for c in report["checks"]}
    for name in ("1x task_arithmetic max abs diff vs mergekit", "1x ties (tie_break: sort) max abs diff vs mergekit",
                 f"1x {ms.BF16_METHOD}, dtype float32: numpy path max abs diff vs our torch path",
                 f"1x {ms.BF16_METHOD}, dtype bfloat16: max abs diff vs mergekit"):
        assert checks[name]["ok"], name
    md = (results / "merge_speed.md").read_text()
    assert "| 1x task_arithmetic time vs floor |" in md and "## Notes" in md
    assert not (tmp_path / "work" / "out").exists()          # outputs are cleaned up
