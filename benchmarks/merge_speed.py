"""Merge speed and memory: ``mergekit-bico-yaml`` vs mergekit 0.1.5's ``mergekit-yaml`` vs an I/O floor.

Run (``make bench`` runs the first form)::

    python -m benchmarks.merge_speed                      # sizes 1x and 4x
    python -m benchmarks.merge_speed --quick              # 1x only
    python -m benchmarks.merge_speed --sizes 1,4 --workdir /big/disk/bench \\
        --mergekit-bin /tmp/mkvenv/bin/mergekit-yaml     # reuse an existing mergekit install

What it does
------------
1. Generates (once, cached under ``--workdir``) three Llama-shaped float32 models per size:
   ``base`` (random weights, std 0.02, norms 1) and two "fine-tunes" ``ft1``/``ft2`` =
   base + N(0, 0.002) noise, saved as sharded safetensors with an index and a ``config.json``.
   1x = 148M parameters (hidden 768, intermediate 2048, 14 layers, vocab 32000, untied head),
   4x = 607M parameters (hidden 1536, intermediate 4096, 18 layers).
2. Installs mergekit 0.1.5 into its own venv (``<workdir>/mkvenv``, or ``--mergekit-venv``;
   ``--mergekit-bin`` reuses an existing ``mergekit-yaml``), so this project never imports mergekit.
3. For ``task_arithmetic`` and ``ties`` (one YAML, used by both tools, ``dtype``/``out_dtype``
   float32) runs each tool as a child process and measures it alone: wall time
   (``time.perf_counter`` around the child), peak RSS from ``os.wait4``'s rusage
   (``ru_maxrss`` of that child only; includes file-backed pages such as mmapped inputs)
   and, sampled every 20 ms from ``/proc/PID/status``, the peaks of ``RssAnon`` (heap) and
   ``RssFile`` (mapped files) to tell the two apart.
4. Times two I/O references on the same bytes:
   * ``floor``: one process that reads the three input models once (every shard, 16 MiB
     ``readinto`` chunks into a reused buffer) and writes one output of the same size (the base's
     bytes), ``fsync`` per output shard -- the minimum any merge must do. Our writer fsyncs every
     shard too; mergekit does not fsync.
   * ``cp``: ``cp -r`` of one input model (reads 1, writes 1, no fsync) -- informational.
5. Repeats task arithmetic on bfloat16 copies of the three models: with ``dtype: float32,
   out_dtype: bfloat16`` (our numpy path, against our torch path on the same config: the bytes
   must be the same) and with ``dtype: bfloat16`` (16-bit arithmetic, which runs in torch;
   against mergekit on the same config).
6. Checks numerical equality of our outputs with mergekit's (same tensor names, shapes and dtypes;
   max |ours - mergekit| per tensor over all tensors, must be <= 1e-6). TIES keeps the top-k
   magnitudes of each delta; where several elements tie at the k-th magnitude, which of them are
   kept is decided by the sort (mergekit: ``torch.argsort``, whose order among equal values is
   unspecified; mergekit-bico: lowest flat index). Elements that differ only for that reason are
   counted and reported apart, with the max diff over all other elements.

Before every timed run the input files are read once (so every tool starts with the inputs in the
page cache) and ``sync`` is called (so no tool pays for another's dirty pages). The machine may be
shared: our CLI and the I/O references run ``--repeat`` times (default 3) and the fastest run is
reported; mergekit, several times slower, runs ``--mergekit-repeat`` times (default 1). The 1-minute
load average before each run is kept in the JSON. ``python -c 'import torch'`` is timed too: every
torch-based merge pays that start-up, the floor does not. Our task_arithmetic runs in numpy and does
not import torch; one extra untimed run per method records whether ours did (``imports_torch``).

Output: a markdown table printed and written to ``benchmarks/results/merge_speed.md``, and
``benchmarks/results/merge_speed.json`` with every measurement, machine info, the command and
timestamps.

Targets (from the issue): TIES <= 0.3x mergekit's time, task_arithmetic <= 0.7x mergekit's time and
<= 1.5x the floor, our peak RSS at the largest size <= 1.2x that at 1x, max abs diff <= 1e-6.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

# ----------------------------------------------------------------------------------- model shapes
VOCAB = 32000
SIZES: dict[int, dict[str, int]] = {
    1: dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=12),
    2: dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=16),
    4: dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=18, num_attention_heads=12),
    8: dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=16),
}
BASE_STD = 0.02
FT_STD = 0.002
IN_SHARD_BYTES = 256 * 1024**2  # input shard size (HF style model-0000i-of-0000N.safetensors)
GEN_VERSION = 1  # bump to invalidate cached models

METHODS = {
    "task_arithmetic": {
        "models": [{"weight": 0.6}, {"weight": 0.4}],
        "parameters": None,
    },
    "ties": {
        "models": [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.5}],
        "parameters": {"normalize": True},
    },
}
TOLERANCE = 1e-6
TARGETS = {
    "ties_vs_mergekit": 0.3,
    "task_arithmetic_vs_mergekit": 0.7,
    "task_arithmetic_vs_floor": 1.5,
    "rss_growth": 1.2,
}


def tensor_shapes(cfg: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, h))]
    for layer in range(n):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (h, h)),
            (p + "self_attn.v_proj.weight", (h, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (VOCAB, h))]
    return out


def param_count(size: int) -> int:
    return sum(math.prod(s) for _, s in tensor_shapes(SIZES[size]))


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _gen_tensor(name: str, shape: tuple[int, ...], which: str):
    import torch

    g = torch.Generator().manual_seed(_seed("base", name))
    if name.endswith("norm.weight"):
        base = torch.ones(shape) + 0.01 * torch.randn(shape, generator=g)
    else:
        base = torch.randn(shape, generator=g).mul_(BASE_STD)
    if which == "base":
        return base
    g2 = torch.Generator().manual_seed(_seed(which, name))
    return base.add_(torch.randn(shape, generator=g2).mul_(FT_STD))


def _spec(size: int) -> dict[str, Any]:
    return {"version": GEN_VERSION, "size": size, "shape": SIZES[size], "vocab": VOCAB, "base_std": BASE_STD,
            "ft_std": FT_STD, "in_shard_bytes": IN_SHARD_BYTES}


def ensure_models(workdir: Path, size: int) -> dict[str, Path]:
    """Generate (or reuse) base/ft1/ft2 for one size; returns name -> folder."""
    root = workdir / "models" / f"x{size}"
    names = ("base", "ft1", "ft2")
    paths = {n: root / n for n in names}
    marker = root / "spec.json"
    spec = _spec(size)
    if marker.is_file() and json.loads(marker.read_text()) == spec and all(
        (p / "model.safetensors.index.json").is_file() for p in paths.values()
    ):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    shapes = tensor_shapes(SIZES[size])
    # group tensors into shards of at most IN_SHARD_BYTES
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * 4
        if shards[-1] and used + nbytes > IN_SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    n = len(shards)
    total = sum(math.prod(s) for _, s in shapes)
    print(f"[gen] x{size}: {total / 1e6:.0f}M parameters, {n} shards per model -> {root}", flush=True)
    started = time.perf_counter()
    cfg = SIZES[size]
    for which, path in paths.items():
        path.mkdir(parents=True, exist_ok=True)
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_attention_heads"], max_position_embeddings=2048,
            tie_word_embeddings=False, architectures=["LlamaForCausalLM"], torch_dtype="float32",
        ).save_pretrained(str(path))
        weight_map: dict[str, str] = {}
        for k, shard in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{n:05d}.safetensors"
            tensors = {name: _gen_tensor(name, shape, which) for name, shape in shard}
            save_file(tensors, str(path / fname), metadata={"format": "pt"})
            del tensors
            weight_map.update({name: fname for name, _ in shard})
        index = {"metadata": {"total_size": total * 4}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    marker.write_text(json.dumps(spec))
    print(f"[gen] done in {time.perf_counter() - started:.0f} s", flush=True)
    return paths


def write_config(path: Path, method: str, models: dict[str, Path], extra: Optional[dict[str, Any]] = None,
                 dtype: str = "float32", out_dtype: str = "float32") -> Path:
    import yaml

    spec = METHODS[method]
    cfg: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models[ft]), "parameters": dict(params)}
            for ft, params in zip(("ft1", "ft2"), spec["models"])
        ],
    }
    if spec["parameters"] or extra:
        cfg["parameters"] = {**(spec["parameters"] or {}), **(extra or {})}
    cfg["dtype"] = dtype
    cfg["out_dtype"] = out_dtype
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def ensure_bf16_models(workdir: Path, size: int, models: dict[str, Path]) -> dict[str, Path]:
    """bfloat16 copies of one size's base/ft1/ft2 (same shards, each tensor rounded to bfloat16)."""
    root = workdir / "models" / f"x{size}-bf16"
    paths = {n: root / n for n in models}
    marker = root / "spec.json"
    spec = {**_spec(size), "dtype": "bfloat16"}
    if marker.is_file() and json.loads(marker.read_text()) == spec and all(
        (p / "model.safetensors.index.json").is_file() for p in paths.values()
    ):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    import torch
    from safetensors.torch import load_file, save_file

    print(f"[gen] x{size}: bfloat16 copies -> {root}", flush=True)
    for name, src in models.items():
        dst = paths[name]
        dst.mkdir(parents=True)
        for f in weight_files(src):
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(dst / f.name),
                      metadata={"format": "pt"})
        config = json.loads((src / "config.json").read_text())
        config["torch_dtype"] = "bfloat16"
        (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        index = json.loads((src / "model.safetensors.index.json").read_text())
        index["metadata"]["total_size"] //= 2
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    marker.write_text(json.dumps(spec))
    return paths


# the torch path of the same CLI: the numpy kernel of task_arithmetic switched off
TORCH_PATH_CODE = ("import mergekit_bico.executor as E; E.NUMPY_ELEMENTWISE = False; "
                   "from mergekit_bico.cli import yaml_main; yaml_main()")


# ------------------------------------------------------------------------------------ mergekit
def ensure_mergekit(args: argparse.Namespace, workdir: Path) -> Optional[str]:
    if args.no_mergekit:
        return None
    if args.mergekit_bin:
        b = Path(args.mergekit_bin)
        if not b.exists():
            sys.exit(f"error: --mergekit-bin {b} does not exist")
        return str(b)
    venv = Path(args.mergekit_venv) if args.mergekit_venv else workdir / "mkvenv"
    binary = venv / "bin" / "mergekit-yaml"
    if binary.exists():
        return str(binary)
    print(f"[mergekit] installing {args.mergekit_spec} into {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [args.torch_spec], check=True)
    subprocess.run(pip + [args.mergekit_spec], check=True)
    if not binary.exists():
        sys.exit(f"error: installing mergekit did not produce {binary}")
    return str(binary)


def ours_cmd(args: argparse.Namespace) -> list[str]:
    if args.ours_bin:
        return shlex.split(args.ours_bin)
    b = Path(sys.executable).parent / "mergekit-bico-yaml"
    if b.exists():
        return [str(b)]
    return [sys.executable, "-c", "from mergekit_bico.cli import yaml_main; yaml_main()"]


def imports_torch(args: argparse.Namespace, cfg: Path, out: Path) -> Optional[bool]:
    """Whether our merge of ``cfg`` imports torch (one untimed run in a child; None with
    ``--ours-bin``, whose interpreter we do not control). task_arithmetic runs in numpy
    and need not. It writes into its own ``out`` (not the timed run's output, which is compared
    with mergekit's afterwards) and removes it."""
    if args.ours_bin:
        return None
    _rmtree(out)
    code = ("import sys; from mergekit_bico.cli import yaml_main\n"
            "try:\n    yaml_main(sys.argv[1:], standalone_mode=False)\n"
            "finally:\n    print('TORCH', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(cfg), str(out), "--quiet", *args.ours_args],
                          capture_output=True, text=True)
    _rmtree(out)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("TORCH ")), None)
    return None if proc.returncode or line is None else line.endswith("True")


