"""Fine-tune a sentence encoder through the zero-shot head, with an on-disk cache.

There is no new trainable head: the logits are ``scale * cos(text, class description)`` as in
:mod:`benchmarks.realmodels.zeroshot`, and the loss is mean cross-entropy. By default
(``class_embeddings="recomputed"``) the class-description embeddings are recomputed by the model
being trained at every step, so the whole encoder is trained and the fine-tuned model is evaluated
with exactly the same head (and the same loss the calibration stage uses). ``"frozen"`` instead
fixes the class embeddings at the base model's values (computed once, no gradient); evaluation
always recomputes them from the model (that is what a saved folder carries), so prefer the default.

Two modes:

- :func:`finetune`: fixed budget (steps, lr, batch size, seed) on the task's train split.
- :func:`finetune_fewshot`: the few-shot baseline: train on exactly the N given examples (e.g. a
  calibration ``.jsonl``), with learning rate and number of epochs chosen on the validation split.

Results are HF folders (``model.safetensors``, ``config.json``, tokenizer files, ``finetune.json``
with settings, timings and validation accuracy) cached under
``<cache>/finetune/<task>-<base name>-<key>`` where ``key`` hashes (base model fingerprint = SHA-256
of its weight files, task, data split fingerprint, settings, code version): a second call returns
the cached folder at once.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from benchmarks.realmodels import cache_root, data as _data, zeroshot as zs

CODE_VERSION = "finetune-v1"
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "merges.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
    "spiece.model",
)

__all__ = [
    "FinetuneSettings",
    "FewShotSettings",
    "FinetuneResult",
    "model_fingerprint",
    "finetune",
    "finetune_fewshot",
]


@dataclass(frozen=True)
class FinetuneSettings:
    """Budget and optimiser settings of :func:`finetune` (all enter the cache key)."""

    steps: int = 120
    lr: float = 1e-4
    batch_size: int = 32
    seed: int = 0
    weight_decay: float = 0.01
    warmup_frac: float = 0.1  # linear warm-up, then linear decay to 0
    scale: float = zs.LOGIT_SCALE
    max_length: int = 64
    class_embeddings: str = "recomputed"  # or "frozen"
    dropout: bool = True  # model.train() (BERT dropout 0.1) during training


@dataclass(frozen=True)
class FewShotSettings:
    """Search space of :func:`finetune_fewshot` (lr x epochs, chosen on validation)."""

    lrs: tuple[float, ...] = (1e-5, 3e-5, 1e-4)
    max_epochs: int = 10
    batch_size: int = 16
    seed: int = 0
    weight_decay: float = 0.01
    scale: float = zs.LOGIT_SCALE
    max_length: int = 64
    class_embeddings: str = "recomputed"
    dropout: bool = True
    val_limit: int | None = None  # None: the whole validation split


@dataclass(frozen=True)
class FinetuneResult:
    path: Path
    meta: dict[str, Any]
    cached: bool


# ---------------------------------------------------------------------------------------------
# fingerprints and cache


_FP_MEMO: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FP_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _FP_MEMO[key] = h.hexdigest()
    return _FP_MEMO[key]


def model_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 over the weight files (``*.safetensors`` / ``*.bin``) and ``config.json``."""
    from mergekit_bico.errors import ModelLoadError

    d = Path(model_dir)
    files = sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json") \
        if d.is_dir() else []
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise ModelLoadError(f"no weight file in model folder {d}")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + _file_sha256(p).encode() + b"\n")
    return h.hexdigest()


def _cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _base_name(model_dir: Path) -> str:
    name = model_dir.name
    if name in ("model", "") and model_dir.parent.name:
        name = model_dir.parent.name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]


def _save_folder(model: torch.nn.Module, base_dir: Path, tokenizer: Any, out: Path, meta: dict[str, Any]) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        copied = False
        for name in TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copyfile(base_dir / name, tmp / name)
                copied = True
        if not copied:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "finetune.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _load_cached(out: Path) -> dict[str, Any] | None:
    meta = out / "finetune.json"
    if meta.is_file() and (out / "model.safetensors").is_file():
        try:
            return json.loads(meta.read_text())
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------------------------------------
# training core


def _tokenize(tok: Any, examples: Sequence[_data.Example], max_length: int) -> list[list[int]]:
    enc = tok([e.text for e in examples], truncation=True, max_length=max_length)
    return enc["input_ids"]


