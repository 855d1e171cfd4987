"""CLIP-style zero-shot head for sentence encoders (no trainable head).

sentence embedding = mean of the last hidden states over non-pad tokens, L2-normalised;
class embedding    = the same, computed by the *same model* from a short class description;
logits             = ``scale * cos(text, class)`` (``scale`` = :data:`LOGIT_SCALE`).

The class embeddings are recomputed from the model at every call (with gradient), so a loss built
on these logits is a function of all encoder weights; nothing is trained or stored besides the
encoder.

Calibration losses for the project's calibration stage (``loss(model, batch) -> scalar``, batch =
dict with ``input_ids``, ``attention_mask``, ``labels``; mean cross-entropy over the examples)::

    benchmarks.realmodels.zeroshot:sentiment_loss
    benchmarks.realmodels.zeroshot:subjectivity_loss
    benchmarks.realmodels.zeroshot:wordnet_loss

Each tokenises its task's class descriptions with the model's tokenizer (found from
``model.name_or_path`` / ``model.config._name_or_path``, or ``$BICO_TOKENIZER_DIR``, or, for the
30522-token uncased BERT vocabulary shared by all-MiniLM-L6-v2 and paraphrase-MiniLM-L3-v2,
all-MiniLM-L6-v2's tokenizer), cached per (tokenizer, task). The class-description token ids must
come from the same vocabulary as the batch's ``input_ids``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from benchmarks.realmodels import data as _data

LOGIT_SCALE = 20.0
MAX_LENGTH = 128
EVAL_BATCH_SIZE = 64

__all__ = [
    "LOGIT_SCALE",
    "MAX_LENGTH",
    "mean_pool",
    "encode",
    "class_embeddings",
    "zero_shot_logits",
    "zero_shot_loss",
    "make_loss",
    "sentiment_loss",
    "subjectivity_loss",
    "wordnet_loss",
    "load_model",
    "find_tokenizer",
    "evaluate",
    "predict",
]


# ---------------------------------------------------------------------------------------------
# embeddings


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``attention_mask`` is 1 (sentence-transformers pooling)."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def encode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings ``[batch, hidden]``."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return F.normalize(mean_pool(hidden, attention_mask), p=2, dim=-1)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# tokenizer discovery (for the class descriptions)


def _tokenizer_source(model: torch.nn.Module) -> str:
    env = os.environ.get("BICO_TOKENIZER_DIR")
    if env:
        return env
    candidates = [getattr(model, "name_or_path", None)]
    cfg = getattr(model, "config", None)
    if cfg is not None:
        candidates += [getattr(cfg, "_name_or_path", None), getattr(cfg, "name_or_path", None)]
    for cand in candidates:
        if cand and Path(cand).is_dir() and any(
            (Path(cand) / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
        ):
            return str(Path(cand).resolve())
    vocab = getattr(cfg, "vocab_size", None)
    if vocab == 30522 and getattr(cfg, "model_type", "bert") == "bert":
        from benchmarks.realmodels import model_a_dir

        return str(model_a_dir())
    raise _data.MergeKitBicoError(
        "cannot find a tokenizer for the class descriptions: the model's folder "
        f"({candidates[0]!r}) has none; set BICO_TOKENIZER_DIR"
    )


@functools.lru_cache(maxsize=8)
def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def find_tokenizer(model: torch.nn.Module) -> Any:
    """The tokenizer that belongs to ``model`` (see the module docstring for the search order)."""
    return _load_tokenizer(_tokenizer_source(model))


@functools.lru_cache(maxsize=64)
def _class_tokens_cached(source: str, descriptions: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    tok = _load_tokenizer(source)
    enc = tok(list(descriptions), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _class_tokens(
    model: torch.nn.Module, descriptions: Sequence[str], tokenizer: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if tokenizer is not None:
        enc = tokenizer(list(descriptions), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
    else:
        ids, mask = _class_tokens_cached(_tokenizer_source(model), tuple(descriptions))
    dev = _model_device(model)
    return ids.to(dev), mask.to(dev)


def class_embeddings(
    model: torch.nn.Module, task: str | Sequence[str], tokenizer: Any = None
) -> torch.Tensor:
    """``[num_classes, hidden]`` normalised embeddings of the class descriptions (with gradient
    if grad mode is on). ``task`` is a task name or an explicit list of descriptions."""
    descriptions = _data.class_descriptions(task) if isinstance(task, str) else list(task)
    ids, mask = _class_tokens(model, descriptions, tokenizer)
    return encode(model, ids, mask)


def zero_shot_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    task: str | Sequence[str],
    scale: float = LOGIT_SCALE,
    tokenizer: Any = None,
    class_emb: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[batch, num_classes]`` logits; pass ``class_emb`` to reuse precomputed class embeddings."""
    if class_emb is None:
        class_emb = class_embeddings(model, task, tokenizer)
    text = encode(model, input_ids, attention_mask)
    return scale * text @ class_emb.T


# ---------------------------------------------------------------------------------------------
# calibration losses


