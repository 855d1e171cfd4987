"""Known-answer tests of BiCo on real architectures.

The target B is built from a tiny random source base A by a *function-preserving*
reparametrisation (tests/_reparam.py); A is fine-tuned a few Adam steps into A'. Transferring
A' - A onto B with ``prepare_transfer`` and adding the deltas must reproduce A''s logits on
held-out inputs (max relative error <= 1e-4), while ``naive`` is far off (or refuses).

Why it is exact: with ``x_B = P^T x_A`` for every linear input and ``g_B = Q^T g_A`` for every output
gradient (P, Q (semi-)orthogonal), ``C_in = X_A^T X_A P`` and the Procrustes polar factor of
``M P`` is ``P`` as soon as ``M = X_A^T X_A`` is positive definite, i.e. the condition is:
**the source-side calibration rows of every space have full column rank d_A** (at least d_A
tokens in general position; here ~900 tokens for widths <= 64). Spaces that LayerNorm confines to
the complement of the ones vector (GPT-2) have rank d_A - 1; the missing direction is the one
every LayerNorm ignores, so any completion is exact (ours keeps it: closest to identity).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from mergekit_bico.config import CalibrationConfig, TransferConfig
from mergekit_bico.errors import TransferError
from mergekit_bico.transfer import prepare_transfer
from tests import _reparam as rp
from tests._tiny import WORDS, make_tiny_causal_lm, make_tiny_tokenizer, write_txt

TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# helpers


def _calibration(root: Path, samples: int = 48) -> CalibrationConfig:
    rng = random.Random(0)
    vocab = WORDS + [f"w{i}" for i in range(60)]
    lines = [" ".join(rng.choice(vocab) for _ in range(rng.randint(16, 24))) for _ in range(samples)]
    path = write_txt(root / "calib.txt", lines)
    return CalibrationConfig(data=str(path), samples=samples, max_length=32, batch_size=8)


def _finetune(src: Path, dst: Path, *, steps: int = 6, lr: float = 3e-3, seed: int = 0, freeze: tuple[str, ...] = ()) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    model.train()
    params = [p for n, p in model.named_parameters() if not any(f in n for f in freeze)]
    for n, p in model.named_parameters():
        p.requires_grad_(not any(f in n for f in freeze))
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(7, 128, (8, 20), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dst), max_shard_size="40KB", safe_serialization=True)
    make_tiny_tokenizer(dst)
    return dst


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.to(torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _held_out() -> torch.Tensor:
    return torch.randint(7, 128, (4, 24), generator=torch.Generator().manual_seed(123))


def _transfer(root: Path, a: Path, ft: Path, b: Path, calib, **cfg):
    tcfg = TransferConfig(source_base=str(a), **cfg)
    return prepare_transfer(cfg=tcfg, source_finetuned=ft, target_base=b, calibration=calib,
                            cache_dir=root / "cache", progress=False)


def _error(prepared, b: Path, ft: Path) -> float:
    model, applied = rp.apply_deltas(b, prepared)
    assert applied > 0
    ids = _held_out()
    return _rel(_logits(model, ids), _logits(rp.load_causal_lm(ft), ids))


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("ka-llama")
    a = make_tiny_causal_lm(root / "A", arch="llama", seed=0)
    ft = _finetune(a, root / "A_ft", seed=1)
    ids = _held_out()
    change = _rel(_logits(rp.load_causal_lm(ft), ids), _logits(rp.load_causal_lm(a), ids))
    assert change > 0.05, f"the fine-tune barely changes the model ({change})"
    return root, a, ft, _calibration(root)


def _check_full_rank(prepared, allow_deficit: int = 0) -> None:
    rep = prepared.report()
    for row in rep["spaces"]:
        assert row["rank"] >= min(row["d_source"], row["d_target"]) - allow_deficit, row
        assert row["residual"] is not None and row["residual"] < 1e-4, row


# ---------------------------------------------------------------------------------------------
# 1. rotation + head / neuron permutations (Llama)


@pytest.fixture(scope="module")
def llama_rotated(llama_pair) -> Path:
    """B: norms folded, residual rotated, heads permuted (whole heads: RoPE), value heads rotated,
    MLP neurons permuted."""
    root, a, ft, calib = llama_pair
    sd, config = rp.state_dict64(a)
    gen = torch.Generator().manual_seed(7)
    sd = rp.llama_fold_norms(sd)
    sd, config = rp.llama_embed_residual(sd, config, rp.random_orthogonal(32, gen))
    for layer in range(2):
        sd = rp.llama_permute_heads(sd, config, layer, kv_perm=[1, 0], q_perms=[[1, 0], [0, 1]])
        sd = rp.llama_rotate_values(sd, config, layer, [rp.random_orthogonal(8, gen) for _ in range(2)])
        sd = rp.llama_permute_mlp(sd, layer, torch.randperm(64, generator=gen))
    b = rp.save_causal_lm(config, sd, root / "B_rot")
    ids = _held_out()
    assert _rel(_logits(rp.load_causal_lm(b), ids), _logits(rp.load_causal_lm(a), ids)) < 1e-5  # B == A
    return b


def test_llama_rotation_and_permutations(llama_pair, llama_rotated):
    root, a, ft, calib = llama_pair
    b = llama_rotated
    prepared = _transfer(root, a, ft, b, calib)
    _check_full_rank(prepared)
    err = _error(prepared, b, ft)
    assert err <= TOL, err
    rep = prepared.report()
    assert rep["layer_map"] == [0, 1]
    assert rep["untransferred"] == []
    assert rep["rules"]["norm (folded into consumers: zero delta)"]
    assert rep["timings"]["statistics_s"] > 0 and rep["timings"]["maps_s"] > 0
    assert rep["memory"]["peak_rss_bytes"] > 0

    naive = _transfer(root, a, ft, b, calib, method="naive")
    assert _error(naive, b, ft) > 100 * TOL

    # tie_maps (GQA: q/k and v/o_in differ in size, so only the MLP's gate/up/down are tied): exact
    tied = _transfer(root, a, ft, b, calib, tie_maps=True)
    assert {r.get("tied") for r in tied.report()["spaces"]} == {None, "gate_out+up_out+down_in"}
    assert _error(tied, b, ft) <= TOL

    # the cache: a second preparation reuses the maps (no statistics pass) and gives the same deltas
    again = _transfer(root, a, ft, b, calib)
    assert again.report()["cache"]["hit"] is True
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(again.delta(name), prepared.delta(name))


def test_llama_memory_budget_splits_passes(llama_pair, llama_rotated, tmp_path):
    """A budget smaller than all statistics splits the blocks over passes, same maps."""
    root, a, ft, calib = llama_pair
    b = llama_rotated
    one = prepare_transfer(cfg=TransferConfig(source_base=str(a)), source_finetuned=ft, target_base=b,
                           calibration=calib, cache_dir=tmp_path / "c1", progress=False)
    split = prepare_transfer(cfg=TransferConfig(source_base=str(a), memory_budget="1M"), source_finetuned=ft,
                             target_base=b, calibration=calib, cache_dir=tmp_path / "c2", progress=False)
    assert one.report()["memory"]["passes"] == 1
    assert split.report()["memory"]["passes"] >= 2
    assert split.report()["memory"]["statistics_bytes"] <= 1024 * 1024
    for name in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(split.delta(name), one.delta(name), rtol=1e-5, atol=1e-7)
    with pytest.raises(TransferError, match="memory_budget"):
        prepare_transfer(cfg=TransferConfig(source_base=str(a), memory_budget=1000), source_finetuned=ft,
                         target_base=b, calibration=calib, cache_dir=tmp_path / "c3", progress=False)


def test_llama_memory_budget_resumes_finished_passes(llama_pair, llama_rotated, tmp_path, monkeypatch):
    """A run killed between passes keeps the passes it finished: the rerun computes only the rest,
    and its maps equal those of an uninterrupted run."""
    import mergekit_bico.transfer.bico as bico_mod

    root, a, ft, calib = llama_pair
    b = llama_rotated
    cfg = TransferConfig(source_base=str(a), memory_budget="1M")
    whole = prepare_transfer(cfg=cfg, source_finetuned=ft, target_base=b, calibration=calib,
                             cache_dir=tmp_path / "whole", progress=False)
    passes = whole.report()["memory"]["passes"]
    assert passes >= 2
    real = bico_mod.accumulate_pass
    calls = []

    def dies_on_second_pass(**kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt   # the run is stopped during its second pass
        return real(**kw)

    monkeypatch.setattr(bico_mod, "accumulate_pass", dies_on_second_pass)
    with pytest.raises(KeyboardInterrupt):
        prepare_transfer(cfg=cfg, source_finetuned=ft, target_base=b, calibration=calib,
                         cache_dir=tmp_path / "c", progress=False)
    calls.clear()
    monkeypatch.setattr(bico_mod, "accumulate_pass", lambda **kw: (calls.append(1), real(**kw))[1])
    resumed = prepare_transfer(cfg=cfg, source_finetuned=ft, target_base=b, calibration=calib,
                               cache_dir=tmp_path / "c", progress=False)
    rep = resumed.report()
    assert len(calls) == passes - 1                          # the first pass was read back
    assert any("1 of" in n and "interrupted run" in n for n in rep["notes"])
    assert rep["spaces"] == whole.report()["spaces"]         # same report rows (residuals, ranks)
    assert rep["memory"]["statistics_bytes"] == whole.report()["memory"]["statistics_bytes"]
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"):
        torch.testing.assert_close(resumed.delta(name), whole.delta(name), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# 2. width: wider residual stream (rotated), more heads, more MLP neurons


def test_llama_width(llama_pair):
    root, a, ft, calib = llama_pair
    sd, config = rp.state_dict64(a)
    gen = torch.Generator().manual_seed(9)
    sd = rp.llama_fold_norms(sd)
    big = rp.random_orthogonal(48, gen)
    sd, config = rp.llama_embed_residual(sd, config, big[:, :32])
    sd, config = rp.llama_widen_heads(sd, config, extra_kv=1)    # 4 -> 6 heads, 2 -> 3 kv heads
    sd, config = rp.llama_widen_mlp(sd, config, extra=32)       # 64 -> 96 neurons
    for layer in range(2):
        sd = rp.llama_permute_mlp(sd, layer, torch.randperm(96, generator=gen))
        sd = rp.llama_permute_heads(sd, config, layer, kv_perm=[2, 0, 1], q_perms=[[1, 0], [0, 1], [1, 0]])
    b = rp.save_causal_lm(config, sd, root / "B_wide")
    ids = _held_out()
    assert _rel(_logits(rp.load_causal_lm(b), ids), _logits(rp.load_causal_lm(a), ids)) < 1e-5

    prepared = _transfer(root, a, ft, b, calib)
    _check_full_rank(prepared)
    err = _error(prepared, b, ft)
    assert err <= TOL, err
    rep = prepared.report()
    assert any("num_attention_heads" in n for n in rep["notes"])
    with pytest.raises(TransferError, match="equal shapes"):
        _transfer(root, a, ft, b, calib, method="naive")


# ---------------------------------------------------------------------------------------------
# 3. depth: an inserted identity block


def test_llama_depth_explicit_and_similarity(llama_pair):
    root, a, ft, calib = llama_pair
    sd, config = rp.state_dict64(a)
    sd, config = rp.llama_insert_identity_block(sd, config, at=1, copy_from=0)
    b = rp.save_causal_lm(config, sd, root / "B_deep")
    ids = _held_out()
    assert _rel(_logits(rp.load_causal_lm(b), ids), _logits(rp.load_causal_lm(a), ids)) < 1e-5

    prepared = _transfer(root, a, ft, b, calib, layer_map=[0, None, 1])
    err = _error(prepared, b, ft)
    assert err <= TOL, err
    rep = prepared.report()
    assert rep["layer_map"] == [0, None, 1] and rep["zero_delta_blocks"] == ["block 1"]

    naive = _transfer(root, a, ft, b, calib, method="naive")          # index map [0, 1, 1]
    assert naive.report()["layer_map"] == [0, 1, 1]
    assert _error(naive, b, ft) > 100 * TOL

    sim = _transfer(root, a, ft, b, calib, layer_map="similarity")
    assert sim.report()["layer_map"] == [0, None, 1]
    assert sim.report()["similarity"][0][0] > 0.999
    assert _error(sim, b, ft) <= TOL


# ---------------------------------------------------------------------------------------------
# GPT-2: fused qkv Conv1D, LayerNorm with bias, tied embeddings


def test_gpt2_rotation_and_permutations(tmp_path):
    root = tmp_path
    a = make_tiny_causal_lm(root / "A", arch="gpt2", seed=0)
    # ln_f feeds the tied embedding: no linear to fold its change into, and a diagonal gain cannot
    # follow a rotation, so the fine-tune leaves ln_f alone (ln_1 / ln_2 are trained and folded).
    ft = _finetune(a, root / "A_ft", seed=2, freeze=("ln_f",))
    calib = _calibration(root)
    sd, config = rp.state_dict64(a)
    gen = torch.Generator().manual_seed(11)
    sd = rp.gpt2_fold_norms(sd)
    sd = rp.gpt2_rotate_residual(sd, rp.orthogonal_fixing_ones(32, gen))
    for layer in range(2):
        sd = rp.gpt2_permute_heads(sd, 4, layer, [2, 0, 3, 1])
        sd = rp.gpt2_rotate_qk_v(sd, 4, layer, [rp.random_orthogonal(8, gen) for _ in range(4)],
                                 [rp.random_orthogonal(8, gen) for _ in range(4)])
        sd = rp.gpt2_permute_mlp(sd, layer, torch.randperm(64, generator=gen))
    sd.pop("lm_head.weight", None)
    b = rp.save_causal_lm(config, sd, root / "B")
    ids = _held_out()
    assert _rel(_logits(rp.load_causal_lm(b), ids), _logits(rp.load_causal_lm(a), ids)) < 1e-5
    assert _rel(_logits(rp.load_causal_lm(ft), ids), _logits(rp.load_causal_lm(a), ids)) > 0.05

    prepared = _transfer(root, a, ft, b, calib)
    _check_full_rank(prepared, allow_deficit=1)
    err = _error(prepared, b, ft)
    assert err <= TOL, err
    rep = prepared.report()
    assert "transformer.h.0.attn.c_attn.weight" in rep["rules"]["linear (norm gain folded in)"]
    assert "transformer.h.0.attn.c_attn.bias" in rep["rules"]["bias (norm shift folded in)"]
    assert "transformer.ln_f.weight" in rep["rules"]["norm (diagonal conjugation)"]

    naive = _transfer(root, a, ft, b, calib, method="naive")
    assert _error(naive, b, ft) > 100 * TOL
    tied = _transfer(root, a, ft, b, calib, tie_maps=True)
    assert {r.get("tied") for r in tied.report()["spaces"]} >= {"q_out+k_out", "v_out+o_in", "fc_out+down_in"}
    assert _error(tied, b, ft) <= TOL


# ---------------------------------------------------------------------------------------------
# BERT (post-LN, sequence classification): the diagonal norm rule is exact for permutations


def _finetune_classifier(src: Path, dst: Path, *, steps: int = 6, lr: float = 3e-3, seed: int = 3) -> Path:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(src), dtype=torch.float32)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(7, 128, (8, 12), generator=gen)
        loss = model(input_ids=ids, labels=torch.randint(0, 2, (8,), generator=gen)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dst), max_shard_size="40KB", safe_serialization=True)
    make_tiny_tokenizer(dst)
    return dst


def test_bert_permutations_with_diagonal_norm_rule(tmp_path):
    from tests._tiny import make_tiny_classifier, write_jsonl

    a = make_tiny_classifier(tmp_path / "A", arch="bert", seed=0)
    ft = _finetune_classifier(a, tmp_path / "A_ft")
    rng = random.Random(1)
    vocab = WORDS + [f"w{i}" for i in range(60)]
    rows = [{"text": " ".join(rng.choice(vocab) for _ in range(rng.randint(8, 14))), "label": rng.randint(0, 1)} for _ in range(80)]
    # 80 sequences: the last block's MLP gradients live on the [CLS] rows only, so >= 64 sequences
    # are needed for full rank there (the pooled spaces need >= 32)
    calib = CalibrationConfig(data=str(write_jsonl(tmp_path / "calib.jsonl", rows)), samples=80, max_length=16, batch_size=16)
    model_a = rp.load_classifier(a)
    sd, config = rp.to64(model_a.state_dict()), model_a.config
    gen = torch.Generator().manual_seed(5)
    sd = rp.bert_permute_hidden(sd, torch.randperm(32, generator=gen))
    sd = rp.bert_permute_pooler(sd, torch.randperm(32, generator=gen))
    for layer in range(2):
        sd = rp.bert_permute_heads_and_mlp(sd, 4, layer, [3, 1, 0, 2], torch.randperm(64, generator=gen),
                                           v_rot=[rp.random_orthogonal(8, gen) for _ in range(4)])
    b = rp.save_classifier(config, sd, tmp_path / "B")
    ids = torch.randint(7, 128, (6, 14), generator=torch.Generator().manual_seed(9))

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits.to(torch.float64)

    ref = logits(rp.load_classifier(ft))
    assert _rel(logits(rp.load_classifier(b)), logits(model_a)) < 1e-5
    assert _rel(ref, logits(model_a)) > 0.05

    # a classification loss gives low-rank output gradients (the pooler's come from a 2-class head:
    # rank ~13 < 32 whatever the data; near-linear tiny MLPs lose more), so output spaces use
    # `combined` statistics (gradients + activations), which restores full rank
    grads_only = _transfer(tmp_path, a, ft, b, calib)
    deficient = {r["space"] for r in grads_only.report()["spaces"]
                 if r["well_determined_rank"] < min(r["d_source"], r["d_target"]) - 1}
    assert "pool_out" in deficient
    prepared = _transfer(tmp_path, a, ft, b, calib, output_space="combined")
    _check_full_rank(prepared, allow_deficit=1)
    model, _ = rp.apply_deltas(b, prepared, loader=rp.load_classifier)
    assert _rel(logits(model), ref) <= TOL
    rep = prepared.report()
    assert "bert.encoder.layer.0.output.LayerNorm.weight" in rep["rules"]["norm (diagonal conjugation)"]
    assert "classifier.weight" in rep["rules"]["linear"]
    assert rep["untransferred"] == []
    naive = _transfer(tmp_path, a, ft, b, calib, method="naive")
    model, _ = rp.apply_deltas(b, naive, loader=rp.load_classifier)
    assert _rel(logits(model), ref) > 100 * TOL
    # tie_maps: one map for q/k, v/o_in, fc_out/down_in each; exact too, and the tied spaces'
    # pooled statistics are full rank with gradients alone
    tied = _transfer(tmp_path, a, ft, b, calib, tie_maps=True)
    rows = {(r["layer"], r["space"]): r for r in tied.report()["spaces"]}
    assert rows[(0, "q_out")]["tied"] == "q_out+k_out" and rows[(1, "down_in")]["tied"] == "fc_out+down_in"
    assert rows[(0, "v_out")]["tied"] == "v_out+o_in"
    model, _ = rp.apply_deltas(b, tied, loader=rp.load_classifier)
    assert _rel(logits(model), ref) <= TOL


# ---------------------------------------------------------------------------------------------
# statistics variants, baselines, refusals and the report


def test_output_space_variants(llama_pair, llama_rotated):
    """`combined` (gradients + activations) is exact as well. `activations` (Theseus) cannot be:
    the outputs of an expanding linear (gate/up: 32 -> 64) span at most d_in = 32 directions, so
    half of the MLP output space is unseen -- the gap output gradients close."""
    root, a, ft, calib = llama_pair
    combined = _transfer(root, a, ft, llama_rotated, calib, output_space="combined")
    assert {r["stat"] for r in combined.report()["spaces"]} == {"X", "G+Y"}
    assert _error(combined, llama_rotated, ft) <= TOL
    acts = _transfer(root, a, ft, llama_rotated, calib, output_space="activations")
    rows = {(r["layer"], r["space"]): r for r in acts.report()["spaces"]}
    assert {r["stat"] for r in rows.values()} == {"X", "Y"}
    assert rows[(0, "gate_out")]["rank"] <= 32 < rows[(0, "gate_out")]["d_source"]
    assert _error(acts, llama_rotated, ft) > 10 * TOL


def test_finetuned_statistics_use_the_finetune(llama_pair, llama_rotated):
    """statistics: finetuned pairs A' (not A) with B: a different cache entry and statistics (here A'
    is far from A -- 6 large Adam steps -- so the maps are only approximate)."""
    root, a, ft, calib = llama_pair
    prepared = _transfer(root, a, ft, llama_rotated, calib, statistics="finetuned")
    rep = prepared.report()
    assert rep["settings"]["statistics"] == "finetuned" and rep["cache"]["hit"] is False
    assert max(r["residual"] for r in rep["spaces"]) > 1e-4   # A' is not a reparametrisation of B
    err = _error(prepared, llama_rotated, ft)
    naive = _error(_transfer(root, a, ft, llama_rotated, calib, method="naive"), llama_rotated, ft)
    assert TOL < err < naive / 2, (err, naive)   # approximate, but far better than ignoring the rotation


def test_gradfix_keeps_entries_agreeing_with_the_target_gradient(llama_pair, tmp_path):
    from mergekit_bico.calibration import data, losses, models
    from mergekit_bico.io.loader import LazyModel

    root, a, ft, calib = llama_pair
    prepared = _transfer(tmp_path, a, ft, a, calib, method="gradfix")   # target = A: same shapes
    model, tok = models.load_model(a, calib)
    batches = data.make_batches(data.load_samples(calib, need_labels=False), tok, calib, causal_lm=True)
    loss = losses.resolve_loss(calib, model)
    for n, batch in enumerate(batches):
        loss(model, batch, n).backward()
    grads = {k: p.grad / len(batches) for k, p in model.named_parameters()}
    la, lf = LazyModel(a), LazyModel(ft)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        delta = lf.get(name) - la.get(name)
        expected = delta * ((delta * -grads[name]) > 0)
        torch.testing.assert_close(prepared.delta(name), expected, rtol=0, atol=1e-7)
    kept = prepared.report()["gradfix"]["kept_fraction"]
    assert 0.2 < kept < 0.8
    assert _transfer(tmp_path, a, ft, a, calib, method="gradfix").report()["cache"]["hit"] is True


def test_methods_needing_statistics_refuse_without_calibration(llama_pair):
    root, a, ft, _ = llama_pair
    for method in ("bico", "gradfix"):
        with pytest.raises(TransferError, match="needs calibration"):
            _transfer(root, a, ft, a, None, method=method)
    naive = _transfer(root, a, ft, a, None, method="naive")   # naive needs none
    assert naive.delta("lm_head.weight") is not None


def test_different_tokenizers_are_refused(llama_pair, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    from tests._tiny import tiny_vocab

    root, a, ft, calib = llama_pair
    b = tmp_path / "B"
    sd, config = rp.state_dict64(a)
    rp.save_causal_lm(config, sd, b)
    vocab = tiny_vocab()
    words = sorted(vocab, key=vocab.get)
    shuffled = {w: i for i, w in enumerate(words[:7] + list(reversed(words[7:])))}
    raw = Tokenizer(WordLevel(vocab=shuffled, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]").save_pretrained(str(b))
    with pytest.raises(TransferError, match=f"tokenizers of '{a}' and '{b}' give different token ids"):
        _transfer(tmp_path, a, ft, b, calib)


def test_untransferable_tensors_are_reported(llama_pair, tmp_path):
    """A target with a larger vocabulary: embeddings / lm_head keep the target's value (None),
    listed with the reason; everything else is transferred. naive refuses the shape change."""
    root, a, ft, calib = llama_pair
    sd, config = rp.state_dict64(a)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[name] = torch.cat([sd[name], torch.zeros(4, sd[name].shape[1], dtype=torch.float64)])
    config = config.__class__(**{**config.to_dict(), "vocab_size": 132})
    b = rp.save_causal_lm(config, sd, tmp_path / "B")
    prepared = _transfer(tmp_path, a, ft, b, calib)
    assert prepared.delta("model.embed_tokens.weight") is None
    assert prepared.delta("lm_head.weight") is None
    assert prepared.delta("model.layers.0.self_attn.q_proj.weight") is not None
    rep = prepared.report()
    reasons = {u["tensor"]: u["reason"] for u in rep["untransferred"]}
    assert set(reasons) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert "'vocab' sizes differ" in reasons["model.embed_tokens.weight"]
    assert "'vocab' sizes differ" in reasons["lm_head.weight"]
    with pytest.raises(TransferError, match="equal shapes: .(lm_head|model.embed_tokens).weight"):
        _transfer(tmp_path, a, ft, b, calib, method="naive")


def test_cross_family_transfer_is_refused(llama_pair, tmp_path):
    root, a, ft, calib = llama_pair
    g = make_tiny_causal_lm(tmp_path / "gpt2", arch="gpt2")
    with pytest.raises(TransferError, match="same family"):
        _transfer(tmp_path, a, ft, g, calib)


def test_report_is_json_and_plot_is_optional(llama_pair, llama_rotated, tmp_path):
    import importlib.util
    import json

    root, a, ft, calib = llama_pair
    prepared = _transfer(root, a, ft, llama_rotated, calib)   # cached maps
    prepared.delta("model.layers.0.mlp.up_proj.weight")
    paths = prepared.write_report(tmp_path, "transfer_report_0")
    data = json.loads(paths[0].read_text())
    assert paths[0].name == "transfer_report_0.json"
    for key in ("layer_map", "spaces", "untransferred", "timings", "memory", "rules", "summary", "plot"):
        assert key in data
    assert data["summary"]["max_residual"] < 1e-4
    if importlib.util.find_spec("matplotlib") is None:
        assert len(paths) == 1 and data["plot"].startswith("skipped")
    else:
        assert paths[1].suffix == ".png"


def test_large_tensor_float32_path_is_exact_too(llama_pair, llama_rotated, monkeypatch):
    """Tensors above FLOAT64_MAX_NUMEL are mapped in float32 (memory); still exact."""
    from mergekit_bico.transfer import api

    root, a, ft, calib = llama_pair
    monkeypatch.setattr(api, "FLOAT64_MAX_NUMEL", 0)
    prepared = _transfer(root, a, ft, llama_rotated, calib)   # cached maps
    assert _error(prepared, llama_rotated, ft) <= TOL


def test_scale_norms_is_exact_on_a_rescaled_reparametrisation(llama_pair, llama_rotated, tmp_path):
    """B with every MLP's inner space scaled (up_proj x 3, down_proj / 3 keeps the function): the
    gradient-side and activation-side norms of that space change by 1/3 and 3. `scale: norms`
    recovers the factors (gains 1/3 on up's output, 3 on down's input) and stays exact; it is
    exact on the plain rotation as well (every gain 1)."""
    root, a, ft, calib = llama_pair
    sd, config = rp.state_dict64(llama_rotated)
    for layer in range(2):
        sd[f"model.layers.{layer}.mlp.up_proj.weight"] = sd[f"model.layers.{layer}.mlp.up_proj.weight"] * 3
        sd[f"model.layers.{layer}.mlp.down_proj.weight"] = sd[f"model.layers.{layer}.mlp.down_proj.weight"] / 3
    b = rp.save_causal_lm(config, sd, tmp_path / "B_scaled")
    ids = _held_out()
    assert _rel(_logits(rp.load_causal_lm(b), ids), _logits(rp.load_causal_lm(a), ids)) < 1e-5
    plain = _transfer(root, a, ft, b, calib)
    assert _error(plain, b, ft) > 100 * TOL          # orthogonal maps alone miss the factors
    scaled = _transfer(root, a, ft, b, calib, scale="norms")
    assert scaled.report()["settings"]["scale"] == "norms"
    assert _error(scaled, b, ft) <= TOL
    gains = {(r["layer"], r["space"]): r["gain"] for r in scaled.report()["spaces"]}
    assert gains[(0, "down_in")] == pytest.approx(1 / 3, rel=1e-6)
    assert _error(_transfer(root, a, ft, llama_rotated, calib, scale="norms"), llama_rotated, ft) <= TOL
