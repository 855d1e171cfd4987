"""Fisher statistics (closed forms, per-example semantics) and the Fisher merge (maths, fallback, real check)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_bico.calibration.data import load_samples, make_batches
from mergekit_bico.calibration.fisher import compute_fisher, fisher_diagonal, fisher_norm
from mergekit_bico.calibration.models import load_model
from mergekit_bico.calibration.store import StatsStore
from mergekit_bico.config import CalibrationConfig
from mergekit_bico.errors import CalibrationError, TensorMismatchError
from mergekit_bico.io.loader import LazyModel
from mergekit_bico.methods.fisher import fisher_merge
from tests._tiny import make_tiny_causal_lm, make_tiny_classifier, make_tiny_tokenizer, write_jsonl

TEXTS = [
    "the cat sat on the mat",
    "a dog",
    "hello world model one two three four five",
    "big red house",
    "the small blue dog ran to the green house and sat",
    "yes",
    "no no no",
    "one two",
    "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12",
    "good bad good",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; on a shared busy CPU two threads are ~10x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fisher_models")
    return {
        "llama": make_tiny_causal_lm(root / "llama", arch="llama"),
        "bert": make_tiny_classifier(root / "bert", num_labels=3),
    }


def _cfg(data="unused.txt", **kw) -> CalibrationConfig:
    return CalibrationConfig(data=str(data), **kw)


# ------------------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("estimator", ["expected", "empirical"])
def test_classifier_head_fisher_matches_closed_form(tiny, tmp_path, estimator):
    """For logits = W h + b: d log p_c / dW = (e_c - p) h^T, so per example
    expected: F[k, j] = p_k (1 - p_k) h_j^2 (exact sum over classes); empirical: (y_k - p_k)^2 h_j^2."""
    rows = [{"text": t, "label": i % 3} for i, t in enumerate(TEXTS)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = _cfg(data, samples=len(rows), batch_size=4)
    path = compute_fisher(tiny["bert"], cfg, estimator=estimator, store=StatsStore(tmp_path / "c"), progress=False)
    stats = StatsStore(tmp_path / "c").open(path, model_fingerprint=LazyModel(tiny["bert"]).fingerprint())
    assert set(stats.keys()) == set(LazyModel(tiny["bert"]).keys())

    model, tok = load_model(tiny["bert"], cfg)
    want_w = torch.zeros(3, 32)
    want_b = torch.zeros(3)
    for text, label in load_samples(cfg, need_labels=True):
        with torch.no_grad():
            h = model.bert(**tok(text, return_tensors="pt")).pooler_output[0]
            p = model.classifier(h).softmax(-1)
        coef = p * (1 - p) if estimator == "expected" else (F.one_hot(torch.tensor(label), 3).float() - p) ** 2
        want_w += coef[:, None] * h[None, :] ** 2
        want_b += coef
    n = len(rows)
    torch.testing.assert_close(stats.get("classifier.weight"), want_w / n, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(stats.get("classifier.bias"), want_b / n, rtol=1e-4, atol=1e-9)
    expected_norm = sum(stats.get(k).double().pow(2).sum() for k in stats.keys()) ** 0.5
    assert fisher_norm(stats) == pytest.approx(float(expected_norm), rel=1e-6)
    assert stats.metadata["estimator"] == estimator and stats.metadata["examples"] == str(n)


class SoftmaxLinear(torch.nn.Module):
    """logits = W x + b with fixed features x = mean of a frozen random table over the input ids."""

    def __init__(self, vocab: int = 16, dim: int = 5, classes: int = 3):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("table", torch.randn(vocab, dim, generator=gen))
        self.linear = torch.nn.Linear(dim, classes)

    def features(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids].mean(dim=1)

    def forward(self, input_ids, attention_mask=None):
        return self.linear(self.features(input_ids))


def user_nll(model, batch):
    return F.cross_entropy(model(batch["input_ids"]), batch["labels"])


def test_user_loss_fisher_matches_closed_form():
    """A user loss on a tiny softmax-linear model: empirical Fisher = mean_n (y - p)_k^2 x_j^2."""
    torch.manual_seed(0)
    model = SoftmaxLinear()
    ids = torch.randint(0, 16, (7, 4))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    batches = [{"input_ids": ids[:4], "attention_mask": torch.ones(4, 4, dtype=torch.long), "labels": labels[:4]},
               {"input_ids": ids[4:], "attention_mask": torch.ones(3, 4, dtype=torch.long), "labels": labels[4:]}]
    fisher, n = fisher_diagonal(model, batches, kind="custom", estimator="empirical", loss_fn=user_nll)
    with torch.no_grad():
        x = model.features(ids)
        r2 = (F.one_hot(labels, 3).float() - model.linear(x).softmax(-1)) ** 2
    assert n == 7
    torch.testing.assert_close(fisher["linear.weight"], (r2[:, :, None] * x[:, None, :] ** 2).mean(0), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(fisher["linear.bias"], r2.mean(0), rtol=1e-5, atol=1e-9)
    with pytest.raises(CalibrationError, match="'expected' needs a built-in loss"):
        fisher_diagonal(model, batches, kind="custom", estimator="expected", loss_fn=user_nll)


def _lm_closed_forms(model, tok, texts):
    """lm_head rows: per sequence g = sum_t (p_t - e_{y_t}) h_t^T; empirical F = mean g^2,
    expected F = mean sum_t p_t (1 - p_t) h_t^2 (independent positions, zero-mean terms)."""
    emp = torch.zeros_like(model.lm_head.weight)
    exp = torch.zeros_like(emp)
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        h, p, y = out.hidden_states[-1][0, :-1], out.logits[0, :-1].softmax(-1), ids[0, 1:]
        emp += ((p - F.one_hot(y, p.shape[-1]).float()).T @ h) ** 2
        exp += (p * (1 - p)).T @ h**2
    return emp / len(texts), exp / len(texts)


def test_causal_lm_fisher_closed_forms(tiny):
    cfg = _cfg(batch_size=3)
    model, tok = load_model(tiny["llama"], cfg)
    texts = TEXTS[:4]
    batches = make_batches([(t, None) for t in texts], tok, cfg, causal_lm=True)
    want_emp, want_exp = _lm_closed_forms(model, tok, texts)
    emp, _ = fisher_diagonal(model, batches, kind="causal_lm", estimator="empirical")
    torch.testing.assert_close(emp["lm_head.weight"], want_emp, rtol=1e-4, atol=1e-10)
    # sampled expectation: unbiased; its per-class sums over the hidden dimension concentrate fast
    exp, _ = fisher_diagonal(model, batches, kind="causal_lm", estimator="expected", lm_samples=12, seed=1)
    got = exp["lm_head.weight"]
    assert (got.sum(0) - want_exp.sum(0)).norm() / want_exp.sum(0).norm() < 0.05
    assert got.sum().item() == pytest.approx(want_exp.sum().item(), rel=0.05)
    short = batches[:1]
    once, _ = fisher_diagonal(model, short, kind="causal_lm", estimator="expected", lm_samples=2, seed=1)
    again, _ = fisher_diagonal(model, short, kind="causal_lm", estimator="expected", lm_samples=2, seed=1)
    other, _ = fisher_diagonal(model, short, kind="causal_lm", estimator="expected", lm_samples=2, seed=2)
    assert torch.equal(again["lm_head.weight"], once["lm_head.weight"])  # seeded
    assert not torch.equal(other["lm_head.weight"], once["lm_head.weight"])


# ------------------------------------------------------------------------ per-example semantics


@pytest.mark.parametrize("which, kind, estimator", [
    ("llama", "causal_lm", "expected"),
    ("llama", "causal_lm", "empirical"),
    ("bert", "sequence_classification", "empirical"),
])
def test_fisher_independent_of_batch_size_and_padding(tiny, which, kind, estimator):
    """Batches of 1 carry no padding; batches of 3 and 8 mix lengths 1..12 (heavy padding)."""
    cfg1 = _cfg(batch_size=1)
    model, tok = load_model(tiny[which], cfg1)
    samples = [(t, i % 3) for i, t in enumerate(TEXTS)]
    results = []
    for bs in (1, 3, 8):
        batches = make_batches(samples, tok, _cfg(batch_size=bs), causal_lm=kind == "causal_lm")
        if bs == 8:
            assert (batches[0]["attention_mask"] == 0).float().mean() > 0.4
        fisher, n = fisher_diagonal(model, batches, kind=kind, estimator=estimator, seed=0)
        assert n == len(samples)
        results.append(fisher)
    for other in results[1:]:
        for name, value in results[0].items():
            torch.testing.assert_close(other[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # and it is not the square of a batch-summed gradient
    batch = make_batches(samples, tok, _cfg(batch_size=len(samples)), causal_lm=kind == "causal_lm")[0]
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if kind == "causal_lm":
        from mergekit_bico.calibration.losses import causal_lm_example_losses

        total = causal_lm_example_losses(logits, batch["labels"]).sum()
    else:
        total = F.cross_entropy(logits, batch["labels"], reduction="sum")
    total.backward()
    name = "lm_head.weight" if kind == "causal_lm" else "classifier.weight"
    squared_sum = dict(model.named_parameters())[name].grad ** 2 / len(samples)
    assert not torch.allclose(squared_sum, results[0][name], rtol=0.1)


# --------------------------------------------------------------------------------- the merge


def test_merge_hand_example_and_equal_fishers_are_linear():
    t = [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([4.0, 3.0, 2.0])]
    f = [torch.tensor([1.0, 3.0, 0.0]), torch.tensor([3.0, 1.0, 0.0])]
    out = fisher_merge(t, f, [1.0, 1.0], base=None, floor=0.0, norms=None)
    # [ (0*1+4*3)/4, (1*3+3*1)/4, all-zero Fisher -> plain average ]
    torch.testing.assert_close(out, torch.tensor([3.0, 1.5, 2.0]))
    same = [torch.full((3,), 0.7), torch.full((3,), 0.7)]
    linear = fisher_merge(t, same, [1.0, 3.0], base=None, floor=1e-6, norms=None)
    torch.testing.assert_close(linear, (t[0] * 1 + t[1] * 3) / 4)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-10, 10), min_size=2, max_size=4),
    st.floats(1e-4, 100.0),
    st.integers(0, 10_000),
)
def test_merge_property_equal_fishers_reduce_to_weighted_average(weights_raw, fisher_value, seed):
    weights = [abs(w) + 0.1 for w in weights_raw]
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(4, 3, generator=gen) for _ in weights]
    fishers = [torch.full((4, 3), fisher_value) for _ in weights]
    want = sum(w * x for w, x in zip(weights, tensors)) / sum(weights)
    for norms in (None, [2.0] * len(weights)):
        got = fisher_merge(tensors, fishers, weights, base=None, floor=1e-6, norms=norms)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_merge_zero_fisher_fallback_is_plain_weighted_average():
    a, b = torch.tensor([1.0, 1.0]), torch.tensor([5.0, 5.0])
    zero = torch.zeros(2)
    for floor in (0.0, 1e-6):
        for norms in (None, [1e-3, 10.0]):
            out = fisher_merge([a, b], [zero, zero], [1.0, 3.0], base=None, floor=floor, norms=norms)
            torch.testing.assert_close(out, torch.tensor([4.0, 4.0]))
    # only one model touches element 0: with floor 0 it wins there outright
    out = fisher_merge([a, b], [torch.tensor([2.0, 0.0]), zero], [1.0, 3.0], base=None, floor=0.0, norms=None)
    torch.testing.assert_close(out, torch.tensor([1.0, 4.0]))


def test_merge_normalize_uses_inverse_norms():
    a, b = torch.tensor([0.0]), torch.tensor([1.0])
    fa, fb = torch.tensor([10.0]), torch.tensor([1.0])  # model a's Fisher is 10x larger overall
    plain = fisher_merge([a, b], [fa, fb], [1.0, 1.0], base=None, floor=0.0, norms=None)
    normed = fisher_merge([a, b], [fa, fb], [1.0, 1.0], base=None, floor=0.0, norms=[10.0, 1.0])
    torch.testing.assert_close(plain, torch.tensor([1.0 / 11.0]))
    torch.testing.assert_close(normed, torch.tensor([0.5]))


def test_merge_with_base_is_fisher_weighted_task_arithmetic():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(5, generator=gen)
    deltas = [torch.randn(5, generator=gen) * 0.1 for _ in range(3)]
    fishers = [torch.rand(5, generator=gen) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    fishers[0][0] = fishers[1][0] = fishers[2][0] = 0.0  # element 0: fallback
    out = fisher_merge([base + d for d in deltas], fishers, weights, base=base, floor=1e-3, norms=None)
    precision = [w * (f + 1e-3) for w, f in zip(weights, fishers)]
    want = base + sum(p * d for p, d in zip(precision, deltas)) / sum(precision)
    want[0] = base[0] + sum(w * d[0] for w, d in zip(weights, deltas)) / sum(weights)
    torch.testing.assert_close(out, want)
    # bfloat16 inputs keep their dtype
    out16 = fisher_merge([(base + d).bfloat16() for d in deltas], fishers, weights, base=base.bfloat16(), floor=1e-3, norms=None)
    assert out16.dtype == torch.bfloat16


def test_merge_checks_shapes_and_weights():
    x = torch.zeros(2)
    with pytest.raises(TensorMismatchError, match="Fisher shape"):
        fisher_merge([x, x], [x, torch.zeros(3)], [1.0, 1.0], base=None, floor=0.0, norms=None)
    with pytest.raises(TensorMismatchError, match="2 tensors, 1 Fishers"):
        fisher_merge([x, x], [x], [1.0, 1.0], base=None, floor=0.0, norms=None)
    with pytest.raises(ValueError, match="non-zero sum"):
        fisher_merge([x, x], [x, x], [1.0, -1.0], base=None, floor=0.0, norms=None)
    with pytest.raises(ValueError, match="fisher_floor"):
        fisher_merge([x], [x], [1.0], base=None, floor=-1.0, norms=None)


# ------------------------------------------------------------------------------ the real check


def _task(offset: int, labels: tuple[int, int], n: int, seed: int) -> list[dict]:
    """Label = which of two disjoint keyword groups (w{offset}..+4 / +5..+9) the text contains,
    among filler words w{offset+10}..+19. Task A and task B use disjoint words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randrange(2)
        words = [f"w{offset + 10 + rng.randrange(10)}" for _ in range(5)]
        words.insert(rng.randrange(6), f"w{offset + 5 * y + rng.randrange(5)}")
        rows.append({"text": " ".join(words), "label": labels[y]})
    return rows


