"""Activation quantization of attention's two batched MatMuls, as an attention function of transformers'
``AttentionInterface`` (``act_attention=True``).

``ATTN_IMPLEMENTATION`` is registered with ``AttentionInterface`` (and, for the mask, ``AttentionMaskInterface``, with
transformers' eager additive mask). Any model whose attention modules call ``ALL_ATTENTION_FUNCTIONS`` (LLaMA, Qwen,
Mistral, ViT, DINOv2, ...) runs it once ``config._attn_implementation`` names it. It computes eager attention::

    P = softmax(q̂ k̂ᵀ · scaling + mask)        out = P̂ v̂

where ``q̂, k̂, v̂`` are fake-quantized with ``act_bits`` on the signed (``act_sym``) or asymmetric grid, and ``P̂``
on an unsigned grid (probabilities lie in ``[0, 1]``: zero point 0). Each attention module carries an
:class:`AttentionQuantizer` child (``attn_quant``) with one per-tensor ``(scale, zero)`` buffer pair per input, so
the scales are saved with the weights and restored on reload; with ``act_scale="dynamic"`` each call uses its
inputs' own min-max range instead. A module without a quantizer (not calibrated yet) runs float eager attention.

The scales are fitted per module with the same :class:`~optimum_bc.formats.activations.ActObserver` methods as the
Linear inputs (min-max, percentile or MSE search) while :func:`observing` is active (see
:mod:`optimum_bc.calibration.attention_observers`). All of this is simulated (float MatMuls on fake-quantized
inputs): there is no integer attention kernel here.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from ..formats.activations import ActObserver, ActSpec, fake_quantize, quantize_input, spec_from_config


#: The name this attention function is registered under (``config._attn_implementation``).
ATTN_IMPLEMENTATION = "optimum_bc_quant_attention"
#: Implementations a model may run before it is switched to ``ATTN_IMPLEMENTATION`` (the ones computing plain
#: softmax attention from an additive or boolean mask).
SWITCHABLE = (None, "eager", "sdpa", ATTN_IMPLEMENTATION)
#: The attention module's child holding the scales.
QUANT_ATTR = "attn_quant"
#: The MatMul inputs, in order: QKᵀ takes query and key, PV the probabilities and value.
INPUTS = ("query", "key", "probs", "value")
#: Keyword arguments of other attention variants that this eager computation does not implement.
UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")

# Per attention module, the observers of a calibration pass (see ``observing``; None outside one), the grids and
# fitting method they use, and the non-padding tokens of the batch being observed.
_observers: dict[nn.Module, dict[str, ActObserver]] | None = None
_specs: dict[str, ActSpec] = {}
_method, _seed = "minmax", 0
_valid: torch.Tensor | None = None


def input_specs(spec: ActSpec) -> dict[str, ActSpec]:
    """The grid of each MatMul input: ``spec`` (per tensor) for query, key, value; unsigned for the probabilities."""
    tensor = ActSpec(spec.bits, spec.sym, "tensor", spec.dynamic)
    probs = ActSpec(spec.bits, False, "tensor", spec.dynamic)
    return {name: probs if name == "probs" else tensor for name in INPUTS}


class AttentionQuantizer(nn.Module):
    """The fake quantizers of one attention module's MatMul inputs; static scales live in ``<input>_scale`` /
    ``<input>_zero`` buffers of shape ``[1]`` (zeros until fitted or loaded)."""

    def __init__(self, spec: ActSpec, params: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        super().__init__()
        self.specs = input_specs(spec)
        if not spec.dynamic:
            for name in INPUTS:
                scale, zero = (params or {}).get(name, (torch.zeros(1), torch.zeros(1)))
                self.register_buffer(f"{name}_scale", scale.detach().reshape(1).float().clone())
                self.register_buffer(f"{name}_zero", zero.detach().reshape(1).float().clone())

    def forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` (the MatMul input ``name``) fake-quantized."""
        spec = self.specs[name]
        if spec.dynamic:
            return quantize_input(x, spec)
        return fake_quantize(x, getattr(self, f"{name}_scale"), getattr(self, f"{name}_zero"), spec)

    def extra_repr(self) -> str:
        spec = self.specs["query"]
        kind = "dynamic" if spec.dynamic else "static"
        return f"bits={spec.bits}, sym={spec.sym}, {kind} per-tensor scales, unsigned probabilities"


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query heads: each key/value head repeated for its ``groups`` query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _observe(module: nn.Module, name: str, x: torch.Tensor) -> None:
    """Feed the rows of ``x`` ``[batch, heads, tokens, ...]`` at non-padding tokens to the module's observer (made on
    the module's first call)."""
    observers = _observers.get(module)
    if observers is None:
        observers = _observers[module] = {n: ActObserver(s, _method, _seed) for n, s in _specs.items()}
    rows = x.transpose(1, 2)  # [batch, tokens, heads, ...]
    if _valid is not None and _valid.shape == rows.shape[:2]:
        rows = rows[_valid.to(rows.device)]
    observers[name].add_batch(rows)