# ---------------------------------------------------------------------------------- measuring


def run_measured(cmd: list[str], log_path: Path, env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Run one child alone: wall time, its own peak RSS (``os.wait4``), sampled RssAnon/RssFile peaks."""
    from benchmarks.common import launch

    load_before = os.getloadavg()[0]
    ru = launch(cmd, log=log_path, env=env, cwd=Path.cwd())
    rec = {
        "cmd": cmd,
        "rc": ru["rc"],
        "wall_s": round(ru["wall_s"], 3),
        "user_s": round(ru["user_s"], 3),
        "sys_s": round(ru["sys_s"], 3),
        "maxrss_mib": round(ru["maxrss_kb"] / 1024, 1),  # Linux: kB
        "rss_anon_peak_mib": round(ru["peak_kb"]["RssAnon"] / 1024, 1),
        "rss_file_peak_mib": round(ru["peak_kb"]["RssFile"] / 1024, 1),
        "minflt": ru["minflt"],
        "majflt": ru["majflt"],
        # last sample of /proc/PID/io: bytes that really came from / went to the disk
        "disk_read_mib": round(ru["io"].get("read_bytes", 0) / 2**20, 1),
        "disk_write_mib": round(ru["io"].get("write_bytes", 0) / 2**20, 1),
        "loadavg_before": round(load_before, 2),
        "log": str(log_path),
    }
    if rec["rc"] != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        print(f"  !! exit {rec['rc']}: {' '.join(cmd)}\n{tail}", flush=True)
    return rec


def weight_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def warm_and_sync(models: dict[str, Path]) -> None:
    """Put every input in the page cache (same start for every tool) and flush dirty pages."""
    buf = bytearray(16 << 20)
    for m in models.values():
        for f in weight_files(m):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    os.sync()


def floor_copy(inputs: list[Path], out: Path, *, fsync: bool = True, chunk: int = 16 << 20) -> None:
    """The I/O floor of a merge: read every input once, write one output of one model's size.

    Shards are processed in lockstep (shard k of every input, then shard k of the output, which
    gets the first input's bytes); each output shard is fsynced like our writer does.
    """
    out.mkdir(parents=True, exist_ok=False)
    buf = bytearray(chunk)
    view = memoryview(buf)
    lists = [weight_files(m) for m in inputs]
    for group in zip(*lists):
        handles = [open(f, "rb", buffering=0) for f in group]
        try:
            with open(out / group[0].name, "wb", buffering=0) as dst:
                for h in handles[1:]:
                    while h.readinto(buf):
                        pass
                while True:
                    n = handles[0].readinto(buf)
                    if not n:
                        break
                    dst.write(view[:n])
                if fsync:
                    os.fsync(dst.fileno())
        finally:
            for h in handles:
                h.close()
    for extra in ("config.json", "model.safetensors.index.json"):
        if (inputs[0] / extra).is_file():
            shutil.copyfile(inputs[0] / extra, out / extra)


# --------------------------------------------------------------------------------- equality
def _st_index(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in weight_files(folder):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = f
    return out


def _read_tensor(where: dict[str, Path], name: str):
    from safetensors import safe_open

    with safe_open(str(where[name]), framework="pt") as h:
        return h.get_tensor(name).clone()


def _threshold_ties(name: str, method: str, models: dict[str, Path], indexes: dict[str, dict[str, Path]]):
    """Flat bool mask of elements whose |delta| equals the top-k threshold of some input's delta when
    more elements tie there than top-k keeps: which of those are kept is up to the sort's tie-breaking
    (mergekit: torch.argsort, unstable; mergekit-bico: lowest flat index first)."""
    import torch

    base = _read_tensor(indexes["base"], name).float().reshape(-1)
    tied = torch.zeros(base.numel(), dtype=torch.bool)
    for ft, params in zip(("ft1", "ft2"), METHODS[method]["models"]):
        density = params.get("density", 1.0)
        if density >= 1:
            continue
        w = (_read_tensor(indexes[ft], name).float().reshape(-1) - base).abs()
        n = w.numel()
        k = max(1, int(density * n))
        thr = torch.kthvalue(w, n - k + 1).values
        eq = w == thr
        if int((w > thr).sum()) + int(eq.sum()) > k:
            tied |= eq
    return tied


def compare_outputs(ours: Path, theirs: Path, *, method: str, models: dict[str, Path]) -> dict[str, Any]:
    """Max |ours - theirs| per tensor over all tensors (streamed, one tensor at a time).

    For methods with top-k pruning, elements that differ are also classified: those lying on a tied
    top-k threshold of an input delta are reported apart (``*_tie_break``); the rest must be equal.
    """
    from safetensors import safe_open

    a, b = _st_index(ours), _st_index(theirs)
    topk = any(p.get("density", 1.0) < 1 for p in METHODS[method]["models"])
    indexes = {k: _st_index(v) for k, v in models.items()} if topk else {}
    res: dict[str, Any] = {
        "tensors": len(a),
        "only_ours": sorted(set(a) - set(b))[:10],
        "only_mergekit": sorted(set(b) - set(a))[:10],
        "mismatched_meta": [],
        "max_abs_diff": 0.0,
        "tensors_over_tol": 0,
        "elements": 0,
        "elements_over_tol": 0,
        "elements_over_tol_tie_break": 0,
        "max_abs_diff_excluding_tie_break": 0.0,
        "worst": [],
    }
    per: list[tuple[float, str, int, int, float]] = []
    handles: dict[Path, Any] = {}
    try:
        for name in sorted(set(a) & set(b)):
            for f in (a[name], b[name]):
                if f not in handles:
                    handles[f] = safe_open(str(f), framework="pt")
            x, y = handles[a[name]].get_tensor(name), handles[b[name]].get_tensor(name)
            if x.shape != y.shape or x.dtype != y.dtype:
                res["mismatched_meta"].append(f"{name}: ours {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
                continue
            d = (x.double() - y.double()).abs().reshape(-1)
            res["elements"] += d.numel()
            m = float(d.max()) if d.numel() else 0.0
            over_mask = d > TOLERANCE
            over = int(over_mask.sum())
            tie_over, rest_max = 0, m
            if over and topk:
                tied = _threshold_ties(name, method, models, indexes)
                tie_over = int((over_mask & tied).sum())
                rest = d[~tied]
                rest_max = float(rest.max()) if rest.numel() else 0.0
            per.append((m, name, over, tie_over, rest_max))
            del x, y, d
    finally:
        handles.clear()
    if per:
        res["max_abs_diff"] = max(p[0] for p in per)
        res["tensors_over_tol"] = sum(1 for p in per if p[0] > TOLERANCE)
        res["elements_over_tol"] = sum(p[2] for p in per)
        res["elements_over_tol_tie_break"] = sum(p[3] for p in per)
        res["max_abs_diff_excluding_tie_break"] = max(p[4] for p in per)
        res["worst"] = [{"tensor": n, "max_abs_diff": m, "elements_over_tol": o, "of_which_tie_break": t}
                        for m, n, o, t, _ in sorted(per, reverse=True)[:5]]
    structural = not res["only_ours"] and not res["only_mergekit"] and not res["mismatched_meta"]
    res["equal"] = structural and res["max_abs_diff"] <= TOLERANCE
    res["equal_except_tie_break"] = structural and res["max_abs_diff_excluding_tie_break"] <= TOLERANCE
    return res


# ------------------------------------------------------------------------------------- driver
def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "hostname": platform.node(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        import safetensors

        info["safetensors"] = safetensors.__version__
    except ImportError:
        pass
    try:
        from mergekit_bico import __version__

        info["mergekit_bico"] = __version__
    except ImportError:
        pass
    return info


def _rmtree(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)


def _best(records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if r["rc"] == 0] or records
    best = min(ok, key=lambda r: r["wall_s"])
    best = dict(best)
    best["runs_wall_s"] = [r["wall_s"] for r in records]
    best["maxrss_mib"] = max(r["maxrss_mib"] for r in records)
    return best


def run_size(args: argparse.Namespace, size: int, workdir: Path, mk_bin: Optional[str]) -> list[dict[str, Any]]:
    models = ensure_models(workdir, size)
    inputs = [models["base"], models["ft1"], models["ft2"]]
    rows: list[dict[str, Any]] = []
    outdir = workdir / "out"
    logs = workdir / "logs"
    _rmtree(outdir)
    outdir.mkdir(parents=True)
    params = param_count(size)
    model_bytes = sum(f.stat().st_size for f in weight_files(models["base"]))
    common = {"size": f"{size}x", "params_m": round(params / 1e6, 1), "model_mib": round(model_bytes / 2**20, 1)}
    with_mk = mk_bin is not None and (args.mergekit_sizes is None or size in args.mergekit_sizes)

    def measure(label: str, cmd_for: Any, out: Path, repeat: Optional[int] = None) -> dict[str, Any]:
        recs = []
        repeat = args.repeat if repeat is None else repeat
        for k in range(repeat):
            _rmtree(out)
            warm_and_sync(models)
            rec = run_measured(cmd_for(out), logs / f"x{size}-{label}-{k}.log")
            recs.append(rec)
            if k + 1 < repeat:
                _rmtree(out)
        return _best(recs)

    # I/O references
    me = str(Path(__file__).resolve())
    base_rec = run_measured(["true"], logs / f"x{size}-true.log")
    rows.append({**common, "method": "-", "tool": "launcher baseline (`true`)", **base_rec})
    startup = measure("startup", lambda out: [sys.executable, "-c", "import torch"], outdir / "none")
    rows.append({**common, "method": "-", "tool": "python -c 'import torch' (startup)", **startup})
    print(f"[x{size}] startup (python + import torch): {startup['wall_s']:.2f} s", flush=True)
    print(f"[x{size}] floor (read 3 inputs, write 1 output, fsync)", flush=True)
    floor = measure("floor", lambda out: [sys.executable, me, "--_floor", "fsync", *map(str, inputs), str(out)],
                    outdir / "floor")
    _rmtree(outdir / "floor")
    rows.append({**common, "method": "-", "tool": "floor (read 3, write 1, fsync)", **floor})
    print(f"  {floor['wall_s']:.1f} s, peak RSS {floor['maxrss_mib']:.0f} MiB", flush=True)
    print(f"[x{size}] floor without fsync", flush=True)
    floor_ns = measure("floor-nosync", lambda out: [sys.executable, me, "--_floor", "nosync", *map(str, inputs), str(out)],
                       outdir / "floor")
    _rmtree(outdir / "floor")
    rows.append({**common, "method": "-", "tool": "floor, no fsync (read 3, write 1)", **floor_ns})
    print(f"  {floor_ns['wall_s']:.1f} s", flush=True)
    print(f"[x{size}] cp -r of one input", flush=True)
    cp = measure("cp", lambda out: ["cp", "-r", str(models["base"]), str(out)], outdir / "cp")
    _rmtree(outdir / "cp")
    rows.append({**common, "method": "-", "tool": "cp -r (read 1, write 1, no fsync)", **cp})
    print(f"  {cp['wall_s']:.1f} s", flush=True)

    for method in METHODS:
        cfg = write_config(workdir / f"x{size}-{method}.yml", method, models)
        ours_out, mk_out = outdir / f"ours-{method}", outdir / f"mk-{method}"
        print(f"[x{size}] {method}: mergekit-bico", flush=True)
        ours = measure(f"ours-{method}", lambda out: ours_cmd(args) + [str(cfg), str(out), "--quiet", *args.ours_args], ours_out)
        row = {**common, "method": method, "tool": "mergekit-bico", **ours}
        print(f"  {ours['wall_s']:.1f} s, peak RSS {ours['maxrss_mib']:.0f} MiB "
              f"(anon {ours['rss_anon_peak_mib']:.0f}, file {ours['rss_file_peak_mib']:.0f})", flush=True)
        torch_used = imports_torch(args, cfg, outdir / f"torchcheck-{method}")
        if torch_used is not None:
            row["imports_torch"] = torch_used
            print(f"  torch imported by this merge: {'yes' if torch_used else 'no'}", flush=True)
        mk_row = None
        if with_mk:
            print(f"[x{size}] {method}: mergekit-yaml 0.1.5", flush=True)
            mk = measure(f"mk-{method}", lambda out: [mk_bin, str(cfg), str(out), *args.mergekit_args], mk_out,
                         repeat=args.mergekit_repeat)
            mk_row = {**common, "method": method, "tool": "mergekit 0.1.5", **mk}
            print(f"  {mk['wall_s']:.1f} s, peak RSS {mk['maxrss_mib']:.0f} MiB", flush=True)
            if ours["rc"] == 0 and mk["rc"] == 0:
                eq = compare_outputs(ours_out, mk_out, method=method, models=models)
                row["equality"] = eq
                print(f"  max |ours - mergekit| = {eq['max_abs_diff']:.3g} over {eq['tensors']} tensors "
                      f"({'OK' if eq['equal'] else 'MISMATCH'}; {eq['elements_over_tol']} elements over "
                      f"{TOLERANCE:g}, {eq['elements_over_tol_tie_break']} of them on tied top-k thresholds; "
                      f"max excluding those {eq['max_abs_diff_excluding_tie_break']:.3g})", flush=True)
                row["vs_mergekit"] = round(ours["wall_s"] / mk["wall_s"], 3)
        row["vs_floor"] = round(ours["wall_s"] / floor["wall_s"], 3)
        rows.append(row)
        if mk_row:
            mk_row["vs_floor"] = round(mk_row["wall_s"] / floor["wall_s"], 3)
            rows.append(mk_row)
        _rmtree(ours_out)
        if method == "ties":
            # which of several equal magnitudes at the top-k cut are kept: mergekit leaves it to
            # torch.argsort's unstable order; tie_break: sort makes the same call (and pays its cost)
            label = "mergekit-bico, tie_break: sort"
            print(f"[x{size}] {method}: {label}", flush=True)
            cfg_sort = write_config(workdir / f"x{size}-{method}-sort.yml", method, models, {"tie_break": "sort"})
            var = measure(f"ours-{method}-sort", lambda out: ours_cmd(args) + [str(cfg_sort), str(out), "--quiet", *args.ours_args],
                          ours_out)
            var_row = {**common, "method": method, "tool": label, **var,
                       "vs_floor": round(var["wall_s"] / floor["wall_s"], 3)}
            if mk_row and var["rc"] == 0 and mk_row["rc"] == 0:
                var_row["equality"] = compare_outputs(ours_out, mk_out, method=method, models=models)
                var_row["vs_mergekit"] = round(var["wall_s"] / mk_row["wall_s"], 3)
                print(f"  {var['wall_s']:.1f} s; max |ours - mergekit| = {var_row['equality']['max_abs_diff']:.3g}", flush=True)
            rows.append(var_row)
            _rmtree(ours_out)
        _rmtree(mk_out)
        for shard in args.shard_variants:
            if method != "task_arithmetic":
                continue
            label = f"mergekit-bico --out-shard-size {shard}"
            print(f"[x{size}] {method}: {label}", flush=True)
            var = measure(f"ours-{method}-shard{shard}",
                          lambda out: ours_cmd(args) + [str(cfg), str(out), "--quiet", "--out-shard-size", shard, *args.ours_args],
                          ours_out)
            rows.append({**common, "method": method, "tool": label, **var,
                         "vs_floor": round(var["wall_s"] / floor["wall_s"], 3)})
            print(f"  {var['wall_s']:.1f} s, peak RSS {var['maxrss_mib']:.0f} MiB", flush=True)
            _rmtree(ours_out)
    rows.extend(run_bf16(args, size, workdir, models, common, measure, mk_bin if with_mk else None))
    _rmtree(outdir)
    return rows


BF16_METHOD = "task_arithmetic (bf16 inputs)"


def run_bf16(args: argparse.Namespace, size: int, workdir: Path, models: dict[str, Path], common: dict[str, Any],
             measure: Any, mk_bin: Optional[str]) -> list[dict[str, Any]]:
    """Task arithmetic of bfloat16 copies of the models: computed in float32 (``dtype: float32,
    out_dtype: bfloat16``: our numpy path, against our torch path on the same config, whose
    output must be the same bytes) and in bfloat16 (``dtype: bfloat16``: 16-bit arithmetic, which
    runs in torch; against mergekit on the same config). No ratio to the float32 I/O floor: these
    models have half its bytes."""
    if args.ours_bin:
        return []
    b16 = ensure_bf16_models(workdir, size, models)
    outdir = workdir / "out"
    rows: list[dict[str, Any]] = []
    cfg32 = write_config(workdir / f"x{size}-bf16-f32.yml", "task_arithmetic", b16, dtype="float32", out_dtype="bfloat16")
    cfg16 = write_config(workdir / f"x{size}-bf16-bf16.yml", "task_arithmetic", b16, dtype="bfloat16", out_dtype="bfloat16")
    ours32, torch32 = outdir / "bf16-ours", outdir / "bf16-torch"
    variants = (
        ("mergekit-bico, dtype float32 (numpy path)", cfg32, ours32, ours_cmd(args)),
        ("mergekit-bico, dtype float32, torch path", cfg32, torch32, [sys.executable, "-c", TORCH_PATH_CODE]),
        ("mergekit-bico, dtype bfloat16 (torch: 16-bit arithmetic)", cfg16, outdir / "bf16-16", ours_cmd(args)),
    )
    for label, cfg, out, cmd in variants:
        print(f"[x{size}] {BF16_METHOD}: {label}", flush=True)
        rec = measure(f"bf16-{len(rows)}", lambda o, cmd=cmd, cfg=cfg: cmd + [str(cfg), str(o), "--quiet", *args.ours_args], out)
        rows.append({**common, "method": BF16_METHOD, "tool": label, **rec})
        print(f"  {rec['wall_s']:.1f} s, peak RSS {rec['maxrss_mib']:.0f} MiB", flush=True)
    if rows[0]["rc"] == 0 and rows[1]["rc"] == 0:
        eq = compare_outputs(ours32, torch32, method="task_arithmetic", models=b16)
        rows[0]["equality_torch_path"] = eq
        rows[0]["vs_torch_path"] = round(rows[0]["wall_s"] / rows[1]["wall_s"], 3)
        print(f"  numpy vs torch path: max abs diff {eq['max_abs_diff']:.3g} over {eq['tensors']} tensors", flush=True)
    if mk_bin is not None and rows[2]["rc"] == 0:
        label = "mergekit 0.1.5, dtype bfloat16"
        print(f"[x{size}] {BF16_METHOD}: {label}", flush=True)
        mk_out = outdir / "bf16-mk"
        mk = measure("bf16-mk", lambda o: [mk_bin, str(cfg16), str(o), *args.mergekit_args], mk_out,
                     repeat=args.mergekit_repeat)
        rows.append({**common, "method": BF16_METHOD, "tool": label, **mk})
        if mk["rc"] == 0:
            eq = compare_outputs(outdir / "bf16-16", mk_out, method="task_arithmetic", models=b16)
            rows[2]["equality"] = eq
            rows[2]["vs_mergekit"] = round(rows[2]["wall_s"] / mk["wall_s"], 3)
            print(f"  {mk['wall_s']:.1f} s; max |ours - mergekit| = {eq['max_abs_diff']:.3g}", flush=True)
        _rmtree(mk_out)
    for _, _, out, _ in variants:
        _rmtree(out)
    return rows


def evaluate(rows: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def get(size: int, method: str, tool: str) -> Optional[dict[str, Any]]:
        for r in rows:
            if r["size"] == f"{size}x" and r["method"] == method and r["tool"] == tool:
                return r
        return None

    for size in sizes:
        for method, key in (("ties", "ties_vs_mergekit"), ("task_arithmetic", "task_arithmetic_vs_mergekit")):
            r = get(size, method, "mergekit-bico")
            if r and "vs_mergekit" in r:
                checks.append({"check": f"{size}x {method} time vs mergekit", "value": r["vs_mergekit"],
                               "target": f"<= {TARGETS[key]}", "ok": r["vs_mergekit"] <= TARGETS[key]})
        r = get(size, "task_arithmetic", "mergekit-bico")
        if r:
            checks.append({"check": f"{size}x task_arithmetic time vs floor", "value": r["vs_floor"],
                           "target": f"<= {TARGETS['task_arithmetic_vs_floor']}",
                           "ok": r["vs_floor"] <= TARGETS["task_arithmetic_vs_floor"]})
        r = get(size, "ties", "mergekit-bico, tie_break: sort")
        if r and "equality" in r:
            checks.append({"check": f"{size}x ties (tie_break: sort) max abs diff vs mergekit", "value": r["equality"]["max_abs_diff"],
                           "target": f"<= {TOLERANCE:g}", "ok": r["equality"]["equal"]})
        for method in METHODS:
            r = get(size, method, "mergekit-bico")
            if r and "equality" in r:
                eq = r["equality"]
                checks.append({"check": f"{size}x {method} max abs diff vs mergekit", "value": eq["max_abs_diff"],
                               "target": f"<= {TOLERANCE:g}", "ok": eq["equal"]})
                if not eq["equal"] and eq["elements_over_tol_tie_break"]:
                    checks.append({
                        "check": f"{size}x {method} max abs diff vs mergekit, elements on tied top-k thresholds excluded "
                                 f"({eq['elements_over_tol_tie_break']} of {eq['elements']} elements differ there)",
                        "value": eq["max_abs_diff_excluding_tie_break"], "target": f"<= {TOLERANCE:g}",
                        "ok": eq["equal_except_tie_break"]})
        r = get(size, BF16_METHOD, "mergekit-bico, dtype float32 (numpy path)")
        if r and "equality_torch_path" in r:
            eq = r["equality_torch_path"]
            checks.append({"check": f"{size}x {BF16_METHOD}, dtype float32: numpy path max abs diff vs our torch path",
                           "value": eq["max_abs_diff"], "target": "== 0",
                           "ok": eq["equal"] and eq["max_abs_diff"] == 0})
        r = get(size, BF16_METHOD, "mergekit-bico, dtype bfloat16 (torch: 16-bit arithmetic)")
        if r and "equality" in r:
            checks.append({"check": f"{size}x {BF16_METHOD}, dtype bfloat16: max abs diff vs mergekit",
                           "value": r["equality"]["max_abs_diff"], "target": f"<= {TOLERANCE:g}", "ok": r["equality"]["equal"]})
    if len(sizes) > 1 and 1 in sizes:
        big = max(sizes)
        for method in METHODS:
            small_r, big_r = get(1, method, "mergekit-bico"), get(big, method, "mergekit-bico")
            if small_r and big_r:
                ratio = round(big_r["maxrss_mib"] / small_r["maxrss_mib"], 3)
                checks.append({"check": f"our peak RSS {big}x / 1x ({method})", "value": ratio,
                               "target": f"<= {TARGETS['rss_growth']}", "ok": ratio <= TARGETS["rss_growth"]})
    return checks


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None or v == "":
        return ""
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Merge speed and memory: mergekit-bico vs mergekit 0.1.5",
        "",
        f"Command: `{report['command']}`  ",
        f"Started {report['started']}, finished {report['finished']}  ",
        f"Machine: {report['machine'].get('cpu', '?')}, {report['machine'].get('cpus')} CPUs, "
        f"{report['machine'].get('mem_gib')} GiB RAM, torch {report['machine'].get('torch')}, "
        f"Python {report['machine'].get('python')}",
        "",
        "Inputs: three Llama-shaped float32 models per size (base; two fine-tunes = base + N(0, 0.002)), "
        f"{IN_SHARD_BYTES >> 20} MiB safetensors shards, in the page cache before every run. "
        f"Wall time: each tool in its own child process, fastest of {report['repeat']} run(s) "
        f"(mergekit: {report['mergekit_repeat']}); cpu = user + sys of that run. "
        "Peak RSS: `ru_maxrss` of that child alone (`os.wait4`, started from a ~10 MB launcher); "
        "anon/file: sampled peaks of RssAnon/RssFile (file = mapped files, e.g. mmapped inputs). "
        "floor = one process reading the three inputs once and writing one output of one model's size, "
        "fsync per shard (our writer fsyncs; mergekit does not); startup = `python -c 'import torch'`, "
        "part of every torch-based merge (mergekit's; ours for ties; ours for task_arithmetic runs in numpy). max abs diff: over all elements of all tensors; for TIES, elements on a tied "
        "top-k threshold (equal |delta| at the k-th place: which of them are kept is up to the sort, "
        "torch.argsort's unstable order in mergekit, lowest index in mergekit-bico) are counted apart.",
        "",
        "| size | params | method | tool | wall s | cpu s | vs mergekit | vs floor | peak RSS MiB | anon MiB | file MiB | max abs diff vs mergekit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        eq = r.get("equality")
        diff = "" if not eq else f"{eq['max_abs_diff']:.3g}" + ("" if eq["equal"] else (
            f" ({eq['elements_over_tol']} elements; all on tied top-k thresholds)" if eq["equal_except_tie_break"]
            else f" (FAIL: {eq['elements_over_tol']} elements)"))
        if r.get("rc"):
            diff = f"exit {r['rc']}"
        lines.append(
            f"| {r['size']} | {r['params_m']:.0f}M | {r['method']} | {r['tool']} | {_fmt(r['wall_s'])} | "
            f"{_fmt(r['user_s'] + r['sys_s'], '.1f')} | "
            f"{_fmt(r.get('vs_mergekit'))} | {_fmt(r.get('vs_floor'))} | {_fmt(r['maxrss_mib'], '.0f')} | "
            f"{_fmt(r['rss_anon_peak_mib'], '.0f')} | {_fmt(r['rss_file_peak_mib'], '.0f')} | {diff} |"
        )
    lines += ["", "## Targets", "", "| check | value | target | result |", "|---|---|---|---|"]
    for c in report["checks"]:
        v = c["value"]
        vs = f"{v:.3g}" if isinstance(v, float) else str(v)
        lines.append(f"| {c['check']} | {vs} | {c['target']} | {'PASS' if c['ok'] else 'FAIL'} |")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.merge_speed", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1x only (same as --sizes 1)")
    p.add_argument("--sizes", default="1,4", help=f"model sizes, comma separated, from {sorted(SIZES)} (default 1,4)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mergekit-bico-bench"),
                   help="cache of generated models, outputs and logs (default: $TMPDIR/mergekit-bico-bench)")
    p.add_argument("--mergekit-bin", default=os.environ.get("MERGEKIT_BIN"),
                   help="an existing mergekit-yaml (0.1.5) to use instead of installing one (env MERGEKIT_BIN)")
    p.add_argument("--mergekit-venv", default=None, help="venv to install mergekit into (default <workdir>/mkvenv)")
    p.add_argument("--mergekit-spec", default="mergekit==0.1.5", help="pip requirement (or wheel path) for mergekit")
    p.add_argument("--torch-spec", default="torch==2.13.0", help="pip requirement for torch in the mergekit venv")
    p.add_argument("--mergekit-sizes", default=None,
                   help="sizes at which mergekit also runs (default: all of --sizes)")
    p.add_argument("--no-mergekit", action="store_true", help="skip mergekit (no speed ratios, no equality check)")
    p.add_argument("--ours-bin", default=None, help="command for our CLI (default: mergekit-bico-yaml beside python)")
    p.add_argument("--ours-args", default="", help="extra arguments for our CLI, e.g. '--out-shard-size 1G'")
    p.add_argument("--mergekit-args", default="", help="extra arguments for mergekit-yaml")
    p.add_argument("--shard-variants", default="1G",
                   help="extra task_arithmetic runs of ours with these --out-shard-size values ('' for none)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of our CLI and of the I/O references per measurement; the fastest is reported (default 3)")
    p.add_argument("--mergekit-repeat", type=int, default=1, help="runs of mergekit per measurement (default 1)")
    p.add_argument("--clean", action="store_true", help="delete the generated models when done (default: kept for reruns)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed (default: report only)")
    p.add_argument("--results", default=str(RESULTS_DIR), help="where merge_speed.md/json go")
    p.add_argument("--_floor", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._floor:
        return args
    sizes = [1] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        p.error(f"unknown size(s) {bad}; choose from {sorted(SIZES)}")
    args.size_list = sorted(set(sizes))
    args.mergekit_sizes = (None if args.mergekit_sizes is None
                           else [int(s) for s in args.mergekit_sizes.split(",") if s.strip()])
    args.ours_args = shlex.split(args.ours_args)
    args.mergekit_args = shlex.split(args.mergekit_args)
    args.shard_variants = [s for s in args.shard_variants.split(",") if s.strip()]
    args.repeat = max(1, args.repeat)
    args.mergekit_repeat = max(1, args.mergekit_repeat)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args._floor:
        mode, *ins, out = args._floor
        floor_copy([Path(x) for x in ins], Path(out), fsync=mode == "fsync")
        return 0
    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    free = shutil.disk_usage(workdir).free
    need = sum(param_count(s) * 4 * 7 for s in args.size_list)  # 3 inputs + up to 3 outputs + slack
    if free < need:
        print(f"warning: {free / 1e9:.0f} GB free under {workdir}, about {need / 1e9:.0f} GB needed", flush=True)
    mk_bin = ensure_mergekit(args, workdir)
    rows: list[dict[str, Any]] = []
    for size in args.size_list:
        rows.extend(run_size(args, size, workdir, mk_bin))
    checks = evaluate(rows, args.size_list)
    notes = []
    if mk_bin is None:
        notes.append("mergekit was not run (--no-mergekit): no speed ratios and no equality check.")
    elif args.mergekit_sizes is not None:
        skipped = [s for s in args.size_list if s not in args.mergekit_sizes]
        if skipped:
            notes.append(f"mergekit was not run at {', '.join(f'{s}x' for s in skipped)} (--mergekit-sizes).")
    for r in rows:
        if r["method"] == "task_arithmetic" and r["tool"] == "mergekit-bico":
            su = next((x for x in rows if x["size"] == r["size"] and "startup" in x["tool"]), None)
            fl = next((x for x in rows if x["size"] == r["size"] and x["tool"].startswith("floor (")), None)
            if r.get("imports_torch") is False:
                notes.append(f"{r['size']} task_arithmetic: ours did not import torch (the numpy path of the "
                             "elementwise methods), so it does not pay the start-up row; ties does.")
            elif su and fl:
                notes.append(f"{r['size']} task_arithmetic: without the interpreter + torch start-up "
                             f"({su['wall_s']:.2f} s) ours takes {r['wall_s'] - su['wall_s']:.2f} s = "
                             f"{(r['wall_s'] - su['wall_s']) / fl['wall_s']:.2f}x the floor.")
    for r in rows:
        if r["method"] == BF16_METHOD and "vs_torch_path" in r:
            t = next(x for x in rows if x["size"] == r["size"] and x["method"] == BF16_METHOD and "torch path" in x["tool"])
            notes.append(f"{r['size']} {BF16_METHOD}, dtype float32: the numpy path took {r['wall_s']:.2f} s, our torch "
                         f"path {t['wall_s']:.2f} s on the same config ({r['vs_torch_path']:.2f}x), with the same bytes.")
    report = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "benchmarks.merge_speed", *(sys.argv[1:] if argv is None else argv)]),
        "started": started,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "mergekit_bin": mk_bin,
        "ours_cmd": ours_cmd(args),
        "workdir": str(workdir),
        "sizes": {f"{s}x": {"params": param_count(s), **SIZES[s]} for s in args.size_list},
        "configs": {m: METHODS[m] for m in METHODS},
        "targets": TARGETS,
        "tolerance": TOLERANCE,
        "repeat": args.repeat,
        "mergekit_repeat": args.mergekit_repeat,
        "rows": rows,
        "checks": checks,
        "notes": notes,
    }
    md = render_markdown(report)
    print()
    print(md)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "merge_speed.md").write_text(md)
    (results / "merge_speed.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {results / 'merge_speed.md'} and {results / 'merge_speed.json'}")
    if args.clean:
        _rmtree(workdir / "models")
    crashed = [r for r in rows if r.get("rc")]
    if crashed:
        return 2
    return 1 if args.strict and not all(c["ok"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
