"""Function-preserving reparametrisations of tiny Llama and GPT-2 models, for known-answer tests.

Every helper takes and returns a float64 state dict (plus the config where shapes change) and
preserves the network's function exactly (up to float rounding):

Llama (RMSNorm, RoPE, GQA, untied lm_head):
* :func:`llama_fold_norms`: fold RMSNorm gains into the linears that read them (gains -> 1);
* :func:`llama_embed_residual`: ``h_B = P h_A`` with ``P`` (d_B x d_A), ``P^T P = I`` (a rotation
  when square). RMSNorm divides by the rms over the *wider* dim: gains ``sqrt(d_A/d_B)`` and
  ``eps * d_A / d_B`` keep ``x_B = P x_A`` exactly;
* :func:`llama_permute_heads` (whole heads only, because of RoPE; GQA groups move together),
  :func:`llama_rotate_values` (any orthogonal map inside each value head),
  :func:`llama_permute_mlp`, :func:`llama_widen_heads`, :func:`llama_widen_mlp` (zero-initialised
  extra heads / neurons), :func:`llama_insert_identity_block` (``o_proj = down_proj = 0``).

GPT-2 (LayerNorm with bias, Conv1D (in, out), fused c_attn, tied wte/lm_head):
* :func:`gpt2_fold_norms` (ln_1 / ln_2 gains and biases into c_attn / c_fc);
* :func:`gpt2_rotate_residual` with an orthogonal ``Q`` fixing the all-ones vector, so that
  LayerNorm's centring commutes with it (no need to centre the writers);
* :func:`gpt2_permute_heads`, :func:`gpt2_rotate_qk_v` (per-head q/k rotation -- no RoPE -- and
  value rotation), :func:`gpt2_permute_mlp`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import torch

SD = dict[str, torch.Tensor]


def random_orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def orthogonal_fixing_ones(d: int, gen: torch.Generator) -> torch.Tensor:
    """Random orthogonal ``Q`` with ``Q 1 = 1`` (a rotation of the complement of the ones vector)."""
    ones = torch.ones(d, 1, dtype=torch.float64) / math.sqrt(d)
    basis, _ = torch.linalg.qr(torch.cat([ones, torch.randn(d, d - 1, generator=gen, dtype=torch.float64)], dim=1))
    comp = basis[:, 1:]
    o = random_orthogonal(d - 1, gen)
    return ones @ ones.T + comp @ o @ comp.T


def to64(sd: SD) -> SD:
    return {k: v.detach().to(torch.float64).clone() for k, v in sd.items()}


def _layers(sd: SD, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


# ---------------------------------------------------------------------------------------------
# Llama


def llama_layers(sd: SD) -> list[int]:
    return _layers(sd, r"^model\.layers\.(\d+)\.")


def llama_fold_norms(sd: SD) -> SD:
    sd = dict(sd)
    for i in llama_layers(sd):
        p = f"model.layers.{i}."
        g = sd[p + "input_layernorm.weight"]
        for n in ("q_proj", "k_proj", "v_proj"):
            sd[p + f"self_attn.{n}.weight"] = sd[p + f"self_attn.{n}.weight"] * g[None, :]
        sd[p + "input_layernorm.weight"] = torch.ones_like(g)
        g = sd[p + "post_attention_layernorm.weight"]
        for n in ("gate_proj", "up_proj"):
            sd[p + f"mlp.{n}.weight"] = sd[p + f"mlp.{n}.weight"] * g[None, :]
        sd[p + "post_attention_layernorm.weight"] = torch.ones_like(g)
    g = sd["model.norm.weight"]
    sd["lm_head.weight"] = sd["lm_head.weight"] * g[None, :]
    sd["model.norm.weight"] = torch.ones_like(g)
    return sd


def llama_embed_residual(sd: SD, config: Any, p: torch.Tensor) -> tuple[SD, Any]:
    """``h_B = P h_A`` (P: d_B x d_A, orthonormal columns). Norm gains must be folded (all ones)."""
    sd = dict(sd)
    d_b, d_a = p.shape
    scale = math.sqrt(d_a / d_b)
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] @ p.T
    sd["lm_head.weight"] = sd["lm_head.weight"] @ p.T
    for i in llama_layers(sd):
        pre = f"model.layers.{i}."
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            sd[pre + n + ".weight"] = sd[pre + n + ".weight"] @ p.T
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            sd[pre + n + ".weight"] = p @ sd[pre + n + ".weight"]
        for n in ("input_layernorm", "post_attention_layernorm"):
            assert torch.allclose(sd[pre + n + ".weight"], torch.ones(d_a, dtype=torch.float64)), "fold norms first"
            sd[pre + n + ".weight"] = torch.full((d_b,), scale, dtype=torch.float64)
    sd["model.norm.weight"] = torch.full((d_b,), scale, dtype=torch.float64)
    config = config.__class__(**{**config.to_dict(), "hidden_size": d_b, "rms_norm_eps": config.rms_norm_eps * d_a / d_b,
                                 "head_dim": _head_dim(config)})
    return sd, config


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama_permute_heads(sd: SD, config: Any, layer: int, kv_perm: list[int], q_perms: list[list[int]]) -> SD:
    """New kv head ``g`` = old kv head ``kv_perm[g]``; within it, new q head ``t`` of the group = old
    q head ``q_perms[g][t]`` of old group ``kv_perm[g]``. Whole heads only (RoPE)."""
    sd = dict(sd)
    hd = _head_dim(config)
    n_kv = config.num_key_value_heads
    rep = config.num_attention_heads // n_kv
    pre = f"model.layers.{layer}.self_attn."
    q_order = [kv_perm[g] * rep + q_perms[g][t] for g in range(n_kv) for t in range(rep)]
    q_idx = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in q_order])
    kv_idx = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in kv_perm])
    sd[pre + "q_proj.weight"] = sd[pre + "q_proj.weight"][q_idx]
    sd[pre + "k_proj.weight"] = sd[pre + "k_proj.weight"][kv_idx]
    sd[pre + "v_proj.weight"] = sd[pre + "v_proj.weight"][kv_idx]
    sd[pre + "o_proj.weight"] = sd[pre + "o_proj.weight"][:, q_idx]
    for n, idx in (("q_proj", q_idx), ("k_proj", kv_idx), ("v_proj", kv_idx)):
        if pre + n + ".bias" in sd:
            sd[pre + n + ".bias"] = sd[pre + n + ".bias"][idx]
    return sd


def llama_rotate_values(sd: SD, config: Any, layer: int, rotations: list[torch.Tensor]) -> SD:
    """``v_g -> U_g v_g`` per kv head; the o_proj columns of every q head reading it get ``U_g^T``."""
    sd = dict(sd)
    hd = _head_dim(config)
    rep = config.num_attention_heads // config.num_key_value_heads
    pre = f"model.layers.{layer}.self_attn."
    v = sd[pre + "v_proj.weight"].clone()
    o = sd[pre + "o_proj.weight"].clone()
    for g, u in enumerate(rotations):
        sl = slice(g * hd, (g + 1) * hd)
        v[sl] = u @ v[sl]
        for t in range(rep):
            h = g * rep + t
            hs = slice(h * hd, (h + 1) * hd)
            o[:, hs] = o[:, hs] @ u.T
    sd[pre + "v_proj.weight"] = v
    sd[pre + "o_proj.weight"] = o
    return sd


def llama_permute_mlp(sd: SD, layer: int, perm: torch.Tensor) -> SD:
    sd = dict(sd)
    pre = f"model.layers.{layer}.mlp."
    sd[pre + "gate_proj.weight"] = sd[pre + "gate_proj.weight"][perm]
    sd[pre + "up_proj.weight"] = sd[pre + "up_proj.weight"][perm]
    sd[pre + "down_proj.weight"] = sd[pre + "down_proj.weight"][:, perm]
    return sd


def llama_widen_mlp(sd: SD, config: Any, extra: int) -> tuple[SD, Any]:
    """Append ``extra`` zero neurons to every MLP (gate/up rows, down columns)."""
    sd = dict(sd)
    for i in llama_layers(sd):
        pre = f"model.layers.{i}.mlp."
        for n in ("gate_proj", "up_proj"):
            w = sd[pre + n + ".weight"]
            sd[pre + n + ".weight"] = torch.cat([w, torch.zeros(extra, w.shape[1], dtype=w.dtype)], dim=0)
        w = sd[pre + "down_proj.weight"]
        sd[pre + "down_proj.weight"] = torch.cat([w, torch.zeros(w.shape[0], extra, dtype=w.dtype)], dim=1)
    config = config.__class__(**{**config.to_dict(), "intermediate_size": config.intermediate_size + extra})
    return sd, config


def llama_widen_heads(sd: SD, config: Any, extra_kv: int) -> tuple[SD, Any]:
    """Append ``extra_kv`` zero kv heads and their q heads (q/k/v rows and o columns zero)."""
    sd = dict(sd)
    hd = _head_dim(config)
    rep = config.num_attention_heads // config.num_key_value_heads
    for i in llama_layers(sd):
        pre = f"model.layers.{i}.self_attn."
        q = sd[pre + "q_proj.weight"]
        sd[pre + "q_proj.weight"] = torch.cat([q, torch.zeros(extra_kv * rep * hd, q.shape[1], dtype=q.dtype)])
        for n in ("k_proj", "v_proj"):
            w = sd[pre + n + ".weight"]
            sd[pre + n + ".weight"] = torch.cat([w, torch.zeros(extra_kv * hd, w.shape[1], dtype=w.dtype)])
        o = sd[pre + "o_proj.weight"]
        sd[pre + "o_proj.weight"] = torch.cat([o, torch.zeros(o.shape[0], extra_kv * rep * hd, dtype=o.dtype)], dim=1)
    config = config.__class__(**{**config.to_dict(), "head_dim": hd,
                                 "num_attention_heads": config.num_attention_heads + extra_kv * rep,
                                 "num_key_value_heads": config.num_key_value_heads + extra_kv})
    return sd, config


def llama_insert_identity_block(sd: SD, config: Any, at: int, copy_from: int = 0) -> tuple[SD, Any]:
    """Insert a block at index ``at`` that adds nothing (a copy of block ``copy_from`` with
    ``o_proj = down_proj = 0``); later blocks shift by one."""
    out: SD = {}
    rx = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    for k, v in sd.items():
        m = rx.match(k)
        if not m:
            out[k] = v
            continue
        i, rest = int(m.group(1)), m.group(2)
        out[f"model.layers.{i + 1 if i >= at else i}.{rest}"] = v
        if i == copy_from:
            new = torch.zeros_like(v) if rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight") else v.clone()
            out[f"model.layers.{at}.{rest}"] = new
    config = config.__class__(**{**config.to_dict(), "num_hidden_layers": config.num_hidden_layers + 1})
    return out, config


# ---------------------------------------------------------------------------------------------
# GPT-2


def gpt2_layers(sd: SD) -> list[int]:
    return _layers(sd, r"^transformer\.h\.(\d+)\.")


def gpt2_fold_norms(sd: SD) -> SD:
    """ln_1 -> c_attn, ln_2 -> c_fc: ``W <- diag(g) W``, ``b <- b + beta W`` (Conv1D: x W + b)."""
    sd = dict(sd)
    for i in gpt2_layers(sd):
        pre = f"transformer.h.{i}."
        for ln, lin in (("ln_1", "attn.c_attn"), ("ln_2", "mlp.c_fc")):
            g, beta = sd[pre + ln + ".weight"], sd[pre + ln + ".bias"]
            w, b = sd[pre + lin + ".weight"], sd[pre + lin + ".bias"]
            sd[pre + lin + ".bias"] = b + beta @ w
            sd[pre + lin + ".weight"] = g[:, None] * w
            sd[pre + ln + ".weight"] = torch.ones_like(g)
            sd[pre + ln + ".bias"] = torch.zeros_like(beta)
    return sd


def gpt2_rotate_residual(sd: SD, q: torch.Tensor) -> SD:
    """``h_B = Q h_A`` with ``Q 1 = 1``; ln_f must have unit gain and zero bias (it cannot be folded
    into the tied embedding)."""
    sd = dict(sd)
    assert torch.allclose(q @ torch.ones(q.shape[0], dtype=q.dtype), torch.ones(q.shape[0], dtype=q.dtype))
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):
        sd[name] = sd[name] @ q.T
    for i in gpt2_layers(sd):
        pre = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            assert torch.allclose(sd[pre + ln + ".weight"], torch.ones_like(sd[pre + ln + ".weight"])), "fold norms first"
            assert torch.allclose(sd[pre + ln + ".bias"], torch.zeros_like(sd[pre + ln + ".bias"]))
        for lin in ("attn.c_attn", "mlp.c_fc"):          # readers, Conv1D (in, out): rows = inputs
            sd[pre + lin + ".weight"] = q @ sd[pre + lin + ".weight"]
        for lin in ("attn.c_proj", "mlp.c_proj"):        # writers: columns = outputs
            sd[pre + lin + ".weight"] = sd[pre + lin + ".weight"] @ q.T
            sd[pre + lin + ".bias"] = sd[pre + lin + ".bias"] @ q.T
    assert torch.allclose(sd["transformer.ln_f.weight"], torch.ones_like(sd["transformer.ln_f.weight"]))
    assert torch.allclose(sd["transformer.ln_f.bias"], torch.zeros_like(sd["transformer.ln_f.bias"]))
    return sd


def gpt2_permute_heads(sd: SD, n_head: int, layer: int, perm: list[int]) -> SD:
    sd = dict(sd)
    pre = f"transformer.h.{layer}.attn."
    w, b = sd[pre + "c_attn.weight"], sd[pre + "c_attn.bias"]
    d = w.shape[0]
    hd = d // n_head
    idx = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in perm])
    full = torch.cat([idx + k * d for k in range(3)])
    sd[pre + "c_attn.weight"] = w[:, full]
    sd[pre + "c_attn.bias"] = b[full]
    sd[pre + "c_proj.weight"] = sd[pre + "c_proj.weight"][idx]
    return sd


def gpt2_rotate_qk_v(sd: SD, n_head: int, layer: int, qk_rot: list[torch.Tensor], v_rot: list[torch.Tensor]) -> SD:
    """Per head: ``q, k -> q U^T, k U^T`` (scores unchanged, no RoPE) and ``v -> v V^T`` with the
    c_proj rows of that head ``-> V rows``."""
    sd = dict(sd)
    pre = f"transformer.h.{layer}.attn."
    w, b = sd[pre + "c_attn.weight"].clone(), sd[pre + "c_attn.bias"].clone()
    proj = sd[pre + "c_proj.weight"].clone()
    d = w.shape[0]
    hd = d // n_head
    for h in range(n_head):
        for k, u in ((0, qk_rot[h]), (1, qk_rot[h]), (2, v_rot[h])):
            sl = slice(k * d + h * hd, k * d + (h + 1) * hd)
            w[:, sl] = w[:, sl] @ u.T
            b[sl] = b[sl] @ u.T
        hs = slice(h * hd, (h + 1) * hd)
        proj[hs] = v_rot[h] @ proj[hs]
    sd[pre + "c_attn.weight"], sd[pre + "c_attn.bias"], sd[pre + "c_proj.weight"] = w, b, proj
    return sd


def gpt2_permute_mlp(sd: SD, layer: int, perm: torch.Tensor) -> SD:
    sd = dict(sd)
    pre = f"transformer.h.{layer}.mlp."
    sd[pre + "c_fc.weight"] = sd[pre + "c_fc.weight"][:, perm]
    sd[pre + "c_fc.bias"] = sd[pre + "c_fc.bias"][perm]
    sd[pre + "c_proj.weight"] = sd[pre + "c_proj.weight"][perm]
    return sd


# ---------------------------------------------------------------------------------------------
# Saving / loading


def save_causal_lm(config: Any, sd: SD, path: Path, shard_size: str = "40KB") -> Path:
    """Build the model from ``config``, load ``sd`` (strict; cast to float32) and save it sharded
    with the tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    from tests._tiny import make_tiny_tokenizer

    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    state = {k: v.to(torch.float32) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") or "lm_head.weight" in state]
    assert not missing and not unexpected, (missing, unexpected)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), max_shard_size=shard_size, safe_serialization=True)
    make_tiny_tokenizer(path)
    return path


