"""Load: a merge of 8 input models and a calibration run of 1,000 samples, with bounded memory.

    .venv/bin/python -m benchmarks.load            # ~4 GB of generated models in a temp folder
    .venv/bin/python -m benchmarks.load --quick    # small shapes: a smoke test of this script

Each measured step runs in its own child process (the CLI, exactly as a user runs it), spawned by
a ~10 MB launcher; wall and cpu time and peak RSS (``ru_maxrss`` of that child alone, ``os.wait4``)
are recorded, with the load average before it (other work on the machine slows it down).

Bounds checked (and stated in the results):

* merge: peak RSS <= RSS of the same command with ``--dry-run`` (interpreter, torch, the plan:
  everything but tensor data) + 64 MiB + ``6 x (inputs + 1) x largest tensor`` in the computation
  dtype. It depends on the largest tensor and the number of inputs, not on the model's size: the
  8 fine-tunes are larger than the bound, and the same merge at a quarter of the depth (same
  tensor shapes, a quarter of the parameters) must peak within 64 MiB of it;
* calibration: peak RSS of the 1,000-sample run <= peak of the same run on 10 samples + 64 MiB
  (per-example squared gradients are summed into one tensor per parameter).

Writes benchmarks/results/load.md and load.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import command_line, save

MIB = 1 << 20
CLI = "from mergekit_bico.cli import yaml_main; yaml_main()"
CLI_MAIN = "from mergekit_bico.cli import main; main()"

FULL = dict(hidden=1024, intermediate=2816, layers=16, vocab=4096, inputs=8, calib_samples=1000)
QUICK = dict(hidden=256, intermediate=704, layers=8, vocab=1024, inputs=8, calib_samples=1000)


# ---------------------------------------------------------------------------------------------
# Inputs


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
        shapes += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in ("q", "k", "v", "o")]
        shapes += [(p + "mlp.gate_proj.weight", (intermediate, hidden)), (p + "mlp.up_proj.weight", (intermediate, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, intermediate))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def write_llama(folder: Path, spec: dict[str, int], seed: int, base: Optional[Path] = None, shard_bytes: int = 200 * MIB) -> Path:
    """A Llama-shaped bfloat16 checkpoint (config.json + sharded safetensors + index): random for the
    base; for a fine-tune, the base plus seeded N(0, 0.002) noise."""
    import torch
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": spec["hidden"],
           "intermediate_size": spec["intermediate"], "num_hidden_layers": spec["layers"], "vocab_size": spec["vocab"],
           "num_attention_heads": 16 if spec["hidden"] % 16 == 0 else 8, "num_key_value_heads": 16 if spec["hidden"] % 16 == 0 else 8,
           "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    base_index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"] if base else {}
    loaded: dict[str, dict] = {}
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, Any]] = [{}]
    used = 0
    for name, shape in llama_shapes(spec["hidden"], spec["intermediate"], spec["layers"], spec["vocab"]):
        if base is None:
            t = (torch.randn(shape, generator=gen) * (1.0 if len(shape) == 1 else 0.02)).to(torch.bfloat16)
        else:
            shard = base_index[name]
            if shard not in loaded:
                loaded.clear()
                loaded[shard] = load_file(str(base / shard))
            t = (loaded[shard][name].float() + torch.randn(shape, generator=gen) * 0.002).to(torch.bfloat16)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += nbytes
    weight_map = {}
    for i, tensors in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def write_calibration_model(folder: Path, samples: int, seed: int = 0) -> tuple[Path, Path]:
    """A small GPT-2 (4 layers, width 256, word-level tokenizer of 1,000 words) and ``samples`` lines."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

    vocab = 1000
    words = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(vocab - 3)]
    raw = Tokenizer(WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=256, n_head=8, n_layer=4, n_inner=1024, n_positions=128,
                        bos_token_id=2, eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = AutoModelForCausalLM.from_config(config)
    model_dir = folder / "small"
    model.save_pretrained(str(model_dir), max_shard_size="8MB")
    tok.save_pretrained(str(model_dir))
    rng = random.Random(seed)
    lines = [" ".join(f"w{rng.randrange(vocab - 3)}" for _ in range(rng.randint(16, 48))) for _ in range(samples)]
    data = folder / "calib.txt"
    data.write_text("\n".join(lines) + "\n")
    return model_dir, data


# ---------------------------------------------------------------------------------------------
# Steps


def measured(cmd: list[str], what: str, env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Run ``cmd`` alone (:func:`benchmarks.common.child`): wall and cpu seconds, peak RSS of that
    process (MiB), load average before."""
    from benchmarks.common import child

    res = child(cmd, env=env)
    if res["rc"] != 0:
        raise SystemExit(f"{what} failed (exit {res['rc']}): {res['output'][-800:]}")
    return {k: res[k] for k in ("wall_s", "cpu_s", "peak_rss_mib", "loadavg_before")}


def check_output(out: Path, models: list[Path], base: Path, names: list[str], density: float) -> dict[str, Any]:
    """The output has every tensor; a few of them equal the method applied to the whole tensors
    (the executor merged them in slices)."""
    import torch
    from mergekit_bico.io import LazyModel
    from mergekit_bico.methods import get_method

    got = LazyModel(out)
    assert sorted(got.keys()) == sorted(LazyModel(base).keys()), "output tensors differ from the base's"
    ties = get_method("ties")
    worst = 0.0
    for name in names:
        inputs = [LazyModel(m).get(name, dtype=torch.float32) for m in models]
        ref = LazyModel(base).get(name, dtype=torch.float32)
        params = [{"weight": 1.0, "density": density} for _ in models]
        want = ties.merge(inputs, ref, params, {}, tensor_name=name).to(torch.bfloat16)
        have = got.get(name)
        diff = (have.float() - want.float()).abs()
        # bfloat16 rounding of equal float32 values is exact; ties on the top-k threshold may differ
        worst = max(worst, float(diff.max()))
        mismatched = int((diff > 0).sum())
        assert mismatched <= max(8, have.numel() // 10_000), f"{name}: {mismatched} elements differ"
    return {"tensors": len(got.keys()), "checked": names, "max_abs_diff": worst}


SLACK_MIB = 64  # allocator arenas, TIES histograms, small buffers: a constant, not per input or per tensor
# Copies of the largest tensor per input that one merge step may hold: the float32 input (read
# as bfloat16 first), its delta, its sparsified weighted delta, masks, and freed buffers the
# allocator keeps for the next step (M_TRIM_THRESHOLD, see cli._tune_malloc).
COPIES_PER_INPUT = 6


def merge_step(work: Path, spec: dict[str, int], *, verify: bool) -> dict[str, Any]:
    """Generate base + 8 fine-tunes of ``spec``, merge them (TIES) in a measured child, check the output."""
    import yaml

    t0 = time.perf_counter()
    base = write_llama(work / "base", spec, seed=1)
    models = [write_llama(work / f"ft{i}", spec, seed=100 + i, base=base) for i in range(spec["inputs"])]
    gen_s = time.perf_counter() - t0
    shapes = llama_shapes(spec["hidden"], spec["intermediate"], spec["layers"], spec["vocab"])
    largest = max(math.prod(s) for _, s in shapes)
    params = sum(math.prod(s) for _, s in shapes)
    density = 0.3
    cfg = {"merge_method": "ties", "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
           "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": density}} for m in models]}
    config = work / "ties8.yml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = work / "merged"
    py = sys.executable
    try:
        # the baseline imports torch itself: the merge does (TIES runs in torch), --dry-run no longer does
        dry = measured([py, "-c", "import torch; " + CLI, str(config), str(out), "--dry-run", "--quiet"], "dry run")
        merge = measured([py, "-c", CLI, str(config), str(out), "--quiet", "--out-shard-size", "1G"], "merge")
        checked = check_output(out, models, base, ["model.embed_tokens.weight", "model.layers.3.mlp.up_proj.weight",
                                                   "model.layers.0.input_layernorm.weight"], density) if verify else None
        input_bytes = [folder_bytes(p) for p in [base, *models]]
        output_mib = folder_bytes(out) / MIB
    finally:
        for p in [base, *models, out]:
            shutil.rmtree(p, ignore_errors=True)
    bound_mib = dry["peak_rss_mib"] + SLACK_MIB + COPIES_PER_INPUT * (spec["inputs"] + 1) * largest * 4 / MIB
    return {
        "models": f"{spec['inputs']} fine-tunes + base, Llama-shaped, {spec['layers']} layers, hidden {spec['hidden']}, "
                  f"intermediate {spec['intermediate']}, vocab {spec['vocab']}, bfloat16 on disk",
        "layers": spec["layers"],
        "params_per_model": params,
        "largest_tensor_elements": largest,
        "model_file_mib": input_bytes[0] / MIB,
        "all_inputs_file_mib": sum(input_bytes) / MIB,
        "eight_whole_models_mib": spec["inputs"] * params * 2 / MIB,
        "generate_s": gen_s,
        "dry_run": dry,
        "merge": merge,
        "output_mib": output_mib,
        "bound_mib": bound_mib,
        "copies_per_input_measured": (merge["peak_rss_mib"] - dry["peak_rss_mib"]) / ((spec["inputs"] + 1) * largest * 4 / MIB),
        "within_bound": merge["peak_rss_mib"] <= bound_mib,
        "whole_inputs_exceed_bound": spec["inputs"] * params * 2 / MIB > bound_mib,
        "verify": checked,
    }


def calibration_step(work: Path, samples: int) -> dict[str, Any]:
    """Fisher of a small model on 10 and on ``samples`` samples, each in a measured child."""
    import yaml
    from safetensors import safe_open

    small, data = write_calibration_model(work, samples)
    py = sys.executable
    runs = {}
    for n in (10, samples):
        c = {"merge_method": "fisher", "models": [{"model": str(small)}],
             "calibration": {"data": str(data), "samples": n, "max_length": 64, "batch_size": 8}}
        path = work / f"fisher{n}.yml"
        path.write_text(yaml.safe_dump(c))
        r = measured([py, "-c", CLI_MAIN, "calibrate", str(path), "--cache-dir", str(work / f"cache{n}"), "--quiet"],
                     f"calibration ({n} samples)", env={"OMP_NUM_THREADS": "1"})
        files = sorted((work / f"cache{n}").rglob("*.safetensors"))
        with safe_open(str(files[0]), "pt") as fh:
            examples = int(fh.metadata()["examples"])
        assert examples == n, (examples, n)
        runs[str(n)] = {**r, "examples": examples}
    startup = measured([py, "-c", "import torch, transformers, mergekit_bico.cli"], "startup")
    bound = runs["10"]["peak_rss_mib"] + SLACK_MIB
    return {
        "model": "GPT-2 shaped, 4 layers, width 256, vocab 1000, float32",
        "params": sum(math.prod(t) for t in _shapes_of(small)),
        "samples": samples,
        "runs": runs,
        "startup_rss_mib": startup["peak_rss_mib"],
        "bound_mib": bound,
        "within_bound": runs[str(samples)]["peak_rss_mib"] <= bound,
        "samples_per_s": samples / runs[str(samples)]["wall_s"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="mergekit-bico-load-", dir=args.workdir))
    try:
        main = merge_step(work, spec, verify=True)
        quarter = merge_step(work, {**spec, "layers": max(2, spec["layers"] // 4)}, verify=False)
        growth = main["merge"]["peak_rss_mib"] - quarter["merge"]["peak_rss_mib"]
        calibration = calibration_step(work, spec["calib_samples"])
        return {"merge": main, "merge_quarter_depth": quarter, "peak_growth_4x_model_mib": growth,
                "size_independent": growth <= SLACK_MIB, "calibration": calibration, "quick": bool(args.quick)}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _shapes_of(model: Path) -> list[tuple[int, ...]]:
    from mergekit_bico.io import LazyModel

    m = LazyModel(model)
    return [m.shape(n) for n in m.keys()]


def render(report: dict[str, Any]) -> str:
    m, q, c = report["merge"], report["merge_quarter_depth"], report["calibration"]
    ok = lambda b: "PASS" if b else "FAIL"  # noqa: E731
    fp32 = m["largest_tensor_elements"] * 4 / MIB

    def row(label: str, r: dict[str, Any]) -> str:
        return f"| {label} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['loadavg_before']:.1f} |"

    lines = [
        "## Merge of 8 models (TIES, `dtype: float32`, `out_dtype: bfloat16`)",
        "",
        f"Inputs: {m['models']}: {m['params_per_model'] / 1e6:.0f}M parameters, {m['model_file_mib']:.0f} MiB per model, "
        f"{m['all_inputs_file_mib']:.0f} MiB for all 9 (the 8 fine-tunes alone: {m['eight_whole_models_mib']:.0f} MiB). "
        f"Largest tensor: {m['largest_tensor_elements'] / 1e6:.1f}M elements ({fp32:.0f} MiB in float32). Generated in "
        f"{m['generate_s']:.0f} s (not measured). The same merge at a quarter of the depth ({q['layers']} layers, "
        f"{q['params_per_model'] / 1e6:.0f}M parameters, same tensor shapes) shows what grows with the model's size.",
        "",
        "| step | wall s | cpu s | peak RSS MiB | load average before |",
        "|---|---|---|---|---|",
        row(f"`--dry-run`, {m['layers']} layers (interpreter, torch, plan; no tensor read)", m["dry_run"]),
        row(f"merge, {m['layers']} layers (9 x {m['model_file_mib']:.0f} MiB -> {m['output_mib']:.0f} MiB)", m["merge"]),
        row(f"merge, {q['layers']} layers (9 x {q['model_file_mib']:.0f} MiB -> {q['output_mib']:.0f} MiB)", q["merge"]),
        "",
        f"Bound: peak RSS <= RSS(`--dry-run`) + {SLACK_MIB} MiB + {COPIES_PER_INPUT} x (inputs + 1) x largest tensor in "
        f"float32 = {m['dry_run']['peak_rss_mib']:.0f} + {SLACK_MIB} + {COPIES_PER_INPUT} x 9 x {fp32:.0f} = "
        f"**{m['bound_mib']:.0f} MiB**; measured {m['merge']['peak_rss_mib']:.0f} MiB "
        f"({m['copies_per_input_measured']:.1f} copies per input): **{ok(m['within_bound'])}**. "
        "(Per input, one merge step holds at most its float32 tensor, its delta, its sparsified weighted delta and "
        "masks, plus freed buffers the allocator keeps for the next step.) The 8 fine-tunes alone, as stored, are larger "
        f"than the bound: {ok(m['whole_inputs_exceed_bound'])}. A model 4x deeper costs "
        f"{report['peak_growth_4x_model_mib']:+.0f} MiB of peak RSS (<= {SLACK_MIB}: "
        f"**{ok(report['size_independent'])}**).",
    ]
    if m["verify"]:
        lines.append(f"Output check: {m['verify']['tensors']} tensors; {', '.join(m['verify']['checked'])} equal TIES "
                     f"on the whole tensors (max abs diff {m['verify']['max_abs_diff']:.3g}).")
    lines += [
        "",
        f"## Calibration: diagonal Fisher on {c['samples']:,} samples",
        "",
        f"Model: {c['model']} ({c['params'] / 1e6:.1f}M parameters); `mergekit-bico calibrate` (expected Fisher, "
        "max_length 64, batch_size 8, one thread: `OMP_NUM_THREADS=1`, the fastest for per-example passes of a small "
        f"model). Startup (`import torch, transformers`) peak RSS: {c['startup_rss_mib']:.0f} MiB.",
        "",
        "| samples | wall s | cpu s | peak RSS MiB | load average before |",
        "|---|---|---|---|---|",
    ]
    lines += [row(f"{int(n):,}", r) for n, r in c["runs"].items()]
    lines += [
        "",
        f"Bound: peak RSS with {c['samples']:,} samples <= peak RSS with 10 samples + {SLACK_MIB} MiB = "
        f"**{c['bound_mib']:.0f} MiB**; measured {c['runs'][str(c['samples'])]['peak_rss_mib']:.0f} MiB: "
        f"**{ok(c['within_bound'])}** ({c['samples_per_s']:.0f} samples/s). Per-example squared gradients are summed "
        "into one float32 tensor per parameter: memory is the model, its gradients and that sum, whatever the data size.",
    ]
    if report["quick"]:
        lines += ["", "(`--quick`: small shapes; the figures above are a smoke test, not the benchmark.)"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--workdir", default=None, help="where to generate the models (default: the system temp folder)")
    ap.add_argument("--results", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    report = run(args)
    body = render(report)
    kwargs = {"results": Path(args.results)} if args.results else {}
    path = save("load", "Load: 8-model merge and 1,000-sample calibration with bounded memory",
                command_line("benchmarks.load", argv), body, report, **kwargs)
    print(body)
    print(f"\nwrote {path}")
    ok = (report["merge"]["within_bound"] and report["merge"]["whole_inputs_exceed_bound"] and report["size_independent"]
          and report["calibration"]["within_bound"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
