"""Tensor name -> role in the network, per model family (Llama, Mistral, Qwen2, GPT-2, BERT).

A *space* is a coordinate system the transfer maps: the input of a linear (``attn_in``: what
q/k/v read, shared by them), the output of a linear (``q_out``), the residual stream as an
embedding writes it (``embed_out``), and so on. Spaces are named per block (``layer`` = the block
index) or globally (``layer`` = None). Some spaces are *identity* spaces whose coordinates are
shared by construction and never mapped: token ids (``vocab``), positions, token types and class
labels (``labels``); their sizes must agree between the models.

Every tensor is described by a :class:`TensorSpec`: its block index, its module ``role``, its
``kind`` (``weight``, ``bias``, ``norm``, ``norm_bias``, ``embedding``, ``vector``, ``buffer``,
``unknown``), the input and output spaces, the storage ``layout`` (``out_in`` for ``nn.Linear``,
``in_out`` for GPT-2's ``Conv1D``, ``rows`` for embeddings (n x hidden), ``vector``) and, for fused
modules, the output ``splits`` (GPT-2 ``c_attn`` = q | k | v).

:func:`layer_index` gives the block index of any tensor name (the planner uses it), with the
per-family block pattern in :data:`LAYER_PATTERNS`.

Statistics a space needs (see :mod:`mergekit_bico.calibration.covariance`):
``input`` spaces use the activations entering a module (``X``), ``output`` spaces the output
gradients (``G``) and/or output activations (``Y``), ``hidden`` spaces the activations leaving a
norm (post-LN models, where the normalised stream is the residual itself).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from mergekit_bico.errors import TransferError

__all__ = [
    "IDENTITY_SPACES",
    "LAYER_PATTERNS",
    "ArchSpec",
    "LinearRule",
    "EmbeddingRule",
    "NormRule",
    "VectorRule",
    "TensorSpec",
    "Probe",
    "detect_family",
    "get_arch",
    "arch_for_config",
    "layer_index",
]

IDENTITY_SPACES = frozenset({"vocab", "positions", "token_types", "labels"})


# ---------------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True)
class LinearRule:
    """A linear module ``y = W x (+ b)``; ``out_spaces`` has several entries for a fused output
    split in equal parts (GPT-2 ``c_attn``)."""

    role: str
    in_space: str
    out_spaces: tuple[str, ...]
    conv1d: bool = False  # GPT-2 Conv1D stores W as (in, out)


@dataclass(frozen=True)
class EmbeddingRule:
    """A lookup table (n x hidden): a linear on one-hot ``in_space`` ids writing ``out_space``."""

    role: str
    in_space: str  # an identity space: vocab / positions / token_types
    out_space: str


@dataclass(frozen=True)
class NormRule:
    """RMSNorm / LayerNorm gain (and bias) acting diagonally on ``space`` (the norm's output).

    ``consumers``: roles of the linears that read the norm's output and nothing else (pre-LN
    blocks): the norm's change can be folded into them. Empty for post-LN norms (BERT), whose
    output is also the residual stream. ``capture``: the space is captured at the norm's output
    (no linear reads exactly this tensor at this scope).
    """

    role: str
    space: str
    consumers: tuple[str, ...] = ()
    capture: bool = False


@dataclass(frozen=True)
class VectorRule:
    """A bias-like vector living in ``space`` that is not a linear's own bias (BERT MLM ``cls.predictions.bias``)."""

    role: str
    space: str


Rule = Any  # LinearRule | EmbeddingRule | NormRule | VectorRule


@dataclass(frozen=True)
class TensorSpec:
    """What one tensor is. ``layer`` None = outside the blocks. ``splits``: the output spaces of a
    fused weight, in order along its output axis (equal sizes)."""

    name: str
    family: str
    layer: Optional[int]
    role: str
    kind: str
    module: Optional[str]
    in_space: Optional[str] = None
    out_space: Optional[str] = None
    layout: str = "out_in"
    splits: tuple[str, ...] = ()
    rule: Optional[Rule] = field(default=None, compare=False, repr=False)

    @property
    def fused(self) -> bool:
        return len(self.splits) > 1


@dataclass(frozen=True)
class Probe:
    """Where a space's statistic is read in a loaded model: ``site`` ``in`` (module input),
    ``out`` (module output) or ``grad`` (gradient of the module output); ``part``/``parts`` select
    an equal slice of the last axis (fused outputs)."""

    space: str
    layer: Optional[int]
    module: str
    site: str
    stat: str = "X"  # X: input activations; G: output gradients; Y: output activations
    part: int = 0
    parts: int = 1