def load_causal_lm(path: Path, dtype: torch.dtype = torch.float64):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def state_dict64(path: Path) -> tuple[SD, Any]:
    model = load_causal_lm(path)
    return to64(model.state_dict()), model.config


def apply_deltas(target: Path, prepared: Any, out_dtype: torch.dtype = torch.float64, loader: Any = None):
    """The target model with every transferable delta added (float64 model)."""
    from mergekit_bico.io.loader import LazyModel

    model = (loader or load_causal_lm)(target, out_dtype)
    lazy = LazyModel(target)
    params = dict(model.named_parameters())
    applied = 0
    with torch.no_grad():
        for name in lazy.keys():
            delta = prepared.delta(name)
            if delta is None:
                continue
            assert tuple(delta.shape) == tuple(lazy.shape(name)), name
            assert delta.dtype == torch.float32
            params[name].copy_(lazy.get(name, dtype=out_dtype) + delta.to(out_dtype))
            applied += 1
    return model, applied


# ---------------------------------------------------------------------------------------------
# BERT (post-LN: the LayerNorm output *is* the residual stream, so only permutations of the hidden
# axis commute with it; heads and MLP neurons can be permuted freely)


def bert_prefix(sd: SD) -> str:
    return "bert." if any(k.startswith("bert.") for k in sd) else ""