def test_fisher_merge_beats_average_on_disjoint_tasks(tmp_path):
    """Two experts fine-tuned from one tiny BERT base on disjoint 2-class tasks (A: words w0-w19,
    classes 0/1; B: words w40-w59, classes 2/3), 4-way shared head.

    Construction: the base's task-word embeddings were trained on SWAPPED labels (a confidently
    wrong start); each expert fine-tunes only the word embeddings until it fits its task. So
    (1) expert A differs from the base only in the rows of A's words, and B's Fisher is exactly
    zero there (those words never occur in B's data), and vice versa; all other tensors are equal.
    The Fisher merge therefore reproduces each expert on its own task. (2) The simple average puts
    each task's rows halfway between the confidently wrong base and the just-fitting expert.
    """
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    tok = make_tiny_tokenizer()
    train_a, train_b = _task(0, (0, 1), 48, 1), _task(40, (2, 3), 48, 2)
    test_a, test_b = _task(0, (0, 1), 64, 3), _task(40, (2, 3), 64, 4)

    def encode(rows):
        enc = tok([r["text"] for r in rows], return_tensors="pt", padding=True)
        return enc["input_ids"], enc["attention_mask"], torch.tensor([r["label"] for r in rows])

    def accuracy(model, rows):
        ids, mask, y = encode(rows)
        with torch.no_grad():
            return (model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == y).float().mean().item()

    def finetune(src, rows, out, *, seed, steps, stop_when_fit):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(str(src))
        for name, p in model.named_parameters():
            p.requires_grad_(name == "bert.embeddings.word_embeddings.weight")
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)  # no weight decay
        ids, mask, y = encode(rows)
        model.eval()  # dropout is off in the tiny models anyway
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask).logits
            if stop_when_fit and bool((logits.argmax(-1) == y).all()):
                break  # the current weights fit every training example
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        return out

    init = make_tiny_classifier(tmp_path / "init", num_labels=4, seed=0, initializer_range=0.2)
    swapped = [dict(r, label={0: 1, 1: 0, 2: 3, 3: 2}[r["label"]]) for r in train_a + train_b]
    base = finetune(init, swapped, tmp_path / "base", seed=0, steps=40, stop_when_fit=False)
    expert_a = finetune(base, train_a, tmp_path / "ea", seed=1, steps=200, stop_when_fit=True)
    expert_b = finetune(base, train_b, tmp_path / "eb", seed=2, steps=200, stop_when_fit=True)

    store = StatsStore(tmp_path / "cache")
    stats = []
    for expert, rows, name in ((expert_a, train_a, "a"), (expert_b, train_b, "b")):
        cfg = CalibrationConfig(data=str(write_jsonl(tmp_path / f"{name}.jsonl", rows)), samples=48)
        path = compute_fisher(expert, cfg, store=store, progress=False)
        stats.append(store.open(path, model_fingerprint=LazyModel(expert).fingerprint()))
    lazy = [LazyModel(expert_a), LazyModel(expert_b)]

    emb = "bert.embeddings.word_embeddings.weight"
    vocab = tok.get_vocab()
    rows_a = [vocab[f"w{i}"] for i in range(20)]
    rows_b = [vocab[f"w{i}"] for i in range(40, 60)]
    assert stats[1].get(emb)[rows_a].abs().max() == 0 and stats[0].get(emb)[rows_b].abs().max() == 0
    assert stats[0].get(emb)[rows_a].sum() > 0 and stats[1].get(emb)[rows_b].sum() > 0

    def merged(method: str, floor: float = 1e-6):
        model = AutoModelForSequenceClassification.from_pretrained(str(base))
        state = {}
        for name in lazy[0].keys():  # streamed: one tensor (and its Fishers) at a time
            tensors = [m.get(name) for m in lazy]
            if method == "average":
                state[name] = (tensors[0] + tensors[1]) / 2
            else:
                fishers = [s.get(name) for s in stats]
                state[name] = fisher_merge(tensors, fishers, [1.0, 1.0], base=None, floor=floor,
                                           norms=[fisher_norm(s) for s in stats])
        model.load_state_dict(state, strict=False)
        return model.eval()

    models = {
        "a": AutoModelForSequenceClassification.from_pretrained(str(expert_a)).eval(),
        "b": AutoModelForSequenceClassification.from_pretrained(str(expert_b)).eval(),
        "average": merged("average"),
        "fisher": merged("fisher"),
        "fisher_floor0": merged("fisher", floor=0.0),
    }
    acc = {k: (accuracy(m, test_a), accuracy(m, test_b)) for k, m in models.items()}
    joint = {k: (a + b) / 2 for k, (a, b) in acc.items()}
    assert acc["a"][0] >= 0.7 and acc["b"][1] >= 0.7, acc  # the experts learned their tasks
    # (1) with floor 0 the Fisher merge IS each expert on its own task's rows
    assert acc["fisher_floor0"][0] == acc["a"][0] and acc["fisher_floor0"][1] == acc["b"][1], acc
    # (2) a clear margin over the plain average, also with the default floor
    assert joint["fisher_floor0"] >= joint["average"] + 0.15, acc
    assert joint["fisher"] >= joint["average"] + 0.1, acc


