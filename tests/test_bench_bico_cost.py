"""``benchmarks.bico_cost``'s split of BiCo's calibration time into the parts its exactness fixes
(float64 products of the statistics, LAPACK decompositions of the maps), on a tiny Llama pair: the
timers must see every such call that ``prepare_transfer`` makes, or the reported floor would be
understated."""

from __future__ import annotations

import random

import torch

from benchmarks import bico_cost
from mergekit_bico.config import CalibrationConfig, TransferConfig
from mergekit_bico.transfer import prepare_transfer, procrustes
from tests._tiny import WORDS, make_tiny_causal_lm, write_jsonl


def test_exact_parts_are_timed_where_prepare_transfer_spends_them(tmp_path, monkeypatch):
    a = make_tiny_causal_lm(tmp_path / "a", arch="llama", seed=0)
    b = make_tiny_causal_lm(tmp_path / "b", arch="llama", seed=1)
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(12))} for _ in range(16)]
    calib = CalibrationConfig(data=str(write_jsonl(tmp_path / "c.jsonl", rows)), samples=16, max_length=16, batch_size=8)
    # every decomposition torch.linalg offers for the maps is wrapped, and the wide (eigh) path runs too
    monkeypatch.setattr(procrustes, "EIGH_MIN_DIM", 48)
    calls: list[str] = []
    for name in bico_cost.DECOMPOSITIONS:
        real = getattr(torch.linalg, name)
        monkeypatch.setattr(torch.linalg, name, lambda *x, _n=name, _f=real, **k: calls.append(_n) or _f(*x, **k))
    from mergekit_bico.calibration import covariance

    adds: list[int] = []
    real_add = covariance.SpaceStats.add
    monkeypatch.setattr(covariance.SpaceStats, "add", lambda self, xa, xb: adds.append(1) or real_add(self, xa, xb))
    spent = bico_cost._time_exact_parts()              # wraps the counters above; teardown restores the originals
    prepared = prepare_transfer(cfg=TransferConfig(source_base=str(a), identity_prior="auto"), source_finetuned=a,
                                target_base=b, calibration=calib, cache_dir=tmp_path / "cache", progress=False)
    timings = prepared.report()["timings"]
    assert set(calls) == set(bico_cost.DECOMPOSITIONS)  # eigh/eigvalsh (wide) and svd/svdvals (narrow) all seen
    assert adds, "no statistics were accumulated"
    assert 0 < spent["decompositions"] <= timings["maps_s"]
    assert 0 < spent["products"] <= timings["statistics_s"]
    assert {name for name, _, _ in spent["calls"]} == set(bico_cost.DECOMPOSITIONS)
    assert abs(sum(seconds for _, _, seconds in spent["calls"]) - spent["decompositions"]) < 1e-9
    # the wide maps' directions are counted, and one of their Gram matrices kept for the float32 timings
    assert spent["wide_directions"] > 0 and 0 <= spent["unresolved_f32"] <= spent["wide_directions"]
    gram = spent["wide_gram"]
    assert gram.shape[-1] == gram.shape[-2] >= 48 and gram.dtype == torch.float64
    before = len(spent["calls"])
    assert set(bico_cost._alternatives(gram[0], spent["linalg"])) == {"eigh_float64_s", "eigh_float32_s", "svd_float32_s"}
    assert len(spent["calls"]) == before                # timed outside the counted decompositions


def test_steady_decompositions_count_a_repeated_first_call_at_the_median_of_the_rest():
    calls = [("svd", (31, 384, 384), 0.6),                        # once: counted as it is
             ("eigvalsh", (1, 1536, 1536), 1.0),                  # first of four: 0.12 (median of 0.11 / 0.12 / 0.14)
             ("eigh", (1, 1536, 1536), 0.3),                      # first of two: kept
             ("eigvalsh", (1, 1536, 1536), 0.12), ("eigh", (1, 1536, 1536), 0.31),
             ("eigvalsh", (1, 1536, 1536), 0.14), ("eigvalsh", (1, 1536, 1536), 0.11)]
    assert abs(bico_cost.steady_decompositions(calls) - (0.6 + 0.12 + 0.12 + 0.14 + 0.11 + 0.3 + 0.31)) < 1e-12
    assert bico_cost.steady_decompositions([]) == 0.0
