"""What the masks keep, per layer, against the target: the numbers behind the ``pruning/...`` W&B charts.

:func:`architecture_report` reads :class:`~lit_accel.pruning.masks.L0Masks` (no gradient) and returns, for every
layer, the *expected* kept units (the sum of ``P(gate != 0)``, what the Lagrangian pushes), the *kept* units of the
deterministic masks (what evaluation and :func:`~lit_accel.pruning.export.export_pruned` keep now), and the target.
:func:`architecture_charts` describes its line charts (one per group), which the callback logs to W&B with the
report as a table.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    >>> target = PruningTarget(num_layers=1, num_kv_heads=1, intermediate_size=64, hidden_size=32)
    >>> masks = L0Masks(model, keep=target.keep(L0Masks(model).shape))
    >>> report = architecture_report(masks, target)
    >>> report["layer"], report["kv_heads_kept"], report["kv_heads_target"]
    ([0, 1], [1.0, 1.0], [1.0, 1.0])
"""

from __future__ import annotations

from typing import Any

import torch

from lit_accel.models.params import gathered_for_reading
from lit_accel.observe.wandb import LineChart
from lit_accel.pruning.masks import L0Masks
from lit_accel.pruning.targets import PruningTarget

__all__ = ["CHART_GROUPS", "architecture_charts", "architecture_report"]

CHART_GROUPS: dict[str, tuple[str, str]] = {
    "blocks": ("block", "Decoder blocks kept (1 = kept)"),
    "kv_heads": ("kv_heads", "KV heads kept per layer (with their query heads)"),
    "intermediate": ("intermediate", "MLP channels kept per layer"),
    "hidden": ("hidden", "Hidden dims kept (shared by all layers)"),
}
"""Chart name -> (column prefix in the report, chart title)."""


@torch.no_grad()
def architecture_report(masks: L0Masks, target: PruningTarget) -> dict[str, list[Any]]:
    """Per-layer expected, kept and target sizes of every mask group.

    Columns (one entry per layer): ``layer``; ``attention_expected`` and ``mlp_expected`` (``P(gate != 0)`` of the
    layer's attention and MLP sublayers); ``block_kept`` (1 if the deterministic masks keep the block) and
    ``block_target`` (the fraction of blocks the target keeps); ``kv_heads_*``, ``intermediate_*`` and
    ``hidden_*`` with suffixes ``_expected``, ``_kept`` and ``_target`` (the hidden dims are shared, so their
    values repeat). A ratio target has no per-group target: its ``*_target`` columns are absent.

    Under DeepSpeed ZeRO-3 the masks' parameters are gathered for the call (unless already whole): call it on every
    rank.

    Args:
        masks: The masks being learned (their mode is not changed).
        target: The target they are pushed to.

    Returns:
        Column name -> list of per-layer values (floats; ``layer`` holds ints).
    """
    shape = masks.shape
    n = shape.num_layers
    with gathered_for_reading(masks.parameters()):
        scores = {k: v.detach().float().cpu() for k, v in _expected(masks).items()}
        det = {k: v.detach().float().cpu() for k, v in masks.deterministic().items()}
    block_kept = ((det["head_layer"] != 0) | (det["mlp"] != 0)).float()
    hidden_expected = float(scores["hidden"].sum())
    hidden_kept = float((det["hidden"] != 0).sum())
    report: dict[str, list[Any]] = {
        "layer": list(range(n)),
        "attention_expected": scores["head_layer"].tolist(),
        "mlp_expected": scores["mlp"].tolist(),
        "block_kept": block_kept.tolist(),
        "kv_heads_expected": scores["heads"].sum(-1).tolist(),
        "kv_heads_kept": (det["heads"] != 0).sum(-1).float().tolist(),
        "intermediate_expected": scores["intermediate"].sum(-1).tolist(),
        "intermediate_kept": (det["intermediate"] != 0).sum(-1).float().tolist(),
        "hidden_expected": [hidden_expected] * n,
        "hidden_kept": [hidden_kept] * n,
    }
    if target.param_ratio is None:
        keep = target.keep(shape)
        report["block_target"] = [keep["layers"] / n] * n
        report["kv_heads_target"] = [float(keep["heads"])] * n
        report["intermediate_target"] = [float(keep["intermediate"])] * n
        report["hidden_target"] = [float(keep["hidden"])] * n
    return report


def _expected(masks: L0Masks) -> dict[str, torch.Tensor]:
    # expected_scores() clamps log_alpha in place; a report must not change the parameters.
    return {name: gate.expected_l0() for name, gate in masks.groups().items()}


def architecture_charts(report: dict[str, list[Any]]) -> dict[str, LineChart]:
    """The line charts of ``report``, by W&B key ``pruning/chart/<group>``, for
    :class:`~lit_accel.observe.wandb.WandbCharts` (which logs the report as the table ``pruning/architecture``).

    Each chart plots, against the layer index, the expected and kept sizes and the target (when there is one):
    ``blocks`` (attention and MLP keep probabilities, block kept, target fraction), ``kv_heads``,
    ``intermediate`` and ``hidden``.

    Example:
        >>> charts = architecture_charts({"layer": [0, 1], "kv_heads_expected": [1.5, 1], "kv_heads_kept": [2, 1]})
        >>> list(charts), charts["pruning/chart/kv_heads"].ys
        (['pruning/chart/kv_heads'], ('kv_heads_expected', 'kv_heads_kept'))
    """
    charts: dict[str, LineChart] = {}
    for chart, (prefix, title) in CHART_GROUPS.items():
        if prefix == "block":
            names = ["attention_expected", "mlp_expected", "block_kept", "block_target"]
        else:
            names = [f"{prefix}_expected", f"{prefix}_kept", f"{prefix}_target"]
        names = [c for c in names if c in report]
        if names:
            charts[f"pruning/chart/{chart}"] = LineChart("layer", tuple(names), title)
    return charts
