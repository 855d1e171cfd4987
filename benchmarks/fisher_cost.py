"""Cost of the diagonal-Fisher pass relative to one plain forward+backward over the same data.

    .venv/bin/python -m benchmarks.fisher_cost [--layers 2] [--seq-len 128] [--samples 16] [--threads 1]

Builds a GPT-2-small-shaped but shallower causal LM (hidden 768, 12 heads, MLP 3072, word-level
vocabulary of 8192 tokens, random weights) in a temporary folder, writes random calibration text,
then measures each mode in its OWN subprocess (so peak memory, ``ru_maxrss``, is per measurement):

* ``load``: load the model and tokenizer, tokenize (the memory floor of every other row);
* ``plain fwd+bwd``: one batched forward + backward of the mean loss per batch (what a training
  epoch over the data costs, without the optimizer);
* ``fisher empirical`` / ``fisher expected (k)``: :func:`fisher_diagonal` (per-example squared
  gradients by batch-1 backward passes; ``expected`` samples k sequences per example);
* ``compute_fisher (cold)``: the whole public call: fingerprint, load, Fisher, safetensors write.

Prints a markdown table: seconds, ratio to ``plain fwd+bwd``, peak RSS and peak RSS above ``load``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

MODES = ["load", "plain", "fisher_empirical", "fisher_expected", "compute_fisher"]


def _peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024.0


def build(folder: Path, *, layers: int, vocab: int, seq_len: int, samples: int, seed: int = 0) -> tuple[Path, Path]:
    """Save the benchmark model (with a word-level tokenizer) and a calibration .txt file."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(vocab - 3)]
    raw = Tokenizer(WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=768, n_head=12, n_layer=layers, n_inner=3072,
                        n_positions=max(seq_len, 64), bos_token_id=2, eos_token_id=2, pad_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = AutoModelForCausalLM.from_config(config)
    model_dir = folder / "model"
    model.save_pretrained(str(model_dir), max_shard_size="50MB")
    tok.save_pretrained(str(model_dir))
    rng = random.Random(seed)
    lines = []
    for _ in range(samples):
        n = rng.randint(seq_len // 2, seq_len)  # mixed lengths: batches carry padding
        lines.append(" ".join(f"w{rng.randrange(vocab - 3)}" for _ in range(n)))
    data = folder / "calib.txt"
    data.write_text("\n".join(lines) + "\n")
    return model_dir, data


def measure(mode: str, model_dir: Path, data: Path, *, seq_len: int, batch_size: int, samples: int,
            threads: int, lm_samples: int) -> dict:
    """Run one mode in this process; return {'seconds', 'peak_rss_mib'}."""
    import torch

    torch.set_num_threads(threads)
    from mergekit_bico.calibration.data import load_samples, make_batches
    from mergekit_bico.calibration.fisher import compute_fisher, fisher_diagonal
    from mergekit_bico.calibration.losses import resolve_loss
    from mergekit_bico.calibration.models import load_model
    from mergekit_bico.calibration.store import StatsStore
    from mergekit_bico.config import CalibrationConfig

    cfg = CalibrationConfig(data=str(data), samples=samples, max_length=seq_len, batch_size=batch_size)
    if mode == "compute_fisher":
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            compute_fisher(model_dir, cfg, estimator="empirical", store=StatsStore(cache), progress=False)
            seconds = time.perf_counter() - start
        return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib()}
    model, tok = load_model(model_dir, cfg)
    batches = make_batches(load_samples(cfg, need_labels=False), tok, cfg, causal_lm=True)
    seconds = 0.0
    if mode == "plain":
        loss_fn = resolve_loss(cfg, model)
        start = time.perf_counter()
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
        seconds = time.perf_counter() - start
    elif mode in ("fisher_empirical", "fisher_expected"):
        estimator = mode.split("_", 1)[1]
        start = time.perf_counter()
        fisher_diagonal(model, batches, kind="causal_lm", estimator=estimator, lm_samples=lm_samples, seed=0)
        seconds = time.perf_counter() - start
    elif mode != "load":
        raise SystemExit(f"unknown mode {mode}")
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib()}


