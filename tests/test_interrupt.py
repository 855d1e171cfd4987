"""Interrupted runs: a merge (a real subprocess of the CLI) is killed by SIGINT or SIGKILL at given
points, and at random moments; OUT is never a half model, a rerun completes with the weights an
uninterrupted run gives, and calibration statistics already written are reused, never read back
partial.

The points are reached by wrapping one function of the child (e.g. the shard writer's ``add``, the
final rename) so that its n-th call signals the child itself; nothing in mergekit_bico knows about
it. The random moments are fractions of a measured uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from mergekit_bico.cli import yaml_main
from tests._catalogue import child_env, leftovers, snapshot
from tests._tiny import write_txt
from tests.test_cli_merge import weights

INTERRUPTED = "error: interrupted; no output was written (partial files removed)"

# Runs in the child: wrap MODULE:ATTR so that its KILL_COUNT-th call sends KILL_SIG to the child
# (before the call, or after it; "after-truncate" first cuts the file named by the call's second
# argument to half its size: a partial write), then run the CLI.
_CHILD = r"""
import importlib, os, signal, sys
# a Ctrl-C in a terminal: Python's handler even when the test runs as a background job (which
# starts with SIGINT ignored, and Python then keeps it ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
target = os.environ["KILL_AT"]
count = int(os.environ["KILL_COUNT"])
sig = getattr(signal, "SIG" + os.environ["KILL_SIG"])
when = os.environ.get("KILL_WHEN", "before")
module, _, attr = target.partition(":")
owner = importlib.import_module(module)
parts = attr.split(".")
for p in parts[:-1]:
    owner = getattr(owner, p)
real = getattr(owner, parts[-1])
calls = [0]
def hooked(*args, **kwargs):
    calls[0] += 1
    hit = calls[0] == count
    if hit and when == "before":
        os.kill(os.getpid(), sig)
    out = real(*args, **kwargs)
    if hit and when.startswith("after"):
        if when == "after-truncate":
            name = str(args[1])
            os.truncate(name, os.path.getsize(name) // 2)
        os.kill(os.getpid(), sig)
    return out
setattr(owner, parts[-1], hooked)
from mergekit_bico.cli import yaml_main
sys.argv[0] = "mergekit-bico-yaml"
yaml_main()
"""


def run_child(config: Path, out: Path, *args: str, kill_at: str, count: int, sig: str, when: str = "before",
              timeout: float = 300) -> subprocess.CompletedProcess:
    env = child_env()
    env.update(KILL_AT=kill_at, KILL_COUNT=str(count), KILL_SIG=sig, KILL_WHEN=when, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", _CHILD, str(config), str(out), "--quiet", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def rerun(config: Path, out: Path, *args: str, quiet: bool = True) -> None:
    """An uninterrupted run, in this process (info messages reach caplog when not ``quiet``)."""
    r = CliRunner().invoke(yaml_main, [str(config), str(out), *(["--quiet"] if quiet else []), *args])
    assert r.exit_code == 0, r.output


def assert_same(got: dict, want: dict, atol: float = 0.0) -> None:
    assert set(got) == set(want)
    for k in want:
        if atol:
            assert torch.allclose(got[k], want[k], atol=atol, rtol=0), k
        else:
            assert torch.equal(got[k], want[k]), k


def check_killed(r: subprocess.CompletedProcess, sig: str) -> None:
    """SIGINT: one line, exit 130, nothing left. SIGKILL: died on the spot."""
    if sig == "INT":
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert (r.returncode, lines) == (130, [INTERRUPTED]), (r.returncode, r.stderr)
    else:
        assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)


# ---------------------------------------------------------------------------------------------
# A plain merge


@pytest.fixture(scope="module")
def merge(llama_family, tmp_path_factory) -> dict:
    """A TIES config over the tiny family, and its output from an uninterrupted run."""
    root = tmp_path_factory.mktemp("interrupt")
    f = llama_family
    cfg = {"merge_method": "ties", "base_model": str(f["base"]), "dtype": "float32", "models": [
        {"model": str(f["ft1"]), "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": str(f["ft2"]), "parameters": {"weight": 0.7, "density": 0.3}}]}
    path = root / "ties.yml"
    path.write_text(yaml.safe_dump(cfg))
    ref = root / "reference"
    rerun(path, ref, "--out-shard-size", "30K")
    return {"config": path, "reference": weights(ref), "files": sorted(p.name for p in ref.iterdir()),
            "inputs": [f["base"], f["ft1"], f["ft2"]]}


# (function wrapped in the child, which call, when): each a moment where a half-written model exists
MERGE_POINTS = {
    "planning": ("mergekit_bico.plan:Planner._job", 5, "before"),
    "mid-merge": ("mergekit_bico.io.writer:StreamingShardedWriter.add", 10, "before"),
    "last-tensor": ("mergekit_bico.io.writer:StreamingShardedWriter.add", 21, "after"),
    "shard-renames": ("os:replace", 2, "before"),
    "final-rename": ("mergekit_bico.io.writer:_commit", 1, "before"),
}
FAST_MERGE = {("mid-merge", "KILL"), ("mid-merge", "INT"), ("final-rename", "KILL")}


def _merge_params():
    out = []
    for point in MERGE_POINTS:
        for sig in ("INT", "KILL"):
            marks = [] if (point, sig) in FAST_MERGE else [pytest.mark.slow]
            out.append(pytest.param(point, sig, id=f"{point}-SIG{sig}", marks=marks))
    return out


@pytest.mark.parametrize("point, sig", _merge_params())
def test_killed_merge_leaves_no_half_model(merge, tmp_path, point, sig):
    kill_at, count, when = MERGE_POINTS[point]
    out = tmp_path / "out"
    before = snapshot(*merge["inputs"])
    r = run_child(merge["config"], out, "--out-shard-size", "30K", kill_at=kill_at, count=count, sig=sig, when=when)
    check_killed(r, sig)
    assert not out.exists(), f"a killed run left {sorted(p.name for p in out.iterdir())} under OUT"
    if sig == "INT":
        assert leftovers(out) == []
    rerun(merge["config"], out, "--out-shard-size", "30K")
    assert sorted(p.name for p in out.iterdir()) == merge["files"]
    assert_same(weights(out), merge["reference"])
    assert leftovers(out) == []  # the rerun removed what a SIGKILL left
    assert snapshot(*merge["inputs"]) == before


@pytest.mark.parametrize("sig", ["KILL", pytest.param("INT", marks=pytest.mark.slow)])
def test_killed_overwrite_keeps_the_old_model(merge, tmp_path, sig):
    """Killed between moving the old OUT aside and moving the new one in: the old one survives."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old model")
    (out / "config.json").write_text("{}")
    old = snapshot(out)
    r = run_child(merge["config"], out, "--overwrite", kill_at="os:rename", count=2, sig=sig)
    check_killed(r, sig)
    if sig == "INT":
        assert snapshot(out) == old and leftovers(out) == []
    else:
        assert not out.exists()  # moved aside, next to OUT, under .out.old-<pid>-<hex>
        [aside] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
        assert {k.replace(str(aside), str(out)): v for k, v in snapshot(aside).items()} == old
        # the next run puts it back before deciding anything: without --overwrite it refuses
        r2 = CliRunner().invoke(yaml_main, [str(merge["config"]), str(out), "--quiet"])
        assert r2.exit_code == 1 and "exists and is not empty" in r2.stderr
        assert snapshot(out) == old and leftovers(out) == []
    rerun(merge["config"], out, "--overwrite")
    assert_same(weights(out), merge["reference"])
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# Calibration statistics (Fisher): reused after a kill, never read back partial