# ---------------------------------------------------------------------------------------------
# Families


@dataclass(frozen=True)
class ArchSpec:
    """Naming rules of one family. Module paths are matched after removing ``base_prefixes``."""

    family: str
    model_types: tuple[str, ...]
    base_prefixes: tuple[str, ...]
    block_re: re.Pattern
    block_rules: Mapping[str, Rule]
    global_rules: Mapping[str, Rule]
    buffers: tuple[str, ...] = ()
    final_hidden_norm: Optional[str] = None  # post-LN: block-relative norm whose output (last block) is ``final_hidden``
    # Spaces of one block whose maps must be equal for the block's function to be carried over
    # (``tie_maps``): queries and keys meet in the bilinear scores q.k; values are mixed linearly
    # by attention into the output projection's input; an elementwise nonlinearity (GELU, SiLU,
    # gate * up) ties a linear's outputs to the next one's inputs (only a permutation commutes with it).
    tied_spaces: tuple[tuple[str, ...], ...] = ()

    # -- name parsing ------------------------------------------------------------------------
    def _strip(self, path: str) -> tuple[str, str]:
        for prefix in self.base_prefixes:
            if path.startswith(prefix):
                return prefix, path[len(prefix):]
        return "", path

    def parse_module(self, path: str) -> tuple[Optional[int], Optional[str], Optional[Rule]]:
        """Module path -> (block index or None, role, rule); (None, None, None) when unknown."""
        _, rest = self._strip(path)
        m = self.block_re.match(rest)
        if m:
            layer = int(m.group("layer"))
            sub = m.group("rest") or ""
            rule = self.block_rules.get(sub)
            return layer, (rule.role if rule else None), rule
        rule = self.global_rules.get(rest) or self.global_rules.get(path)
        return None, (rule.role if rule else None), rule

    def layer_of(self, name: str) -> Optional[int]:
        _, rest = self._strip(name)
        m = self.block_re.match(rest)
        return int(m.group("layer")) if m else None

    def is_block_module(self, path: str) -> Optional[int]:
        """Block index when ``path`` is a whole block (``model.layers.3``), else None."""
        _, rest = self._strip(path)
        m = self.block_re.match(rest)
        if m and not m.group("rest"):
            return int(m.group("layer"))
        return None

    def spec(self, name: str) -> TensorSpec:
        """Describe the tensor ``name`` (a checkpoint key)."""
        if any(name == b or name.endswith("." + b) for b in self.buffers):
            return TensorSpec(name, self.family, self.layer_of(name), "buffer", "buffer", None, layout="buffer")
        module, _, param = name.rpartition(".")
        layer, role, rule = self.parse_module(module)
        if module and rule is not None and param in ("weight", "bias", "gamma", "beta"):
            is_bias = param in ("bias", "beta")
            if isinstance(rule, LinearRule):
                out = rule.out_spaces[0] if len(rule.out_spaces) == 1 else None
                return TensorSpec(
                    name, self.family, layer, rule.role, "bias" if is_bias else "weight", module,
                    in_space=None if is_bias else rule.in_space, out_space=out,
                    layout="vector" if is_bias else ("in_out" if rule.conv1d else "out_in"),
                    splits=rule.out_spaces, rule=rule,
                )
            if isinstance(rule, EmbeddingRule) and not is_bias:
                return TensorSpec(name, self.family, layer, rule.role, "embedding", module, in_space=rule.in_space,
                                  out_space=rule.out_space, layout="rows", splits=(rule.out_space,), rule=rule)
            if isinstance(rule, NormRule):
                return TensorSpec(name, self.family, layer, rule.role, "norm_bias" if is_bias else "norm", module,
                                  in_space=rule.space, out_space=rule.space, layout="vector", rule=rule)
        # vectors registered under their full path (no .weight/.bias suffix)
        layer2, role2, rule2 = self.parse_module(name)
        if isinstance(rule2, VectorRule):
            return TensorSpec(name, self.family, layer2, rule2.role, "vector", name, in_space=rule2.space,
                              out_space=rule2.space, layout="vector", rule=rule2)
        return TensorSpec(name, self.family, self.layer_of(name), "unknown", "unknown", module or None, layout="unknown")

    # -- spaces and probes -----------------------------------------------------------------
    def rules(self) -> Iterable[tuple[bool, str, Rule]]:
        for sub, rule in self.block_rules.items():
            yield True, sub, rule
        for path, rule in self.global_rules.items():
            yield False, path, rule

    def space_kinds(self) -> dict[tuple[bool, str], str]:
        """{(in_block, space): "input" | "output" | "hidden"} for every non-identity space."""
        kinds: dict[tuple[bool, str], str] = {}
        for in_block, _, rule in self.rules():
            if isinstance(rule, LinearRule):
                if rule.in_space not in IDENTITY_SPACES:
                    kinds.setdefault((in_block, rule.in_space), "input")
                for s in rule.out_spaces:
                    if s not in IDENTITY_SPACES:
                        kinds.setdefault((in_block, s), "output")
            elif isinstance(rule, EmbeddingRule):
                kinds.setdefault((in_block, rule.out_space), "output")
        for in_block, _, rule in self.rules():
            if isinstance(rule, NormRule) and rule.capture:
                kinds.setdefault((in_block, rule.space), "hidden")
        if self.final_hidden_norm:
            kinds.setdefault((False, "final_hidden"), "hidden")
        return kinds

    def probes(self, module_names: Iterable[str], num_layers: int, output_stats: Iterable[str]) -> list[Probe]:
        """Probes for every space of a loaded model with these module paths.

        ``output_stats``: statistics of output spaces, ``G`` (gradients) and/or ``Y`` (activations).
        One probe per (space, layer, statistic): q/k/v share one ``attn_in`` probe.
        """
        output_stats = tuple(output_stats)
        site_of = {"G": "grad", "Y": "out"}
        probes: dict[tuple[Optional[int], str, str], Probe] = {}
        names = list(module_names)
        if self.final_hidden_norm and num_layers > 0:
            for path in names:
                layer, _, rule = self.parse_module(path)
                if layer == num_layers - 1 and rule is not None and rule.role == self.final_hidden_norm:
                    probes[(None, "final_hidden", "X")] = Probe("final_hidden", None, path, "out", "X")
        for path in names:
            layer, _, rule = self.parse_module(path)
            if rule is None:
                continue
            if isinstance(rule, LinearRule):
                if rule.in_space not in IDENTITY_SPACES:
                    probes.setdefault((layer, rule.in_space, "X"), Probe(rule.in_space, layer, path, "in", "X"))
                for k, s in enumerate(rule.out_spaces):
                    if s in IDENTITY_SPACES:
                        continue
                    for stat in output_stats:
                        probes.setdefault((layer, s, stat), Probe(s, layer, path, site_of[stat], stat, k, len(rule.out_spaces)))
            elif isinstance(rule, EmbeddingRule):
                for stat in output_stats:
                    probes.setdefault((layer, rule.out_space, stat), Probe(rule.out_space, layer, path, site_of[stat], stat))
            elif isinstance(rule, NormRule) and rule.capture:
                probes.setdefault((layer, rule.space, "X"), Probe(rule.space, layer, path, "out", "X"))
        return list(probes.values())

    def space_dims(self, shapes: Mapping[str, tuple[int, ...]], num_layers: int) -> dict[tuple[Optional[int], str], int]:
        """{(layer, space): width} from checkpoint tensor shapes (name -> shape)."""
        dims: dict[tuple[Optional[int], str], int] = {}
        for name, shape in shapes.items():
            spec = self.spec(name)
            rule = spec.rule
            if spec.kind == "weight" and isinstance(rule, LinearRule) and len(shape) == 2:
                d_out, d_in = (shape[1], shape[0]) if rule.conv1d else (shape[0], shape[1])
                if rule.in_space not in IDENTITY_SPACES:
                    dims.setdefault((spec.layer, rule.in_space), d_in)
                for s in rule.out_spaces:
                    if s not in IDENTITY_SPACES:
                        dims.setdefault((spec.layer, s), d_out // len(rule.out_spaces))
            elif spec.kind == "embedding" and len(shape) == 2:
                dims.setdefault((None, rule.out_space), shape[1])
            elif spec.kind == "norm" and len(shape) == 1:
                dims.setdefault((spec.layer, rule.space), shape[0])
                if self.final_hidden_norm and rule.role == self.final_hidden_norm and spec.layer == num_layers - 1:
                    dims.setdefault((None, "final_hidden"), shape[0])
        return dims

    def norm_feeding(self, role: str, in_block: bool) -> Optional[str]:
        """The norm role whose output the linear ``role`` reads exclusively (fold target), or None."""
        table = self.block_rules if in_block else self.global_rules
        for rule in table.values():
            if isinstance(rule, NormRule) and role in rule.consumers:
                return rule.role
        return None

    def rule_by_role(self, role: str, in_block: bool) -> Optional[tuple[str, Rule]]:
        table = self.block_rules if in_block else self.global_rules
        for path, rule in table.items():
            if rule.role == role:
                return path, rule
        return None


_LLAMA_BLOCK = {
    "self_attn.q_proj": LinearRule("q_proj", "attn_in", ("q_out",)),
    "self_attn.k_proj": LinearRule("k_proj", "attn_in", ("k_out",)),
    "self_attn.v_proj": LinearRule("v_proj", "attn_in", ("v_out",)),
    "self_attn.o_proj": LinearRule("o_proj", "o_in", ("o_out",)),
    "mlp.gate_proj": LinearRule("gate_proj", "mlp_in", ("gate_out",)),
    "mlp.up_proj": LinearRule("up_proj", "mlp_in", ("up_out",)),
    "mlp.down_proj": LinearRule("down_proj", "down_in", ("down_out",)),
    "input_layernorm": NormRule("input_layernorm", "attn_in", ("q_proj", "k_proj", "v_proj")),
    "post_attention_layernorm": NormRule("post_attention_layernorm", "mlp_in", ("gate_proj", "up_proj")),
}
_LLAMA_GLOBAL = {
    "embed_tokens": EmbeddingRule("embed_tokens", "vocab", "embed_out"),
    "norm": NormRule("norm", "final_in", ("lm_head", "score")),
    "lm_head": LinearRule("lm_head", "final_in", ("vocab",)),
    "score": LinearRule("score", "final_in", ("labels",)),
}

_GPT2_BLOCK = {
    "ln_1": NormRule("ln_1", "attn_in", ("c_attn",)),
    "attn.c_attn": LinearRule("c_attn", "attn_in", ("q_out", "k_out", "v_out"), conv1d=True),
    "attn.c_proj": LinearRule("c_proj", "o_in", ("o_out",), conv1d=True),
    "ln_2": NormRule("ln_2", "mlp_in", ("c_fc",)),
    "mlp.c_fc": LinearRule("c_fc", "mlp_in", ("fc_out",), conv1d=True),
    "mlp.c_proj": LinearRule("mlp_c_proj", "down_in", ("down_out",), conv1d=True),
}
_GPT2_GLOBAL = {
    "wte": EmbeddingRule("wte", "vocab", "embed_out"),
    "wpe": EmbeddingRule("wpe", "positions", "embed_out"),
    "ln_f": NormRule("ln_f", "final_in", ("lm_head", "score")),
    "lm_head": LinearRule("lm_head", "final_in", ("vocab",)),
    "score": LinearRule("score", "final_in", ("labels",)),
}

_BERT_BLOCK = {
    "attention.self.query": LinearRule("query", "attn_in", ("q_out",)),
    "attention.self.key": LinearRule("key", "attn_in", ("k_out",)),
    "attention.self.value": LinearRule("value", "attn_in", ("v_out",)),
    "attention.output.dense": LinearRule("attn_output", "o_in", ("o_out",)),
    "attention.output.LayerNorm": NormRule("attn_layernorm", "mlp_in"),
    "intermediate.dense": LinearRule("intermediate", "mlp_in", ("fc_out",)),
    "output.dense": LinearRule("output", "down_in", ("down_out",)),
    "output.LayerNorm": NormRule("output_layernorm", "hidden_out", capture=True),
}
_BERT_GLOBAL = {
    "embeddings.word_embeddings": EmbeddingRule("word_embeddings", "vocab", "embed_out"),
    "embeddings.position_embeddings": EmbeddingRule("position_embeddings", "positions", "embed_out"),
    "embeddings.token_type_embeddings": EmbeddingRule("token_type_embeddings", "token_types", "embed_out"),
    "embeddings.LayerNorm": NormRule("embeddings_layernorm", "embed_hidden", capture=True),
    "pooler.dense": LinearRule("pooler", "final_hidden", ("pool_out",)),
    "classifier": LinearRule("classifier", "pool_act", ("labels",)),
    "cls.predictions.transform.dense": LinearRule("mlm_dense", "final_hidden", ("mlm_dense_out",)),
    "cls.predictions.transform.LayerNorm": NormRule("mlm_layernorm", "mlm_hidden"),
    "cls.predictions.decoder": LinearRule("mlm_decoder", "mlm_hidden", ("vocab",)),
    "cls.predictions.bias": VectorRule("mlm_bias", "vocab"),
}

LAYER_PATTERNS: dict[str, str] = {
    "llama": r"^(?:model\.)?layers\.(\d+)\.",
    "gpt2": r"^(?:transformer\.)?h\.(\d+)\.",
    "bert": r"^(?:bert\.)?encoder\.layer\.(\d+)\.",
}

_ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        family="llama",
        model_types=("llama", "mistral", "qwen2"),
        base_prefixes=("model.",),
        block_re=re.compile(r"^layers\.(?P<layer>\d+)(?:\.(?P<rest>.+))?$"),
        block_rules=_LLAMA_BLOCK,
        global_rules=_LLAMA_GLOBAL,
        buffers=("rotary_emb.inv_freq",),
        tied_spaces=(("q_out", "k_out"), ("v_out", "o_in"), ("gate_out", "up_out", "down_in")),
    ),
    "gpt2": ArchSpec(
        family="gpt2",
        model_types=("gpt2",),
        base_prefixes=("transformer.",),
        block_re=re.compile(r"^h\.(?P<layer>\d+)(?:\.(?P<rest>.+))?$"),
        block_rules=_GPT2_BLOCK,
        global_rules=_GPT2_GLOBAL,
        buffers=("attn.bias", "attn.masked_bias"),
        tied_spaces=(("q_out", "k_out"), ("v_out", "o_in"), ("fc_out", "down_in")),
    ),
    "bert": ArchSpec(
        family="bert",
        model_types=("bert",),
        base_prefixes=("bert.",),
        block_re=re.compile(r"^encoder\.layer\.(?P<layer>\d+)(?:\.(?P<rest>.+))?$"),
        block_rules=_BERT_BLOCK,
        global_rules=_BERT_GLOBAL,
        buffers=("position_ids", "embeddings.token_type_ids"),
        final_hidden_norm="output_layernorm",
        tied_spaces=(("q_out", "k_out"), ("v_out", "o_in"), ("fc_out", "down_in")),
    ),
}

_ARCH_NAME_HINTS = (("Llama", "llama"), ("Mistral", "llama"), ("Qwen2", "llama"), ("GPT2", "gpt2"), ("Bert", "bert"))
_UNSUPPORTED_HINTS = ("Qwen2Moe", "Qwen2VL", "Qwen2Audio", "MistralMoe")


def detect_family(config: Mapping[str, Any], *, model: str = "model") -> str:
    """``llama`` (Llama, Mistral, Qwen2), ``gpt2`` or ``bert`` from a config dict's ``model_type``
    (else its ``architectures``); TransferError naming ``model`` when unsupported."""
    model_type = str(config.get("model_type") or "")
    for family, arch in _ARCHS.items():
        if model_type in arch.model_types:
            return family
    if not model_type:
        for name in config.get("architectures") or []:
            if isinstance(name, str) and not name.startswith(_UNSUPPORTED_HINTS):
                for hint, family in _ARCH_NAME_HINTS:
                    if name.startswith(hint):
                        return family
    what = model_type or ", ".join(map(str, config.get("architectures") or [])) or "no model_type in config.json"
    raise TransferError(
        f"model '{model}': architecture '{what}' is not supported for transfer (supported: llama, mistral, qwen2, gpt2, bert)"
    )


def get_arch(family: str) -> ArchSpec:
    try:
        return _ARCHS[family]
    except KeyError:
        raise TransferError(f"unknown architecture family '{family}'") from None


def arch_for_config(config: Mapping[str, Any], *, model: str = "model") -> ArchSpec:
    return _ARCHS[detect_family(config, model=model)]


_ANY_LAYER = [re.compile(p) for p in LAYER_PATTERNS.values()]


def layer_index(name: str, family: Optional[str] = None) -> Optional[int]:
    """Block index of a tensor name (``model.layers.3.mlp.up_proj.weight`` -> 3), None outside blocks."""
    patterns = [re.compile(LAYER_PATTERNS[family])] if family else _ANY_LAYER
    for pat in patterns:
        m = pat.match(name)
        if m:
            return int(m.group(1))
    return None


def num_layers_from_config(config: Mapping[str, Any]) -> Optional[int]:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = config.get(key)
        if isinstance(value, int):
            return value
    return None
