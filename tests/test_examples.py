"""Every example in merge_configs/ runs through the CLI as shipped (on tiny models laid out where
the example expects them), and the merged model loads and runs. The two MiniLM examples need the
real models: `make demo` runs them (and the slow test in test_demo.py)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_bico.cli import yaml_main
from tests._tiny import WORDS, make_tiny_causal_lm
from tests.conftest import make_variant
from tests.test_cli_merge import check_loads_and_runs

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "merge_configs").glob("*.yml") if not p.name.startswith("minilm_"))


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    """``models/{base, ft-a, ft-b, old-base, old-ft}`` and ``data/*.jsonl`` as the examples name them."""
    root = tmp_path_factory.mktemp("examples")
    models = root / "models"
    base = make_tiny_causal_lm(models / "base", arch="llama", seed=1)
    make_variant(base, models / "ft-a", seed=11)
    make_variant(base, models / "ft-b", seed=22)
    old = make_tiny_causal_lm(models / "old-base", arch="llama", seed=2)
    make_variant(old, models / "old-ft", seed=33)
    rng = random.Random(0)
    for name in ("calib", "task-a", "task-b"):
        lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(12))}) for _ in range(64)]
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_every_example_is_covered():
    names = {p.name for p in EXAMPLES}
    assert {"linear.yml", "task_arithmetic.yml", "ties.yml", "dare_ties.yml", "passthrough_slices.yml",
            "fisher.yml", "bico.yml", "ties_with_transfer.yml", "fisher_with_transfer.yml"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(example: Path, layout: Path, tmp_path):
    config = layout / example.name
    shutil.copyfile(example, config)
    out = tmp_path / "out"
    result = CliRunner().invoke(yaml_main, [str(config), str(out), "--quiet", "--cache-dir", str(layout / "cache")])
    assert result.exit_code == 0, result.output
    assert (out / "mergekit_config.yml").read_text() == example.read_text()
    check_loads_and_runs(out)