def bert_layers(sd: SD) -> list[int]:
    return _layers(sd, r"^(?:bert\.)?encoder\.layer\.(\d+)\.")


def bert_permute_hidden(sd: SD, perm: torch.Tensor) -> SD:
    """New hidden coordinate ``k`` = old ``perm[k]`` everywhere on the residual axis."""
    sd = dict(sd)
    p = bert_prefix(sd)
    for n in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        sd[f"{p}embeddings.{n}.weight"] = sd[f"{p}embeddings.{n}.weight"][:, perm]
    for n in ("weight", "bias"):
        sd[f"{p}embeddings.LayerNorm.{n}"] = sd[f"{p}embeddings.LayerNorm.{n}"][perm]
    for i in bert_layers(sd):
        pre = f"{p}encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense"):
            sd[pre + n + ".weight"] = sd[pre + n + ".weight"][:, perm]
        for n in ("attention.output.dense", "output.dense"):
            sd[pre + n + ".weight"] = sd[pre + n + ".weight"][perm]
            sd[pre + n + ".bias"] = sd[pre + n + ".bias"][perm]
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[pre + n + ".weight"] = sd[pre + n + ".weight"][perm]
            sd[pre + n + ".bias"] = sd[pre + n + ".bias"][perm]
    if f"{p}pooler.dense.weight" in sd:
        sd[f"{p}pooler.dense.weight"] = sd[f"{p}pooler.dense.weight"][:, perm]
    return sd


