"""Shared fixtures: tiny model families (a base and perturbed "fine-tunes") built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: threads only add overhead on 2 shared cores

from tests._tiny import make_tiny_causal_lm, make_tiny_tokenizer  # noqa: E402


def make_variant(base: Path, out: Path, seed: int, scale: float = 0.02, shard_size: str = "40KB") -> Path:
    """A "fine-tune" of ``base``: every parameter plus seeded Gaussian noise of std ``scale``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), max_shard_size=shard_size)
    make_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session", params=["llama", "qwen2", "gpt2"])
def family(request, tmp_path_factory) -> dict[str, Path]:
    """``{"base", "ft1", "ft2"}``: a tiny random model of each architecture and two perturbed copies."""
    root = tmp_path_factory.mktemp(f"family-{request.param}")
    base = make_tiny_causal_lm(root / "base", arch=request.param, seed=1)
    return {
        "arch": request.param,
        "base": base,
        "ft1": make_variant(base, root / "ft1", seed=11),
        "ft2": make_variant(base, root / "ft2", seed=22),
    }


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-llama-only")
    base = make_tiny_causal_lm(root / "base", arch="llama", seed=1)
    return {
        "arch": "llama",
        "base": base,
        "ft1": make_variant(base, root / "ft1", seed=11),
        "ft2": make_variant(base, root / "ft2", seed=22),
        "ft3": make_variant(base, root / "ft3", seed=33),
    }
