"""Tensor-name classification per family, probes on real (tiny) transformers models, and the
per-family transfer rules end to end (self-transfer A -> A must reproduce the fine-tune exactly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergekit_bico.architectures import (
    IDENTITY_SPACES,
    arch_for_config,
    detect_family,
    get_arch,
    layer_index,
)
from mergekit_bico.errors import TransferError


# ---------------------------------------------------------------------------------------------
# family detection


@pytest.mark.parametrize(
    "config,family",
    [
        ({"model_type": "llama"}, "llama"),
        ({"model_type": "mistral"}, "llama"),
        ({"model_type": "qwen2"}, "llama"),
        ({"model_type": "gpt2"}, "gpt2"),
        ({"model_type": "bert"}, "bert"),
        ({"architectures": ["LlamaForCausalLM"]}, "llama"),
        ({"architectures": ["GPT2LMHeadModel"]}, "gpt2"),
        ({"architectures": ["BertForSequenceClassification"]}, "bert"),
    ],
)
def test_detect_family(config, family):
    assert detect_family(config) == family


@pytest.mark.parametrize("config", [{"model_type": "t5"}, {}, {"architectures": ["Qwen2MoeForCausalLM"]}])
def test_unsupported_family_names_the_model(config):
    with pytest.raises(TransferError, match="model '/m/x'.*not supported"):
        detect_family(config, model="/m/x")


# ---------------------------------------------------------------------------------------------
# tensor specs


def test_llama_specs():
    arch = get_arch("llama")
    q = arch.spec("model.layers.3.self_attn.q_proj.weight")
    assert (q.layer, q.role, q.kind, q.in_space, q.out_space, q.layout) == (3, "q_proj", "weight", "attn_in", "q_out", "out_in")
    assert arch.spec("model.layers.3.self_attn.k_proj.weight").in_space == "attn_in"  # shared with q / v
    b = arch.spec("model.layers.0.self_attn.v_proj.bias")  # qwen2
    assert (b.kind, b.out_space, b.layout, b.in_space) == ("bias", "v_out", "vector", None)
    down = arch.spec("model.layers.1.mlp.down_proj.weight")
    assert (down.in_space, down.out_space) == ("down_in", "down_out")
    norm = arch.spec("model.layers.1.input_layernorm.weight")
    assert (norm.kind, norm.in_space, norm.rule.consumers) == ("norm", "attn_in", ("q_proj", "k_proj", "v_proj"))
    emb = arch.spec("model.embed_tokens.weight")
    assert (emb.layer, emb.kind, emb.in_space, emb.out_space, emb.layout) == (None, "embedding", "vocab", "embed_out", "rows")
    head = arch.spec("lm_head.weight")
    assert (head.in_space, head.out_space) == ("final_in", "vocab") and "vocab" in IDENTITY_SPACES
    final = arch.spec("model.norm.weight")
    assert (final.layer, final.kind, final.in_space) == (None, "norm", "final_in")
    assert arch.spec("score.weight").out_space == "labels"
    # a LlamaModel checkpoint (no "model." prefix)
    assert arch.spec("layers.2.mlp.up_proj.weight").role == "up_proj"
    assert arch.spec("embed_tokens.weight").kind == "embedding"
    assert arch.spec("model.layers.0.self_attn.rotary_emb.inv_freq").kind == "buffer"
    assert arch.spec("model.layers.0.mlp.experts.0.w1.weight").kind == "unknown"
    assert arch.norm_feeding("gate_proj", True) == "post_attention_layernorm"
    assert arch.norm_feeding("lm_head", False) == "norm"


def test_gpt2_specs():
    arch = get_arch("gpt2")
    c = arch.spec("transformer.h.1.attn.c_attn.weight")
    assert (c.layer, c.kind, c.layout, c.in_space, c.splits, c.fused) == (1, "weight", "in_out", "attn_in", ("q_out", "k_out", "v_out"), True)
    cb = arch.spec("transformer.h.1.attn.c_attn.bias")  # not the causal-mask buffer 'attn.bias'
    assert (cb.kind, cb.splits) == ("bias", ("q_out", "k_out", "v_out"))
    assert arch.spec("transformer.h.1.attn.bias").kind == "buffer"
    assert arch.spec("h.0.attn.masked_bias").kind == "buffer"
    proj = arch.spec("h.0.mlp.c_proj.weight")  # hub checkpoints have no "transformer." prefix
    assert (proj.role, proj.in_space, proj.out_space, proj.layout) == ("mlp_c_proj", "down_in", "down_out", "in_out")
    assert arch.spec("transformer.h.0.attn.c_proj.weight").out_space == "o_out"
    ln = arch.spec("transformer.h.0.ln_1.bias")
    assert (ln.kind, ln.in_space) == ("norm_bias", "attn_in")
    wpe = arch.spec("transformer.wpe.weight")
    assert (wpe.kind, wpe.in_space, wpe.out_space) == ("embedding", "positions", "embed_out")
    assert arch.spec("transformer.ln_f.weight").rule.consumers == ("lm_head", "score")


def test_bert_specs():
    arch = get_arch("bert")
    for prefix in ("bert.", ""):
        q = arch.spec(f"{prefix}encoder.layer.0.attention.self.query.weight")
        assert (q.layer, q.role, q.in_space, q.out_space) == (0, "query", "attn_in", "q_out")
        o = arch.spec(f"{prefix}encoder.layer.0.attention.output.dense.weight")
        assert (o.in_space, o.out_space) == ("o_in", "o_out")
        ln = arch.spec(f"{prefix}encoder.layer.0.attention.output.LayerNorm.weight")
        assert (ln.kind, ln.in_space, ln.rule.consumers) == ("norm", "mlp_in", ())  # post-LN: never folded
        assert arch.spec(f"{prefix}encoder.layer.0.output.LayerNorm.bias").in_space == "hidden_out"
        assert arch.spec(f"{prefix}encoder.layer.0.intermediate.dense.weight").out_space == "fc_out"
        assert arch.spec(f"{prefix}embeddings.token_type_embeddings.weight").in_space == "token_types"
        assert arch.spec(f"{prefix}embeddings.LayerNorm.weight").in_space == "embed_hidden"
        assert arch.spec(f"{prefix}pooler.dense.weight").in_space == "final_hidden"
    assert arch.spec("bert.embeddings.LayerNorm.gamma").kind == "norm"  # legacy names
    assert arch.spec("classifier.weight").out_space == "labels"
    assert arch.spec("cls.predictions.bias").kind == "vector"
    assert arch.spec("cls.predictions.decoder.weight").out_space == "vocab"
    assert arch.spec("bert.embeddings.position_ids").kind == "buffer"


@pytest.mark.parametrize(
    "name,family,index",
    [
        ("model.layers.12.mlp.up_proj.weight", None, 12),
        ("layers.3.self_attn.o_proj.weight", "llama", 3),
        ("transformer.h.7.attn.c_attn.bias", None, 7),
        ("h.0.ln_1.weight", "gpt2", 0),
        ("bert.encoder.layer.5.output.dense.weight", None, 5),
        ("encoder.layer.1.attention.self.key.bias", "bert", 1),
        ("model.embed_tokens.weight", None, None),
        ("lm_head.weight", "llama", None),
        ("transformer.ln_f.weight", "gpt2", None),
    ],
)
def test_layer_index(name, family, index):
    assert layer_index(name, family) == index


# ---------------------------------------------------------------------------------------------
# real tiny models: every tensor classified, every probe on an existing module


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from tests._tiny import make_tiny_causal_lm, make_tiny_classifier

    root = tmp_path_factory.mktemp("arch")
    models = {arch: make_tiny_causal_lm(root / arch, arch=arch, seed=0) for arch in ("llama", "qwen2", "gpt2")}
    models["mistral"] = _tiny_mistral(root / "mistral")
    models["bert"] = make_tiny_classifier(root / "bert", arch="bert", seed=0)
    return models


def _tiny_mistral(path: Path) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    from tests._tiny import make_tiny_tokenizer

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                        bos_token_id=2, eos_token_id=3, pad_token_id=0)
    MistralForCausalLM(cfg).save_pretrained(str(path), max_shard_size="40KB")
    make_tiny_tokenizer(path)
    return path


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "bert"])
def test_every_checkpoint_tensor_is_classified(tiny_models, family):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from mergekit_bico.io.loader import LazyModel

    lazy = LazyModel(tiny_models[family])
    arch = arch_for_config(lazy.config_dict())
    specs = {n: arch.spec(n) for n in lazy.keys()}
    unknown = [n for n, s in specs.items() if s.kind in ("unknown", "buffer")]
    assert unknown == []
    for name, s in specs.items():
        assert s.layer == layer_index(name, arch.family)
    cls = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    model = cls.from_pretrained(str(tiny_models[family]))
    names = [n for n, _ in model.named_modules()]
    probes = arch.probes(names, 2, ("G", "Y"))
    modules = set(names)
    assert all(p.module in modules for p in probes)
    dims = arch.space_dims({n: tuple(lazy.shape(n)) for n in lazy.keys()}, 2)
    # every non-identity space a tensor uses has a probe and a width
    keys = {(p.layer, p.space) for p in probes}
    for s in specs.values():
        for space in filter(None, (s.in_space, s.out_space, *s.splits)):
            if space not in IDENTITY_SPACES:
                assert (s.layer, space) in keys and (s.layer, space) in dims, (s.name, space)
    if family == "gpt2":
        fused = [p for p in probes if p.layer == 0 and p.space in ("q_out", "k_out", "v_out") and p.stat == "G"]
        assert sorted((p.space, p.part, p.parts) for p in fused) == [("k_out", 1, 3), ("q_out", 0, 3), ("v_out", 2, 3)]
        assert dims[(0, "q_out")] == 32
    attn_in = [p for p in probes if p.layer == 0 and p.space == "attn_in"]
    assert len(attn_in) == 1 and attn_in[0].site == "in"  # q/k/v share one input probe


# ---------------------------------------------------------------------------------------------
# end to end per family: transferring A' - A onto A itself must give A' exactly


def _perturbed(src: Path, dst: Path, family: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tests._tiny import make_tiny_tokenizer

    cls = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    model = cls.from_pretrained(str(src), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(str(dst), max_shard_size="40KB")
    make_tiny_tokenizer(dst)
    return dst


@pytest.mark.parametrize("family,prior", [("qwen2", 0.0), ("mistral", 0.0), ("bert", 0.0), ("bert", 1.0), ("bert", "auto")])
def test_self_transfer_reproduces_the_finetune(tiny_models, tmp_path, family, prior):
    """Source base = target base: every map is the identity, with or without an identity prior
    (C is then a Gram matrix, so C + beta I is positive definite and its polar factor is I; with
    ``auto`` the identity's share tr(C) / ||C||_* is 1 but the statistics are explained exactly
    (best-fit misfit 0), so each space records a prior of 0: the plain fit)."""
    import random

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from mergekit_bico.config import CalibrationConfig, TransferConfig
    from mergekit_bico.io.loader import LazyModel
    from mergekit_bico.transfer import prepare_transfer
    from tests._tiny import WORDS, write_jsonl

    a = tiny_models[family]
    ft = _perturbed(a, tmp_path / "ft", family)
    rng = random.Random(0)
    words = WORDS + [f"w{i}" for i in range(60)]
    rows = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(12, 20))), "label": rng.randint(0, 1)}
            for _ in range(80)]
    calib = CalibrationConfig(data=str(write_jsonl(tmp_path / "c.jsonl", rows)), samples=80, max_length=24, batch_size=16)
    prepared = prepare_transfer(cfg=TransferConfig(source_base=str(a), output_space="combined", identity_prior=prior), source_finetuned=ft,
                                target_base=a, calibration=calib, cache_dir=tmp_path / "cache", progress=False)
    cls = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    model = cls.from_pretrained(str(a), dtype=torch.float64).eval()
    lazy = LazyModel(a)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in lazy.keys():
            delta = prepared.delta(name)
            assert delta is not None, name
            params[name].copy_(lazy.get(name, dtype=torch.float64) + delta.double())
    ids = torch.randint(7, 128, (3, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        ref = cls.from_pretrained(str(ft), dtype=torch.float64).eval()(input_ids=ids).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4
    rules = prepared.report()["rules"]
    if prior == "auto":
        spaces = prepared.report()["spaces"]
        fitted = [row for row in spaces if row["rank"] > 0]
        assert fitted and all(row["best_fit_misfit"] < 1e-9 and row["identity_prior"] < 1e-9 for row in fitted)
    if family == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in rules["bias"]
        assert "model.norm.weight" in rules["norm (folded into consumers: zero delta)"]
    if family == "bert":
        assert "bert.embeddings.token_type_embeddings.weight" in rules["embedding (hidden axis by output map)"]
        assert "bert.pooler.dense.weight" in rules["linear"]
