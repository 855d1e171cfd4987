"""Builders of tiny random models, tokenizers and data files for tests (no network).

Reusable by every test module::

    from tests._tiny import make_tiny_causal_lm, make_tiny_tokenizer, make_tiny_classifier, write_jsonl

Models are small (hidden 32, 2 layers, vocab 128), float32, saved as safetensors in several shards
(``shard_size``) so that the sharded-index loader paths are exercised, with a tokenizer beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

VOCAB_SIZE = 128
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "to", "house", "big", "small", "red",
    "blue", "green", "and", "is", "was", "good", "bad", "yes", "no", "one", "two", "three",
    "four", "five", "hello", "world", "model",
]


def tiny_vocab() -> dict[str, int]:
    """Token -> id: the special tokens, a few English words, then ``w0``, ``w1``, ... up to VOCAB_SIZE."""
    tokens = list(SPECIAL_TOKENS) + list(WORDS)
    i = 0
    while len(tokens) < VOCAB_SIZE:
        tokens.append(f"w{i}")
        i += 1
    return {t: n for n, t in enumerate(tokens)}


def make_tiny_tokenizer(path: str | Path | None = None, *, pad_token: Optional[str] = "[PAD]"):
    """A word-level ``PreTrainedTokenizerFast`` over :func:`tiny_vocab` (whitespace split, no
    special tokens added on encode). ``pad_token=None`` builds one without a pad token (to test the
    eos fallback). Saved to ``path`` when given; returns the tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(WordLevel(vocab=tiny_vocab(), unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    kwargs: dict[str, Any] = dict(
        tokenizer_object=raw,
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    tok = PreTrainedTokenizerFast(**kwargs)
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(path))
    return tok


def _causal_config(arch: str, **overrides: Any):
    common = dict(vocab_size=VOCAB_SIZE, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    if arch == "llama":
        from transformers import LlamaConfig

        cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
        return LlamaConfig(**{**common, **cfg, **overrides})
    if arch == "qwen2":
        from transformers import Qwen2Config

        cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
        return Qwen2Config(**{**common, **cfg, **overrides})
    if arch == "gpt2":
        from transformers import GPT2Config

        cfg = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2Config(**{**common, **cfg, **overrides})
    raise ValueError(f"unknown tiny causal LM arch {arch!r}; use llama, qwen2 or gpt2")


def _save(model: torch.nn.Module, path: Path, shard_size: str | int, tokenizer: bool) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), max_shard_size=shard_size, safe_serialization=True)
    if tokenizer:
        make_tiny_tokenizer(path)
    return path


def make_tiny_causal_lm(
    path: str | Path,
    arch: str = "llama",
    seed: int = 0,
    shard_size: str | int = "40KB",
    *,
    tokenizer: bool = True,
    **config_overrides: Any,
) -> Path:
    """Save a random tiny ``*ForCausalLM`` (``arch`` in llama / qwen2 / gpt2; hidden 32, 2 layers,
    vocab 128) in several safetensors shards at ``path``, with a tiny tokenizer; return ``path``.
    ``config_overrides`` go to the transformers config (e.g. ``tie_word_embeddings=True``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _causal_config(arch, **config_overrides)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    return _save(model, Path(path), shard_size, tokenizer)


def make_tiny_classifier(
    path: str | Path,
    arch: str = "bert",
    num_labels: int = 2,
    seed: int = 0,
    shard_size: str | int = "40KB",
    *,
    tokenizer: bool = True,
    **config_overrides: Any,
) -> Path:
    """Save a random tiny ``*ForSequenceClassification`` (``arch`` in bert / llama / qwen2 / gpt2)
    with ``num_labels`` classes at ``path``, with a tiny tokenizer; return ``path``."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(seed)
    if arch == "bert":
        cfg = dict(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        config = BertConfig(**{**cfg, **config_overrides})
    else:
        config = _causal_config(arch, **config_overrides)
    config.num_labels = num_labels
    model = AutoModelForSequenceClassification.from_config(config).to(torch.float32)
    return _save(model, Path(path), shard_size, tokenizer)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSON lines (UTF-8) to ``path``; return ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return p


def write_txt(path: str | Path, lines: Iterable[str]) -> Path:
    """Write one sample a line to ``path``; return ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


def copy_without_tensor(src: Path, dst: Path, name: str) -> Path:
    """A copy of the sharded model ``src`` at ``dst`` lacking tensor ``name`` (shard and index)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = dst / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst

