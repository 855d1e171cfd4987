"""End to end through the CLI on tiny Llama / Qwen2 / GPT-2 models, checked against values computed
here from the input weights with plain torch (not with the code under test)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_bico.cli import main, yaml_main


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_yaml(tmp_path: Path, config: dict, *extra: str, name: str = "out"):
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / name
    result = CliRunner().invoke(yaml_main, [str(cfg), str(out), "--quiet", *extra])
    return result, out


def check_loads_and_runs(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 12]])).logits
    assert torch.isfinite(logits).all()


def assert_close(got: dict, expected: dict, atol: float = 1e-6) -> None:
    assert set(got) == set(expected)
    for k in expected:
        assert got[k].shape == expected[k].shape, k
        assert torch.allclose(got[k].float(), expected[k].float(), atol=atol, rtol=0), (k, (got[k] - expected[k]).abs().max())


def test_linear(family, tmp_path):
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": 0.3}},
            {"model": str(family["ft2"]), "parameters": {"weight": 0.9}},
        ],
        "dtype": "float32",
    }
    result, out = run_yaml(tmp_path, config, "--out-shard-size", "30K")
    assert result.exit_code == 0, result.output
    a, b = weights(family["ft1"]), weights(family["ft2"])
    expected = {k: (0.3 * a[k] + 0.9 * b[k]) / 1.2 for k in a}
    assert_close(weights(out), expected)
    assert len(list(out.glob("*.safetensors"))) > 1  # sharded output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    assert (out / "mergekit_config.yml").exists() and (out / "README.md").exists()
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    check_loads_and_runs(out)


def test_task_arithmetic(family, tmp_path):
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": 0.7}},
            {"model": str(family["ft2"]), "parameters": {"weight": -0.4}},
        ],
        "parameters": {"lambda": 1.5},
        "dtype": "float32",
    }
    result, out = run_yaml(tmp_path, config)
    assert result.exit_code == 0, result.output
    base, a, b = weights(family["base"]), weights(family["ft1"]), weights(family["ft2"])
    expected = {k: base[k] + 1.5 * (0.7 * (a[k] - base[k]) - 0.4 * (b[k] - base[k])) for k in base}
    assert_close(weights(out), expected, atol=2e-6)
    check_loads_and_runs(out)


def ties_reference(base, deltas, weights_, density):
    """TIES by the paper: keep the top-k magnitudes of each delta, elect the sign of the weighted sum,
    average the agreeing weighted entries (disjoint mean)."""
    kept = []
    for d in deltas:
        k = int(density * d.numel())
        order = torch.argsort(d.abs().flatten(), descending=True)[:k]
        mask = torch.zeros(d.numel())
        mask[order] = 1
        kept.append(d * mask.view(d.shape))
    w = torch.tensor(weights_).view(-1, *([1] * base.dim()))
    wd = torch.stack(kept) * w
    sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
    agree = (wd.sign() == sign).float()
    num = (wd * agree).sum(0)
    den = (w * agree).sum(0)
    den[den == 0] = 1
    return base + num / den


def test_ties(llama_family, tmp_path):
    f = llama_family
    config = {
        "merge_method": "ties",
        "base_model": str(f["base"]),
        "models": [
            {"model": str(f["ft1"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(f["ft2"]), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(f["base"])},  # the base listed as a model is skipped, as in mergekit
        ],
        "dtype": "float32",
    }
    result, out = run_yaml(tmp_path, config)
    assert result.exit_code == 0, result.output
    base, a, b = weights(f["base"]), weights(f["ft1"]), weights(f["ft2"])
    expected = {k: ties_reference(base[k], [a[k] - base[k], b[k] - base[k]], [1.0, 0.5], 0.5) for k in base}
    assert_close(weights(out), expected, atol=2e-6)
    check_loads_and_runs(out)


def test_gradient_and_filter_parameters(llama_family, tmp_path):
    f = llama_family
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(f["base"]),
        "models": [
            # gradient over the 2 layers: layer 0 gets 0.0, layer 1 gets 1.0; non-layer tensors t = 0
            {"model": str(f["ft1"]), "parameters": {"weight": [0.0, 1.0]}},
            # first matching filter wins; the bare value is the fallback
            {"model": str(f["ft2"]), "parameters": {"weight": [{"filter": "self_attn", "value": 0.25},
                                                               {"filter": "mlp", "value": [1.0, 3.0]},
                                                               {"value": 0.5}]}},
        ],
        "dtype": "float32",
    }
    result, out = run_yaml(tmp_path, config)
    assert result.exit_code == 0, result.output
    base, a, b = weights(f["base"]), weights(f["ft1"]), weights(f["ft2"])
    got = weights(out)
    for k in base:
        layer = 1 if ".layers.1." in k else 0
        w1 = float(layer) if ".layers." in k else 0.0
        if "self_attn" in k:
            w2 = 0.25
        elif "mlp" in k:
            w2 = 1.0 + 2.0 * layer
        else:
            w2 = 0.5
        exp = base[k] + w1 * (a[k] - base[k]) + w2 * (b[k] - base[k])
        assert torch.allclose(got[k], exp, atol=2e-6), k


def test_model_parameters_override_global(llama_family, tmp_path):
    f = llama_family
    config = {
        "merge_method": "linear",
        "models": [{"model": str(f["ft1"]), "parameters": {"weight": 3.0}}, {"model": str(f["ft2"])}],
        "parameters": {"weight": 1.0, "normalize": False},
    }
    result, out = run_yaml(tmp_path, config)
    assert result.exit_code == 0, result.output
    a, b = weights(f["ft1"]), weights(f["ft2"])
    assert_close(weights(out), {k: 3.0 * a[k] + b[k] for k in a}, atol=2e-6)


def test_dare_reproducible_and_seeded_by_name(llama_family, tmp_path):
    f = llama_family
    config = {
        "merge_method": "dare_linear",
        "base_model": str(f["base"]),
        "models": [
            {"model": str(f["ft1"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(f["ft2"]), "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "dtype": "float32",
    }
    r1, out1 = run_yaml(tmp_path, config, "--random-seed", "7", name="o1")
    r2, out2 = run_yaml(tmp_path, config, "--random-seed", "7", "--out-shard-size", "10K", name="o2")
    r3, out3 = run_yaml(tmp_path, config, "--random-seed", "8", name="o3")
    assert r1.exit_code == r2.exit_code == r3.exit_code == 0, (r1.output, r2.output, r3.output)
    w1, w2, w3 = weights(out1), weights(out2), weights(out3)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    big = [k for k in w1 if w1[k].numel() > 256]
    assert any(not torch.equal(w1[k], w3[k]) for k in big)
    # the job order does not matter: each tensor's generator is seeded by (seed, tensor name)
    from mergekit_bico.config import parse_config
    from mergekit_bico.executor import Inputs, RunOptions, _merge_one
    from mergekit_bico.plan import build_plan

    plan = build_plan(parse_config(config), random_seed=7)
    inputs = Inputs(plan, RunOptions(progress=False), torch.float32)
    forward = {j.name: _merge_one(j, inputs) for j in plan.jobs}
    backward = {j.name: _merge_one(j, inputs) for j in reversed(plan.jobs)}
    assert all(torch.equal(forward[k], backward[k]) and torch.equal(forward[k], w1[k]) for k in forward)


def test_passthrough_slices_frankenmerge(llama_family, tmp_path):
    f = llama_family
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(f["ft1"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(f["ft2"]), "layer_range": [1, 2]}]},
        ],
        "dtype": "float32",
    }
    result, out = run_yaml(tmp_path, config)
    assert result.exit_code == 0, result.output
    a, b = weights(f["ft1"]), weights(f["ft2"])
    got = weights(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    for k, v in got.items():
        if ".layers.2." in k:
            assert torch.equal(v, b[k.replace(".layers.2.", ".layers.1.")]), k
        elif "model.norm" in k or "lm_head" in k:
            assert torch.equal(v, b[k]), k
        else:
            assert torch.equal(v, a[k]), k
    check_loads_and_runs(out)


def test_out_dtype_and_dry_run(llama_family, tmp_path):
    f = llama_family
    config = {
        "merge_method": "linear",
        "models": [{"model": str(f["ft1"]), "parameters": {"weight": 1.0}},
                   {"model": str(f["ft2"]), "parameters": {"weight": 1.0}}],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    result, out = run_yaml(tmp_path, config, "--dry-run")
    assert result.exit_code == 0, result.output
    assert not out.exists()
    assert "model.layers.0.mlp.up_proj.weight" in result.output
    result, out = run_yaml(tmp_path, config)
    assert result.exit_code == 0, result.output
    got = weights(out)
    a, b = weights(f["ft1"]), weights(f["ft2"])
    for k in a:
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], ((a[k] + b[k]) / 2).to(torch.bfloat16))


def test_validate_and_methods_commands(llama_family, tmp_path):
    f = llama_family
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(f["base"]),
                                   "models": [{"model": str(f["ft1"]), "parameters": {"weight": 1, "density": 0.3}}]}))
    r = CliRunner().invoke(main, ["validate", str(cfg)])
    assert r.exit_code == 0 and r.output.startswith("ok:"), r.output
    r = CliRunner().invoke(main, ["methods"])
    assert r.exit_code == 0
    for name in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "passthrough"):
        assert f"{name}:" in r.output


def test_tokenizer_source_model_path(llama_family, tmp_path):
    f = llama_family
    src = tmp_path / "tok"
    from tests._tiny import make_tiny_tokenizer

    make_tiny_tokenizer(src)
    (src / "tokenizer_config.json").write_text(
        json.dumps({**json.loads((src / "tokenizer_config.json").read_text()), "model_max_length": 33})
    )
    config = {"merge_method": "linear", "tokenizer_source": str(src),
              "models": [{"model": str(f["ft1"]), "parameters": {"weight": 1.0}}]}
    result, out = run_yaml(tmp_path, config)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 33