def _collate(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), n), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids, mask


def _bucketed_batches(
    ids: Sequence[Sequence[int]], batch_size: int, steps: int, gen: torch.Generator, bucket: int = 8
) -> list[list[int]]:
    """``steps`` batches of indices: epochs of seeded permutations, cut into chunks of
    ``bucket * batch_size`` examples, sorted by length inside a chunk (less padding), split into
    batches whose order is shuffled again. Every example is used once per epoch."""
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        stream.extend(torch.randperm(len(ids), generator=gen).tolist())
    stream = stream[: steps * batch_size]
    out: list[list[int]] = []
    chunk = bucket * batch_size
    for c in range(0, len(stream), chunk):
        part = sorted(stream[c : c + chunk], key=lambda i: len(ids[i]))
        bs = [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
        order = torch.randperm(len(bs), generator=gen).tolist()
        out.extend(bs[k] for k in order)
    return out


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


def _step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    task: str,
    tok: Any,
    ids: list[list[int]],
    labels: list[int],
    scale: float,
    frozen_cls: torch.Tensor | None,
) -> float:
    input_ids, mask = _collate(ids, tok.pad_token_id or 0)
    logits = zs.zero_shot_logits(model, input_ids, mask, task, scale=scale, tokenizer=tok, class_emb=frozen_cls)
    loss = F.cross_entropy(logits, torch.tensor(labels, dtype=torch.long))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def _frozen_class_embeddings(model: torch.nn.Module, task: str, tok: Any) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        cls = zs.class_embeddings(model, task, tok)
    model.train(was)
    return cls


