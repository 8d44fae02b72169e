"""Dense replacements of packed layers, for ``model.dequantize()``.

A packed layer becomes an ``nn.Linear`` holding its dequantized weight and its bias. A layer that also carries the
position-dependent BC buffers (``sink_bias`` from ``bc_sink_tokens``, or ``position_bias``) becomes a
:class:`BCDenseLinear`, an ``nn.Linear`` that keeps them, so the dequantized model computes what the packed model
computed. Such a model saves those buffers next to the weights, but stock ``transformers`` builds plain
``nn.Linear`` layers and drops them when reloading: it needs optimum-bc to reload
(:func:`restore_position_biases`). Quantize with ``bc_sink_tokens=0`` (and the channel granularity) to get a
checkpoint that stock ``transformers`` reloads with the same logits.
"""

import os
from pathlib import Path

import torch
from torch import nn

from ..layers.packed_base import PackedLinearBase, PositionBiases
from ..layers.positions import attach_position_hooks


POSITION_BUFFERS = ("sink_bias", "position_bias")


class BCDenseLinear(PositionBiases, nn.Linear):
    """``nn.Linear`` plus the BC ``sink_bias`` / ``position_bias`` buffers of the packed layer it replaces.

    Like the packed layers it reads the token positions its decoder block publishes (:mod:`optimum_bc.layers.positions`).
    Reloading a saved model that holds these layers needs optimum-bc (:func:`restore_position_biases`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        positions: int | None = None,
        sink_tokens: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=True, dtype=dtype, device=device)
        self._register_position_buffers(out_features, positions, sink_tokens, self.bias.dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` plus the bias of each row's token position."""
        return self._add_position_terms(super().forward(x), x)


def check_in_memory(layer: PackedLinearBase) -> None:
    """Refuse a packed layer whose tensors are on the meta device (offloaded): there is nothing to dequantize."""
    tensors = list(layer.buffers()) + list(layer.parameters())
    if any(t.is_meta for t in tensors):
        raise ValueError(
            f"{layer} has tensors on the meta device (offloaded with a device_map?); dequantize needs the packed "
            "layers in memory. Fix: load the model without disk/CPU offload before calling model.dequantize()"
        )


def dense_linear(layer: PackedLinearBase, dtype: torch.dtype) -> nn.Linear:
    """The dense layer computing what ``layer`` computes (reference path): ``nn.Linear``, or
    :class:`BCDenseLinear` when ``layer`` has a ``sink_bias`` or ``position_bias``."""
    check_in_memory(layer)
    device = layer.bias.device
    sink, table = layer.sink_bias, layer.position_bias
    if sink is None and table is None:
        dense = nn.Linear(layer.in_features, layer.out_features, bias=True, device="meta")
    else:
        dense = BCDenseLinear(
            layer.in_features,
            layer.out_features,
            positions=None if table is None else table.shape[0],
            sink_tokens=0 if sink is None else sink.shape[0],
            device="meta",
        )
        for name, tensor in ((n, getattr(layer, n)) for n in POSITION_BUFFERS):
            if tensor is not None:
                dense.register_buffer(name, tensor.detach().to(dtype=dtype, copy=True))
    dense.weight = nn.Parameter(layer.dequantize_weight(dtype).to(device))
    dense.bias = nn.Parameter(layer.bias.detach().to(dtype=dtype, copy=True))
    return dense


def restore_position_biases(model: nn.Module, checkpoint_dir: str | os.PathLike[str]) -> list[str]:
    """Give a stock-reloaded dequantized model back its ``sink_bias`` / ``position_bias`` layers.

    ``AutoModelForCausalLM.from_pretrained`` on a folder saved after ``model.dequantize()`` drops these buffers (the
    architecture has plain ``nn.Linear`` layers); this reads them from the folder's safetensors files, swaps each
    owning ``nn.Linear`` for a :class:`BCDenseLinear` with the same weight and bias, and attaches the hooks that
    publish token positions. Returns the names of the swapped layers.
    """
    from safetensors import safe_open

    from ..calibration.architectures import get_blocks, resolve_spec, set_module

    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors file in {os.fspath(checkpoint_dir)!r}; pass a save_pretrained folder")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                owner, _, name = key.rpartition(".")
                if name in POSITION_BUFFERS:
                    found.setdefault(owner, {})[name] = f.get_tensor(key)
    for owner, buffers in sorted(found.items()):
        linear = model.get_submodule(owner)
        if not isinstance(linear, nn.Linear) or linear.bias is None:
            raise ValueError(f"{owner!r} holds {sorted(buffers)} but is a {type(linear).__name__} without a bias")
        dense = BCDenseLinear(linear.in_features, linear.out_features, device="meta")
        dense.weight, dense.bias = linear.weight, linear.bias
        for name, tensor in buffers.items():
            dense.register_buffer(name, tensor.to(dtype=linear.bias.dtype, device=linear.bias.device))
        set_module(model, owner, dense)
    if found:
        attach_position_hooks(get_blocks(model, resolve_spec(model)), model)
    return sorted(found)