def quantized_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with fake-quantized MatMul inputs (``[batch, heads, tokens, head_dim]`` in, the output
    ``[batch, tokens, heads, head_dim]`` and the probabilities out, as transformers' eager functions)."""
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"act_attention=True: {type(module).__name__} passes {name}= to its attention function, which the "
                "quantized eager attention does not implement. Fix: act_attention=False for this model."
            )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    quant = getattr(module, QUANT_ATTR, None)
    observe = _observers is not None
    if observe:
        _observe(module, "query", query)
        _observe(module, "key", key)
        _observe(module, "value", value)
    elif quant is not None:
        query, key, value = quant("query", query), quant("key", key), quant("value", value)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    if observe:
        _observe(module, "probs", probs)
    elif quant is not None:
        probs = quant("probs", probs)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


@contextmanager
def observing(config: object) -> Iterator[dict[nn.Module, dict[str, ActObserver]]]:
    """Within the block, every call of ``quantized_attention`` feeds its MatMul inputs to its module's observers
    (fitting with ``config.act_scale``; the attention itself stays float); yields the observers by module."""
    global _observers, _specs, _method, _seed
    saved = (_observers, _specs, _method, _seed)
    _observers, _specs = {}, input_specs(spec_from_config(config))
    _method, _seed = config.act_scale, getattr(config, "seed", 0)
    try:
        yield _observers
    finally:
        _observers, _specs, _method, _seed = saved


@contextmanager
def valid_tokens(valid: torch.Tensor | None) -> Iterator[None]:
    """The ``[batch, tokens]`` non-padding mask of the batch being observed (padding enters no statistic)."""
    global _valid
    previous, _valid = _valid, valid
    try:
        yield
    finally:
        _valid = previous


def register() -> None:
    """Register the attention function and its (eager, additive) mask with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, quantized_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


def check_model(model: nn.Module) -> None:
    """Refuse, before any calibration, a model whose attention cannot run ``quantized_attention``."""
    name = type(model).__name__
    if not getattr(type(model), "_supports_attention_backend", False):
        raise ValueError(
            f"act_attention=True: {name} does not route its attention through transformers' AttentionInterface, so "
            "its attention MatMuls cannot be quantized. Fix: act_attention=False (the Linears' inputs still take "
            "act_bits)."
        )
    current = getattr(model.config, "_attn_implementation", None)
    if current not in SWITCHABLE:
        raise ValueError(
            f"act_attention=True: {name} was loaded with attn_implementation={current!r}, which cannot take "
            "quantized MatMul inputs. Fix: load it with attn_implementation='sdpa' (or 'eager'), or set "
            "act_attention=False."
        )


def enable(model: nn.Module) -> None:
    """Check ``model`` and switch its attention (and its sub-models') to ``ATTN_IMPLEMENTATION``."""
    check_model(model)
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


def attach(module: nn.Module, quantizer: AttentionQuantizer) -> None:
    """Give one attention module its quantizer (a child module, so its buffers enter the state dict)."""
    module.add_module(QUANT_ATTR, quantizer)


register()
