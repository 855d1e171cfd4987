"""The numpy path of ``task_arithmetic`` (mergekit_bico/methods/elementwise_np.py).

Its outputs must be the torch method's bit for bit (kernels over every stored dtype, both
computation dtypes, 1-4 inputs, ``normalize`` and ``lambda``; conversions; whole merges through
the CLI), and a merge that needs nothing else must not import torch (checked in a child process).
16-bit computations, more than four inputs and ``linear`` are left to torch (checked too).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergekit_bico import executor
from mergekit_bico.methods import elementwise_np as enp
from mergekit_bico.methods import get_method
from tests.test_cli_merge import run_yaml, weights

DTYPES = ["float32", "float64", "bfloat16", "float16"]
COMPUTE = ["float32", "float64"]
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
ROOT = Path(__file__).resolve().parents[1]


def bits_torch(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(_INT_VIEW[t.element_size()]).numpy().copy()


def bits_np(stored: np.ndarray) -> np.ndarray:
    return stored.view({1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[stored.itemsize])


def assert_same_bits(ref: torch.Tensor, stored: np.ndarray) -> None:
    """Equal bits everywhere, except that NaNs only need to be NaN in both."""
    ref_nan = torch.isnan(ref.float()).numpy()
    got_nan = np.isnan(enp.to_work(stored, _name(ref.dtype), "float64" if ref.dtype == torch.float64 else "float32"))
    assert np.array_equal(ref_nan, got_nan)
    a, b = bits_torch(ref), bits_np(stored)
    diff = (a != b) & ~ref_nan
    assert not diff.any(), f"{int(diff.sum())} of {diff.size} elements differ"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _inputs(n: int, dtype: str, numel: int = 12_001, seed: int = 0):
    """base and n fine-tunes (torch, in ``dtype``); a few entries big enough to overflow 16 bits."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=gen, dtype=torch.float64)
    base[:5] = torch.tensor([6.0e4, -6.5e4, 3.0e38, 1e-40, -0.0], dtype=torch.float64)
    fts = [base + 0.05 * torch.randn(numel, generator=gen, dtype=torch.float64) for _ in range(n)]
    td = getattr(torch, dtype)
    if dtype in ("float16", "bfloat16"):
        base = base.clamp(-3e38, 3e38)
    return base.to(td), [t.to(td) for t in fts]


def _to_work(t: torch.Tensor, compute: str) -> np.ndarray:
    stored = _name(t.dtype)
    return enp.to_work(bits_torch(t).view(enp.STORAGE[stored]), stored, compute)


@pytest.mark.parametrize("stored", DTYPES)
@pytest.mark.parametrize("compute", COMPUTE)
@pytest.mark.parametrize("n", range(1, enp.MAX_INPUTS + 1))
def test_task_arithmetic_kernel_is_the_torch_method_bit_for_bit(stored, compute, n):
    base, fts = _inputs(n, stored, seed=n)
    rng = np.random.default_rng(n)
    td = getattr(torch, compute)
    for normalize in (False, True):
        for lam in (1.0, 0.7):
            w = [float(x) for x in rng.uniform(-1.0, 1.5, n)]
            ref = get_method("task_arithmetic").merge(
                [t.to(td) for t in fts], base.to(td), [{"weight": x} for x in w],
                {"normalize": normalize, "lambda": lam}, tensor_name="x")
            got = enp.task_arithmetic([_to_work(t, compute) for t in fts], _to_work(base, compute), w,
                                      dtype=compute, normalize=normalize, lambda_=lam)
            assert_same_bits(ref, enp.from_work(got, compute))


_SPECIAL = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-9, -(1 + 2**-8), 65504.0, 65520.0, 65519.0, 3.4e38,
                     -3.4e38, 1e-40, 1e-45, 6e-8, 3e-8, 0.0, -0.0, np.inf, -np.inf, 1.0 / 3.0], dtype=np.float64)


@pytest.mark.parametrize("stored", DTYPES)
@pytest.mark.parametrize("compute", COMPUTE)
def test_conversions_round_as_torch_does(stored, compute):
    values = np.concatenate([_SPECIAL, np.random.default_rng(1).standard_normal(5000) * 1e3])
    src = torch.from_numpy(values).to(getattr(torch, stored))
    stored_np = bits_torch(src).view(enp.STORAGE[stored])
    with np.errstate(all="ignore"):
        work = enp.to_work(stored_np, stored, compute)
    ref = src.to(getattr(torch, compute))
    assert_same_bits(ref, enp.from_work(work, compute))
    for out in DTYPES:
        if compute == "float64" and out in ("float16", "bfloat16"):
            continue  # not taken by the numpy path
        with np.errstate(all="ignore"):
            assert_same_bits(ref.to(getattr(torch, out)), enp.from_work(work, out))


