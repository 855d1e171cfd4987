"""Every bad input: one line on stderr naming the cause, exit code != 0, no traceback, no output
folder (and no partial folder) left behind."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(sys.executable).parent / "mergekit-bico-yaml"


def cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-c", "from mergekit_bico.cli import yaml_main; yaml_main()"]
    return subprocess.run(cmd + list(args) + ["--quiet"], capture_output=True, text=True, timeout=300)


def expect_error(tmp_path: Path, config, *, needle: str, code: int | None = None, extra=(), out_name="out") -> str:
    cfg = tmp_path / "bad.yml"
    cfg.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    out = tmp_path / out_name
    existed = out.exists()
    before = sorted(p.name for p in out.iterdir()) if existed else None
    r = cli(str(cfg), str(out), *extra)
    assert r.returncode != 0, r.stdout + r.stderr
    if code is not None:
        assert r.returncode == code, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert lines[0].startswith("error: ")
    assert needle in lines[0], lines[0]
    if existed:
        assert sorted(p.name for p in out.iterdir()) == before  # untouched
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
    return lines[0]


def ties(f, **over):
    cfg = {
        "merge_method": "ties",
        "base_model": str(f["base"]),
        "models": [
            {"model": str(f["ft1"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(f["ft2"]), "parameters": {"weight": 1.0, "density": 0.5}},
        ],
    }
    cfg.update(over)
    return cfg


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_yaml_syntax_error(tmp_path):
    msg = expect_error(tmp_path, "merge_method: ties\nmodels: [\n", needle="YAML syntax error", code=2)
    assert "line" in msg


def test_unknown_method(llama_family, tmp_path):
    expect_error(tmp_path, ties(llama_family, merge_method="tiess"), needle="did you mean 'ties'", code=2)


def test_unknown_key(llama_family, tmp_path):
    cfg = ties(llama_family)
    cfg["models"][0]["paramters"] = cfg["models"][0].pop("parameters")
    expect_error(tmp_path, cfg, needle="unknown key 'paramters' in models[0]", code=2)


def test_unknown_parameter_name(llama_family, tmp_path):
    cfg = ties(llama_family)
    cfg["models"][1]["parameters"]["densty"] = 0.3
    expect_error(tmp_path, cfg, needle="unknown parameter 'densty'", code=2)


def test_missing_model_path(llama_family, tmp_path):
    cfg = ties(llama_family)
    cfg["models"][0]["model"] = str(tmp_path / "nope")
    expect_error(tmp_path, cfg, needle="nope", code=1)


def test_model_lacking_a_tensor(llama_family, tmp_path):
    from tests._tiny import copy_without_tensor

    name = "model.layers.1.mlp.up_proj.weight"
    bad = copy_without_tensor(llama_family["ft2"], tmp_path / "ft2-missing", name)
    cfg = ties(llama_family)
    cfg["models"][1]["model"] = str(bad)
    expect_error(tmp_path, cfg, needle=name, code=1)


def test_shape_mismatch(llama_family, tmp_path):
    from tests._tiny import make_tiny_causal_lm

    other = make_tiny_causal_lm(tmp_path / "wide", arch="llama", seed=3, intermediate_size=96)
    cfg = ties(llama_family)
    cfg["models"][1]["model"] = str(other)
    expect_error(tmp_path, cfg, needle="shape mismatch", code=1)


def test_weight_missing(llama_family, tmp_path):
    cfg = ties(llama_family)
    del cfg["models"][1]["parameters"]["weight"]
    expect_error(tmp_path, cfg, needle="missing required parameter 'weight'", code=2)


@pytest.mark.parametrize("density", [0.0, 1.5, -0.2])
def test_density_outside_unit_interval(llama_family, tmp_path, density):
    cfg = ties(llama_family)
    cfg["models"][0]["parameters"]["density"] = density
    expect_error(tmp_path, cfg, needle="density", code=2)


def test_truncated_shard(llama_family, tmp_path):
    bad = copy_model(llama_family["ft1"], tmp_path / "ft1-trunc")
    shard = sorted(bad.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    cfg = ties(llama_family)
    cfg["models"][0]["model"] = str(bad)
    expect_error(tmp_path, cfg, needle=shard.name, code=1)


def test_corrupt_shard_header(llama_family, tmp_path):
    bad = copy_model(llama_family["ft1"], tmp_path / "ft1-corrupt")
    shard = sorted(bad.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + 10] = b"\x00garbage!\xff"
    shard.write_bytes(bytes(data))
    cfg = ties(llama_family)
    cfg["models"][0]["model"] = str(bad)
    expect_error(tmp_path, cfg, needle=shard.name, code=1)


def test_index_naming_shard_outside_folder(llama_family, tmp_path):
    bad = copy_model(llama_family["ft1"], tmp_path / "ft1-escape")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = ties(llama_family)
    cfg["models"][0]["model"] = str(bad)
    expect_error(tmp_path, cfg, needle="outside", code=1)


def test_out_exists(llama_family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    expect_error(tmp_path, ties(llama_family), needle="--overwrite", code=1)
    assert (out / "keep.txt").read_text() == "precious"


def test_overwrite_replaces_atomically(llama_family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    cfg = tmp_path / "ok.yml"
    cfg.write_text(yaml.safe_dump(ties(llama_family)))
    r = cli(str(cfg), str(out), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("value", [-1, ".nan", ".inf", "sometimes", "true"])
def test_identity_prior_must_be_finite_and_non_negative(llama_family, tmp_path, value):
    f = llama_family
    config = (f"merge_method: task_arithmetic\nbase_model: {f['base']}\nmodels:\n"
              f"  - model: {f['ft1']}\n    transfer: {{method: bico, source_base: {f['base']}, identity_prior: {value}}}\n")
    msg = expect_error(tmp_path, config, needle="models[0].transfer.identity_prior", code=2)
    assert str(f["ft1"]) in msg and "is neither a finite number >= 0 nor 'auto'" in msg
