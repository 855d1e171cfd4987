"""The benchmark's model variants: the 384 -> 768 widening of a BERT encoder is function preserving
(checked here on a tiny random BERT: same mean-pooled normalised embeddings, hence same zero-shot
logits), and the WordNet gloss pairs parse."""

from __future__ import annotations

import pytest
import torch

from benchmarks.realmodels import data
from benchmarks.realmodels.variants import gloss_pairs, weight_drift, widen_bert
from benchmarks.realmodels.zeroshot import encode


@pytest.mark.parametrize("factor", [2, 3])
def test_widening_preserves_the_embeddings(factor):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=40)
    model = BertModel(cfg).eval()
    with torch.no_grad():   # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(0, 60, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    wide = widen_bert(model, factor)
    assert wide.config.hidden_size == factor * 32 and wide.config.num_attention_heads == 4
    with torch.no_grad():
        ref = encode(model, ids, mask)
        got = encode(wide, ids, mask)
        hidden = wide(input_ids=ids, attention_mask=mask).last_hidden_state
    # [h; h] / sqrt(factor): the same unit vector, so every cosine logit is unchanged
    torch.testing.assert_close(got[:, :32] * factor ** 0.5, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(got @ got.T, ref @ ref.T, rtol=0, atol=1e-5)
    # every residual coordinate is copied `factor` times
    torch.testing.assert_close(hidden[..., :32], hidden[..., 32:64], rtol=0, atol=1e-5)
    # and it is a real widening: the copies' weights differ from the original tensors' shapes
    assert wide.encoder.layer[0].attention.self.query.weight.shape == (factor * 32, factor * 32)


def test_weight_drift_is_relative_norm():
    a = {"w": torch.ones(4), "b": torch.zeros(2)}
    b = {"w": torch.ones(4) * 1.5, "b": torch.zeros(2), "other": torch.ones(3)}
    assert weight_drift(a, b) == pytest.approx(0.5)


@pytest.mark.skipif(not data.available("wordnet"), reason="wordnet-base not installed")
def test_gloss_pairs_are_verbs_adjectives_adverbs():
    pairs = gloss_pairs()
    assert len(pairs) > 20_000
    lemmas, gloss = pairs[0]
    assert lemmas and len(gloss.split()) >= 2 and "_" not in lemmas
    nouns = {e.text for e in data.load_split("wordnet", "test")}
    assert not nouns & {g for _, g in pairs[:5000]}
