""""New versions" of all-MiniLM-L6-v2 for the transfer benchmark's settings 2 and 3.

* :func:`continued_dir` -- setting 2, same shape: A continued-trained, as a base-model release
  drifts. Objective: in-batch contrastive (InfoNCE, temperature :data:`TEMPERATURE`, both
  directions) between the lemmas of a WordNet *verb, adjective or adverb* synset ("run, go") and
  its gloss, mean pooling, ``steps`` AdamW steps. None of the benchmark's tasks uses these texts
  (the WordNet task is about *noun* glosses; the other two are Rotten Tomatoes snippets).
* :func:`widened_dir` -- setting 3, width: A widened 384 -> 768 by a function-preserving
  duplication (:func:`widen_bert`), then the same continued training (dropout breaks the symmetry
  between the copies).

Both are cached under ``<cache>/models/`` by a key over the source fingerprint and the settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.realmodels import cache_root, data as _data, finetune as ft, zeroshot as zs

CODE_VERSION = "variants-v1"
TEMPERATURE = 0.05
POS_FILES = ("data.verb", "data.adj", "data.adv")


@dataclass(frozen=True)
class ContinuedSettings:
    steps: int = 400
    lr: float = 5e-5
    batch_size: int = 32
    seed: int = 0
    max_length: int = 48
    warmup_frac: float = 0.1
    weight_decay: float = 0.01


# ---------------------------------------------------------------------------------------------
# data: (lemmas, gloss) pairs of WordNet verbs, adjectives and adverbs


def gloss_pairs() -> list[tuple[str, str]]:
    """``(lemmas, gloss definition)`` of every verb / adjective / adverb synset, in file order."""
    folder = _data.wordnet_path().parent
    pairs: list[tuple[str, str]] = []
    for name in POS_FILES:
        path = folder / name
        if not path.is_file():
            raise _data.DataUnavailableError(f"WordNet data file {path} not found (apt-get install -y wordnet-base)")
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:
                    continue
                fields = line.split(" | ", 1)[0].split()
                count = int(fields[3], 16)
                words = [fields[4 + 2 * i].replace("_", " ") for i in range(count)]
                words = [w.split("(")[0] for w in words]  # adjective markers like "(a)"
                gloss = _data._gloss_definition(line.split(" | ", 1)[1])
                if len(gloss.split()) >= 2:
                    pairs.append((", ".join(dict.fromkeys(words)), gloss))
    return pairs


# ---------------------------------------------------------------------------------------------
# training


def continue_training(model: torch.nn.Module, tok: Any, settings: ContinuedSettings) -> dict[str, Any]:
    """Contrastive continued training in place; returns the loss trajectory and timing."""
    pairs = gloss_pairs()
    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    opt = ft._optimizer(model, settings.lr, settings.weight_decay)
    warm = max(1, int(round(settings.warmup_frac * settings.steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (settings.steps - s) / max(1, settings.steps - warm))))
    order: list[int] = []
    losses: list[float] = []
    model.train()
    pad = tok.pad_token_id or 0
    t0 = time.perf_counter()
    for _ in range(settings.steps):
        while len(order) < settings.batch_size:
            order.extend(torch.randperm(len(pairs), generator=gen).tolist())
        idx, order = order[: settings.batch_size], order[settings.batch_size:]
        sides = []
        for k in (0, 1):
            enc = tok([pairs[i][k] for i in idx], truncation=True, max_length=settings.max_length)
            ids, mask = ft._collate(enc["input_ids"], pad)
            sides.append(zs.encode(model, ids, mask))
        logits = sides[0] @ sides[1].T / TEMPERATURE
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    first, last = losses[: min(50, len(losses))], losses[-min(50, len(losses)):]
    return {"train_seconds": round(time.perf_counter() - t0, 1), "pairs": len(pairs),
            "loss_first50": round(sum(first) / len(first), 4), "loss_last50": round(sum(last) / len(last), 4)}


def weight_drift(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """``||after - before|| / ||before||`` over all shared float tensors of the same shape."""
    num = den = 0.0
    for name, b in before.items():
        a = after.get(name)
        if a is None or a.shape != b.shape or not b.is_floating_point():
            continue
        num += float((a.double() - b.double()).pow(2).sum())
        den += float(b.double().pow(2).sum())
    return math.sqrt(num / den) if den else 0.0


# ---------------------------------------------------------------------------------------------
# function-preserving widening of a BERT encoder


def widen_bert(model: Any, factor: int = 2) -> Any:
    """A BertModel ``factor`` times wider (hidden, heads' size; same head count, same MLP width)
    computing the same function: every hidden vector becomes ``[h; h; ...]`` (``factor`` copies).

    LayerNorm over ``[h; h]`` has h's mean and variance, so norms copy their gain and bias; a linear
    reading the residual stream takes ``W / factor`` on every copy; one writing it repeats its rows.
    Heads keep their count and grow to ``factor * d_head``, each head ``[q_j; q_j]``: the scores
    ``q'.k' / sqrt(factor d)`` equal ``q.k / sqrt(d)`` with q and k scaled by ``factor ** -0.25``.
    Mean-pooled, L2-normalised embeddings (and so cosine logits) are unchanged.
    """
    from transformers import BertConfig, BertModel

    cfg = model.config
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    dh = d // heads
    new_cfg = BertConfig(**{**cfg.to_dict(), "hidden_size": factor * d})
    wide = BertModel(new_cfg, add_pooling_layer=getattr(model, "pooler", None) is not None)
    # index maps: residual copy c of coordinate i -> c*d + i; head layout: head j, copy c, dim p
    resid = torch.arange(factor * d) % d                                        # new -> old residual coord
    head_src = torch.tensor([j * dh + p for j in range(heads) for _ in range(factor) for p in range(dh)])
    qk_scale = factor ** -0.25
    old = {k: v.detach().double() for k, v in model.state_dict().items()}
    new: dict[str, torch.Tensor] = {}
    for name, t in old.items():
        if name.endswith("position_ids") or name.endswith("token_type_ids"):
            new[name] = t.to(model.state_dict()[name].dtype)
            continue
        if "embeddings" in name and name.endswith("weight") and "LayerNorm" not in name:
            new[name] = t[:, resid]                                              # tables: columns copied
        elif "LayerNorm" in name:
            new[name] = t[resid]
        elif any(s in name for s in (".query.", ".key.", ".value.")):
            scale = qk_scale if (".query." in name or ".key." in name) else 1.0
            new[name] = scale * (t[head_src][:, resid] / factor if name.endswith("weight") else t[head_src])
        elif "attention.output.dense" in name:
            new[name] = t[resid][:, head_src] / factor if name.endswith("weight") else t[resid]
        elif "intermediate.dense" in name:
            new[name] = t[:, resid] / factor if name.endswith("weight") else t
        elif ".output.dense" in name:                                           # MLP output -> residual
            new[name] = t[resid] if name.endswith("weight") else t[resid]
        elif "pooler.dense" in name:
            new[name] = t[resid][:, resid] / factor if name.endswith("weight") else t[resid]
        else:
            raise ValueError(f"widen_bert: unexpected tensor {name}")
    state = wide.state_dict()
    missing = set(state) - set(new)
    if missing:
        raise ValueError(f"widen_bert: tensors not produced: {sorted(missing)[:3]}")
    wide.load_state_dict({k: v.to(state[k].dtype) for k, v in new.items()})
    return wide.eval()


# ---------------------------------------------------------------------------------------------
# cached folders


def _key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _build(name: str, source: Path, settings: ContinuedSettings, widen: int, verbose: bool) -> Path:
    parts = {"code": CODE_VERSION, "source": ft.model_fingerprint(source), "settings": dataclasses.asdict(settings),
             "widen": widen, "data": [os.path.getsize(_data.wordnet_path().parent / f) for f in POS_FILES]}
    out = cache_root() / "models" / f"{name}-{_key(parts)}"
    if (out / "model.safetensors").is_file() and (out / "variant.json").is_file():
        return out
    model, tok = zs.load_model(source)
    meta: dict[str, Any] = {"source": str(source), "settings": dataclasses.asdict(settings), "widen": widen}
    probe = [e.text for e in _data.load_split("sentiment", "validation")[:32]] if _data.available("sentiment") else \
        [b for _, b in gloss_pairs()[:32]]
    enc = tok(probe, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        reference = zs.encode(model.eval(), enc["input_ids"], enc["attention_mask"])
    if widen > 1:
        model = widen_bert(model, widen)
        with torch.no_grad():
            got = zs.encode(model, enc["input_ids"], enc["attention_mask"])
        meta["widening_max_cos_error"] = float((got @ got.T - reference @ reference.T).abs().max())
        if meta["widening_max_cos_error"] > 1e-5:
            raise RuntimeError(f"widening is not function preserving (cosine error {meta['widening_max_cos_error']:.2e})")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if verbose:
        print(f"[variants] {name}: continued training ({settings.steps} steps) from {source}", flush=True)
    meta.update(continue_training(model, tok, settings))
    meta["weight_drift"] = weight_drift(before, model.state_dict())
    with torch.no_grad():
        after = zs.encode(model, enc["input_ids"], enc["attention_mask"])
    if widen > 1:
        after_cos = after @ after.T
        ref_cos = reference @ reference.T
    else:
        after_cos, ref_cos = (after * reference).sum(-1), torch.ones(len(probe))
    meta["embedding_drift"] = float((after_cos - ref_cos).abs().mean())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for f in ft.TOKENIZER_FILES:
            if (source / f).is_file():
                shutil.copyfile(source / f, tmp / f)
        (tmp / "variant.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def continued_dir(source: Path, settings: ContinuedSettings | None = None, verbose: bool = True) -> Path:
    """Setting 2: ``source`` (all-MiniLM-L6-v2) after contrastive continued training (cached)."""
    return _build("minilm-l6-continued", Path(source), settings or ContinuedSettings(), 1, verbose)


def widened_dir(source: Path, settings: ContinuedSettings | None = None, verbose: bool = True) -> Path:
    """Setting 3: ``source`` widened 384 -> 768 (function preserving), then continued training (cached)."""
    return _build("minilm-l6-wide768-continued", Path(source), settings or ContinuedSettings(), 2, verbose)


def variant_meta(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "variant.json").read_text())