def bert_permute_pooler(sd: SD, perm: torch.Tensor) -> SD:
    """Permute the pooler's outputs (tanh is elementwise) and the classifier's inputs."""
    sd = dict(sd)
    p = bert_prefix(sd)
    sd[f"{p}pooler.dense.weight"] = sd[f"{p}pooler.dense.weight"][perm]
    sd[f"{p}pooler.dense.bias"] = sd[f"{p}pooler.dense.bias"][perm]
    sd["classifier.weight"] = sd["classifier.weight"][:, perm]
    return sd


def bert_permute_heads_and_mlp(sd: SD, n_head: int, layer: int, head_perm: list[int], mlp_perm: torch.Tensor,
                               v_rot: Optional[list[torch.Tensor]] = None) -> SD:
    """Permute whole heads (q/k/v rows + biases, attention-output columns), optionally rotate each
    value head (``v -> U v``), and permute MLP neurons."""
    sd = dict(sd)
    pre = f"{bert_prefix(sd)}encoder.layer.{layer}."
    d = sd[pre + "attention.self.query.weight"].shape[0]
    hd = d // n_head
    idx = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in head_perm])
    for n in ("query", "key", "value"):
        sd[pre + f"attention.self.{n}.weight"] = sd[pre + f"attention.self.{n}.weight"][idx]
        sd[pre + f"attention.self.{n}.bias"] = sd[pre + f"attention.self.{n}.bias"][idx]
    sd[pre + "attention.output.dense.weight"] = sd[pre + "attention.output.dense.weight"][:, idx]
    if v_rot is not None:
        w, b = sd[pre + "attention.self.value.weight"].clone(), sd[pre + "attention.self.value.bias"].clone()
        o = sd[pre + "attention.output.dense.weight"].clone()
        for h, u in enumerate(v_rot):
            sl = slice(h * hd, (h + 1) * hd)
            w[sl], b[sl] = u @ w[sl], u @ b[sl]
            o[:, sl] = o[:, sl] @ u.T
        sd[pre + "attention.self.value.weight"], sd[pre + "attention.self.value.bias"] = w, b
        sd[pre + "attention.output.dense.weight"] = o
    sd[pre + "intermediate.dense.weight"] = sd[pre + "intermediate.dense.weight"][mlp_perm]
    sd[pre + "intermediate.dense.bias"] = sd[pre + "intermediate.dense.bias"][mlp_perm]
    sd[pre + "output.dense.weight"] = sd[pre + "output.dense.weight"][:, mlp_perm]
    return sd


def save_classifier(config: Any, sd: SD, path: Path, shard_size: str = "40KB") -> Path:
    from transformers import AutoModelForSequenceClassification

    from tests._tiny import make_tiny_tokenizer

    model = AutoModelForSequenceClassification.from_config(config).to(torch.float32)
    missing, unexpected = model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), max_shard_size=shard_size, safe_serialization=True)
    make_tiny_tokenizer(path)
    return path


def load_classifier(path: Path, dtype: torch.dtype = torch.float64):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype).eval()