def zero_shot_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    task: str | Sequence[str],
    scale: float = LOGIT_SCALE,
    tokenizer: Any = None,
) -> torch.Tensor:
    """Mean cross-entropy of the zero-shot logits against ``batch['labels']``."""
    dev = _model_device(model)
    ids = batch["input_ids"].to(dev)
    mask = batch["attention_mask"].to(dev)
    labels = batch["labels"].to(dev).long()
    logits = zero_shot_logits(model, ids, mask, task, scale=scale, tokenizer=tokenizer)
    return F.cross_entropy(logits.float(), labels, reduction="mean")


def make_loss(
    task: str, scale: float = LOGIT_SCALE, tokenizer: Any = None
) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """A ``loss(model, batch)`` for ``task`` (e.g. for a different logit scale or tokenizer)."""
    _data.get_task(task)

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return zero_shot_loss(model, batch, task, scale=scale, tokenizer=tokenizer)

    loss.__name__ = f"{task}_loss"
    loss.__qualname__ = loss.__name__
    return loss


def sentiment_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Zero-shot cross-entropy for Rotten Tomatoes sentiment (0 rotten, 1 fresh)."""
    return zero_shot_loss(model, batch, "sentiment")


def subjectivity_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Zero-shot cross-entropy for subjectivity (0 plot sentence, 1 critic snippet)."""
    return zero_shot_loss(model, batch, "subjectivity")


def wordnet_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Zero-shot cross-entropy for the 26 WordNet noun supersenses."""
    return zero_shot_loss(model, batch, "wordnet")


# ---------------------------------------------------------------------------------------------
# evaluation


def load_model(model_dir_or_model: str | Path | torch.nn.Module, tokenizer: Any = None) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` from a folder (``AutoModel``) or an already built model."""
    if isinstance(model_dir_or_model, torch.nn.Module):
        model = model_dir_or_model
        return model, tokenizer if tokenizer is not None else find_tokenizer(model)
    from transformers import AutoModel

    from mergekit_bico.errors import ModelLoadError

    path = Path(model_dir_or_model)
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    try:
        model = AutoModel.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from {path}: {str(exc).splitlines()[0]}") from None
    return model, tokenizer if tokenizer is not None else find_tokenizer(model)


def _examples(task: str, split: str | Sequence[_data.Example], limit: int | None) -> list[_data.Example]:
    examples = _data.load_split(task, split) if isinstance(split, str) else list(split)
    return examples[:limit] if limit is not None else examples


@torch.no_grad()
def predict(
    model_dir_or_model: str | Path | torch.nn.Module,
    task: str,
    split: str | Sequence[_data.Example] = "test",
    batch_size: int = EVAL_BATCH_SIZE,
    limit: int | None = None,
    tokenizer: Any = None,
    max_length: int = MAX_LENGTH,
) -> tuple[list[int], list[int]]:
    """``(predictions, labels)`` of the zero-shot head (model in eval mode, no grad)."""
    model, tok = load_model(model_dir_or_model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        examples = _examples(task, split, limit)
        cls = class_embeddings(model, task, tok)
        dev = _model_device(model)
        # Sort by length for less padding; restore order afterwards.
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].text))
        preds = [0] * len(examples)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tok([examples[i].text for i in idx], padding=True, truncation=True,
                      max_length=max_length, return_tensors="pt")
            emb = encode(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
            for i, p in zip(idx, (emb @ cls.T).argmax(dim=-1).tolist()):
                preds[i] = int(p)
    finally:
        model.train(was_training)
    return preds, [e.label for e in examples]


def evaluate(
    model_dir_or_model: str | Path | torch.nn.Module,
    task: str,
    split: str | Sequence[_data.Example] = "test",
    batch_size: int = EVAL_BATCH_SIZE,
    limit: int | None = None,
    tokenizer: Any = None,
) -> float:
    """Zero-shot accuracy in [0, 1] of a model folder or model on ``task``'s ``split``
    (or on an explicit list of :class:`~benchmarks.realmodels.data.Example`)."""
    preds, labels = predict(model_dir_or_model, task, split, batch_size=batch_size, limit=limit, tokenizer=tokenizer)
    if not labels:
        raise ValueError("no examples to evaluate")
    return sum(int(p == y) for p, y in zip(preds, labels)) / len(labels)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    import time

    parser = argparse.ArgumentParser(prog="python -m benchmarks.realmodels.zeroshot",
                                     description="zero-shot accuracy of a model folder")
    parser.add_argument("model", help="model folder, or 'A' / 'B' for the two MiniLM bases")
    parser.add_argument("--tasks", nargs="+", default=list(_data.TASKS))
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks.realmodels import model_a_dir, model_b_dir

    path = {"A": model_a_dir, "B": model_b_dir}.get(args.model, lambda: Path(args.model))()
    try:
        model, tok = load_model(path)
        for task in args.tasks:
            t0 = time.perf_counter()
            acc = evaluate(model, task, args.split, tokenizer=tok)
            print(f"{task:12s} {args.split:10s} acc={100 * acc:6.2f}  ({time.perf_counter() - t0:.1f}s)")
    except _data.MergeKitBicoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