def test_bfloat16_rounding_hand_values():
    # float32 bit patterns -> bfloat16 bits, round to nearest, ties to even (worked out by hand)
    cases = {
        0x3F808000: 0x3F80,  # 1 + 2^-8: a tie, the even neighbour is 1.0
        0x3F818000: 0x3F82,  # 1 + 3*2^-8: a tie, rounds up to the even 1 + 2^-6
        0x3F808001: 0x3F81,  # just above the tie: up
        0x3F807FFF: 0x3F80,  # just below: down
        0x7F7FFFFF: 0x7F80,  # the largest float32 rounds to +inf
        0xFF800000: 0xFF80,  # -inf stays
        0x80000000: 0x8000,  # -0.0 stays
    }
    x = np.array(list(cases), dtype=np.uint32).view(np.float32)
    got = enp.from_work(x, "bfloat16")
    assert [int(v) for v in got] == list(cases.values())
    assert np.isnan(enp.to_work(enp.from_work(np.array([np.nan], np.float32), "bfloat16"), "bfloat16", "float32")).all()
    # a float32 merge of bfloat16 inputs, written as bfloat16: base 1.0 (0x3F80), fine-tune
    # 1 + 2^-7 (0x3F81), weight 0.5 -> 1 + 2^-8 in float32: a tie, written as the even 1.0
    b16 = enp.to_work(np.array([0x3F80], np.uint16), "bfloat16", "float32")
    t16 = enp.to_work(np.array([0x3F81], np.uint16), "bfloat16", "float32")
    got = enp.task_arithmetic([t16], b16, [0.5], dtype="float32")
    assert got.tolist() == [1 + 2**-8] and enp.from_work(got, "bfloat16").tolist() == [0x3F80]


def test_task_arithmetic_hand_values():
    base = np.array([1.0, 2.0], np.float32)
    fts = [np.array([2.0, 4.0], np.float32), np.array([0.0, 1.0], np.float32)]
    # deltas [1, 2] and [-1, -1]; 0.5 * [1, 2] + 1 * [-1, -1] = [-0.5, 0]; lambda 2 -> [-1, 0]; + base
    got = enp.task_arithmetic(fts, base, [0.5, 1.0], dtype="float32", lambda_=2.0)
    assert got.tolist() == [0.0, 2.0]
    # normalize: [-0.5, 0] / 1.5 = [-1/3, 0]; + base
    got = enp.task_arithmetic(fts, base, [0.5, 1.0], dtype="float32", normalize=True)
    assert got.tolist() == [np.float32(1.0) + np.float32(np.float32(-0.5) / np.float32(1.5)), 2.0]


def test_has_nonfinite():
    assert not enp.has_nonfinite(np.ones(10, np.float32))
    assert not enp.has_nonfinite(np.array([3e38, 3e38], np.float32))  # the sum overflows, the values do not
    assert enp.has_nonfinite(np.array([1.0, np.nan], np.float32))
    assert enp.has_nonfinite(np.array([1.0, -np.inf], np.float64))
    assert not enp.has_nonfinite(np.zeros(0, np.float32))


# ------------------------------------------------------------------------------ end to end

def _child_merge(cfg: Path, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, bool]:
    """Merge in a fresh interpreter; whether it imported torch."""
    code = ("import sys\nfrom mergekit_bico.cli import yaml_main\n"
            "try:\n    yaml_main(sys.argv[1:], standalone_mode=False)\n"
            "finally:\n    print('TORCH', 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(cfg), str(out), "--quiet", *extra],
                          capture_output=True, text=True, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("TORCH ")]
    return proc, bool(line) and line[-1].endswith("True")


def _bf16_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
    return dst


def _same_model(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb)
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and wa[k].shape == wb[k].shape, k
        assert torch.equal(bits_torch_t(wa[k]), bits_torch_t(wb[k])), k
    ia, ib = a / "model.safetensors.index.json", b / "model.safetensors.index.json"
    assert ia.exists() == ib.exists()
    if ia.exists():
        assert json.loads(ia.read_text())["weight_map"] == json.loads(ib.read_text())["weight_map"]


def bits_torch_t(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.element_size()])


