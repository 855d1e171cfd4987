"""Calibration stage: data loading, batching, losses, model loading, statistics store and cache."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from mergekit_bico.calibration.data import data_fingerprint, load_samples, make_batches
from mergekit_bico.calibration.fisher import compute_fisher
from mergekit_bico.calibration.losses import loss_kind, resolve_loss
from mergekit_bico.calibration.models import checkpoint_names, load_model
from mergekit_bico.calibration.store import StatsStore, default_cache_dir
from mergekit_bico.config import CalibrationConfig
from mergekit_bico.errors import CalibrationError
from tests._tiny import make_tiny_causal_lm, make_tiny_classifier, make_tiny_tokenizer, write_jsonl, write_txt


def cfg_for(data, **kw) -> CalibrationConfig:
    return CalibrationConfig(data=str(data), **kw)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; on a shared busy CPU two threads are ~10x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib_models")
    return {
        "llama": make_tiny_causal_lm(root / "llama", arch="llama"),
        "gpt2": make_tiny_causal_lm(root / "gpt2", arch="gpt2"),
        "bert": make_tiny_classifier(root / "bert", num_labels=3),
    }


# ---------------------------------------------------------------------------------------- data


def test_txt_blank_lines_seeded_shuffle_and_cap(tmp_path):
    path = write_txt(tmp_path / "d.txt", [f"the cat w{i}" for i in range(20)] + ["", "   "])
    rows = load_samples(cfg_for(path, samples=100), need_labels=False)
    assert len(rows) == 20 and all(label is None for _, label in rows)
    a = load_samples(cfg_for(path, samples=5, seed=1), need_labels=False)
    b = load_samples(cfg_for(path, samples=5, seed=1), need_labels=False)
    c = load_samples(cfg_for(path, samples=5, seed=2), need_labels=False)
    assert a == b and a != c and len(a) == 5
    # the first k of a larger selection are the same samples (a prefix of one shuffled order)
    assert load_samples(cfg_for(path, samples=8, seed=1), need_labels=False)[:5] == a


def test_jsonl_fields_and_labels(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": f"w{i} cat", "y": i % 3, "other": 1} for i in range(6)])
    rows = load_samples(cfg_for(path, text_field="body", label_field="y"), need_labels=True)
    assert sorted(rows) == sorted((f"w{i} cat", i % 3) for i in range(6))
    unlabeled = write_jsonl(tmp_path / "u.jsonl", [{"text": "a cat"}, {"text": "a dog", "label": 1}])
    assert sorted(load_samples(cfg_for(unlabeled), need_labels=False)) == [("a cat", None), ("a dog", 1)]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": broken}\n', "line 2: bad JSON"),
        ('{"text": "ok"}\n\n[1, 2]\n', "line 3: expected a JSON object"),
        ('{"txt": "ok"}\n', "line 1: missing text field 'text'"),
        ('{"text": 5}\n', "must be a string"),
        ('{"text": "a", "label": "pos"}\n', "integer class index"),
        ('{"text": "a", "label": 1}\n{"text": "b"}\n', "line 2: missing label field 'label'"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(CalibrationError, match="bad.jsonl") as err:
        load_samples(cfg_for(path), need_labels=True)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        load_samples(cfg_for(tmp_path / "missing.txt"), need_labels=False)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(CalibrationError, match="empty"):
        load_samples(cfg_for(tmp_path / "empty.txt"), need_labels=False)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(CalibrationError, match="unsupported format '.csv'"):
        load_samples(cfg_for(tmp_path / "d.csv"), need_labels=False)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CalibrationError, match="not UTF-8"):
        load_samples(cfg_for(tmp_path / "bin.txt"), need_labels=False)
    (tmp_path / "nodata").mkdir()
    with pytest.raises(CalibrationError, match="without .arrow files"):
        load_samples(cfg_for(tmp_path / "nodata"), need_labels=False)


def test_fewer_samples_than_requested_warns(tmp_path, caplog):
    path = write_txt(tmp_path / "d.txt", ["a cat", "a dog"])
    with caplog.at_level(logging.WARNING):
        rows = load_samples(cfg_for(path, samples=10), need_labels=False)
    assert len(rows) == 2
    assert "fewer than the 10 requested" in caplog.text


def _fake_save_to_disk(folder: Path) -> Path:
    folder.mkdir()
    (folder / "data-00000-of-00001.arrow").write_bytes(b"not really arrow")
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def test_save_to_disk_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    folder = _fake_save_to_disk(tmp_path / "ds")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    with pytest.raises(CalibrationError, match="needs pyarrow: pip install pyarrow"):
        load_samples(cfg_for(folder), need_labels=False)


def test_save_to_disk_folder_read_with_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    folder = tmp_path / "ds"
    folder.mkdir()
    table = pa.table({"text": ["a cat", "a dog", "the mat"], "label": [0, 1, 0]})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    rows = load_samples(cfg_for(folder), need_labels=True)
    assert sorted(rows) == [("a cat", 0), ("a dog", 1), ("the mat", 0)]


def test_data_fingerprint_follows_bytes_not_name(tmp_path):
    a = write_txt(tmp_path / "a.txt", ["a cat", "a dog"])
    b = write_txt(tmp_path / "b.txt", ["a cat", "a dog"])
    c = write_txt(tmp_path / "c.txt", ["a cat", "a dot"])
    assert data_fingerprint(cfg_for(a)) == data_fingerprint(cfg_for(b)) != data_fingerprint(cfg_for(c))


# ------------------------------------------------------------------------------------- batches


def test_make_batches_causal_lm_right_padding_and_order(tmp_path):
    tok = make_tiny_tokenizer()
    samples = [("the cat sat on the mat", None), ("a dog", None), ("hello", None)]
    cfg = cfg_for(tmp_path / "unused.txt", batch_size=2, max_length=4)
    batches = make_batches(samples, tok, cfg, causal_lm=True)
    assert [b["input_ids"].shape for b in batches] == [torch.Size([2, 4]), torch.Size([1, 1])]
    first = batches[0]
    assert first["input_ids"][0].tolist() == tok("the cat sat on")["input_ids"]  # truncated, first sample first
    assert first["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]  # padding on the right
    assert first["labels"][1].tolist() == [tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("dog"), -100, -100]
    assert first["input_ids"][1, 2:].tolist() == [tok.pad_token_id] * 2


def test_make_batches_pad_falls_back_to_eos_and_classification_labels(tmp_path):
    tok = make_tiny_tokenizer(pad_token=None)
    assert tok.pad_token is None
    cfg = cfg_for(tmp_path / "unused.txt", batch_size=4)
    batch = make_batches([("the cat", 1), ("a", 0)], tok, cfg, causal_lm=False)[0]
    assert tok.pad_token == tok.eos_token
    assert batch["input_ids"][1, 1] == tok.eos_token_id and batch["attention_mask"][1, 1] == 0
    assert batch["labels"].tolist() == [1, 0]
    assert "labels" not in make_batches([("the cat", None)], tok, cfg, causal_lm=False)[0]


# -------------------------------------------------------------------------------------- losses


def test_loss_kind_auto_and_explicit(tmp_path):
    cfg = cfg_for("x.txt")
    assert loss_kind(cfg, {"architectures": ["LlamaForCausalLM"]}) == "causal_lm"
    assert loss_kind(cfg, {"architectures": ["GPT2LMHeadModel"]}) == "causal_lm"
    assert loss_kind(cfg, {"architectures": ["BertForSequenceClassification"]}) == "sequence_classification"
    assert loss_kind(cfg_for("x.txt", loss="causal_lm"), {"architectures": ["BertModel"]}) == "causal_lm"
    assert loss_kind(cfg_for("x.txt", loss="pkg.mod:fn"), {}) == "custom"
    with pytest.raises(CalibrationError, match=r"cannot pick a loss for architectures \['BertModel'\]"):
        loss_kind(cfg, {"architectures": ["BertModel"]})


def test_causal_lm_loss_ignores_padding(models, tmp_path):
    cfg = cfg_for(tmp_path / "unused.txt", batch_size=2)
    model, tok = load_model(models["llama"], cfg)
    loss = resolve_loss(cfg, model)
    short, long = "the cat", "the big red dog sat on the small blue mat and was good"
    padded = make_batches([(short, None), (long, None)], tok, cfg, causal_lm=True)[0]
    assert (padded["attention_mask"] == 0).sum() >= 8  # heavy padding
    with torch.no_grad():
        s = make_batches([(short, None)], tok, cfg, causal_lm=True)[0]
        l_ = make_batches([(long, None)], tok, cfg, causal_lm=True)[0]
        n_s, n_l = s["input_ids"].shape[1] - 1, l_["input_ids"].shape[1] - 1
        expected = (loss(model, s) * n_s + loss(model, l_) * n_l) / (n_s + n_l)
        assert torch.allclose(loss(model, padded), expected, atol=1e-5)


def _install_module(monkeypatch, name: str, **attrs) -> None:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)


def test_user_loss_checked_at_call_time(models, tmp_path, monkeypatch):
    def good(model, batch):
        return model(input_ids=batch["input_ids"]).logits.square().mean()

    calls = {"n": 0}

    def nan_on_third(model, batch):
        calls["n"] += 1
        return torch.tensor(float("nan") if calls["n"] == 4 else 1.0)

    _install_module(monkeypatch, "calib_user_losses", good=good, nan_on_third=nan_on_third,
                    vector=lambda m, b: torch.ones(3), notfn=3)
    cfg = cfg_for(tmp_path / "unused.txt", loss="calib_user_losses:good")
    model, tok = load_model(models["llama"], cfg)
    batch = make_batches([("the cat", None)], tok, cfg, causal_lm=True)[0]
    assert resolve_loss(cfg, model)(model, batch).dim() == 0

    nan_loss = resolve_loss(cfg_for("x", loss="calib_user_losses:nan_on_third"), model)
    for _ in range(3):
        nan_loss(model, batch)
    with pytest.raises(CalibrationError, match=r"calibration loss 'calib_user_losses:nan_on_third' returned NaN on batch 3"):
        nan_loss(model, batch)
    with pytest.raises(CalibrationError, match="non-scalar of shape"):
        resolve_loss(cfg_for("x", loss="calib_user_losses:vector"), model)(model, batch)
    with pytest.raises(CalibrationError, match="'calib_user_losses:missing'.*no attribute 'missing'"):
        resolve_loss(cfg_for("x", loss="calib_user_losses:missing"), model)
    with pytest.raises(CalibrationError, match="'calib_user_losses:notfn'.*not callable"):
        resolve_loss(cfg_for("x", loss="calib_user_losses:notfn"), model)
    with pytest.raises(CalibrationError, match="calibration loss 'no_such_pkg_x.mod:fn': cannot import module"):
        resolve_loss(cfg_for("x", loss="no_such_pkg_x.mod:fn"), model)


# -------------------------------------------------------------------------------------- models


def test_load_model_float32_eval_with_grads(models, tmp_path):
    model, tok = load_model(models["bert"], cfg_for(tmp_path / "unused.txt"))
    assert type(model).__name__ == "BertForSequenceClassification"
    assert not model.training and all(not m.training for m in model.modules())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert tok.pad_token == "[PAD]"


def test_load_model_errors(tmp_path):
    cfg = cfg_for(tmp_path / "unused.txt")
    with pytest.raises(CalibrationError, match="is not a folder"):
        load_model(tmp_path / "nope", cfg)
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(CalibrationError, match="has no config.json"):
        load_model(tmp_path / "noconfig", cfg)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(CalibrationError, match="cannot load model .*broken.* as AutoModelForCausalLM") as err:
        load_model(tmp_path / "broken", cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_named_parameters_match_checkpoint_names(tmp_path, arch):
    from mergekit_bico.io.loader import LazyModel

    path = make_tiny_causal_lm(tmp_path / arch, arch=arch, tokenizer=False)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path))
    keys = LazyModel(path).keys()
    mapping = checkpoint_names(model, keys)
    stored = [k for names in mapping.values() for k in names]
    assert sorted(stored) == sorted(keys)  # every checkpoint tensor is a parameter, each stored once


def test_checkpoint_names_legacy_and_tied_layouts(models):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    gpt2 = AutoModelForCausalLM.from_pretrained(str(models["gpt2"]))
    # hub GPT-2 checkpoints lack the "transformer." prefix; some also store the tied lm_head
    hub_keys = [n[len("transformer."):] for n, _ in gpt2.named_parameters()] + ["lm_head.weight"]
    mapping = checkpoint_names(gpt2, hub_keys)
    assert mapping["transformer.wte.weight"] == ["wte.weight", "lm_head.weight"]  # tied: both names present
    assert mapping["transformer.h.0.attn.c_attn.weight"] == ["h.0.attn.c_attn.weight"]
    bert = AutoModelForSequenceClassification.from_pretrained(str(models["bert"]))
    legacy = ["bert.embeddings.LayerNorm.gamma", "bert.embeddings.LayerNorm.beta", "classifier.weight"]
    mapping = checkpoint_names(bert, legacy)
    assert mapping["bert.embeddings.LayerNorm.weight"] == ["bert.embeddings.LayerNorm.gamma"]
    assert mapping["bert.embeddings.LayerNorm.bias"] == ["bert.embeddings.LayerNorm.beta"]
    assert mapping["bert.encoder.layer.0.attention.self.query.weight"] == []


# --------------------------------------------------------------------------------------- store


def test_store_key_save_lookup_open(tmp_path):
    store = StatsStore(tmp_path / "cache")
    key = store.key("fisher", model="m1", data="d1", settings={"a": 1, "b": [1, 2]})
    assert key == store.key("fisher", settings={"b": [1, 2], "a": 1}, data="d1", model="m1")
    assert key != store.key("fisher", model="m1", data="d2", settings={"a": 1, "b": [1, 2]})
    assert key != store.key("covariance", model="m1", data="d1", settings={"a": 1, "b": [1, 2]})
    assert store.lookup("fisher", key) is None
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    path = store.save("fisher", key, tensors, {"model_fingerprint": "fp1", "fisher_norm": "2.5"})
    assert store.lookup("fisher", key) == path
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    stats = store.open(path, model_fingerprint="fp1")
    assert sorted(stats.keys()) == ["b", "w"] and stats.shape("w") == (2, 3)
    assert torch.equal(stats.get("w"), tensors["w"])
    assert stats.metadata["fisher_norm"] == "2.5" and stats.metadata["kind"] == "fisher"
    with pytest.raises(CalibrationError, match="has no tensor 'x'"):
        stats.get("x")
    assert default_cache_dir(tmp_path / "out" / "merged") == (tmp_path / "out" / ".mergekit_bico_cache").resolve()


def test_store_refuses_other_model_and_truncated_file(tmp_path):
    store = StatsStore(tmp_path / "cache")
    key = store.key("fisher", model="m1")
    path = store.save("fisher", key, {"w": torch.randn(64, 64)}, {"model_fingerprint": "a" * 64, "model_path": "/m1"})
    with pytest.raises(CalibrationError, match="belongs to another model"):
        store.open(path, model_fingerprint="b" * 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CalibrationError, match=r"stats file '.*' is truncated"):
        store.open(path, model_fingerprint=None)
    assert store.lookup("fisher", key) is None  # a corrupt cache entry is not reused
    path.write_bytes(data[:20])
    with pytest.raises(CalibrationError, match="truncated or corrupt"):
        store.open(path, model_fingerprint=None)
    path.write_bytes((8).to_bytes(8, "little") + b"not json")
    with pytest.raises(CalibrationError, match="corrupt header"):
        store.open(path, model_fingerprint=None)


def test_store_write_is_atomic(tmp_path, monkeypatch):
    store = StatsStore(tmp_path / "cache")
    key = store.key("fisher", model="m1")
    import safetensors.torch as st

    def killed(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        store.save("fisher", key, {"w": torch.ones(2)}, {"model_fingerprint": "x"})
    assert store.lookup("fisher", key) is None
    assert list((tmp_path / "cache" / "fisher").iterdir()) == []


# -------------------------------------------------------------------------------- Fisher cache


def test_compute_fisher_cache_reuse_and_invalidation(models, tmp_path, caplog):
    data = write_txt(tmp_path / "d.txt", ["the cat sat", "a dog ran to the house", "hello world"])
    store = StatsStore(tmp_path / "cache")
    cfg = cfg_for(data, samples=3, batch_size=2)
    with caplog.at_level(logging.INFO, logger="mergekit_bico"):
        first = compute_fisher(models["llama"], cfg, store=store, progress=False)
        assert "reusing" not in caplog.text
        again = compute_fisher(models["llama"], cfg, store=store, progress=False)
    assert again == first
    assert f"reusing cached Fisher statistics from {first}" in caplog.text
    other_setting = compute_fisher(models["llama"], cfg_for(data, samples=2, batch_size=2), store=store, progress=False)
    assert other_setting != first
    write_txt(data, ["the cat sat", "a dog ran to the house", "hello there"])
    changed = compute_fisher(models["llama"], cfg, store=store, progress=False)
    assert changed not in (first, other_setting)
    from mergekit_bico.io.loader import LazyModel

    fp_llama = LazyModel(models["llama"]).fingerprint()
    assert store.open(changed, model_fingerprint=fp_llama).metadata["model_fingerprint"] == fp_llama
    with pytest.raises(CalibrationError, match="belongs to another model"):
        store.open(changed, model_fingerprint=LazyModel(models["gpt2"]).fingerprint())


def test_corrupt_cache_entry_is_recomputed(models, tmp_path, caplog):
    data = write_txt(tmp_path / "d.txt", ["the cat sat", "a dog"])
    store = StatsStore(tmp_path / "cache")
    cfg = cfg_for(data, samples=2)
    path = compute_fisher(models["llama"], cfg, store=store, progress=False)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # e.g. a copy cut short outside our atomic writer
    with caplog.at_level(logging.INFO, logger="mergekit_bico"):
        again = compute_fisher(models["llama"], cfg, store=store, progress=False)
    assert again == path and "reusing" not in caplog.text and "ignoring unusable cached statistics" in caplog.text
    assert store.open(again, model_fingerprint=None).keys()
