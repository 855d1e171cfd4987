"""The bounded-memory merge path: the streaming shard writer, flat-slice reads and sliced merging.

Big tensors (more than ``CHUNK_ELEMENTS`` / ``ELEMENTWISE_SLICE`` elements) are read, merged and
written slice by slice. Tiny models never reach those sizes, so the thresholds are lowered here
and the results are checked against plain torch computed from the input weights.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mergekit_bico import executor
from mergekit_bico.errors import OutputError
from mergekit_bico.io.loader import LazyModel
from mergekit_bico.io.writer import ShardedWriter, StreamingShardedWriter
from mergekit_bico.methods.sparsify import MagnitudeThreshold, magnitude, magnitude_keys
from tests.test_cli_merge import assert_close, check_loads_and_runs, run_yaml, weights


@pytest.fixture
def sliced(monkeypatch):
    """Lower the slicing thresholds and count the flat-slice reads of the torch path (the numpy
    path of task_arithmetic is off here: tests/test_elementwise_np.py covers it)."""
    monkeypatch.setattr(executor, "NUMPY_ELEMENTWISE", False)
    monkeypatch.setattr(executor, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(executor, "ELEMENTWISE_SLICE", 300)
    calls = {"n": 0}
    original = executor.Inputs.load_flat

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(executor.Inputs, "load_flat", counting)
    return calls


def test_task_arithmetic_in_slices(llama_family, sliced, tmp_path):
    f = llama_family
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(f["base"]),
        "models": [{"model": str(f["ft1"]), "parameters": {"weight": 0.7}},
                   {"model": str(f["ft2"]), "parameters": {"weight": -0.4}}],
        "parameters": {"lambda": 1.5},
        "dtype": "float32",
    }
    result, out = run_yaml(tmp_path, config, "--out-shard-size", "50K")
    assert result.exit_code == 0, result.output
    assert sliced["n"] > 0
    b, a1, a2 = weights(f["base"]), weights(f["ft1"]), weights(f["ft2"])
    expected = {k: b[k] + 1.5 * (0.7 * (a1[k] - b[k]) - 0.4 * (a2[k] - b[k])) for k in b}
    assert_close(weights(out), expected, atol=1e-6)
    check_loads_and_runs(out)


def test_linear_in_slices_to_half(llama_family, sliced, tmp_path):
    f = llama_family
    config = {
        "merge_method": "linear",
        "models": [{"model": str(f["ft1"]), "parameters": {"weight": 1.0}},
                   {"model": str(f["ft2"]), "parameters": {"weight": 3.0}}],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    result, out = run_yaml(tmp_path, config)
    assert result.exit_code == 0, result.output
    assert sliced["n"] > 0
    a1, a2 = weights(f["ft1"]), weights(f["ft2"])
    got = weights(out)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert_close(got, {k: ((a1[k] + 3 * a2[k]) / 4).to(torch.bfloat16) for k in a1}, atol=0)


def _ties_reference(base, fts, weights_, density):
    """TIES (mergekit 0.1.5): top-k magnitude per delta, sign of the weighted sum, disjoint mean."""
    deltas = []
    for ft, w in zip(fts, weights_):
        d = (ft - base).reshape(-1)
        k = max(1, int(density * d.numel()))
        keep = torch.zeros_like(d, dtype=torch.bool)
        keep[torch.topk(d.abs(), k).indices] = True
        deltas.append(w * d * keep)
    stacked = torch.stack(deltas)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(stacked) == sign).float()
    w = torch.tensor(weights_).reshape(-1, 1)
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return base + ((stacked * agree).sum(0) / divisor).reshape(base.shape)


def test_ties_in_three_sliced_passes(llama_family, sliced, tmp_path):
    f = llama_family
    config = {
        "merge_method": "ties",
        "base_model": str(f["base"]),
        "models": [{"model": str(f[k]), "parameters": {"weight": w, "density": 0.3}}
                   for k, w in (("ft1", 1.0), ("ft2", 0.5), ("ft3", 0.8))],
        "dtype": "float32",
    }
    result, out = run_yaml(tmp_path, config)
    assert result.exit_code == 0, result.output
    assert sliced["n"] > 0
    b = weights(f["base"])
    fts = [weights(f[k]) for k in ("ft1", "ft2", "ft3")]
    expected = {k: _ties_reference(b[k], [ft[k] for ft in fts], [1.0, 0.5, 0.8], 0.3) for k in b}
    assert_close(weights(out), expected, atol=1e-6)


def _sliced_threshold(delta: torch.Tensor, density: float, step: int = 701) -> tuple[MagnitudeThreshold, list]:
    numel, k = delta.numel(), max(1, int(density * delta.numel()))
    slices = [delta[a:a + step].clone() for a in range(0, numel, step)]
    high = sum(MagnitudeThreshold.high_histogram(magnitude_keys(s)) for s in slices)
    digit, below = MagnitudeThreshold.pick_digit(high, numel, k)
    low = sum(MagnitudeThreshold.low_histogram(magnitude_keys(s), digit) for s in slices)
    return MagnitudeThreshold.from_histograms(low, digit, below, numel, k), slices


@pytest.mark.parametrize("density", [0.1, 0.5, 0.93])
def test_sliced_threshold_keeps_what_the_whole_tensor_keeps(density):
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(5003, generator=gen)
    threshold, slices = _sliced_threshold(delta, density)
    assert not threshold.ambiguous
    got = torch.cat([threshold.apply(s) for s in slices])
    assert torch.equal(got, magnitude(delta.clone(), density))


def test_sliced_threshold_inside_a_tie_keeps_the_lowest_indices():
    """Equal magnitudes across the cut: slice by slice, the first ones (in flat order) are kept,
    exactly as on the whole tensor; the cut is flagged for tie_break: sort."""
    delta = torch.randint(-6, 7, (5003,), generator=torch.Generator().manual_seed(0)).float()
    threshold, slices = _sliced_threshold(delta, 0.5)
    assert threshold.ambiguous
    got = torch.cat([threshold.apply(s) for s in slices])
    assert torch.equal(got, magnitude(delta.clone(), 0.5))
    assert threshold.ties_left == 0


def test_ties_with_tied_magnitudes_by_index_and_by_sort(llama_family, sliced, tmp_path, monkeypatch):
    """A delta with many equal magnitudes: tie_break index streams it in slices and keeps the lowest
    indices; tie_break sort merges that tensor whole and keeps what torch.argsort keeps (mergekit)."""
    from safetensors.torch import save_file

    f = llama_family
    tied = tmp_path / "tied"
    shutil.copytree(f["ft1"], tied)
    b = weights(f["base"])
    name = "model.embed_tokens.weight"   # 4096 elements > CHUNK_ELEMENTS (1000)
    steps = torch.randint(-3, 4, b[name].shape, generator=torch.Generator().manual_seed(5)).float()
    new = weights(tied)
    new[name] = b[name] + 0.01 * steps
    for shard in tied.glob("*.safetensors"):
        shard.unlink()
    save_file(new, str(tied / "model.safetensors"))
    (tied / "model.safetensors.index.json").unlink(missing_ok=True)
    whole = []
    original = executor._whole_unit
    monkeypatch.setattr(executor, "_whole_unit", lambda job, *a: (whole.append(job.name), original(job, *a))[1])
    d = (new[name] - b[name]).reshape(-1)
    k = int(0.4 * d.numel())
    for tie_break, order in (("sort", torch.argsort(d.abs(), descending=True)),
                             ("index", torch.sort(d.abs(), descending=True, stable=True).indices)):
        whole.clear()
        config = {"merge_method": "ties", "base_model": str(f["base"]), "parameters": {"tie_break": tie_break},
                  "models": [{"model": str(tied), "parameters": {"weight": 1.0, "density": 0.4}}], "dtype": "float32"}
        result, out = run_yaml(tmp_path, config, name=f"out-{tie_break}")
        assert result.exit_code == 0, result.output
        assert (name in whole) == (tie_break == "sort")   # index: streamed in slices all the same
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[order[:k]] = True
        assert torch.equal(weights(out)[name], b[name] + (d * keep).reshape(b[name].shape)), tie_break


# ---------------------------------------------------------------------------------------------
# the writer and the flat reads


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(40, 30, generator=gen),
        "b.bias": torch.randn(30, generator=gen).to(torch.float16),
        "c.weight": torch.randn(100, 50, generator=gen),
        "d.ids": torch.arange(7, dtype=torch.int64),
        "e.weight": torch.randn(64, 16, generator=gen).to(torch.bfloat16),
    }


def test_streaming_writer_any_order_parts_and_same_shards(tmp_path):
    sd = _state()
    layout = [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()]
    out = tmp_path / "stream"
    out.mkdir()
    w = StreamingShardedWriter(out, 12_000, layout, metadata={"mergekit_bico": "test"})
    flat = sd["c.weight"].reshape(-1)
    for a in (3000, 0, 1000, 4000, 2000):   # parts in any order
        w.add_part("c.weight", flat[a:a + 1000], a)
    for name in reversed(list(sd)):
        if name != "c.weight":
            w.add(name, sd[name])
    assert len(w) == len(sd) and "c.weight" in w
    weight_map = w.finish()

    ref = tmp_path / "buffered"
    ref.mkdir()
    r = ShardedWriter(ref, 12_000)
    for name, t in sd.items():
        r.add(name, t)
    assert weight_map == r.finish()   # shards cut the same way for the same order
    got = {}
    for shard in sorted(out.glob("*.safetensors")):
        got.update(load_file(str(shard)))
    assert set(got) == set(sd)
    for name in sd:
        assert got[name].dtype == sd[name].dtype and torch.equal(got[name], sd[name]), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    assert not list(out.glob(".*"))   # no temp files left
    assert w.bytes_written == sum(p.stat().st_size for p in out.glob("*.safetensors"))


def test_streaming_writer_refuses_what_was_not_planned(tmp_path):
    sd = _state()
    layout = [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()]
    w = StreamingShardedWriter(tmp_path, 1 << 20, layout)
    with pytest.raises(OutputError, match="'zzz' was not planned"):
        w.add("zzz", torch.zeros(1))
    with pytest.raises(OutputError, match=r"'a.weight' is float64\[40, 30\], but float32\[40, 30\]"):
        w.add("a.weight", sd["a.weight"].double())
    w.add("a.weight", sd["a.weight"])
    with pytest.raises(OutputError, match="written twice"):
        w.add("a.weight", sd["a.weight"])
    with pytest.raises(OutputError, match="outside output tensor 'c.weight'"):
        w.add_part("c.weight", torch.zeros(10), 4995)
    with pytest.raises(OutputError, match="planned but never written"):
        w.finish()
    with pytest.raises(OutputError, match="planned twice"):
        StreamingShardedWriter(tmp_path, 1 << 20, layout + layout[:1])


def test_get_flat_reads_exactly_the_slice(tmp_path):
    from safetensors.torch import save_file

    sd = _state(1)
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    model = LazyModel(folder)
    for name, t in sd.items():
        flat = t.reshape(-1)
        n = flat.numel()
        for a, b in ((0, n), (3, min(n, 17)), (n - 1, n), (5, 5)):
            got = model.get_flat(name, a, b)
            assert got.dtype == t.dtype and torch.equal(got, flat[a:b]), (name, a, b)
        assert model.get_flat(name, 0, 4, dtype=torch.float64).dtype == torch.float64
        with pytest.raises(ValueError, match="out of bounds"):
            model.get_flat(name, 0, flat.numel() + 1)


def test_nonfinite_check_is_exact():
    big = torch.full((1000,), 3e38)   # finite values whose float32 sum overflows
    assert not executor._has_nonfinite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.zeros(100)
        t[37] = bad
        assert executor._has_nonfinite(t)
        assert executor._has_nonfinite(t.to(torch.bfloat16))
    assert not executor._has_nonfinite(torch.arange(5))   # integers are never checked


@pytest.mark.parametrize("where,weight", [("ft1", 0.7), ("ft1", 0.0), ("base", 0.7)])
def test_sliced_task_arithmetic_finds_a_nan_in_any_input(llama_family, sliced, tmp_path, where, weight):
    """The sliced elementwise merge checks its output for NaN/Inf and then the inputs: a NaN in a
    fine-tune (even one with weight 0, as 0 * NaN is NaN) or an Inf in the base is still refused
    with the tensor and model named, no output folder is left, and `--nan-policy warn` merges on."""
    from safetensors.torch import save_file

    f = llama_family
    bad = tmp_path / f"bad-{where}"
    shutil.copytree(f[where], bad)
    name = "model.embed_tokens.weight"   # 4096 elements > ELEMENTWISE_SLICE (300): sliced
    new = weights(bad)
    new[name][7, 3] = float("nan") if where == "ft1" else float("inf")
    for shard in bad.glob("*.safetensors"):
        shard.unlink()
    save_file(new, str(bad / "model.safetensors"))
    (bad / "model.safetensors.index.json").unlink(missing_ok=True)
    paths = {"base": str(f["base"]), "ft1": str(f["ft1"]), where: str(bad)}
    config = {"merge_method": "task_arithmetic", "base_model": paths["base"], "dtype": "float32",
              "models": [{"model": paths["ft1"], "parameters": {"weight": weight}},
                         {"model": str(f["ft2"]), "parameters": {"weight": 0.5}}]}
    result, out = run_yaml(tmp_path, config)
    assert result.exit_code != 0
    assert f"tensor '{name}' of model '{bad}' contains NaN or Inf" in result.output
    assert not out.exists()
    result, out = run_yaml(tmp_path, config, "--nan-policy", "warn", name="out-warn")
    assert result.exit_code == 0, result.output
    assert not torch.isfinite(weights(out)[name]).all() and sliced["n"] > 0