def _check_mode(mode: str) -> None:
    if mode not in ("recomputed", "frozen"):
        raise ValueError(f"class_embeddings must be 'recomputed' or 'frozen', not {mode!r}")


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def finetune(
    base_dir: str | Path,
    task: str,
    settings: FinetuneSettings | None = None,
    cache_dir: str | Path | None = None,
    evaluate_test: bool = True,
    verbose: bool = False,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune ``base_dir`` on ``task``'s train split for a fixed budget; cached.

    ``overrides`` replace fields of ``settings`` (e.g. ``steps=100``). Returns the folder and its
    metadata (``train_seconds``, ``validation_acc``, ``test_acc`` if ``evaluate_test``, losses).
    """
    settings = dataclasses.replace(settings or FinetuneSettings(), **overrides)
    _check_mode(settings.class_embeddings)
    base = Path(base_dir)
    key_parts = {
        "code": CODE_VERSION,
        "mode": "full",
        "base": model_fingerprint(base),
        "task": task,
        "data": _data.split_fingerprint(task, "train"),
        "settings": dataclasses.asdict(settings),
    }
    key = _cache_key(key_parts)
    out = Path(cache_dir or cache_root() / "finetune") / f"{task}-{_base_name(base)}-{key}"
    meta = _load_cached(out)
    if meta is not None and (not evaluate_test or "test_acc" in meta):
        return FinetuneResult(out, meta, True)

    model, tok = zs.load_model(base)
    torch.manual_seed(settings.seed)
    examples = _data.load_split(task, "train")
    ids = _tokenize(tok, examples, settings.max_length)
    labels = [e.label for e in examples]
    gen = torch.Generator().manual_seed(settings.seed)
    opt = _optimizer(model, settings.lr, settings.weight_decay)
    warm = max(1, int(round(settings.warmup_frac * settings.steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (settings.steps - s) / max(1, settings.steps - warm)))
    )
    frozen = _frozen_class_embeddings(model, task, tok) if settings.class_embeddings == "frozen" else None
    model.train(settings.dropout)
    batches = _bucketed_batches(ids, settings.batch_size, settings.steps, gen)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step, batch in enumerate(batches):
        losses.append(_step(model, opt, task, tok, [ids[i] for i in batch], [labels[i] for i in batch],
                            settings.scale, frozen))
        sched.step()
        if verbose and (step + 1) % 50 == 0:
            _log(verbose, f"[{task}/{_base_name(base)}] step {step + 1}/{settings.steps} "
                          f"loss {sum(losses[-50:]) / len(losses[-50:]):.4f} ({time.perf_counter() - t0:.0f}s)")
    train_seconds = time.perf_counter() - t0
    model.eval()
    meta = {
        "mode": "full",
        "task": task,
        "base_dir": str(base.resolve()),
        "base_fingerprint": key_parts["base"],
        "settings": dataclasses.asdict(settings),
        "train_seconds": round(train_seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "loss_first50": round(sum(losses[:50]) / max(1, len(losses[:50])), 4),
        "loss_last50": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4),
        "validation_acc": zs.evaluate(model, task, "validation", tokenizer=tok),
        "cache_key": key,
        "code": CODE_VERSION,
    }
    if evaluate_test:
        meta["test_acc"] = zs.evaluate(model, task, "test", tokenizer=tok)
    _save_folder(model, base, tok, out, meta)
    return FinetuneResult(out, meta, False)


def finetune_fewshot(
    base_dir: str | Path,
    task: str,
    examples: Sequence[_data.Example] | str | Path,
    settings: FewShotSettings | None = None,
    cache_dir: str | Path | None = None,
    evaluate_test: bool = True,
    verbose: bool = False,
    **overrides: Any,
) -> FinetuneResult:
    """Few-shot baseline: fine-tune on exactly ``examples`` (a list or a ``.jsonl`` file).

    For each learning rate in ``settings.lrs`` a fresh copy of the base is trained for
    ``settings.max_epochs`` epochs (one epoch = every example once, seeded shuffle, batches of
    ``batch_size``); after each epoch the validation accuracy is measured. The (lr, epochs) with
    the best validation accuracy (ties: fewer epochs, then smaller lr) is kept and saved. At least
    one epoch is always trained.
    """
    settings = dataclasses.replace(settings or FewShotSettings(), **overrides)
    _check_mode(settings.class_embeddings)
    if settings.max_epochs < 1 or not settings.lrs:
        raise ValueError("need max_epochs >= 1 and at least one learning rate")
    exs = _data.read_jsonl(examples) if isinstance(examples, (str, Path)) else list(examples)
    if not exs:
        raise ValueError("no few-shot examples")
    nclass = _data.get_task(task).num_classes
    bad = [e.label for e in exs if not 0 <= e.label < nclass]
    if bad:
        raise ValueError(f"label {bad[0]} out of range for task {task} ({nclass} classes)")
    base = Path(base_dir)
    ex_hash = hashlib.sha256("".join(f"{e.label}\t{e.text}\n" for e in exs).encode()).hexdigest()
    key_parts = {
        "code": CODE_VERSION,
        "mode": "fewshot",
        "base": model_fingerprint(base),
        "task": task,
        "examples": ex_hash,
        "validation": _data.split_fingerprint(task, "validation"),
        "settings": dataclasses.asdict(settings),
    }
    key = _cache_key(key_parts)
    out = Path(cache_dir or cache_root() / "finetune") / f"{task}-{_base_name(base)}-fewshot{len(exs)}-{key}"
    meta = _load_cached(out)
    if meta is not None and (not evaluate_test or "test_acc" in meta):
        return FinetuneResult(out, meta, True)

    base_model, tok = zs.load_model(base)
    val = _data.load_split(task, "validation")
    if settings.val_limit is not None:
        val = val[: settings.val_limit]
    ids = _tokenize(tok, exs, settings.max_length)
    labels = [e.label for e in exs]
    best: tuple[float, int, float] | None = None  # (acc, epochs, lr) ordered for selection
    best_state: dict[str, torch.Tensor] | None = None
    grid: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for lr in settings.lrs:
        model = copy.deepcopy(base_model)
        torch.manual_seed(settings.seed)
        gen = torch.Generator().manual_seed(settings.seed)
        opt = _optimizer(model, lr, settings.weight_decay)
        frozen = _frozen_class_embeddings(model, task, tok) if settings.class_embeddings == "frozen" else None
        for epoch in range(1, settings.max_epochs + 1):
            model.train(settings.dropout)
            perm = torch.randperm(len(exs), generator=gen).tolist()
            for s in range(0, len(perm), settings.batch_size):
                idx = perm[s : s + settings.batch_size]
                _step(model, opt, task, tok, [ids[i] for i in idx], [labels[i] for i in idx], settings.scale, frozen)
            acc = zs.evaluate(model, task, val, tokenizer=tok)
            grid.append({"lr": lr, "epochs": epoch, "validation_acc": acc})
            _log(verbose, f"[fewshot {task} n={len(exs)}] lr={lr:g} epoch={epoch} val={100 * acc:.2f}")
            cand = (acc, -epoch, -lr)
            if best is None or cand > best:
                best = cand
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    search_seconds = time.perf_counter() - t0
    assert best is not None and best_state is not None
    model = base_model
    model.load_state_dict(best_state)
    model.eval()
    meta = {
        "mode": "fewshot",
        "task": task,
        "n_examples": len(exs),
        "examples_sha256": ex_hash,
        "base_dir": str(base.resolve()),
        "base_fingerprint": key_parts["base"],
        "settings": dataclasses.asdict(settings),
        "chosen_lr": -best[2],
        "chosen_epochs": -best[1],
        "validation_acc": best[0],
        "grid": grid,
        "search_seconds": round(search_seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "cache_key": key,
        "code": CODE_VERSION,
    }
    if evaluate_test:
        meta["test_acc"] = zs.evaluate(model, task, "test", tokenizer=tok)
    _save_folder(model, base, tok, out, meta)
    return FinetuneResult(out, meta, False)


# ---------------------------------------------------------------------------------------------
# CLI


def _resolve_model(name: str) -> Path:
    from benchmarks.realmodels import model_a_dir, model_b_dir

    return {"A": model_a_dir, "B": model_b_dir}.get(name, lambda: Path(name))()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.realmodels.finetune")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("full", help="fixed-budget fine-tune on the train split")
    p.add_argument("model", help="model folder, or A / B")
    p.add_argument("task", choices=_data.TASKS)
    for f in dataclasses.fields(FinetuneSettings):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default) if f.type != "bool" else int,
                       default=None)
    p = sub.add_parser("fewshot", help="few-shot baseline on a calibration .jsonl")
    p.add_argument("model")
    p.add_argument("task", choices=_data.TASKS)
    p.add_argument("examples", help=".jsonl with text/label")
    p.add_argument("--lrs", type=float, nargs="+", default=None)
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p = sub.add_parser("table", help="zero-shot vs fine-tuned accuracy of A and B on every task")
    p.add_argument("--models", nargs="+", default=["A", "B"])
    p.add_argument("--tasks", nargs="+", default=list(_data.TASKS))
    p.add_argument("--steps", type=int, default=FinetuneSettings.steps)
    for cmd in sub.choices.values():
        cmd.add_argument("--threads", type=int, default=1,
                         help="torch threads (1 is ~3x faster than 2 on the shared 2-core machine)")
        cmd.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if args.cmd == "full":
            over = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneSettings)
                    if getattr(args, f.name, None) is not None}
            if "dropout" in over:
                over["dropout"] = bool(over["dropout"])
            res = finetune(_resolve_model(args.model), args.task, cache_dir=args.cache_dir, verbose=True, **over)
            print(json.dumps({"path": str(res.path), "cached": res.cached, **res.meta}, indent=2))
        elif args.cmd == "fewshot":
            over = {k: v for k, v in {"lrs": tuple(args.lrs) if args.lrs else None, "max_epochs": args.max_epochs,
                                      "batch_size": args.batch_size, "seed": args.seed}.items() if v is not None}
            res = finetune_fewshot(_resolve_model(args.model), args.task, args.examples, cache_dir=args.cache_dir,
                                   verbose=True, **over)
            print(json.dumps({"path": str(res.path), "cached": res.cached, **res.meta}, indent=2))
        else:
            print(f"{'model':6s} {'task':12s} {'zero-shot':>9s} {'fine-tuned':>10s} {'gain':>6s} {'train s':>8s}")
            for m in args.models:
                path = _resolve_model(m)
                for task in args.tasks:
                    zero = zs.evaluate(path, task, "test")
                    res = finetune(path, task, cache_dir=args.cache_dir, verbose=True, steps=args.steps)
                    ft = res.meta["test_acc"]
                    print(f"{m:6s} {task:12s} {100 * zero:9.2f} {100 * ft:10.2f} {100 * (ft - zero):6.2f} "
                          f"{res.meta['train_seconds']:8.1f}{' (cached)' if res.cached else ''}", flush=True)
    except _data.MergeKitBicoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