# ------------------------------------------------------------------------- public entry points


def lm_user_loss(model, batch):
    """A user loss: mean next-token NLL (what causal_lm computes), for the user-function path."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def test_compute_fisher_user_loss_equals_builtin_empirical(tiny, tmp_path):
    import sys
    import types

    module = types.ModuleType("fisher_test_user_loss")
    module.nll = lm_user_loss
    sys.modules["fisher_test_user_loss"] = module
    try:
        data = tmp_path / "d.txt"
        data.write_text("the cat sat on the mat\na dog ran to the house\nbig red dog was good yes\none two three four five w1\n")
        store = StatsStore(tmp_path / "c")
        builtin = store.open(compute_fisher(tiny["llama"], _cfg(data, samples=4), estimator="empirical",
                                            store=store, progress=False), model_fingerprint=None)
        user_cfg = _cfg(data, samples=4, loss="fisher_test_user_loss:nll")
        user = store.open(compute_fisher(tiny["llama"], user_cfg, estimator="empirical", store=store, progress=False),
                          model_fingerprint=None)
        assert user.metadata["loss_kind"] == "custom" and builtin.metadata["loss_kind"] == "causal_lm"
        assert set(user.keys()) == set(builtin.keys())
        with pytest.raises(CalibrationError, match="'expected' needs a built-in loss"):
            compute_fisher(tiny["llama"], user_cfg, estimator="expected", store=store, progress=False)
    finally:
        del sys.modules["fisher_test_user_loss"]
    # the user loss is the per-token MEAN, the built-in example loss the per-sequence SUM: all four
    # sequences have 6 tokens (5 targets), so the user Fisher is the built-in one / 5^2
    for name in builtin.keys():
        torch.testing.assert_close(user.get(name) * 25, builtin.get(name), rtol=1e-4, atol=1e-8, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_argument_matches_cpu(tiny, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    cpu = StatsStore(tmp_path / "cpu")
    gpu = StatsStore(tmp_path / "gpu")
    a = cpu.open(compute_fisher(tiny["llama"], _cfg(data), store=cpu, progress=False), model_fingerprint=None)
    b = gpu.open(compute_fisher(tiny["llama"], _cfg(data), device="cuda", store=gpu, progress=False), model_fingerprint=None)
    for name in a.keys():
        torch.testing.assert_close(b.get(name), a.get(name), rtol=1e-3, atol=1e-7)
