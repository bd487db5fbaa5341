"""Hard-concrete (L0) masks over the structure of a decoder-only model (Sheared-LLaMA, Xia et al. 2023).

:class:`HardConcrete` is one group of gates (Louizos et al. 2018): a ``log_alpha`` per unit, a stretched and
clipped concrete sample in training, ``P(gate != 0)`` as the differentiable expected size, and a deterministic
top-k gate at evaluation. :class:`L0Masks` holds every group Sheared-LLaMA learns for one model:

==============  ====================  ==============================================================
group           shape                 what a zero removes
==============  ====================  ==============================================================
``head_layer``  ``[layers]``          the whole attention sublayer of a block
``mlp``         ``[layers]``          the whole MLP sublayer of a block
``heads``       ``[layers, kv_heads]`` one KV group: a key/value head *and all query heads that read it*
``intermediate`` ``[layers, inter]``  one MLP intermediate channel (a row of gate/up, a column of down)
``hidden``      ``[hidden]``          one residual-stream dimension, in every layer (shared)
==============  ====================  ==============================================================

**GQA rule.** With grouped-query attention, query heads ``kv_head * g .. kv_head * g + g - 1`` (``g =
num_heads // num_kv_heads``) all read KV head ``kv_head``. A mask unit is that whole group: removing one query
head alone would leave a model whose query heads no longer split evenly over its KV heads, which Hugging Face
attention cannot express. So a pruned model keeps ``k`` KV heads and ``k * g`` query heads per layer, and the
group size ``g`` never changes. Without GQA (``num_kv_heads == num_heads``) a group is a single head, as in the
paper.

**Families.** :data:`PRUNABLE_ARCHS` lists the Hugging Face families that can be pruned (and exported): LLaMA,
Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), Phi-3 and OLMo 2. :func:`check_prunable` refuses the others
with the reason: mixture-of-experts MLPs (Mixtral, Qwen3-MoE), whose experts are 3-D tensors with no channel to
mask per expert, and GPT-2 (LayerNorm with a bias, no gated MLP).

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    >>> model = LlamaForCausalLM(cfg)
    >>> masks = L0Masks(model)
    >>> masks.heads.log_alpha.shape
    torch.Size([2, 2])
    >>> n = sum(p.numel() for p in model.parameters())
    >>> 0.98 < float(masks.expected_num_params().detach()) / n < 1.0  # gates start nearly (not fully) open
    True
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lit_accel.models.params import gathered_for_reading
from lit_accel.models.structure import ModelStructure, Sublayer, get_structure

__all__ = [
    "EPSILON",
    "LOG_ALPHA_MAX",
    "LOG_ALPHA_MIN",
    "MASK_GROUPS",
    "PRUNABLE_ARCHS",
    "STRETCH",
    "TEMPERATURE",
    "HardConcrete",
    "L0Masks",
    "PrunableShape",
    "check_prunable",
    "count_params",
]

TEMPERATURE = 2.0 / 3.0
"""Concrete temperature beta, as in the paper and Louizos et al."""
STRETCH = (-0.1, 1.1)
"""The concrete sample in (0, 1) is stretched to this interval, then clipped to [0, 1]; this puts mass on 0 and 1."""
EPSILON = 1e-6
"""Keeps uniform noise and CDF values away from 0 and 1, where the logit is infinite."""
LOG_ALPHA_MIN = math.log(1e-2)
"""Lower clamp of ``log_alpha`` (LLM-Shearing ``constrain_parameters``)."""
LOG_ALPHA_MAX = math.log(1e2)
"""Upper clamp of ``log_alpha``; the paper's init mean 5 is above it, so masks effectively start here."""
_LOG_ALPHA_INIT_MEAN = 5.0
_LOG_ALPHA_INIT_STD = 1e-2
# LLM-Shearing's deterministic mask is sigmoid(log_alpha / temperature * 0.8); 0.8 is their constant.
_DETERMINISTIC_SCALE = 0.8