@pytest.fixture(scope="module")
def bf16_family(llama_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return {k: _bf16_copy(llama_family[k], root / k) for k in ("base", "ft1", "ft2")}


def _configs(f, b16):
    return {
        "ta-3-normalize-lambda": {
            "merge_method": "task_arithmetic", "base_model": str(f["base"]),
            "models": [{"model": str(f[k]), "parameters": {"weight": w}} for k, w in (("ft1", 0.7), ("ft2", -0.4), ("ft3", 0.9))],
            "parameters": {"lambda": 1.3, "normalize": True}, "dtype": "float32"},
        "ta-4-to-bf16": {
            "merge_method": "task_arithmetic", "base_model": str(f["base"]),
            "models": [{"model": str(f[k]), "parameters": {"weight": w}}
                       for k, w in (("ft1", 1.0), ("ft2", 3.0), ("ft3", -0.5), ("ft1", 0.25))],
            "dtype": "float32", "out_dtype": "bfloat16"},
        "ta-gradient-filter-float64": {
            "merge_method": "task_arithmetic", "base_model": str(f["base"]),
            "models": [{"model": str(f["ft1"]), "parameters": {"weight": [0.2, 0.8]}},
                       {"model": str(f["ft2"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": -0.3}]}}],
            "dtype": "float64", "out_dtype": "float32"},
        "ta-bf16-inputs-float32-to-bf16": {
            "merge_method": "task_arithmetic", "base_model": str(b16["base"]),
            "models": [{"model": str(b16["ft1"]), "parameters": {"weight": 0.6}}, {"model": str(b16["ft2"]), "parameters": {"weight": 0.4}}],
            "dtype": "float32", "out_dtype": "bfloat16"},
        "ta-mixed-fp16-out": {
            "merge_method": "task_arithmetic", "base_model": str(f["base"]),
            "models": [{"model": str(b16["ft1"]), "parameters": {"weight": 0.25}}, {"model": str(f["ft2"]), "parameters": {"weight": 0.75}}],
            "out_dtype": "float16"},
    }


@pytest.fixture(scope="module")
def llama3(llama_family, tmp_path_factory):
    from tests.conftest import make_variant

    f = dict(llama_family)
    if "ft3" not in f:
        f["ft3"] = make_variant(f["base"], tmp_path_factory.mktemp("ft3") / "ft3", seed=33)
    return f


@pytest.mark.parametrize("name", ["ta-3-normalize-lambda", "ta-4-to-bf16", "ta-gradient-filter-float64",
                                  "ta-bf16-inputs-float32-to-bf16", "ta-mixed-fp16-out"])
def test_cli_merge_without_torch_equals_the_torch_path(name, llama3, bf16_family, tmp_path, monkeypatch):
    config = _configs(llama3, bf16_family)[name]
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(config))
    proc, used_torch = _child_merge(cfg, tmp_path / "lean", "--out-shard-size", "30K")
    assert proc.returncode == 0, proc.stderr
    assert not used_torch, "a task_arithmetic merge of safetensors imported torch"
    monkeypatch.setattr(executor, "NUMPY_ELEMENTWISE", False)
    result, ref = run_yaml(tmp_path, config, "--out-shard-size", "30K", name="torchpath")
    assert result.exit_code == 0, result.output
    _same_model(tmp_path / "lean", ref)


def test_sliced_numpy_merge_equals_the_torch_path(llama3, bf16_family, tmp_path, monkeypatch):
    config = _configs(llama3, bf16_family)["ta-3-normalize-lambda"]
    monkeypatch.setattr(executor, "ELEMENTWISE_SLICE", 300)
    reads = {"n": 0}
    from mergekit_bico.io.loader import LazyModel

    read = LazyModel.read_flat_into

    def counting(self, name, start, out):
        reads["n"] += 1
        return read(self, name, start, out)

    monkeypatch.setattr(LazyModel, "read_flat_into", counting)
    result, lean = run_yaml(tmp_path, config, name="lean")
    assert result.exit_code == 0, result.output
    assert reads["n"] > 4 * len(weights(lean))  # big tensors were read in several slices
    monkeypatch.setattr(executor, "NUMPY_ELEMENTWISE", False)
    result, ref = run_yaml(tmp_path, config, name="ref")
    assert result.exit_code == 0, result.output
    _same_model(lean, ref)


def test_more_than_four_inputs_and_linear_run_in_torch(llama_family, tmp_path):
    f = llama_family
    config = {"merge_method": "task_arithmetic", "base_model": str(f["base"]),
              "models": [{"model": str(f["ft1" if i % 2 else "ft2"]), "parameters": {"weight": 0.1 * (i + 1)}} for i in range(9)],
              "dtype": "float32"}
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(config))
    proc, used_torch = _child_merge(cfg, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert used_torch       # torch adds five or more deltas in its own order: mergekit's result
    b, a1, a2 = weights(f["base"]), weights(f["ft1"]), weights(f["ft2"])
    got = weights(tmp_path / "out")
    for k in b:
        expected = b[k] + sum(0.1 * (i + 1) * ((a1 if i % 2 else a2)[k] - b[k]) for i in range(9))
        assert torch.allclose(got[k], expected, atol=1e-6, rtol=0), k
    linear = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(f["ft1"]), "parameters": {"weight": 1.0}}, {"model": str(f["ft2"]), "parameters": {"weight": 3.0}}]}
    cfg.write_text(yaml.safe_dump(linear))
    proc, used_torch = _child_merge(cfg, tmp_path / "out-linear")
    assert proc.returncode == 0, proc.stderr
    assert used_torch
    got = weights(tmp_path / "out-linear")
    for k in a1:
        assert torch.allclose(got[k], (a1[k] + 3 * a2[k]) / 4, atol=1e-6, rtol=0), k


def test_half_arithmetic_and_float64_to_half_are_not_taken(llama_family, bf16_family, tmp_path):
    from mergekit_bico.config import MergeConfig
    from mergekit_bico.executor import Inputs, RunOptions, _lean_job
    from mergekit_bico.plan import build_plan

    f = llama_family
    config = {"merge_method": "task_arithmetic", "base_model": str(f["base"]),
              "models": [{"model": str(f["ft1"]), "parameters": {"weight": 0.5}}]}
    b16 = {"merge_method": "task_arithmetic", "base_model": str(bf16_family["base"]),
           "models": [{"model": str(bf16_family["ft1"]), "parameters": {"weight": 0.5}}]}
    for cfg, dtype, out_dtype, lean in ((config, "float64", "bfloat16", False), (config, "float64", "float32", True),
                                        (config, "float32", "bfloat16", True), (config, "bfloat16", None, False),
                                        (config, "float16", "float32", False), (b16, None, None, False),
                                        (b16, "float32", None, True)):
        extra = {k: v for k, v in (("dtype", dtype), ("out_dtype", out_dtype)) if v}
        plan = build_plan(MergeConfig.model_validate({**cfg, **extra}))
        inputs = Inputs(plan, RunOptions(progress=False), dtype)
        assert all((_lean_job(job, inputs) is not None) == lean for job in plan.jobs), (dtype, out_dtype)


def test_nan_in_an_input_is_refused_by_the_numpy_path(llama_family, tmp_path):
    f = llama_family
    bad = tmp_path / "ft-nan"
    shutil.copytree(f["ft1"], bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    sd = load_file(str(shard))
    name = sorted(sd)[0]
    sd[name] = sd[name].clone()
    sd[name].view(-1)[3] = float("nan")
    save_file(sd, str(shard), metadata={"format": "pt"})
    config = {"merge_method": "task_arithmetic", "base_model": str(f["base"]),
              "models": [{"model": str(bad), "parameters": {"weight": 0.5}}, {"model": str(f["ft2"]), "parameters": {"weight": 0.5}}],
              "dtype": "float32"}
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(config))
    proc, used_torch = _child_merge(cfg, tmp_path / "out")
    assert proc.returncode != 0 and not used_torch
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "NaN or Inf" in lines[0] and name in lines[0] and str(bad) in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out."))]
    proc, _ = _child_merge(cfg, tmp_path / "out", "--nan-policy", "warn")
    assert proc.returncode == 0, proc.stderr
    assert "NaN or Inf" in proc.stderr


def test_cli_imports_torch_first_only_when_torch_will_run(tmp_path):
    from mergekit_bico.cli import _runs_torch

    def runs(doc, device="cpu", cuda=False, text=None):
        cfg = tmp_path / "c.yml"
        cfg.write_text(text if text is not None else yaml.safe_dump(doc))
        return _runs_torch(str(cfg), device, cuda)

    assert not runs({"merge_method": "task_arithmetic", "dtype": "float32"})
    assert runs({"merge_method": "linear"})             # mergekit's addcmul_: torch only
    assert runs({"merge_method": "ties", "dtype": "float32"})
    assert runs({"merge_method": "task_arithmetic", "dtype": "bfloat16"})
    assert runs({"merge_method": "linear", "dtype": "float16"})
    assert runs({"merge_method": "linear"}, device="cuda")
    assert runs({"merge_method": "linear"}, cuda=True)
    assert not runs(None, text="merge_method: [unclosed")   # the config loader reports it
