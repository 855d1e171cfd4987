"""Fisher merging end to end through the CLI: output vs the formula on the cached Fisher files,
cache reuse on a rerun, invalidation when the data file changes."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_bico.cli import main, yaml_main
from tests._tiny import write_jsonl
from tests.test_cli_merge import weights

TEXTS_A = ["the cat sat on the mat", "a big red dog ran to the house", "one two three four five"]
TEXTS_B = ["hello world model", "yes no good bad", "blue green small big cat dog"]


def setup(tmp_path: Path, f) -> Path:
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS_A * 3])
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in TEXTS_B * 3])
    cfg = {
        "merge_method": "fisher",
        "models": [
            {"model": str(f["ft1"]), "parameters": {"weight": 1.0},
             "calibration": {"data": str(tmp_path / "a.jsonl"), "samples": 6, "max_length": 16, "batch_size": 4}},
            {"model": str(f["ft2"]), "parameters": {"weight": 2.0},
             "calibration": {"data": str(tmp_path / "b.jsonl"), "samples": 6, "max_length": 16, "batch_size": 4}},
        ],
        "parameters": {"fisher_floor": 1e-3, "fisher_estimator": "empirical"},
        "dtype": "float32",
    }
    path = tmp_path / "fisher.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stats_files(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.safetensors"))


def test_fisher_merge_cli_cache_and_invalidation(llama_family, tmp_path, caplog):
    f = llama_family
    cfg = setup(tmp_path, f)
    cache = tmp_path / "cache"
    r = CliRunner().invoke(yaml_main, [str(cfg), str(tmp_path / "out1"), "--cache-dir", str(cache), "--quiet"])
    assert r.exit_code == 0, r.output
    files = stats_files(cache)
    assert len(files) == 2
    # expected output from the formula, with the Fisher read from the stats files
    by_model = {}
    for p in files:
        with safe_open(str(p), "pt") as fh:
            meta = fh.metadata()
        key = next(k for k in ("ft1", "ft2") if k in " ".join(meta.values()))
        by_model[key] = load_file(str(p))
    assert set(by_model) == {"ft1", "ft2"}
    a, b = weights(f["ft1"]), weights(f["ft2"])
    got = weights(tmp_path / "out1")
    touched = 0
    for k in a:
        fa = by_model["ft1"].get(k, torch.zeros_like(a[k]))
        fb = by_model["ft2"].get(k, torch.zeros_like(b[k]))
        pa, pb = 1.0 * (fa + 1e-3), 2.0 * (fb + 1e-3)
        exp = (pa * a[k] + pb * b[k]) / (pa + pb)
        fallback = (fa == 0) & (fb == 0)
        exp = torch.where(fallback, (a[k] + 2.0 * b[k]) / 3.0, exp)
        touched += int((~fallback).sum())
        assert torch.allclose(got[k], exp, atol=1e-6), k
    assert touched > 0
    mtimes = [p.stat().st_mtime_ns for p in files]

    # second run: statistics reused, not recomputed
    r = CliRunner().invoke(yaml_main, [str(cfg), str(tmp_path / "out2"), "--cache-dir", str(cache)])
    assert r.exit_code == 0, r.output
    assert "reusing" in (r.output + caplog.text).lower()
    assert [p.stat().st_mtime_ns for p in stats_files(cache)] == mtimes
    assert all(torch.equal(got[k], v) for k, v in weights(tmp_path / "out2").items())

    # changed data file: that model's statistics are recomputed
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in reversed(TEXTS_A * 3)] + [{"text": "red red red"}])
    r = CliRunner().invoke(yaml_main, [str(cfg), str(tmp_path / "out3"), "--cache-dir", str(cache), "--quiet"])
    assert r.exit_code == 0, r.output
    assert len(stats_files(cache)) == 3


def test_calibrate_command_precomputes(llama_family, tmp_path):
    cfg = setup(tmp_path, llama_family)
    cache = tmp_path / "cache"
    r = CliRunner().invoke(main, ["calibrate", str(cfg), "--cache-dir", str(cache), "--quiet"])
    assert r.exit_code == 0, r.output
    assert len(stats_files(cache)) == 2
    assert r.output.count("Fisher statistics") == 2


def test_calibrate_with_out_fills_the_merges_default_cache(llama_family, tmp_path):
    """`calibrate CONFIG OUT` then `mergekit-bico-yaml CONFIG OUT`: the merge finds the statistics
    in its default cache (beside OUT) and computes nothing."""
    cfg = setup(tmp_path, llama_family)
    out = tmp_path / "merged" / "out"
    out.parent.mkdir()
    r = CliRunner().invoke(main, ["calibrate", str(cfg), str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    cache = out.parent / ".mergekit_bico_cache"
    assert f"statistics cache: {cache.resolve()}" in r.output
    before = {p: p.stat().st_mtime_ns for p in stats_files(cache)}
    assert len(before) == 2
    r = CliRunner().invoke(yaml_main, [str(cfg), str(out)])
    assert r.exit_code == 0, r.output
    assert {p: p.stat().st_mtime_ns for p in stats_files(cache)} == before


def test_fisher_needs_calibration(llama_family, tmp_path):
    cfg = {"merge_method": "fisher", "models": [{"model": str(llama_family["ft1"])}, {"model": str(llama_family["ft2"])}]}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(yaml_main, [str(path), str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 2 and "needs calibration data" in r.output
    assert not (tmp_path / "out").exists()


def test_fisher_of_a_transferred_entry_is_taken_at_the_transferred_model(tmp_path):
    """A ``transfer:`` entry under ``fisher`` stands for target base + transferred delta: its Fisher is
    computed there (target shapes, even when the source is wider and deeper), equal to the Fisher of
    that model written out and calibrated on its own; the merge follows the formula with it."""
    from mergekit_bico.calibration.fisher import compute_fisher
    from mergekit_bico.calibration.store import StatsStore
    from mergekit_bico.config import CalibrationConfig
    from tests._tiny import make_tiny_causal_lm
    from tests.conftest import make_variant

    base = make_tiny_causal_lm(tmp_path / "base", arch="llama", seed=1)
    ft_a = make_variant(base, tmp_path / "ft-a", seed=11)
    old = make_tiny_causal_lm(tmp_path / "old-base", arch="llama", seed=2, hidden_size=48, num_hidden_layers=3)
    old_ft = make_variant(old, tmp_path / "old-ft", seed=33)
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS_A * 3])
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in TEXTS_B * 3])
    calib_b = {"data": str(tmp_path / "b.jsonl"), "samples": 9, "max_length": 16, "batch_size": 4}
    transfer = {"method": "bico", "source_base": str(old)}
    cfg = {
        "merge_method": "fisher", "base_model": str(base),
        "models": [
            {"model": str(ft_a), "parameters": {"weight": 1.0},
             "calibration": {"data": str(tmp_path / "a.jsonl"), "samples": 9, "max_length": 16, "batch_size": 4}},
            {"model": str(old_ft), "parameters": {"weight": 2.0}, "transfer": transfer, "calibration": calib_b},
        ],
        "parameters": {"fisher_floor": 1e-3},
        "dtype": "float32",
    }
    (tmp_path / "fisher.yml").write_text(yaml.safe_dump(cfg))
    cache = tmp_path / "cache"
    r = CliRunner().invoke(yaml_main, [str(tmp_path / "fisher.yml"), str(tmp_path / "out"), "--cache-dir", str(cache), "--quiet"])
    assert r.exit_code == 0, r.output

    # the transferred model on its own (weight 1), written out, and its Fisher computed from the folder
    ta = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
          "models": [{"model": str(old_ft), "parameters": {"weight": 1.0}, "transfer": transfer, "calibration": calib_b}]}
    (tmp_path / "ta.yml").write_text(yaml.safe_dump(ta))
    r = CliRunner().invoke(yaml_main, [str(tmp_path / "ta.yml"), str(tmp_path / "moved"), "--cache-dir", str(cache), "--quiet"])
    assert r.exit_code == 0, r.output
    ref_path = compute_fisher(tmp_path / "moved", CalibrationConfig(**calib_b), store=StatsStore(tmp_path / "ref-cache"),
                              progress=False)
    ref = load_file(str(ref_path))

    used = {}
    for p in (cache / "fisher").glob("*.safetensors"):
        with safe_open(str(p), "pt") as fh:
            meta = fh.metadata()
        used["moved" if "delta_fingerprint" in meta else "ft-a"] = load_file(str(p))
    assert set(used) == {"moved", "ft-a"}
    b, a, moved = weights(base), weights(ft_a), weights(tmp_path / "moved")
    assert set(used["moved"]) == set(ref) and set(ref) <= set(b)
    for k in ref:
        assert used["moved"][k].shape == b[k].shape
        assert torch.allclose(used["moved"][k], ref[k], rtol=1e-4, atol=1e-10), k
    got = weights(tmp_path / "out")
    for k in b:
        fa = used["ft-a"].get(k, torch.zeros_like(b[k]))
        fb = ref.get(k, torch.zeros_like(b[k]))
        pa, pb = 1.0 * (fa + 1e-3), 2.0 * (fb + 1e-3)
        exp = b[k] + (pa * (a[k] - b[k]) + pb * (moved[k] - b[k])) / (pa + pb)
        fallback = (fa == 0) & (fb == 0)
        exp = torch.where(fallback, b[k] + ((a[k] - b[k]) + 2.0 * (moved[k] - b[k])) / 3.0, exp)
        assert torch.allclose(got[k], exp, atol=1e-5), k


def test_fisher_without_calibration_fails_before_any_transfer_is_prepared(tmp_path):
    from tests._tiny import make_tiny_causal_lm
    from tests.conftest import make_variant

    base = make_tiny_causal_lm(tmp_path / "base", arch="llama", seed=1)
    ft_a = make_variant(base, tmp_path / "ft-a", seed=11)
    old = make_tiny_causal_lm(tmp_path / "old-base", arch="llama", seed=2)
    old_ft = make_variant(old, tmp_path / "old-ft", seed=33)
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in TEXTS_B * 3])
    calib = {"data": str(tmp_path / "b.jsonl"), "samples": 9, "max_length": 16}
    cfg = {"merge_method": "fisher", "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(old_ft), "transfer": {"method": "bico", "source_base": str(old), "calibration": calib},
                       "calibration": calib},
                      {"model": str(ft_a)}]}
    (tmp_path / "f.yml").write_text(yaml.safe_dump(cfg))
    cache = tmp_path / "cache"
    r = CliRunner().invoke(yaml_main, [str(tmp_path / "f.yml"), str(tmp_path / "out"), "--cache-dir", str(cache), "--quiet"])
    assert r.exit_code == 2, r.output
    assert "models[1]" in r.output and "needs calibration data" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()
    assert not list(cache.rglob("*.safetensors"))        # no BiCo statistics were computed first
