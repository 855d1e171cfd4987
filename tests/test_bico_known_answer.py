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


def test_llama_rotation_and_permutations(llama_pair):
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

    # the cache: a second preparation reuses the maps (no statistics pass) and gives the same deltas
    again = _transfer(root, a, ft, b, calib)
    assert again.report()["cache"]["hit"] is True
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(again.delta(name), prepared.delta(name))


def test_llama_memory_budget_splits_passes(llama_pair, tmp_path):
    """A budget smaller than all statistics splits the blocks over passes, same maps."""
    root, a, ft, calib = llama_pair
    sd, config = rp.state_dict64(a)
    gen = torch.Generator().manual_seed(8)
    sd = rp.llama_fold_norms(sd)
    sd, config = rp.llama_embed_residual(sd, config, rp.random_orthogonal(32, gen))
    b = rp.save_causal_lm(config, sd, tmp_path / "B")
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