MASK_GROUPS: tuple[str, ...] = ("head_layer", "mlp", "heads", "intermediate", "hidden")
"""Names of the mask groups of :class:`L0Masks`, in a fixed order."""

PRUNABLE_ARCHS: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
)
"""``config.model_type`` of the Hugging Face families structured pruning supports end to end (masks and export)."""
_SUPPORTED_TEXT = "LLaMA, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, Phi-3, OLMo 2"
_ATTENTION_ROLES = ({"q", "k", "v", "o"}, {"qkv", "o"})
_MLP_ROLES = ({"gate", "up", "down"}, {"gate_up", "down"})


class HardConcrete(nn.Module):
    """A group of hard-concrete gates, one ``log_alpha`` per unit.

    Training (``module.train()``): ``forward`` draws ``u ~ U(eps, 1 - eps)`` and returns
    ``clip(sigmoid((log u - log(1 - u) + log_alpha) / T) * (r - l) + l, 0, 1)`` with ``(l, r) = STRETCH`` and
    ``T = TEMPERATURE`` (the reparameterisation: gradients flow to ``log_alpha``). Evaluation: a deterministic
    gate from :meth:`deterministic`, keeping the units with the largest ``log_alpha``.

    Args:
        shape: Shape of the gate tensor; the last dimension holds the units of one group (a top-k is taken along
            it), leading dimensions index independent groups (e.g. layers).

    Example:
        >>> gate = HardConcrete((3, 8))
        >>> gate.expected_l0().shape, bool((gate.expected_l0() > 0.99).all())
        (torch.Size([3, 8]), True)
        >>> gate.eval()(keep=5).ne(0).sum(-1).tolist()
        [5, 5, 5]
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        if not shape or any(not isinstance(n, int) or n <= 0 for n in shape):
            raise ValueError(f"HardConcrete: shape must be a non-empty tuple of positive ints, got {shape!r}")
        self.shape = tuple(shape)
        self.log_alpha = nn.Parameter(torch.empty(self.shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise ``log_alpha`` as LLM-Shearing does: normal with mean 5 and std 0.01 (nearly all gates open)."""
        with torch.no_grad():
            self.log_alpha.normal_(_LOG_ALPHA_INIT_MEAN, _LOG_ALPHA_INIT_STD)

    def constrain_(self) -> None:
        """Clamp ``log_alpha`` in place to ``[LOG_ALPHA_MIN, LOG_ALPHA_MAX]``; call before every use, as the paper."""
        with torch.no_grad():
            self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def _whole_log_alpha(self) -> torch.Tensor:
        """``log_alpha``, checked to be whole: a ZeRO-3 partition (an empty shard) would give masks of the wrong shape.

        Raises:
            RuntimeError: ``log_alpha`` is a ZeRO-3 partition not gathered now.
        """
        log_alpha = self.log_alpha
        if tuple(log_alpha.shape) != self.shape:
            raise RuntimeError(
                f"HardConcrete: log_alpha has shape {tuple(log_alpha.shape)}, not {self.shape} (a DeepSpeed ZeRO-3 "
                "partition); gather the masks' parameters for the forward and the backward "
                "(lit_accel.models.params.gathered_for_reading), as StructuredPruning does"
            )
        return log_alpha

    def expected_l0(self) -> torch.Tensor:
        """``P(gate != 0)`` per unit, differentiable in ``log_alpha``: ``1 - CDF(0)`` of the stretched concrete."""
        log_alpha = self._whole_log_alpha()
        low, high = STRETCH
        # Logit of where 0 falls in the unstretched (0, 1) interval.
        zero_logit = math.log(-low) - math.log(high)
        cdf0 = torch.sigmoid(zero_logit * TEMPERATURE - log_alpha).clamp(EPSILON, 1 - EPSILON)
        return 1 - cdf0

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised sample of the gates (values in [0, 1], exact zeros and ones occur).

        Args:
            generator: Random generator for the uniform noise; pass one seeded alike on all ranks so that every
                rank samples the same masks.
        """
        log_alpha = self._whole_log_alpha()
        u = torch.rand(self.shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype)
        u = u * (1 - 2 * EPSILON) + EPSILON
        y = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / TEMPERATURE)
        low, high = STRETCH
        return F.hardtanh(y * (high - low) + low, 0.0, 1.0)

    def default_keep(self) -> int:
        """Units to keep per group when no target says: the rounded mean expected L0 of a group."""
        return round(float(self.expected_l0().detach().sum(-1).mean()))

    def deterministic(self, keep: int | None = None) -> torch.Tensor:
        """Deterministic gates: ``sigmoid(0.8 * log_alpha / T)`` for the ``keep`` largest units of each group, 0 else.

        Under DeepSpeed ZeRO-3 ``log_alpha`` is gathered for the call (unless already whole): call it on every rank.

        Args:
            keep: Units kept in every group (the same number in each, so that layers stay uniform); default
                :meth:`default_keep`. Must be in ``[0, shape[-1]]``.

        Returns:
            A tensor of ``shape`` with exactly ``keep`` non-zeros along the last dimension. No gradient.
        """
        n = self.shape[-1]
        with gathered_for_reading([self.log_alpha]), torch.no_grad():
            keep = self.default_keep() if keep is None else keep
            if not 0 <= keep <= n:
                raise ValueError(f"HardConcrete.deterministic: keep must be in [0, {n}], got {keep}")
            # Clamped out of place: evaluating or exporting must not change the parameters.
            log_alpha = self.log_alpha.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
            soft = torch.sigmoid(log_alpha / TEMPERATURE * _DETERMINISTIC_SCALE)
            # Ties are broken by index (stable sort) so the choice is reproducible across ranks.
            order = torch.sort(log_alpha, dim=-1, descending=True, stable=True).indices
            keep_mask = torch.zeros_like(soft, dtype=torch.bool)
            keep_mask.scatter_(-1, order[..., :keep], True)
            return torch.where(keep_mask, soft, torch.zeros_like(soft))

    def forward(self, keep: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """A sample in training mode (after :meth:`constrain_`), :meth:`deterministic` (with ``keep``) otherwise."""
        if self.training:
            self.constrain_()
            return self.sample(generator)
        return self.deterministic(keep)


def check_prunable(structure: ModelStructure) -> None:
    """Raise the reason why structured pruning cannot handle a model, or return if it can.

    Args:
        structure: The model's :class:`~lit_accel.models.structure.ModelStructure`.

    Raises:
        ValueError: The model is a mixture of experts or GPT-2, or its sublayers lack the roles pruning slices (separate
            ``q``/``k``/``v`` or a fused ``qkv`` of ``nn.Linear``, and ``o``; ``gate``/``up``/``down`` or a fused
            ``gate_up``, and ``down``). The message names the family and why.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from lit_accel.models.structure import get_structure
        >>> gpt2 = get_structure(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2)))
        >>> check_prunable(gpt2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: structured pruning does not support GPT-2 (arch='gpt2'): ...
    """
    arch = structure.arch
    if structure.is_moe:
        raise ValueError(
            f"structured pruning of mixture-of-experts MLPs ({arch}) is not supported: the experts' weights are 3-D "
            "tensors (one slice per expert) behind a router, so the MLP-channel masks and the export, which slice "
            "gate/up/down linears, have nothing to act on; prune a dense model instead. Supported families: "
            f"{_SUPPORTED_TEXT}"
        )
    if arch == "gpt2":
        raise ValueError(
            f"structured pruning does not support GPT-2 (arch={arch!r}): its LayerNorms have a bias and subtract "
            "the mean (the hidden-dim masks renormalise RMSNorms over the kept dims), its MLP has no gate, and its "
            f"Conv1D layers store weights transposed. Supported families: {_SUPPORTED_TEXT}"
        )
    block = structure.blocks[0]
    attn, mlp = set(block.attention.roles), set(block.mlp.roles)
    fused = "qkv" in attn and not isinstance(block.attention.linear("qkv"), nn.Linear)
    if not any(r <= attn for r in _ATTENTION_ROLES) or not any(r <= mlp for r in _MLP_ROLES) or fused:
        raise ValueError(
            "structured pruning needs attention roles ['k', 'o', 'q', 'v'] (or a fused nn.Linear 'qkv' and 'o') and "
            f"MLP roles ['down', 'gate', 'up'] (or a fused 'gate_up' and 'down'), as in {_SUPPORTED_TEXT}; model "
            f"arch={arch!r} has attention roles {sorted(attn)} and MLP roles {sorted(mlp)}"
        )


def _hidden_must_divide_heads(structure: ModelStructure) -> bool:
    """Whether the model's config class refuses a ``hidden_size`` that is not a multiple of the query heads.

    Asked of the config itself (LLaMA, Gemma 2 and Gemma 3 refuse one in transformers 5; Qwen3, Phi-3 and OLMo 2
    keep ``head_dim`` apart and do not), so the rule follows the installed transformers.
    """
    config = getattr(structure.model, "config", None)
    heads = structure.attention.num_heads
    if config is None or not callable(getattr(config, "validate_architecture", None)) or heads <= 1:
        return False

    def refused(hidden: int) -> bool:
        probe = copy.deepcopy(config)
        try:
            probe.hidden_size = hidden
            probe.validate_architecture()
        except ValueError:
            return True
        return False

    return not refused(heads * 3) and refused(heads * 3 + 1)


@dataclass
class PrunableShape:
    """The sizes and layout of a model that the masks and the parameter count need."""

    num_layers: int
    """Decoder blocks."""
    hidden_size: int
    """Residual stream width."""
    intermediate_size: int
    """MLP width."""
    num_heads: int
    """Query heads per layer."""
    num_kv_heads: int
    """Key/value heads per layer (the number of head-mask units per layer)."""
    head_dim: int
    """Size of one head; never pruned."""
    vocab_size: int
    """Rows of the embedding and of the LM head."""
    has_lm_head: bool
    """Whether the model has an LM head (a ``*ForCausalLM``)."""
    tied_embeddings: bool
    """Whether the LM head shares the embedding's weight (counted once)."""
    attention_bias: bool
    """Whether q/k/v/o have biases (Qwen2: q/k/v only; see ``o_bias``)."""
    o_bias: bool
    """Whether o_proj has a bias."""
    mlp_bias: bool
    """Whether gate/up/down have biases."""
    arch: str = ""
    """The architecture (``ModelStructure.arch``, e.g. ``"llama"``, ``"gemma2"``)."""
    hidden_multiple_of_heads: bool = False
    """Whether the config refuses a ``hidden_size`` that is not a multiple of ``num_attention_heads`` (LLaMA,
    Gemma 2, Gemma 3), so a pruned hidden size must be one."""
    attention_norms: int = 1
    """Norms over the hidden dims in each attention sublayer: 1 (a pre-norm; OLMo 2: a post-norm) or 2 (Gemma 2/3's
    sandwich: pre- and post-norm)."""
    mlp_norms: int = 1
    """Likewise for each MLP sublayer."""
    qk_norm: Literal["none", "head", "projection"] = "none"
    """The attention's q/k norms: none; per ``"head"`` (Qwen3, Gemma 3: ``2 * head_dim`` weights per layer, never
    pruned); over the whole ``"projection"`` (OLMo 2: one weight per q and k row, pruned with its head)."""

    @property
    def kv_group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_structure(cls, structure: ModelStructure) -> PrunableShape:
        """Read the sizes from the :class:`~lit_accel.models.structure.ModelStructure` of a prunable model.

        Raises:
            ValueError: :func:`check_prunable` refuses the model (mixture of experts, GPT-2, missing roles).
        """
        check_prunable(structure)
        block = structure.blocks[0]
        a = structure.attention

        def has_bias(role: str, sub: str) -> bool:
            sublayer = block.attention if sub == "attention" else block.mlp
            if role not in sublayer.roles:  # a fused projection (Phi-3) holds the role
                role = {"q": "qkv", "up": "gate_up"}[role]
            return getattr(sublayer.linear(role), "bias", None) is not None

        def hidden_norms(sub: Sublayer) -> int:
            return (sub.norm is not None) + (sub.post_norm is not None)

        return cls(
            num_layers=structure.num_layers,
            hidden_size=structure.hidden_size,
            intermediate_size=structure.intermediate_size,
            num_heads=a.num_heads,
            num_kv_heads=a.num_kv_heads,
            head_dim=a.head_dim,
            vocab_size=structure.vocab_size,
            has_lm_head=structure.lm_head_name is not None,
            tied_embeddings=structure.tied_embeddings,
            attention_bias=has_bias("q", "attention"),
            o_bias=has_bias("o", "attention"),
            mlp_bias=has_bias("up", "mlp"),
            arch=structure.arch,
            hidden_multiple_of_heads=_hidden_must_divide_heads(structure),
            attention_norms=hidden_norms(block.attention),
            mlp_norms=hidden_norms(block.mlp),
            qk_norm=structure.qk_norm,
        )


def count_params(shape: PrunableShape, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Parameter count of a prunable model given per-unit keep scores, differentiable in the scores.

    With scores in {0, 1} this is the exact parameter count of the model that keeps the units scored 1 (the
    count :func:`~lit_accel.pruning.export.export_pruned` produces). With expected L0 values it is the expected
    size, as in the paper (units assumed independent). Every weight is a product over the units it belongs to:
    e.g. a q_proj weight of layer ``l`` belongs to that layer's attention sublayer, one KV group, and one hidden
    dimension.

    Args:
        shape: Sizes of the unpruned model.
        scores: ``head_layer`` [L], ``mlp`` [L], ``heads`` [L, kv_heads], ``intermediate`` [L, inter],
            ``hidden`` [hidden].

    Returns:
        A scalar tensor.

    Example:
        >>> s = PrunableShape(num_layers=1, hidden_size=4, intermediate_size=8, num_heads=2, num_kv_heads=1,
        ...                   head_dim=2, vocab_size=10, has_lm_head=True, tied_embeddings=False,
        ...                   attention_bias=False, o_bias=False, mlp_bias=False)
        >>> ones = {"head_layer": torch.ones(1), "mlp": torch.ones(1), "heads": torch.ones(1, 1),
        ...         "intermediate": torch.ones(1, 8), "hidden": torch.ones(4)}
        >>> int(count_params(s, ones))  # 2*10*4 + 4*(4+4+2+2) + 3*4*8 + 3*4
        236
    """
    hid = scores["hidden"].sum()
    layer_attn, layer_mlp = scores["head_layer"], scores["mlp"]
    d, g = shape.head_dim, shape.kv_group_size
    groups = (layer_attn[:, None] * scores["heads"]).sum()
    channels = (layer_mlp[:, None] * scores["intermediate"]).sum()
    # Per KV group: q has g*d rows, k and v d rows each, o has g*d columns; every one spans the hidden dims.
    total = groups * hid * (2 * g * d + 2 * d)
    if shape.attention_bias:
        total = total + groups * (g * d + 2 * d)
    if shape.o_bias:
        total = total + hid * layer_attn.sum()
    total = total + channels * hid * 3
    if shape.mlp_bias:
        total = total + 2 * channels + hid * layer_mlp.sum()
    # Each sublayer's norms over the hidden dims (LLaMA: input_layernorm for attention, post_attention_layernorm for
    # the MLP; Gemma 2/3: a pre- and a post-norm each), plus the final norm.
    total = total + hid * (shape.attention_norms * layer_attn.sum() + shape.mlp_norms * layer_mlp.sum() + 1)
    if shape.qk_norm == "head":
        # One head_dim-wide q_norm and k_norm per attention sublayer, shared by its heads.
        total = total + 2 * d * layer_attn.sum()
    elif shape.qk_norm == "projection":
        # One weight per q row (g * d per group) and per k row (d per group).
        total = total + groups * (g * d + d)
    total = total + hid * shape.vocab_size
    if shape.has_lm_head and not shape.tied_embeddings:
        total = total + hid * shape.vocab_size
    return total


class L0Masks(nn.Module):
    """Every hard-concrete mask group of Sheared-LLaMA for one model (see the module docstring).

    The masks live in their own module (not inside the model) so that they can get their own optimizer group,
    and so that the model's ``state_dict`` keeps its Hugging Face keys.

    Args:
        model: A Hugging Face model of a family in :data:`PRUNABLE_ARCHS` (causal LM or base model); only its sizes
            are read.
        keep: Units kept per group by the deterministic (evaluation) masks: a dict with any of ``"layers"``,
            ``"heads"`` (KV groups per layer), ``"intermediate"`` and ``"hidden"``. Groups not given keep the
            rounded mean of their expected L0. :class:`~lit_accel.pruning.targets.PruningTarget.keep` builds it.

    Raises:
        ValueError: The model is not prunable (:func:`check_prunable`: mixture of experts, GPT-2).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
        >>> masks = L0Masks(model, keep={"layers": 2, "heads": 1, "intermediate": 64, "hidden": 48}).eval()
        >>> z = masks()
        >>> z["head_layer"].ne(0).sum().item(), z["heads"].ne(0).sum(-1).tolist(), z["hidden"].ne(0).sum().item()
        (2, [1, 1, 1], 48)
    """

    def __init__(self, model: nn.Module, keep: dict[str, int] | None = None) -> None:
        super().__init__()
        self.shape = PrunableShape.from_structure(get_structure(model))
        s = self.shape
        self.head_layer = HardConcrete((s.num_layers,))
        self.mlp = HardConcrete((s.num_layers,))
        self.heads = HardConcrete((s.num_layers, s.num_kv_heads))
        self.intermediate = HardConcrete((s.num_layers, s.intermediate_size))
        self.hidden = HardConcrete((s.hidden_size,))
        self.keep: dict[str, int] = {}
        self.set_keep(keep or {})

    def set_keep(self, keep: dict[str, int]) -> None:
        """Set the units the deterministic masks keep (see the class's ``keep`` argument).

        Raises:
            ValueError: An unknown key, or a count outside ``[1, full size]``.
        """
        full = {
            "layers": self.shape.num_layers,
            "heads": self.shape.num_kv_heads,
            "intermediate": self.shape.intermediate_size,
            "hidden": self.shape.hidden_size,
        }
        for key, value in keep.items():
            if key not in full:
                raise ValueError(f"L0Masks: keep has unknown key {key!r}; allowed keys are {sorted(full)}")
            if not isinstance(value, int) or not 1 <= value <= full[key]:
                raise ValueError(f"L0Masks: keep[{key!r}]={value!r} must be an int in [1, {full[key]}]")
        self.keep = dict(keep)

    def groups(self) -> dict[str, HardConcrete]:
        """Group name -> its :class:`HardConcrete`, in :data:`MASK_GROUPS` order."""
        return {name: getattr(self, name) for name in MASK_GROUPS}

    def expected_scores(self) -> dict[str, torch.Tensor]:
        """Group name -> ``P(gate != 0)`` per unit (differentiable); clamps ``log_alpha`` first."""
        out = {}
        for name, gate in self.groups().items():
            gate.constrain_()
            out[name] = gate.expected_l0()
        return out

    def expected_num_params(self) -> torch.Tensor:
        """Expected parameter count of the masked model (:func:`count_params` of the expected scores)."""
        return count_params(self.shape, self.expected_scores())

    def deterministic(self) -> dict[str, torch.Tensor]:
        """The evaluation masks: the same number of units kept in every layer, whole blocks kept or dropped.

        A block is kept or dropped as a whole (both ``head_layer`` and ``mlp``), chosen by the sum of the two
        clamped ``log_alpha`` values, so that an exported model only loses entire decoder blocks; within kept blocks
        each gate takes its own deterministic value. Heads and intermediate channels keep the same count in every
        layer because a Hugging Face config has one ``num_key_value_heads`` and one ``intermediate_size``.
        Counts come from ``keep``; a group without one keeps the rounded mean expected L0 (at least 1). For a family
        whose config needs ``hidden_size`` to be a multiple of ``num_attention_heads`` (LLaMA, Gemma 2/3), a hidden
        count that comes from the expected L0 (not from ``keep``) is rounded to the nearest such multiple.

        Under DeepSpeed ZeRO-3 the masks' parameters are gathered for the call (unless already whole): call it on
        every rank.
        """
        with gathered_for_reading(self.parameters()):
            return self._deterministic()

    def _deterministic(self) -> dict[str, torch.Tensor]:
        layers = self.keep.get("layers")
        if layers is None:
            mean_l0 = (self.head_layer.expected_l0() + self.mlp.expected_l0()).detach().sum() / 2
            layers = max(1, round(float(mean_l0)))
        with torch.no_grad():
            # Each gate clamped first, as the training-time gates (constrain_) and LLM-Shearing see it: after an
            # optimizer step a gate can sit above the bound, and an unclamped sum would rank blocks differently.
            score = self.head_layer.log_alpha.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX) + self.mlp.log_alpha.clamp(
                LOG_ALPHA_MIN, LOG_ALPHA_MAX
            )
            order = torch.sort(score, descending=True, stable=True).indices
            kept = torch.zeros(self.shape.num_layers, dtype=torch.bool, device=score.device)
            kept[order[:layers]] = True
        heads = self._keep("heads", self.heads)
        hidden = self._keep("hidden", self.hidden)
        if self.shape.hidden_multiple_of_heads and "hidden" not in self.keep:
            q_heads = heads * self.shape.kv_group_size
            rounded = round(hidden / q_heads) * q_heads
            hidden = max(q_heads, rounded - q_heads if rounded > self.shape.hidden_size else rounded)
        return {
            "head_layer": self.head_layer.deterministic(self.shape.num_layers) * kept,
            "mlp": self.mlp.deterministic(self.shape.num_layers) * kept,
            "heads": self.heads.deterministic(heads),
            "intermediate": self.intermediate.deterministic(self._keep("intermediate", self.intermediate)),
            "hidden": self.hidden.deterministic(hidden),
        }

    def _keep(self, key: str, gate: HardConcrete) -> int:
        # Without a target, at least one unit survives: a layer with no head or channel cannot be exported.
        return self.keep.get(key) or max(1, gate.default_keep())

    def forward(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Samples of every group in training mode; :meth:`deterministic` in evaluation mode.

        Under DeepSpeed ZeRO-3, training mode needs the parameters whole for the forward *and* the backward (the
        caller gathers them, as :class:`~lit_accel.pruning.callback.StructuredPruning` does); a partition raises.

        Args:
            generator: Random generator for the samples (seed it alike on all ranks).
        """
        if not self.training:
            return self.deterministic()
        out = {}
        for name, gate in self.groups().items():
            gate.constrain_()
            out[name] = gate.sample(generator)
        return out
