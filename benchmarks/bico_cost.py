"""Cost of BiCo's calibration: statistics + maps vs one forward+backward of both models.

    python -m benchmarks.bico_cost                 # what `make bench` runs
    python -m benchmarks.bico_cost --samples 512

The pair is the demo's: all-MiniLM-L6-v2 (source) -> paraphrase-MiniLM-L3-v2 (target), on
``--samples`` class-balanced Rotten Tomatoes sentiment snippets with the zero-shot-head loss
(:mod:`benchmarks.realmodels.zeroshot`). Each measurement runs in its own child process, so its
peak RSS (``ru_maxrss``) is its own:

* ``plain``: one batched forward + backward (parameter gradients, no optimizer) of A and of B over
  the calibration batches -- the reference;
* ``bico``: :func:`mergekit_bico.transfer.prepare_transfer` on a cold cache; the report splits its
  time into model loading, the statistics pass (forward + backward of both models with the
  capture hooks and the float64 accumulation of every cross-covariance) and the maps (batched
  SVDs, completion, writing the cache);
* ``bico, memory_budget``: the same with ``memory_budget`` half the statistics' size, so the blocks
  are split over several passes over the data;
* ``bico, tie_maps``: one map per tied group of spaces (fewer, shared SVDs).

The target of issue 4: (statistics + maps) <= 1.5x the plain forward+backward.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import child, command_line, last_json, save

TARGET_RATIO = 1.5


def _calibration(path: Path, samples: int):
    from benchmarks.realmodels import data
    from mergekit_bico.config import CalibrationConfig

    data.write_calibration_jsonl("sentiment", path, samples)
    return CalibrationConfig(data=str(path), samples=samples, max_length=64, batch_size=16,
                             loss="benchmarks.realmodels.zeroshot:sentiment_loss")


def measure(mode: str, workdir: Path, samples: int, budget: Optional[int], tie: bool = False) -> dict[str, Any]:
    """One measurement in this process (see the module docstring)."""
    import torch

    from benchmarks.realmodels import model_a_dir, model_b_dir
    from mergekit_bico.config import TransferConfig

    a, b = model_a_dir(), model_b_dir()
    calib = _calibration(workdir / f"calib-{samples}.jsonl", samples)
    if mode == "plain":
        from mergekit_bico.transfer.bico import load_calibration

        t0 = time.perf_counter()
        models, batches, losses, _ = load_calibration([a, b], calib, device="cpu")
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for model, loss in zip(models, losses):
            for batch in batches:
                model.zero_grad(set_to_none=True)
                loss(model, batch).backward()
        return {"load_s": load_s, "seconds": time.perf_counter() - t0,
                "tokens": int(sum(int(x["attention_mask"].sum()) for x in batches)), "batches": len(batches)}
    from mergekit_bico.transfer import prepare_transfer

    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=workdir))
    cfg = TransferConfig(source_base=str(a), memory_budget=budget, tie_maps=tie)
    prepared = prepare_transfer(cfg=cfg, source_finetuned=a, target_base=b, calibration=calib,
                                cache_dir=cache, device="cpu", progress=False)
    rep = prepared.report()
    t = rep["timings"]
    return {"load_s": t["load_s"], "statistics_s": t["statistics_s"], "maps_s": t["maps_s"],
            "seconds": t["statistics_s"] + t["maps_s"], "passes": rep["memory"]["passes"],
            "statistics_bytes": rep["memory"]["statistics_bytes"], "maps": len(rep["spaces"]),
            "threads": torch.get_num_threads()}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bico_cost", description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--larger", type=int, default=512,
                   help="also measure plain and BiCo at this many samples (the maps' cost does not grow with the data); 0: skip")
    p.add_argument("--results", default=None, help="folder for bico_cost.md/json (default benchmarks/results)")
    p.add_argument("--_measure", choices=["plain", "bico"], help=argparse.SUPPRESS)
    p.add_argument("--_workdir", help=argparse.SUPPRESS)
    p.add_argument("--_budget", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_tie", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._measure:
        print(json.dumps(measure(args._measure, Path(args._workdir), args.samples, args._budget, args._tie)))
        return 0

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        def run(mode: str, label: str, budget: Optional[int] = None, tie: bool = False,
                samples: Optional[int] = None) -> dict[str, Any]:
            samples = samples or args.samples
            cmd = [sys.executable, "-m", "benchmarks.bico_cost", "--_measure", mode, "--_workdir", tmp,
                   "--samples", str(samples)] + (["--_budget", str(budget)] if budget else []) + \
                (["--_tie"] if tie else [])
            res = child(cmd)
            row = {"label": label, "mode": mode, "budget": budget, "samples": samples, **last_json(res, label),
                   "peak_rss_mib": res["peak_rss_mib"], "wall_s": res["wall_s"]}
            rows.append(row)
            print(f"{label}: {row['seconds']:.1f} s, peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
            return row

        plain = run("plain", "plain fwd+bwd of A and B (reference)")
        full = run("bico", "BiCo statistics + maps")
        budget = max(1, full["statistics_bytes"] // 2)
        run("bico", f"BiCo, memory_budget {budget / 2**20:.0f} MiB", budget)
        run("bico", "BiCo, tie_maps: true", tie=True)
        if args.larger:
            run("plain", f"plain fwd+bwd of A and B, {args.larger} samples (reference)", samples=args.larger)
            run("bico", f"BiCo statistics + maps, {args.larger} samples", samples=args.larger)
    reference = {r["samples"]: r["seconds"] for r in rows if r["mode"] == "plain"}
    for r in rows:
        r["ratio"] = r["seconds"] / reference[r["samples"]]
    lines = [
        f"Pair: all-MiniLM-L6-v2 -> paraphrase-MiniLM-L3-v2; {args.samples} Rotten Tomatoes snippets "
        f"({plain['tokens']} tokens, {plain['batches']} batches of 16), zero-shot-head loss; "
        "each row its own process; model loading excluded from the seconds (its time is in the JSON); "
        "each ratio is against the plain forward+backward on the same samples.",
        "",
        "| measurement | seconds | x plain fwd+bwd | statistics s | maps s | passes | statistics MiB | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        bico = r["mode"] == "bico"
        lines.append(
            f"| {r['label']} | {r['seconds']:.1f} | {r['ratio']:.2f} | "
            f"{r['statistics_s']:.1f} | {r['maps_s']:.1f} | {r['passes']} | {r['statistics_bytes'] / 2**20:.0f} | "
            f"{r['peak_rss_mib']:.0f} |" if bico else
            f"| {r['label']} | {r['seconds']:.1f} | 1.00 | | | | | {r['peak_rss_mib']:.0f} |")
    ratio = rows[1]["ratio"]
    larger = [r for r in rows if r["mode"] == "bico" and r["samples"] == args.larger and args.larger]
    for r in rows:
        r.pop("output", None)
    lines += ["", f"Target: statistics + maps <= {TARGET_RATIO}x the plain forward+backward: "
                  f"{ratio:.2f}x, {'PASS' if ratio <= TARGET_RATIO else 'FAIL'}."]
    if larger:
        lines += [f"At {args.larger} samples: {larger[0]['ratio']:.2f}x "
                  f"({'PASS' if larger[0]['ratio'] <= TARGET_RATIO else 'FAIL'}): the maps' time is fixed by the widths, "
                  "the statistics' grows with the tokens like the reference."]
    body = "\n".join(lines)
    save("bico_cost", "BiCo calibration cost", command_line("benchmarks.bico_cost", argv), body,
         {"rows": rows, "target_ratio": TARGET_RATIO}, **({"results": Path(args.results)} if args.results else {}))
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