@pytest.fixture(scope="module")
def fisher(llama_family, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("interrupt-fisher")
    data = write_txt(root / "calib.txt", ["the cat sat on the mat", "a big red dog ran", "one two three", "hello world"])
    f = llama_family
    cfg = {"merge_method": "fisher", "dtype": "float32", "parameters": {"fisher_estimator": "empirical"},
           "models": [{"model": str(f["ft1"])}, {"model": str(f["ft2"])}],
           "calibration": {"data": str(data), "samples": 3, "max_length": 8, "batch_size": 2}}
    path = root / "fisher.yml"
    path.write_text(yaml.safe_dump(cfg))
    ref = root / "reference"
    rerun(path, ref, "--cache-dir", str(root / "reference-cache"))
    return {"config": path, "reference": weights(ref)}


def stats_files(cache: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(cache.rglob("*.safetensors"))}


@pytest.mark.parametrize("sig", ["KILL", pytest.param("INT", marks=pytest.mark.slow)])
def test_statistics_written_before_a_kill_are_reused(fisher, tmp_path, caplog, sig):
    """Killed while the second model's Fisher is computed: the first model's file is kept and reused."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    r = run_child(fisher["config"], out, "--cache-dir", str(cache),
                  kill_at="mergekit_bico.calibration.fisher:compute_fisher", count=2, sig=sig)
    check_killed(r, sig)
    assert not out.exists()
    first = stats_files(cache)
    assert len(first) == 1
    with caplog.at_level(logging.INFO, logger="mergekit_bico"):
        rerun(fisher["config"], out, "--cache-dir", str(cache), quiet=False)
    assert caplog.text.count("reusing cached Fisher statistics") == 1
    after = stats_files(cache)
    assert len(after) == 2 and all(after[p] == t for p, t in first.items())  # not recomputed
    assert_same(weights(out), fisher["reference"], atol=1e-6)
    assert leftovers(out) == []


@pytest.mark.parametrize("sig", ["KILL", pytest.param("INT", marks=pytest.mark.slow)])
def test_partial_statistics_file_is_never_read(fisher, tmp_path, caplog, sig):
    """Killed right after half of a stats file reached the disk: that file is not under its final
    name, so the rerun recomputes it (and removes the orphan temp file)."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    r = run_child(fisher["config"], out, "--cache-dir", str(cache),
                  kill_at="safetensors.torch:save_file", count=1, sig=sig, when="after-truncate")
    check_killed(r, sig)
    assert stats_files(cache) == {}
    temps = list(cache.rglob("*.tmp"))
    assert len(temps) == (1 if sig == "KILL" else 0)
    with caplog.at_level(logging.INFO, logger="mergekit_bico"):
        rerun(fisher["config"], out, "--cache-dir", str(cache), quiet=False)
    assert "reusing" not in caplog.text and caplog.text.count("Fisher statistics of") == 2
    assert len(stats_files(cache)) == 2 and list(cache.rglob("*.tmp")) == []
    assert_same(weights(out), fisher["reference"], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# BiCo statistics: a finished map cache survives a kill of the merge that follows


@pytest.mark.slow
def test_bico_maps_reused_after_a_kill(llama_family, tmp_path, caplog):
    f = llama_family
    data = write_txt(tmp_path / "calib.txt", ["the cat sat on the mat", "a big red dog ran", "hello world"])
    cfg = {"merge_method": "bico", "base_model": str(f["ft2"]), "dtype": "float32",
           "models": [{"model": str(f["ft1"]), "parameters": {"source_base": str(f["base"]), "weight": 1.0}}],
           "calibration": {"data": str(data), "samples": 3, "max_length": 8}}
    path = tmp_path / "bico.yml"
    path.write_text(yaml.safe_dump(cfg))
    cache, out = tmp_path / "cache", tmp_path / "out"
    r = run_child(path, out, "--cache-dir", str(cache),
                  kill_at="mergekit_bico.io.writer:StreamingShardedWriter.add", count=5, sig="KILL")
    check_killed(r, "KILL")
    assert not out.exists()
    maps = stats_files(cache)
    assert maps  # the maps were finished before the merge started
    rerun(path, out, "--cache-dir", str(cache))
    assert stats_files(cache) == maps  # reused, not recomputed
    report = json.loads((out / "transfer_report_0.json").read_text())
    assert report["cache"]["hit"] is True
    ref = tmp_path / "ref"
    rerun(path, ref, "--cache-dir", str(tmp_path / "cache2"))
    assert_same(weights(out), weights(ref), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Random moments


@pytest.fixture(scope="module")
def bigger(tmp_path_factory) -> dict:
    """Four inputs big enough that merging is a good part of a run (hidden 256, 4 layers)."""
    from tests._tiny import make_tiny_causal_lm
    from tests.conftest import make_variant

    root = tmp_path_factory.mktemp("interrupt-random")
    base = make_tiny_causal_lm(root / "base", seed=1, shard_size="2MB", hidden_size=256, intermediate_size=1024,
                               num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, vocab_size=8192)
    fts = [make_variant(base, root / f"ft{i}", seed=100 + i, shard_size="2MB") for i in range(3)]
    cfg = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.4}} for p in fts]}
    path = root / "ties.yml"
    path.write_text(yaml.safe_dump(cfg))
    ref = root / "reference"
    rerun(path, ref, "--out-shard-size", "4M")
    return {"config": path, "reference": weights(ref)}