def _variant(model_dir: Path, out: Path, seed: int) -> Path:
    """A "fine-tune": the model plus seeded Gaussian noise (std 0.01), saved like the model."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    gen = torch.Generator().manual_seed(seed)
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(shard))
        save_file({k: (v + 0.01 * torch.randn(v.shape, generator=gen)).contiguous() if v.is_floating_point() else v
                   for k, v in tensors.items()}, str(shard), metadata={"format": "pt"})
    return out


def _merge_rows(tmp: Path, model_dir: Path, data: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Fisher merge vs linear merge of the same two models through the CLI (statistics precomputed
    by ``mergekit-bico calibrate``, so the rows time the merges alone)."""
    import yaml

    from benchmarks.common import child

    fts = [_variant(model_dir, tmp / f"ft{k}", seed=k) for k in (1, 2)]
    calib = {"data": str(data), "samples": args.samples, "max_length": args.seq_len, "batch_size": args.batch_size}
    configs = {
        "linear": {"merge_method": "linear", "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in fts],
                   "dtype": "float32"},
        "fisher": {"merge_method": "fisher", "models": [{"model": str(f), "calibration": calib} for f in fts],
                   "parameters": {"fisher_floor": 1e-6, "normalize": True}, "dtype": "float32"},
    }
    cache = tmp / "cache"
    bin_dir = Path(sys.executable).parent
    out: dict[str, dict] = {}
    for name, cfg in configs.items():
        path = tmp / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg))
        if name == "fisher":
            pre = child([str(bin_dir / "mergekit-bico"), "calibrate", str(path), "--cache-dir", str(cache), "-q"])
            if pre["rc"] != 0:
                raise SystemExit(f"calibrate failed: {pre['output'][-500:]}")
            out["fisher_calibrate"] = pre
        res = child([str(bin_dir / "mergekit-bico-yaml"), str(path), str(tmp / f"out-{name}"), "-q",
                     "--cache-dir", str(cache)])
        if res["rc"] != 0:
            raise SystemExit(f"{name} merge failed: {res['output'][-500:]}")
        out[name] = res
    return out


def main(argv: list[str] | None = None) -> None:
    from benchmarks.common import child, command_line, last_json, save

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lm-samples", type=int, default=1)
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common = dict(seq_len=args.seq_len, batch_size=args.batch_size, samples=args.samples,
                  threads=args.threads, lm_samples=args.lm_samples)
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.model), Path(args.data), **common)))
        return

    import logging

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = build(Path(tmp), layers=args.layers, vocab=args.vocab, seq_len=args.seq_len,
                                samples=args.samples)
        n_params = sum(os.path.getsize(p) for p in model_dir.glob("*.safetensors")) / 4 / 1e6
        results = {}
        for mode in MODES:
            cmd = [sys.executable, "-m", "benchmarks.fisher_cost", "--measure", mode, "--model", str(model_dir),
                   "--data", str(data), "--layers", str(args.layers), "--seq-len", str(args.seq_len),
                   "--samples", str(args.samples), "--batch-size", str(args.batch_size),
                   "--threads", str(args.threads), "--lm-samples", str(args.lm_samples)]
            res = child(cmd)
            results[mode] = {**last_json(res, mode), "peak_rss_mib": res["peak_rss_mib"]}
        merges = _merge_rows(Path(tmp), model_dir, data, args)

    plain = results["plain"]["seconds"]
    floor = results["load"]["peak_rss_mib"]
    labels = {
        "load": "load model + tokenize (memory floor)",
        "plain": "plain fwd+bwd (batched, 1 pass)",
        "fisher_empirical": "fisher empirical",
        "fisher_expected": f"fisher expected ({args.lm_samples} sample/position)",
        "compute_fisher": "compute_fisher, cold (load + Fisher + write)",
    }
    lines = [
        f"GPT-2-shaped causal LM: {args.layers} layers, hidden 768, vocab {args.vocab}, ~{n_params:.1f}M params; "
        f"{args.samples} samples of {args.seq_len // 2}-{args.seq_len} tokens, batch {args.batch_size}, "
        f"{args.threads} thread(s), torch on CPU. Each row its own process.",
        "",
        "| measurement | seconds | x plain fwd+bwd | peak RSS MiB | above floor MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        r = results[mode]
        ratio = "-" if mode == "load" else f"{r['seconds'] / plain:.2f}"
        seconds = "-" if mode == "load" else f"{r['seconds']:.2f}"
        lines.append(f"| {labels[mode]} | {seconds} | {ratio} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - floor:+.0f} |")
    lin, fis = merges["linear"], merges["fisher"]
    lines += [
        "",
        "Merging two fine-tunes of that model through the CLI (`mergekit-bico-yaml`, whole process: start-up, "
        "planning, merge, write; the Fisher statistics precomputed by `mergekit-bico calibrate` in "
        f"{merges['fisher_calibrate']['wall_s']:.1f} s):",
        "",
        "| merge | wall s | x linear | peak RSS MiB |",
        "|---|---:|---:|---:|",
        f"| linear | {lin['wall_s']:.2f} | 1.00 | {lin['peak_rss_mib']:.0f} |",
        f"| fisher (normalize, floor 1e-6) | {fis['wall_s']:.2f} | {fis['wall_s'] / lin['wall_s']:.2f} | {fis['peak_rss_mib']:.0f} |",
    ]
    body = "\n".join(lines)
    save("fisher_cost", "Fisher pass and Fisher merge cost", command_line("benchmarks.fisher_cost", argv), body,
         {"results": results, "merges": {k: {kk: vv for kk, vv in v.items() if kk != "output"}
                                         for k, v in merges.items()}, "args": vars(args)})
    print(body)


if __name__ == "__main__":
    main()
