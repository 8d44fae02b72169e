"""transformers 5.x checkpoint conversions (``transformers.conversion_mapping``) kept away from packed tensors.

Some families store fused or split projections in their checkpoints and convert at load (``WeightConverter``: GLM-4
MoE / Sarvam's ``query_key_value`` split into q/k/v, Lara's ``in_proj`` split, Mixtral's per-expert ``w1/w3`` merged
into ``experts.gate_up_proj``) and revert the conversion at ``save_pretrained``. Applied to packed layers those
operations concatenate or split ``qweight``/``scales`` tensors of different widths (or the per-expert packed
buffers), which fails or writes something wrong. A BC checkpoint is therefore saved and loaded under the model's own
module names: every converter whose target is a packed module is dropped, on save (``model._weight_conversions``,
which ``revert_weight_conversion`` reads) and on load (``HfQuantizer.update_weight_conversions``). Renamings
(``WeightRenaming``, ``PrefixChange``) are kept: they are exact both ways.
"""

import re

from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import PrefixChange, WeightConverter

from ..calibration.experts import packed_expert_modules
from ..layers.packed_base import packed_layers


def _matches(pattern: str, names: list[str]) -> bool:
    try:
        regex = re.compile(pattern)
    except re.error:
        return any(pattern in name for name in names)
    return any(regex.search(name) for name in names)


def packed_names(model: nn.Module) -> list[str]:
    """Full names of the packed modules and packed expert weights of ``model``."""
    return list(packed_layers(model)) + list(packed_expert_modules(model))


def drop_packed_converters(conversions: list, model: nn.Module) -> list:
    """``conversions`` without the ``WeightConverter`` entries that target a packed module of ``model``."""
    names = packed_names(model)
    if not names:
        return list(conversions)
    kept = []
    for conversion in conversions:
        if isinstance(conversion, WeightConverter):
            targets = getattr(conversion, "_original_target_patterns", None) or conversion.target_patterns
            if any(_matches(pattern, names) for pattern in targets):
                continue
        kept.append(conversion)
    return kept


def set_save_conversions(model: nn.Module) -> None:
    """Make ``save_pretrained`` revert only the conversions that do not touch packed tensors."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # built in memory: the mapping ``revert_weight_conversion`` would derive
        conversions = [
            c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)
        ]
    model._weight_conversions = drop_packed_converters(conversions, model)
