"""Tests for mergekit_bico.io: LazyModel, ShardedWriter, atomic output folder."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_bico.errors import ConfigError, ModelLoadError, OutputError, TensorMismatchError
from mergekit_bico.io import (
    LazyModel,
    ShardedWriter,
    atomic_output_dir,
    check_output_dir,
    cleanup_stale_partials,
    copy_support_files,
    parse_size,
)

# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama saved as: single safetensors, sharded safetensors, .bin, .bin index."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("tiny")
    single, sharded = root / "single", root / "sharded"
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert (single / "model.safetensors").is_file()
    assert (sharded / "model.safetensors.index.json").is_file()

    binary = root / "bin"
    binary.mkdir()
    shutil.copy(single / "config.json", binary / "config.json")
    torch.save(sd, binary / "pytorch_model.bin")

    bin_index = root / "bin_index"
    bin_index.mkdir()
    shutil.copy(single / "config.json", bin_index / "config.json")
    names = list(sd)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        fname = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, bin_index / fname)
        weight_map.update({k: fname for k in part})
    (bin_index / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    return {"sd": sd, "single": single, "sharded": sharded, "bin": binary, "bin_index": bin_index}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _write_st(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize(
    "layout, expected",
    [
        ("single", "safetensors"),
        ("sharded", "safetensors-index"),
        ("bin", "bin"),
        ("bin_index", "bin-index"),
    ],
)
def test_round_trip_every_layout(tiny, layout, expected):
    sd = tiny["sd"]
    with LazyModel(tiny[layout]) as m:
        assert m.layout == expected
        assert sorted(m.keys()) == sorted(sd)
        for name, ref in sd.items():
            assert name in m
            assert m.shape(name) == tuple(ref.shape)
            assert m.dtype(name) == ref.dtype
            assert m.nbytes(name) == ref.numel() * ref.element_size()
            got = m.get(name)
            assert got.dtype == ref.dtype and torch.equal(got, ref), name
        assert "nope" not in m
        assert m.config_dict()["hidden_size"] == 32


def test_key_order_is_index_and_file_order(tiny):
    m = LazyModel(tiny["sharded"])
    index = json.loads((tiny["sharded"] / "model.safetensors.index.json").read_text())
    assert m.keys() == list(index["weight_map"])
    assert len(m.files()) == 3
    single = LazyModel(tiny["single"])
    offsets = [single._info[k].begin for k in single.keys()]
    assert offsets == sorted(offsets)


def test_get_converts_and_returns_owned_tensor(tiny):
    m = LazyModel(tiny["single"])
    name = "model.layers.0.mlp.up_proj.weight"
    ref = tiny["sd"][name]
    half = m.get(name, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, ref.to(torch.bfloat16))
    a = m.get(name)
    a.add_(1000.0)  # in-place edit by one consumer must not leak into the next read
    assert torch.equal(m.get(name), ref)
    b = LazyModel(tiny["bin"]).get(name)
    b.zero_()
    assert torch.equal(LazyModel(tiny["bin"]).get(name), ref)


def test_indexless_shards_accepted_only_when_complete(tiny, tmp_path):
    m_dir = _copy(tiny["sharded"], tmp_path / "noindex")
    (m_dir / "model.safetensors.index.json").unlink()
    m = LazyModel(m_dir)
    assert m.layout == "safetensors-shards"
    assert sorted(m.keys()) == sorted(tiny["sd"])
    for name in m.keys():
        assert torch.equal(m.get(name), tiny["sd"][name])
    _shards(m_dir)[1].unlink()  # incomplete set -> not a model folder
    with pytest.raises(ModelLoadError, match="is not a directory of weights"):
        LazyModel(m_dir)


def test_unknown_tensor_and_bad_paths(tiny, tmp_path):
    m = LazyModel(tiny["single"])
    with pytest.raises(TensorMismatchError, match=r"has no tensor 'missing\.weight'"):
        m.shape("missing.weight")
    with pytest.raises(TensorMismatchError, match="missing.weight"):
        m.get("missing.weight")
    with pytest.raises(ModelLoadError, match=r"model path '.*nowhere' does not exist"):
        LazyModel(tmp_path / "nowhere")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="is not a directory"):
        LazyModel(tmp_path / "f.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ModelLoadError,
        match=r"is not a directory of weights \(no model.safetensors, model.safetensors.index.json, pytorch_model.bin",
    ):
        LazyModel(tmp_path / "empty")


def test_config_dict_absent_and_malformed(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))
    assert LazyModel(d).config_dict() == {}
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        LazyModel(d).config_dict()


# ------------------------------------------------------- corrupt safetensors

GOOD_A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "header, data, pattern",
    [
        (  # offsets span does not match shape x dtype
            {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            bytes(8),
            r"tensor 'a': data_offsets \[0, 8\] span 8 bytes but shape \[3\] x F32 needs 12",
        ),
        (  # overlap
            {"a": GOOD_A, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            bytes(12),
            r"tensors 'a' and 'b' overlap",
        ),
        (  # out of range: b ends past the data section
            {"a": GOOD_A, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
            bytes(8),
            r"is truncated \(header says 16 bytes of data, file has 8; tensor 'b'",
        ),
        (  # gap
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            bytes(12),
            r"header offsets lie: gap of 4 bytes before tensor 'a'",
        ),
        (  # trailing bytes
            {"a": GOOD_A},
            bytes(12),
            r"has 4 bytes after the last tensor",
        ),
        (
            {"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}},
            bytes(8),
            r"tensor 'a': unknown or unsupported dtype 'Q7'",
        ),
        (
            {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
            bytes(8),
            r"tensor 'a': invalid shape",
        ),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
            bytes(8),
            r"tensor 'a': invalid data_offsets",
        ),
        (
            {"__metadata__": {"format": 1}, "a": GOOD_A},
            bytes(8),
            r"'__metadata__' is not str -> str",
        ),
    ],
    ids=["size-mismatch", "overlap", "out-of-range", "gap", "trailing", "dtype", "shape", "offsets", "meta"],
)
def test_lying_headers_are_refused(tmp_path, header, data, pattern):
    d = tmp_path / "m"
    d.mkdir()
    _write_st(d / "model.safetensors", header, data)
    with pytest.raises(ModelLoadError, match=pattern) as ei:
        LazyModel(d)
    msg = str(ei.value)
    assert "\n" not in msg and "shard 'model.safetensors'" in msg and str(d) in msg


def test_corrupt_header_json_and_bad_length(tiny, tmp_path):
    d = _copy(tiny["single"], tmp_path / "m")
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:20] = b"#garbage####"
    f.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match=r"shard 'model.safetensors' has a corrupt header \(not valid JSON"):
        LazyModel(d)
    f.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ModelLoadError, match="header length says 1099511627776 bytes"):
        LazyModel(d)
    f.write_bytes(b"abc")
    with pytest.raises(ModelLoadError, match=r"is truncated \(3 bytes"):
        LazyModel(d)


def test_truncated_shard(tiny, tmp_path):
    d = _copy(tiny["sharded"], tmp_path / "m")
    shard = _shards(d)[1]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(
        ModelLoadError,
        match=rf"shard '{shard.name}' is truncated \(header says \d+ bytes of data, file has \d+; tensor '",
    ):
        LazyModel(d)


def test_shard_changed_after_indexing(tiny, tmp_path):
    d = _copy(tiny["single"], tmp_path / "m")
    m = LazyModel(d)
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ModelLoadError, match="changed on disk since it was indexed"):
        m.get(m.keys()[0])


# --------------------------------------------------------------- index paths


def _with_index_entry(tiny, tmp_path, shard_name: str) -> Path:
    d = _copy(tiny["sharded"], tmp_path / "m")
    idx = d / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = shard_name
    idx.write_text(json.dumps(data))
    return d


def test_index_refuses_parent_dir(tiny, tmp_path):
    outside = tmp_path / "x.safetensors"
    save_file({"lm_head.weight": torch.zeros(1)}, str(outside))
    d = _with_index_entry(tiny, tmp_path, "../x.safetensors")
    with pytest.raises(
        ModelLoadError,
        match=r"index 'model.safetensors.index.json' names shard '\.\./x\.safetensors' outside the model folder",
    ):
        LazyModel(d)


def test_index_refuses_absolute_path(tiny, tmp_path):
    outside = tmp_path / "abs.safetensors"
    save_file({"lm_head.weight": torch.zeros(1)}, str(outside))
    d = _with_index_entry(tiny, tmp_path, str(outside))
    with pytest.raises(ModelLoadError, match="with an absolute path"):
        LazyModel(d)


def test_index_refuses_symlink_outside(tiny, tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_file({"lm_head.weight": torch.zeros(1)}, str(outside))
    d = _with_index_entry(tiny, tmp_path, "link.safetensors")
    (d / "link.safetensors").symlink_to(outside)
    with pytest.raises(ModelLoadError, match=r"shard 'link.safetensors', which is a symlink resolving outside"):
        LazyModel(d)


def test_symlink_inside_folder_and_hub_cache_ok(tiny, tmp_path):
    # a hub-cache-like snapshot: files are symlinks into ../../blobs
    repo = tmp_path / "models--x--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in tiny["sharded"].iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    m = LazyModel(snap)
    name = "model.embed_tokens.weight"
    assert torch.equal(m.get(name), tiny["sd"][name])


def test_index_missing_shard_and_tensor(tiny, tmp_path):
    d = _with_index_entry(tiny, tmp_path, "model-00009-of-00009.safetensors")
    with pytest.raises(ModelLoadError, match=r"names shard 'model-00009-of-00009.safetensors', which is missing"):
        LazyModel(d)
    d2 = _copy(tiny["sharded"], tmp_path / "m2")
    idx = d2 / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["ghost.weight"] = _shards(d2)[0].name
    idx.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=r"says tensor 'ghost.weight' is in shard .* no such tensor"):
        LazyModel(d2)
    idx.write_text("{broken")
    with pytest.raises(ModelLoadError, match="index 'model.safetensors.index.json' is not valid JSON"):
        LazyModel(d2)


# ---------------------------------------------------------------- pickles


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates a file if ever unpickled


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused(tmp_path, zipfile):
    d = tmp_path / "m"
    d.mkdir()
    marker = tmp_path / "pwned"
    torch.save(
        {"w": torch.zeros(2), "x": _Evil(str(marker))},
        d / "pytorch_model.bin",
        _use_new_zipfile_serialization=zipfile,
    )
    m = LazyModel(d)
    with pytest.raises(
        ModelLoadError, match=r"refusing to unpickle 'pytorch_model.bin': not a plain tensor file"
    ) as ei:
        m.keys()
    assert "\n" not in str(ei.value)
    assert not marker.exists()


def test_legacy_bin_without_mmap_and_corrupt_bin(tiny, tmp_path):
    d = tmp_path / "legacy"
    d.mkdir()
    torch.save(tiny["sd"], d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    m = LazyModel(d)
    for name, ref in tiny["sd"].items():
        assert torch.equal(m.get(name), ref)
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match="pytorch_model.bin"):
        LazyModel(d).keys()
    torch.save([torch.zeros(1)], d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="is not a state dict"):
        LazyModel(d).keys()


def test_bin_index_lying_about_tensor(tiny, tmp_path):
    d = _copy(tiny["bin_index"], tmp_path / "m")
    idx = d / "pytorch_model.bin.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["ghost.weight"] = "pytorch_model-00001-of-00002.bin"
    idx.write_text(json.dumps(data))
    m = LazyModel(d)
    assert "ghost.weight" in m  # the index is trusted for names until the shard is read
    with pytest.raises(ModelLoadError, match=r"says tensor 'ghost.weight' is in shard 'pytorch_model-00001"):
        m.shape("ghost.weight")
    data["weight_map"]["ghost.weight"] = "../evil.bin"
    idx.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=r"names shard '\.\./evil.bin' outside the model folder"):
        LazyModel(d)


# ------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_sensitive(tiny, tmp_path):
    d = _copy(tiny["sharded"], tmp_path / "m")
    fp = LazyModel(d).fingerprint()
    assert fp == LazyModel(d).fingerprint() == LazyModel(tiny["sharded"]).fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    # rewrite one shard with the same shapes / header but different values
    shard = _shards(d)[0]
    tensors = load_file(str(shard))
    save_file({k: v + 1 for k, v in tensors.items()}, str(shard), metadata={"format": "pt"})
    fp2 = LazyModel(d).fingerprint()
    assert fp2 != fp
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert LazyModel(d).fingerprint() == fp  # content-based: restoring restores the digest
    (d / "config.json").write_text("{}")
    assert LazyModel(d).fingerprint() != fp
    assert LazyModel(tiny["bin"]).fingerprint() != LazyModel(tiny["bin_index"]).fingerprint()


# ----------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5G", 5 << 30),
        ("500M", 500 << 20),
        ("1.5G", 3 << 29),
        ("100K", 100 << 10),
        ("123", 123),
        ("123B", 123),
        ("2GB", 2 << 30),
        ("2GiB", 2 << 30),
        ("3 mib", 3 << 20),
        ("1T", 1 << 40),
        (" 7kb ", 7 << 10),
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "5X", "-1", "1.5", "G", "5iB", "1e9", "5 G B", True, None, -3])
def test_parse_size_garbage(text):
    with pytest.raises(ConfigError, match="invalid size"):
        parse_size(text)


# ------------------------------------------------------------------ writer


def test_writer_shards_respected_and_loadable(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    sd = tiny["sd"]
    limit = 20_000
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        w = ShardedWriter(tmp, limit, metadata={"mergekit_bico": "test"})
        for name, t in sd.items():
            w.add(name, t)
        weight_map = w.finish()
        copied = copy_support_files(tiny["sharded"], tmp)
    assert "config.json" in copied and "generation_config.json" in copied
    assert sorted(weight_map) == sorted(sd)
    shards = _shards(out)
    n = len(shards)
    assert n > 2 and [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not list(out.glob(".*"))  # no temp files left
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    total = sum(t.numel() * t.element_size() for t in sd.values())
    assert index["metadata"]["total_size"] == total
    for shard in shards:
        tensors = load_file(str(shard))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= limit or len(tensors) == 1
    biggest = max(t.numel() * t.element_size() for t in sd.values())
    assert w.peak_buffered_bytes <= max(limit, biggest)
    assert w.bytes_written == sum(s.stat().st_size for s in shards)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    got = loaded.state_dict()
    for name, ref in sd.items():
        assert torch.equal(got[name], ref), name
    m = LazyModel(out)
    assert m.layout == "safetensors-index"
    from safetensors import safe_open

    with safe_open(str(shards[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "mergekit_bico": "test"}


def test_writer_single_file_views_and_errors(tmp_path):
    base = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    w = ShardedWriter(tmp_path, 1 << 20)
    w.add("t", base.t())  # non-contiguous
    w.add("row", base[3])  # view into a bigger buffer
    w.add("a", base)
    w.add("alias", base)  # same storage under a second name
    w.add("half", torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(OutputError, match="output tensor 'a' was written twice"):
        w.add("a", torch.zeros(1))
    base.zero_()  # views / aliases were copied at add(), so they keep the values they had
    weight_map = w.finish()
    assert set(weight_map.values()) == {"model.safetensors"}
    assert not (tmp_path / "model.safetensors.index.json").exists()
    out = load_file(str(tmp_path / "model.safetensors"))
    ref = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    assert torch.equal(out["t"], ref.t()) and torch.equal(out["row"], ref[3])
    assert torch.equal(out["alias"], ref)  # cloned because it shares storage with 'a'
    assert out["half"].dtype == torch.bfloat16
    with pytest.raises(OutputError, match="finished"):
        w.add("late", torch.zeros(1))
    with pytest.raises(ConfigError):
        ShardedWriter(tmp_path, 0)


def test_writer_big_tensor_gets_own_shard(tmp_path):
    w = ShardedWriter(tmp_path, 100)
    w.add("small1", torch.zeros(10))  # 40 B
    w.add("big", torch.zeros(100))  # 400 B > limit
    w.add("small2", torch.zeros(10))
    w.add("small3", torch.zeros(10))
    wm = w.finish()
    assert wm == {
        "big": "model-00002-of-00003.safetensors",
        "small1": "model-00001-of-00003.safetensors",
        "small2": "model-00003-of-00003.safetensors",
        "small3": "model-00003-of-00003.safetensors",
    }


def test_writer_write_errors_are_one_line(tmp_path, monkeypatch):
    import safetensors.torch as st

    d = tmp_path / "w"
    d.mkdir()
    w = ShardedWriter(d, 16)
    w.add("a", torch.zeros(4))
    shutil.rmtree(d)  # the folder vanished under us
    with pytest.raises(OutputError, match=r"cannot write output folder '.*w': No such file or directory$"):
        w.add("b", torch.zeros(4))  # flushes 'a'

    def full_disk(*args, **kwargs):
        raise RuntimeError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')

    d.mkdir()
    monkeypatch.setattr(st, "save_file", full_disk)
    w = ShardedWriter(d, 1 << 20)
    w.add("a", torch.zeros(4))
    with pytest.raises(OutputError, match=r"cannot write output folder '.*w': No space left on device$"):
        w.finish()
    assert list(d.iterdir()) == []


# ----------------------------------------------------------- output folder


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_atomic_success_and_empty_existing(tmp_path):
    out = tmp_path / "a" / "b" / "out"  # parents are created
    with atomic_output_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".out.partial-")
        assert not out.exists()
        (tmp / "f").write_text("x")
    assert (out / "f").read_text() == "x"
    assert _leftovers(out.parent, "out") == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(empty) as tmp:
        (tmp / "g").write_text("y")
    assert (empty / "g").read_text() == "y"


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_atomic_exception_leaves_nothing(tmp_path, exc):
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        with atomic_output_dir(out) as tmp:
            (tmp / "f").write_text("x")
            raise exc
    assert not out.exists()
    assert _leftovers(tmp_path, "out") == []


def test_atomic_refuses_nonempty_before_work(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("keep")
    ran = []
    with pytest.raises(
        OutputError, match=r"output folder '.*out' exists and is not empty; pass --overwrite to replace it"
    ):
        with atomic_output_dir(out):
            ran.append(1)
    assert ran == [] and (out / "old").read_text() == "keep"
    with pytest.raises(OutputError, match="exists and is not empty"):
        check_output_dir(out, overwrite=False)
    check_output_dir(out, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)
    with pytest.raises(OutputError, match="is not a directory"):
        check_output_dir(tmp_path / "file" / "sub", overwrite=False)
    with pytest.raises(OutputError, match="would contain or replace input"):
        check_output_dir(tmp_path, overwrite=True, protected=[out])


def test_atomic_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert _leftovers(tmp_path, "out") == []
    # a failed overwrite keeps the old content
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            raise RuntimeError("x")
    assert (out / "new").read_text() == "new"


def test_atomic_oserror_becomes_output_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"cannot write output folder '.*out': No space left on device$"):
        with atomic_output_dir(out):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert not out.exists() and _leftovers(tmp_path, "out") == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_cleanup_stale_partials(tmp_path):
    out = tmp_path / "out"
    dead = _dead_pid()
    stale = tmp_path / f".out.partial-{dead}-deadbeef"
    mine = tmp_path / f".out.partial-{os.getpid()}-cafe1234"
    other = tmp_path / f".other.partial-{dead}-deadbeef"
    for p in (stale, mine, other):
        p.mkdir()
        (p / "x").write_text("x")
    assert cleanup_stale_partials(out) == [stale]
    assert not stale.exists() and mine.exists() and other.exists()
    # an interrupted overwrite (old moved aside, new not yet in) is restored
    old = tmp_path / f".out.old-{dead}-0badf00d"
    old.mkdir()
    (old / "model").write_text("old")
    cleanup_stale_partials(out)
    assert (out / "model").read_text() == "old" and not old.exists()


def test_copy_support_files(tmp_path):
    base, tok, out = tmp_path / "base", tmp_path / "tok", tmp_path / "out"
    for d in (base, tok, out):
        d.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "README.md"):
        (base / name).write_text(f"base {name}")
    for name in ("tokenizer.json", "tokenizer_config.json", "merges.txt", "chat_template.jinja"):
        (tok / name).write_text(f"tok {name}")
    assert copy_support_files(base, out) == ["config.json", "generation_config.json", "tokenizer.json"]
    shutil.rmtree(out)
    out.mkdir()
    copied = copy_support_files(base, out, tokenizer_source=tok)
    assert copied == [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "merges.txt",
        "chat_template.jinja",
    ]
    assert (out / "tokenizer.json").read_text() == "tok tokenizer.json"
    assert not (out / "README.md").exists()
    with pytest.raises(ModelLoadError, match="does not exist"):
        copy_support_files(tmp_path / "nope", out)
