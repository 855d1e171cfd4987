"""Untrusted model folders: what the other tests do not already show.

Covered elsewhere (docs/errors.md points there): a ``.bin`` pickle carrying code is refused through
``weights_only=True`` (test_io.py::test_malicious_pickle_is_refused, and through the CLI in the
catalogue's ``pickle-with-code``); ``../``, absolute and symlink-out index entries
(test_io.py::test_index_refuses_*, catalogue ``index-*``); lying safetensors headers
(test_io.py::test_lying_headers_are_refused, catalogue ``shard-header-lies``); Python YAML tags
(catalogue ``yaml-python-tag``); model code without ``trust_remote_code`` (catalogue ``remote-code``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from mergekit_bico.cli import yaml_main
from mergekit_bico.errors import ModelLoadError
from mergekit_bico.io import LazyModel
from tests._catalogue import EVIL_MODULE, _Evil
from tests._tiny import write_txt


def _remote_code_model(src: Path, dst: Path, marker: Path) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(model_type="evil-llama", architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    return dst


def test_model_code_runs_only_when_the_config_says_so(llama_family, tmp_path):
    marker = tmp_path / "pwned"
    model = _remote_code_model(llama_family["ft1"], tmp_path / "coded", marker)
    data = write_txt(tmp_path / "calib.txt", ["the cat sat", "a dog ran"])

    def run(trust: bool, *flags: str):
        cfg = {"merge_method": "fisher", "parameters": {"fisher_estimator": "empirical"},
               "models": [{"model": str(model)}, {"model": str(llama_family["ft2"])}],
               "calibration": {"data": str(data), "samples": 2, "max_length": 8, "trust_remote_code": trust}}
        path = tmp_path / f"c{trust}.yml"
        path.write_text(yaml.safe_dump(cfg))
        out = tmp_path / f"out-{trust}-{len(flags)}"
        return CliRunner().invoke(yaml_main, [str(path), str(out), "--quiet", *flags]), out

    r, out = run(False, "--trust-remote-code")  # the CLI flag allows nothing
    assert r.exit_code == 1 and "trust_remote_code: true" in r.stderr and not marker.exists() and not out.exists()
    r, out = run(True)
    assert r.exit_code == 0, r.output
    assert marker.read_text() == "model code ran"  # the code was real: refusing it above mattered
    assert (out / "model.safetensors").exists()


def test_bin_index_shard_with_code_is_refused(llama_family, tmp_path):
    from safetensors.torch import load_file

    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(llama_family["ft1"] / "config.json", d / "config.json")
    sd: dict = {}
    for f in sorted(llama_family["ft1"].glob("*.safetensors")):
        sd.update(load_file(str(f)))
    names = sorted(sd)
    marker = tmp_path / "pwned"
    torch.save({k: sd[k] for k in names[:10]}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({**{k: sd[k] for k in names[10:]}, "x": _Evil(str(marker))}, d / "pytorch_model-00002-of-00002.bin")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        **{k: "pytorch_model-00001-of-00002.bin" for k in names[:10]},
        **{k: "pytorch_model-00002-of-00002.bin" for k in names[10:]}}}))
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(llama_family["ft2"]), "parameters": {"weight": 1.0}}, {"model": str(d), "parameters": {"weight": 1.0}}]}))
    r = CliRunner().invoke(yaml_main, [str(cfg), str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 1
    assert "refusing to unpickle 'pytorch_model-00002-of-00002.bin'" in r.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_safetensors_headers_are_checked_before_safetensors_reads(tmp_path, monkeypatch):
    """A lying header never reaches the safetensors library (nor a read of its data)."""
    import safetensors
    import safetensors.torch

    def forbidden(*args, **kwargs):
        raise AssertionError("safetensors was asked to open an unchecked file")

    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    d = tmp_path / "m"
    d.mkdir()
    header = json.dumps({"a": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 4 << 30]}}).encode()
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(ModelLoadError, match=r"is truncated \(header says 4294967296 bytes of data, file has 16"):
        LazyModel(d)


def test_support_files_symlinked_outside_are_not_copied(llama_family, tmp_path):
    """tokenizer.json -> a file elsewhere on this machine: refused before merging; inside the folder or
    a hub cache's blobs/ is fine."""
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    base = tmp_path / "base"
    shutil.copytree(llama_family["base"], base)
    (base / "tokenizer.json").unlink()
    (base / "tokenizer.json").symlink_to(secret)
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": str(llama_family["ft1"]), "parameters": {"weight": 1.0}}]}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    r = CliRunner().invoke(yaml_main, [str(path), str(out), "--quiet"])
    assert r.exit_code == 1 and "'tokenizer.json' is a symlink resolving outside the model folder" in r.stderr
    assert not out.exists()

    # a hub cache snapshot: every file is a symlink into ../../blobs
    repo = tmp_path / "models--x--base"
    snap = repo / "snapshots" / "abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in llama_family["base"].iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    cfg["base_model"] = str(snap)
    path.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(yaml_main, [str(path), str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert (out / "tokenizer.json").read_bytes() == (llama_family["base"] / "tokenizer.json").read_bytes()
    assert not (out / "tokenizer.json").is_symlink()