@pytest.mark.slow
def test_killed_at_random_moments(bigger, tmp_path):
    out = tmp_path / "out"
    env = child_env()
    env["OMP_NUM_THREADS"] = "1"
    args = [sys.executable, "-c", "from mergekit_bico.cli import yaml_main; yaml_main()",
            str(bigger["config"]), str(out), "--quiet", "--out-shard-size", "4M"]
    started = time.perf_counter()
    subprocess.run(args, check=True, env=env, capture_output=True)
    wall = time.perf_counter() - started
    shutil.rmtree(out)
    rng = random.Random(6)
    outcomes = []
    for i in range(8):
        sig = (signal.SIGINT, signal.SIGKILL)[i % 2]
        delay = wall * rng.uniform(0.3, 1.05)
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        outcomes.append((sig.name, round(delay / wall, 2), proc.returncode))
        if out.exists():  # the kill came after the final rename: then OUT is the whole model
            assert_same(weights(out), bigger["reference"])
            shutil.rmtree(out)
        if sig == signal.SIGINT and proc.returncode == 130:
            # nothing of its own left (a SIGKILLed predecessor's partial folder stays until a run
            # gets as far as cleaning up, which an early Ctrl-C does not)
            own = [p for p in leftovers(out) if f"-{proc.pid}-" in Path(p).name]
            assert err.strip().splitlines() == [INTERRUPTED] and own == [], (err, own)
    rerun(bigger["config"], out, "--out-shard-size", "4M")
    assert_same(weights(out), bigger["reference"])
    assert leftovers(out) == []
    assert any(code in (130, -9) for _, _, code in outcomes), outcomes
